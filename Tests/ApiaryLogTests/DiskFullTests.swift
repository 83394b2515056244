import ApiaryCore
@testable import ApiaryLog
import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// A real full disk: a 1 MiB tmpfs mounted for the test (needs root on Linux; skipped otherwise).
final class DiskFullTests: XCTestCase {
    /// Mounts a tmpfs of `sizeKiB` on a fresh directory, unmounted and removed at teardown.
    private func mountSmallFileSystem(sizeKiB: Int = 1024) throws -> String {
        #if os(Linux)
        guard getuid() == 0 else { throw XCTSkip("mounting a tmpfs needs root; running as uid \(getuid())") }
        let mountPoint = try makeTemporaryDirectory(self)
        let (status, output) = try run(["mount", "-t", "tmpfs", "-o", "size=\(sizeKiB)k", "tmpfs", mountPoint])
        guard status == 0 else { throw XCTSkip("cannot mount a tmpfs (\(output.trimmingCharacters(in: .whitespacesAndNewlines))); no full-disk test here") }
        // Registered after the directory's removal, so it runs first (teardown blocks run last-in, first-out).
        addTeardownBlock { [self] in
            let (status, output) = try run(["umount", mountPoint])
            XCTAssertEqual(status, 0, "umount \(mountPoint): \(output)")
        }
        return mountPoint
        #else
        throw XCTSkip("the full-disk test mounts a Linux tmpfs")
        #endif
    }

    private func run(_ arguments: [String]) throws -> (Int32, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return (process.terminationStatus, output)
    }

    /// Writes a file until the file system refuses another byte.
    private func fill(_ path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw POSIX.error("open filler", path: path) }
        defer { close(fd) }
        var chunkBytes = 64 * 1024
        while chunkBytes >= 1 {
            let chunk = [UInt8](repeating: 0xEE, count: chunkBytes)
            if chunk.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == chunkBytes { continue }
            guard errno == ENOSPC || errno == 0 else { throw POSIX.error("fill", path: path) }
            chunkBytes /= 2
        }
    }

    func testAppendOnFullDiskFailsCleanlyAndLogReopensIntact() throws {
        let mountPoint = try mountSmallFileSystem()
        let dir = mountPoint + "/tenant"
        let options = ReplicationLog.Options(segmentBytesMax: 4 << 20)
        let log = try ReplicationLog(directory: dir, options: options)
        try appendRecords(log, 1...20, pageCount: 2, pageBytes: 4096)
        let segment = dir + "/00000000000000000001.log"

        try fill(mountPoint + "/filler")
        // The zeros written ahead still take a few records (that space was set aside before
        // the disk filled); past them, an append must fail cleanly.
        func record(_ lsn: LSN) -> Record { makeRecord(lsn: lsn, pageCount: 3, pageBytes: 4096) }
        var next = LSN(21)
        var error: LogError?
        while error == nil, next < 100 {
            do {
                try log.append(record(next))
                try log.sync()
                next += 1
            } catch let e as LogError {
                error = e
            }
        }
        let synced = log.last
        XCTAssertEqual(error?.code, .diskFull, "\(String(describing: error))")
        XCTAssertEqual(error?.path, segment)
        XCTAssertTrue(error?.description.contains("No space left on device") ?? false, error?.description ?? "")
        // As before the append: nothing half-written, in memory or on disk.
        XCTAssertEqual(synced.lsn, next - 1)
        try assertZerosOnly(segment, from: log.sizeBytes)
        assertLogError(.diskFull) { try log.append(record(next)) } // still full, still clean
        try log.sync()
        log.close()

        // Reopening needs no space and finds every synced record, and no torn tail.
        let reopened = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(reopened.recoveredTornTailBytes, 0)
        XCTAssertEqual(reopened.last, synced)
        XCTAssertEqual(try reopened.records(from: 1, countMax: 200, bytesMax: 64 << 20),
                       (1...20).map { makeRecord(lsn: $0, pageCount: 2, pageBytes: 4096) } + (21..<next).map(record))

        // Once space is freed the same append goes through.
        try FileManager.default.removeItem(atPath: mountPoint + "/filler")
        try reopened.append(record(next))
        try reopened.sync()
        XCTAssertEqual(try reopened.record(at: next), record(next))
    }

    func testRollOnFullDiskFailsCleanly() throws {
        let mountPoint = try mountSmallFileSystem()
        let dir = mountPoint + "/tenant"
        let frame = frameBytes(pageCount: 1, pageBytes: 1000)
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 4 * frame)
        let log = try ReplicationLog(directory: dir, options: options)
        try appendRecords(log, 1...4, pageCount: 1, pageBytes: 1000) // the first segment is now full
        try fill(mountPoint + "/filler")

        // The next append needs a new segment, whose header finds no room.
        assertLogError(.diskFull) { try log.append(makeRecord(lsn: 5, pageCount: 1, pageBytes: 1000)) }
        XCTAssertEqual(log.last.lsn, 4)
        XCTAssertEqual(log.segmentCount, 1)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["00000000000000000001.log"],
                       "no half-made segment or temporary file is left behind")
        log.close()

        try FileManager.default.removeItem(atPath: mountPoint + "/filler")
        let reopened = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(reopened.last.lsn, 4)
        try appendRecords(reopened, 5...5, pageCount: 1, pageBytes: 1000)
        XCTAssertEqual(reopened.segmentCount, 2)
    }
}
