import ApiaryMonitor
import ApiaryLifecycle
import ApiaryMonitorService
import ApiaryNode
import ApiaryTLS
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import XCTest

/// A real `apiary monitor` process on loopback, with test clients holding node and operator
/// certificates in place of real nodes. Time is driven by heartbeats and the monitor's own
/// tick; every wait is a bounded poll for a condition.
final class MonitorProcessTests: XCTestCase {
    static let primaryTimeoutMs: Int64 = 300

    func testPrimaryLostThenRestartLosesNothingAndDecidesNothingDuringGrace() async throws {
        let env = try MonitorEnvironment(test: self)
        var monitor = try env.start()
        let a = try await env.client("node-a", port: monitor.port)
        let b = try await env.client("node-b", port: monitor.port)
        let op = try await env.client("operator", port: monitor.port)

        // 1. Both nodes follow their goals (a model keeper: it reports reaching each goal at
        //    once) until the standby is in sync and promotable.
        var goalA: AssignmentBody?, goalB: AssignmentBody?
        var status = try await env.status(op)
        for _ in 0..<200 {
            goalA = try await env.beat(a, HeartbeatBody(role: "primary", epoch: 1, reached: goalA.map { .init(state: $0.goal, sequence: $0.sequence) },
                                                        tenants: ["t1": .init(lsn: 10, standbyLSN: 10)], streaming: true)).assignment
            goalB = try await env.beat(b, HeartbeatBody(role: "standby", epoch: 1, reached: goalB.map { .init(state: $0.goal, sequence: $0.sequence) },
                                                        tenants: ["t1": .init(lsn: 10)], streaming: true)).assignment
            status = try await env.status(op)
            if status.nodes[1].promotable { break }
        }
        XCTAssertEqual(status.nodes.map(\.goal), ["primary", "secondary"], "\(status)")
        XCTAssertTrue(status.nodes[1].promotable, "\(status)")
        XCTAssertEqual(goalA?.goal, "primary")
        XCTAssertEqual(goalB?.goal, "secondary")
        XCTAssertEqual(goalB?.peer, "node-a")

        // 2. The primary goes silent; the standby confirms it lost the stream. The monitor
        //    promotes only after its timeout: the standby is told wait_primary in epoch 2.
        let secondary = try XCTUnwrap(goalB)
        let lastPrimaryBeat = Date()
        _ = try await env.beat(a, HeartbeatBody(role: "primary", epoch: 1, reached: .init(state: "primary", sequence: goalA!.sequence),
                                                tenants: ["t1": .init(lsn: 10, standbyLSN: 10)], streaming: true))
        var promotion: AssignmentBody?
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            let answer = try await env.beat(b, HeartbeatBody(role: "standby", epoch: 1, reached: .init(state: "secondary", sequence: secondary.sequence),
                                                             tenants: ["t1": .init(lsn: 10)], streaming: false)).assignment
            if answer?.epoch == 2 { promotion = answer; break }
            XCTAssertEqual(answer, secondary, "until the timeout the standby keeps its goal")
        }
        let promoted = try XCTUnwrap(promotion, "no promotion within 20 s")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(lastPrimaryBeat) * 1000, Double(Self.primaryTimeoutMs))
        XCTAssertEqual(promoted.goal, "wait_primary")
        XCTAssertEqual(promoted.peer, "node-a")
        let before = try await env.status(op)
        XCTAssertEqual(before.epoch, 2)
        XCTAssertEqual(before.nodes.map(\.goal), ["demoted", "wait_primary"])
        let historyBefore = try await env.events(op)
        XCTAssertTrue(historyBefore.contains { $0.kind == "decision" && $0.epoch == 2 }, "\(historyBefore)")

        // 3. Restart the monitor process: it loads everything, and with node-a silent it stays
        //    in its startup grace, deciding nothing while node-b keeps reporting.
        for c in [a, b, op] { await c.close() }
        monitor.stop()
        monitor = try env.start()
        let b2 = try await env.client("node-b", port: monitor.port)
        let op2 = try await env.client("operator", port: monitor.port)
        var after = try await env.status(op2)
        XCTAssertFalse(after.deciding)
        XCTAssertEqual(after.epoch, before.epoch)
        XCTAssertEqual(after.lastEvent, before.lastEvent)
        XCTAssertEqual(after.nodes.map(\.goal), before.nodes.map(\.goal))
        XCTAssertEqual(after.nodes.map(\.goalSequence), before.nodes.map(\.goalSequence))
        XCTAssertEqual(after.nodes.map(\.promotable), before.nodes.map(\.promotable))
        let historyAfter = try await env.events(op2)
        XCTAssertEqual(historyAfter, historyBefore, "the history survives the restart")
        for _ in 0..<10 {
            // As its keeper would after promoting: primary in epoch 2, committing alone.
            let answer = try await env.beat(b2, HeartbeatBody(role: "primary", epoch: 2, reached: .init(state: "wait_primary", sequence: promoted.sequence),
                                                              tenants: ["t1": .init(lsn: 11)], streaming: false)).assignment
            XCTAssertEqual(answer, promoted)
        }
        after = try await env.status(op2)
        XCTAssertFalse(after.deciding)
        let newEvents = try await env.events(op2, after: before.lastEvent)
        XCTAssertFalse(newEvents.contains { $0.kind == "decision" }, "decided during the startup grace: \(newEvents)")
        XCTAssertEqual(after.nodes.map(\.goalSequence), before.nodes.map(\.goalSequence))
        for c in [b2, op2] { await c.close() }
        monitor.stop()
    }

    func testHeartbeatsNeedTheNodesOwnCertificate() async throws {
        let env = try MonitorEnvironment(test: self)
        let monitor = try env.start()
        defer { monitor.stop() }
        let report = HeartbeatBody(role: "primary", epoch: 1, reached: nil, streaming: false)

        let op = try await env.client("operator", port: monitor.port)
        let byOperator = try await env.beat(op, report)
        XCTAssertEqual(byOperator.status, 403)
        XCTAssertEqual(byOperator.error?.code, "forbidden")

        let stranger = try await env.client("node-x", port: monitor.port)
        let byStranger = try await env.beat(stranger, report)
        XCTAssertEqual(byStranger.status, 403, "a node certificate of a node outside the formation")
        XCTAssertTrue(byStranger.error?.error.contains("not a node of formation") ?? false, "\(String(describing: byStranger.error))")

        let a = try await env.client("node-a", port: monitor.port)
        let nodeStatus = try await a.request(.GET, "/status")
        XCTAssertEqual(nodeStatus.status, 403, "status is for operators")
        let byNode = try await env.beat(a, report)
        XCTAssertEqual(byNode.status, 200)

        // node-a's name, but issued by another CA: refused by TLS.
        var refused = false
        do {
            let foreign = try await env.client("node-a", port: monitor.port, directory: env.foreignCerts)
            let r = try await foreign.request(.POST, "/heartbeat", body: JSON.encodeForTests(report))
            refused = r.status != 200
        } catch {
            refused = true
        }
        XCTAssertTrue(refused, "a certificate from a foreign CA was accepted")

        let events = try await env.events(op)
        XCTAssertTrue(events.contains { $0.kind == "refusal" && $0.node == "operator" }, "\(events)")
        XCTAssertTrue(events.contains { $0.kind == "refusal" && $0.node == "node-x" }, "\(events)")
        for c in [op, stranger, a] { await c.close() }
    }
}

