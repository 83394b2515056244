import ApiaryNode
import Foundation
import XCTest

/// A record damaged in the middle of a log stops the node at start with an error that names
/// the file and the offset; nothing is served from a log that cannot be trusted.
final class CorruptLogTests: XCTestCase {
    func testNodeRefusesToStartOnACorruptLogAndSaysWhere() async throws {
        let (cluster, directory, api) = try startSinglePrimary("corrupt")
        let executable = cluster.executable
        let c = try await api.connect()
        try await createTenant("acme", on: c)
        try await executeEach(["CREATE TABLE t (x)"] + (0..<20).map { "INSERT INTO t VALUES (\($0))" }, tenant: "acme", on: c)
        await c.close()
        cluster.stopAll()

        // Flip a byte in the middle of the segment: inside an early record, with whole records after it.
        let segment = directory + "/node-a/tenants/acme/log/00000000000000000001.log"
        var bytes = try XCTUnwrap(FileManager.default.contents(atPath: segment))
        // (The segment may end in zeros the log wrote ahead of its appends: aim inside the records.)
        let recordsEnd = (bytes.lastIndex { $0 != 0 } ?? 0) + 1
        let offset = recordsEnd / 3
        bytes[offset] ^= 0xFF
        try bytes.write(to: URL(fileURLWithPath: segment))

        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = cluster.arguments(cluster.primary)
        let stderr = Pipe()
        process.standardError = stderr
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(30)
        while process.isRunning && Date() < deadline { try await Task.sleep(for: .milliseconds(50)) }
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
        let message = String(decoding: stderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertNotEqual(process.terminationStatus, 0, "the node must not start on a corrupt log")
        XCTAssertTrue(message.contains("00000000000000000001.log"), "names the file: \(message)")
        XCTAssertTrue(message.contains("@ byte "), "names the offset: \(message)")
    }
}
