import Foundation
import XCTest

/// Real rqlite client libraries from PyPI, unchanged, against a real node: pyrqlite,
/// sqlalchemy-rqlite with SQLAlchemy 2.0, rqdb (sync and async). `Tests/clients/run.sh` makes
/// the virtual environment (pinned versions), starts the node, creates a tenant and users with
/// `apiary ctl`, and runs the Python tests; this runs it in `swift test`, so CI does.
///
/// Skipped only when the Python package index cannot be reached (the script exits 77 and says
/// so); any other trouble, a missing python3 included, fails with the script's output.
final class RqliteClientsTests: XCTestCase {
    static let timeoutSeconds = 900.0

    func testRealRqliteClientsFromPyPI() throws {
        try runClients()
    }

    /// The same clients, unchanged, pointed at a gateway (in front of a node under a monitor).
    func testRealRqliteClientsThroughAGateway() throws {
        try runClients(["--through-gateway"])
    }

    /// pyrqlite and sqlalchemy-rqlite, unchanged, pointed at a standby: they follow its 301s to
    /// the primary (rqlite's redirect). rqdb is skipped there: it reaches the cluster through a
    /// plain-HTTP sidecar, and the 301 names the primary's https address.
    func testRealRqliteClientsPointedAtAStandby() throws {
        try runClients(["--through-standby"])
    }

    func runClients(_ arguments: [String] = []) throws {
        let apiary = try apiaryExecutable()
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let script = root.appendingPathComponent("Tests/clients/run.sh").path
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("apiary-clients-\(UUID().uuidString).log")
        FileManager.default.createFile(atPath: output.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: output) }
        let log = try FileHandle(forWritingTo: output)
        defer { try? log.close() }

        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [script] + arguments
        var environment = ProcessInfo.processInfo.environment
        environment["APIARY"] = apiary
        environment["APIARY_CLIENTS_VENV"] = root.appendingPathComponent(".build/clients-venv").path
        process.environment = environment
        process.standardOutput = log
        process.standardError = log
        let ended = DispatchSemaphore(value: 0)
        process.terminationHandler = { _ in ended.signal() }
        try process.run()
        if ended.wait(timeout: .now() + Self.timeoutSeconds) == .timedOut {
            process.terminate()
            ended.wait()
            XCTFail("Tests/clients/run.sh ran longer than \(Int(Self.timeoutSeconds)) s:\n\(Self.tail(output))")
            return
        }
        switch process.terminationStatus {
        case 0: return
        case 77: throw XCTSkip(Self.tail(output, lines: 10))
        case let status: XCTFail("Tests/clients/run.sh failed (exit \(status)):\n\(Self.tail(output))")
        }
    }

    static func tail(_ file: URL, lines: Int = 200) -> String {
        let text = (try? String(contentsOf: file, encoding: .utf8)) ?? ""
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }
}