final class MonitorNotifyTests: XCTestCase {
    /// Under a notify socket, as systemd runs `Type=notify` with `WatchdogSec=`: READY=1 with
    /// the formation and epoch once it serves, watchdog pings while the tick runs, STOPPING=1.
    func testTheMonitorTellsSystemdItIsReadyAliveAndStopping() async throws {
        let env = try MonitorEnvironment(test: self)
        let socket = try NotifySocketListener(path: NSTemporaryDirectory() + "apiary-sd-\(UUID().uuidString.prefix(8)).sock")
        let monitor = try env.start(environment: ["NOTIFY_SOCKET": socket.path, "WATCHDOG_USEC": "400000"])
        defer { monitor.stop() }
        let ready = socket.receive(until: { $0.contains("READY=1") })
        XCTAssertTrue(ready?.contains("STATUS=monitor of formation f1, epoch 1") ?? false, ready ?? "no READY=1")
        // READY=1 comes after the port listens: an operator is answered at once.
        let op = try await env.client("operator", port: monitor.port)
        let status = try await env.status(op)
        XCTAssertEqual(status.formation, "f1")
        await op.close()
        for _ in 0..<3 { XCTAssertNotNil(socket.receive(until: { $0 == "WATCHDOG=1" }), "watchdog pings stopped") }
        kill(monitor.process.processIdentifier, SIGTERM)
        XCTAssertNotNil(socket.receive(until: { $0.contains("STOPPING=1") }), "no STOPPING=1 on SIGTERM")
    }
}

// MARK: - Support

enum JSON {
    static func encodeForTests<T: Encodable>(_ value: T) -> [UInt8] { Array(try! JSONEncoder().encode(value)) }
}

struct BeatResult {
    var status: Int
    var assignment: AssignmentBody?
    var error: ErrorBody?
}

/// Certificates, a data directory and the way to start `apiary monitor` for one test.
struct MonitorEnvironment {
    let directory: String
    var certs: String { directory + "/certs" }
    var foreignCerts: String { directory + "/foreign" }
    let executable: String

    init(test: XCTestCase) throws {
        directory = NSTemporaryDirectory() + "apiary-monitor-" + UUID().uuidString
        executable = try monitorTestExecutable()
        let dir = directory
        test.addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try CertificateAuthority.create(in: certs)
        for (role, name) in [(ClusterRole.node, "node-a"), (.node, "node-b"), (.node, "node-x"), (.operator, "operator"), (.monitor, "monitor")] {
            try ca.issue(PeerIdentity(role: role, name: name), into: certs)
        }
        let foreign = try CertificateAuthority.create(in: foreignCerts)
        try foreign.issue(PeerIdentity(role: .node, name: "node-a"), into: foreignCerts)
    }

    /// Starts the monitor and waits (bounded) for its ready line.
    func start(environment: [String: String] = [:]) throws -> MonitorHandle {
        let log = directory + "/monitor-\(UUID().uuidString.prefix(8)).log"
        FileManager.default.createFile(atPath: log, contents: nil)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = ["monitor", "--data", directory + "/data", "--certs", certs, "--listen", "127.0.0.1:0",
                             "--formation", "f1", "--primary", "node-a@zone-a", "--standby", "node-b@zone-b",
                             "--primary-timeout-ms", String(MonitorProcessTests.primaryTimeoutMs), "--standby-timeout-ms", "1000",
                             "--startup-grace-ms", "60000", "--tick-interval-ms", "20", "--log-level", "notice"]
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        // The port appears in the ready line: a reader thread copies the output to the log and
        // signals when the line (or the output's end) comes; nothing polls.
        let found = DispatchSemaphore(value: 0)
        final class Seen: @unchecked Sendable { var text = ""; var port: Int?; var signalled = false }
        let seen = Seen()
        let output = pipe.fileHandleForReading
        let reader = Thread {
            while true {
                let data = output.availableData
                if data.isEmpty { break }
                handle.write(data)
                seen.text += String(decoding: data, as: UTF8.self)
                if seen.port == nil, let range = seen.text.range(of: "listen=https://127.0.0.1:") {
                    let digits = seen.text[range.upperBound...].prefix { $0.isNumber }
                    if let port = Int(digits), seen.text[range.upperBound...].count > digits.count {
                        seen.port = port
                        seen.signalled = true
                        found.signal()
                    }
                }
            }
            if !seen.signalled { found.signal() }
        }
        try process.run()
        try? pipe.fileHandleForWriting.close()
        reader.start()
        if found.wait(timeout: .now() + 30) == .success {
            if let port = seen.port { return MonitorHandle(process: process, port: port, log: log) }
            throw MonitorTestError("the monitor exited before it was ready: \(seen.text)")
        }
        process.terminate()
        throw MonitorTestError("the monitor was not ready within 30 s; see \(log)")
    }

    func client(_ name: String, port: Int, directory: String? = nil) async throws -> HTTPSConnection {
        let credentials = try ClusterCredentials(directory: directory ?? certs, name: name)
        var tls = credentials.clusterClient()
        if directory != nil { tls.trustRoots = .file(certs + "/ca.pem") } // trust the real monitor, present the foreign cert
        return try await HTTPSConnection.connect(host: "127.0.0.1", port: port, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
    }

    func beat(_ c: HTTPSConnection, _ body: HeartbeatBody) async throws -> BeatResult {
        let r = try await c.request(.POST, "/heartbeat", body: JSON.encodeForTests(body))
        if r.status == 200 { return BeatResult(status: 200, assignment: try JSONDecoder().decode(AssignmentBody.self, from: Data(r.body))) }
        return BeatResult(status: r.status, error: try? JSONDecoder().decode(ErrorBody.self, from: Data(r.body)))
    }

    func status(_ c: HTTPSConnection) async throws -> StatusBody {
        let r = try await c.request(.GET, "/status")
        guard r.status == 200 else { throw MonitorTestError("status \(r.status): \(r.text)") }
        return try JSONDecoder().decode(StatusBody.self, from: Data(r.body))
    }

    func events(_ c: HTTPSConnection, after: UInt64 = 0) async throws -> [EventsBody.Event] {
        let r = try await c.request(.GET, "/events?after=\(after)&limit=1000")
        guard r.status == 200 else { throw MonitorTestError("events \(r.status): \(r.text)") }
        return try JSONDecoder().decode(EventsBody.self, from: Data(r.body)).events
    }
}

struct MonitorHandle {
    let process: Process
    let port: Int
    let log: String

    /// SIGTERM, then waits (bounded) for the exit; SIGKILL past it.
    func stop() {
        guard process.isRunning else { return }
        let exited = DispatchSemaphore(value: 0)
        process.terminationHandler = { _ in exited.signal() }
        process.terminate()
        if process.isRunning, exited.wait(timeout: .now() + 10) == .timedOut { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
}

struct MonitorTestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The `apiary` binary next to the test bundle (`swift build --build-tests` builds both).
func monitorTestExecutable() throws -> String {
    let testBinary = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? "/proc/self/exe")
    for dir in [testBinary.deletingLastPathComponent(), testBinary.deletingLastPathComponent().deletingLastPathComponent()] {
        let path = dir.appendingPathComponent("apiary").path
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    throw XCTSkip("the apiary executable was not built next to the tests (run swift build --build-tests first)")
}
