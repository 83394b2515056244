import ApiaryMonitor
import ApiaryNode
import ApiaryTLS
import Foundation
import NIOHTTP1
import NIOPosix
import NIOSSL
import XCTest

/// Automatic failover with real processes on loopback (issue 8): a monitor and two nodes that
/// follow its goals. Under continuous writes from concurrent clients the primary is killed with
/// SIGKILL, again and again, alternating which node is primary: the standby is promoted,
/// writes resume, the killed node restarts, rejoins as the standby with no operator action, and
/// in the end no acknowledged write is missing and both replicas are identical.
///
/// Every wait is for a condition (the monitor's status, a count of acknowledged writes), bounded.
final class AutomaticFailoverTests: NodeProcessTestCase {
    static let tenant = "failover"

    override func setUp() async throws {
        directory = NSTemporaryDirectory() + "apiary-failover-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               monitorArguments: ["--tick-interval-ms", "20"])
        try cluster.startBoth()
    }

    func testKillingThePrimaryTenTimesLosesNoAcknowledgedWrite() async throws {
        let kills = Int(ProcessInfo.processInfo.environment["APIARY_FAILOVER_KILLS"] ?? "") ?? 10
        let monitor = try await MonitorClient(cluster: cluster)
        var primary = cluster.primary
        try await monitor.waitUntil("node-a primary in sync with a promotable node-b", timeoutSeconds: 60) { s in
            s.node(primary.name)?.goal == "primary" && s.node(primary.name)?.reported == "primary" && s.node(self.cluster.peer(of: primary).name)?.promotable == true
        }
        let ledger = WriteLedger()
        let writers = (0..<3).map { w in
            Task { await self.write(as: w, ledger: ledger) }
        }
        defer { ledger.stop() }

        var epochs: [UInt64] = []
        for round in 1...kills {
            let standby = cluster.peer(of: primary)
            // Kill only a primary that has a promotable standby and takes writes.
            try await monitor.waitUntil("round \(round): \(standby.name) promotable under \(primary.name)", timeoutSeconds: 60) { s in
                s.node(primary.name)?.goal == "primary" && s.node(standby.name)?.promotable == true && s.node(standby.name)?.reported == "secondary"
            }
            try await ledger.waitForMoreAcks(5, timeoutSeconds: 60)
            let before = try await monitor.status().epoch
            cluster.kill(primary)
            // The standby is promoted and takes the writes.
            try await monitor.waitUntil("round \(round): \(standby.name) promoted", timeoutSeconds: 30) { s in
                s.epoch > before && s.node(standby.name)?.goal.hasPrefix("wait_primary") == true && s.node(standby.name)?.reported == "wait_primary"
            }
            try await ledger.waitForMoreAcks(5, timeoutSeconds: 30)
            epochs.append(try await monitor.status().epoch)
            // The killed node restarts (as the primary of its old epoch, as its state file says),
            // steps down and rejoins as the standby by itself.
            try cluster.start(primary)
            try await monitor.waitUntil("round \(round): \(primary.name) rejoined as the standby", timeoutSeconds: 60) { s in
                s.node(primary.name)?.reported == "secondary" && s.node(primary.name)?.promotable == true
            }
            print("failover round \(round): \(standby.name) took over in epoch \(epochs.last!), \(primary.name) rejoined; \(ledger.acknowledged.count) writes acknowledged")
            fflush(stdout)
            primary = standby
        }
        ledger.stop()
        for writer in writers { await writer.value }

        XCTAssertEqual(epochs, epochs.sorted(), "epochs only grow")
        XCTAssertEqual(Set(epochs).count, kills, "one new epoch per failover")
        // Every acknowledged write is on the primary, once.
        let api = APIClient(port: primary.apiPort, caPath: cluster.certificates + "/ca.pem")
        let connection = try await api.connect()
        defer { Task { await connection.close() } }
        let r = try await connection.request(.GET, "/db/query?q=" + "SELECT id FROM t".addingPercentEncoding(withAllowedCharacters: .alphanumerics)!,
                                             headers: [("X-Apiary-Tenant", Self.tenant)])
        XCTAssertEqual(r.status, 200, r.text)
        let held = Set(Self.ids(in: r))
        let acked = ledger.acknowledged
        XCTAssertGreaterThan(acked.count, kills * 10)
        XCTAssertEqual(acked.subtracting(held), [], "acknowledged writes missing after \(kills) failovers")
        // Both replicas identical.
        let report = try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", primary.apiPort), standby: ("127.0.0.1", cluster.peer(of: primary).apiPort), waitMs: 30_000)
        XCTAssertTrue(report.consistent, report.text)
    }

    /// The operator's commands through `apiary ctl` against the monitor: a planned switchover
    /// and a failover drill under writes (nothing acknowledged lost, both replicas identical in
    /// the end), and the refusals of unsafe commands, each with its reason and an exit status of 1.
    func testSwitchoverAndFailoverDrillByCommandAndUnsafeCommandsRefused() async throws {
        let monitor = try await MonitorClient(cluster: cluster)
        let a = cluster.primary, b = cluster.standby
        try await monitor.waitUntil("node-b promotable", timeoutSeconds: 60) { s in
            s.node(a.name)?.reported == "primary" && s.node(b.name)?.promotable == true && s.node(b.name)?.reported == "secondary"
        }
        // ctl status: the writer holds its standby's lease, the standby's lag per tenant.
        let table = try ctl(["status"])
        XCTAssertEqual(table.status, 0, table.output)
        XCTAssertTrue(table.output.contains("LEASE") && table.output.contains("held"), table.output)
        let json = try ctl(["status", "--json"])
        let status = try JSONDecoder().decode(StatusBody.self, from: Data(json.output.utf8))
        XCTAssertEqual(status.node(a.name)?.lease, true, json.output)
        XCTAssertNotNil(status.node(b.name)?.lag, json.output)
        // Promoting the writer itself is refused, with the reason.
        let refusedPromote = try ctl(["promote", a.name])
        XCTAssertEqual(refusedPromote.status, 1, refusedPromote.output)
        XCTAssertTrue(refusedPromote.output.contains("refused"), refusedPromote.output)

        let ledger = WriteLedger()
        let writers = (0..<2).map { w in Task { await self.write(as: w, ledger: ledger) } }
        defer { ledger.stop() }
        try await ledger.waitForMoreAcks(20, timeoutSeconds: 60)

        // 1. Planned switchover: node-b takes over, node-a rejoins.
        let switchover = try ctl(["switchover"])
        XCTAssertEqual(switchover.status, 0, switchover.output)
        XCTAssertTrue(switchover.output.contains("switchover started"), switchover.output)
        try await monitor.waitUntil("node-b primary after the switchover, node-a its promotable standby", timeoutSeconds: 60) { s in
            s.epoch == 2 && s.node(b.name)?.reported == "primary" && s.node(a.name)?.reported == "secondary" && s.node(a.name)?.promotable == true
        }
        try await ledger.waitForMoreAcks(20, timeoutSeconds: 60)

        // 2. A failover drill: node-a promoted at once, node-b rejoins.
        let drill = try ctl(["failover"])
        XCTAssertEqual(drill.status, 0, drill.output)
        // Right after the drill node-b is not in sync: a switchover is refused, with the reason.
        let early = try ctl(["switchover"])
        XCTAssertEqual(early.status, 1, early.output)
        XCTAssertTrue(early.output.contains("refused"), early.output)
        try await monitor.waitUntil("node-a primary after the drill, node-b its promotable standby", timeoutSeconds: 60) { s in
            s.epoch == 3 && s.node(a.name)?.reported == "primary" && s.node(b.name)?.reported == "secondary" && s.node(b.name)?.promotable == true
        }
        try await ledger.waitForMoreAcks(20, timeoutSeconds: 60)
        ledger.stop()
        for writer in writers { await writer.value }

        // Bad input: an unknown node, an unknown maintenance state.
        let unknown = try ctl(["maintenance", "on", "node-z"])
        XCTAssertEqual(unknown.status, 1, unknown.output)
        let events = try ctl(["events", "--limit", "1000"])
        XCTAssertTrue(events.output.contains("switchover asked"), events.output)
        XCTAssertTrue(events.output.contains("failover drill"), events.output)
        XCTAssertTrue(events.output.contains("switchover refused"), events.output)

        let api = APIClient(port: a.apiPort, caPath: cluster.certificates + "/ca.pem")
        let connection = try await api.connect()
        defer { Task { await connection.close() } }
        let r = try await connection.request(.GET, "/db/query?q=" + "SELECT id FROM t".addingPercentEncoding(withAllowedCharacters: .alphanumerics)!,
                                             headers: [("X-Apiary-Tenant", Self.tenant)])
        XCTAssertEqual(ledger.acknowledged.subtracting(Self.ids(in: r)), [], "acknowledged writes missing after a switchover and a drill")
        let report = try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", a.apiPort), standby: ("127.0.0.1", b.apiPort), waitMs: 30_000)
        XCTAssertTrue(report.consistent, report.text)
    }

    /// The standby dies: the monitor marks it not promotable and lets the primary commit alone
    /// (`wait_primary`), so writes go on; it comes back, catches up, and the pair is in sync
    /// again. Then the monitor dies: in sync mode the pair keeps serving without it, and a
    /// restarted monitor takes up where it was.
    func testStandbyLossLetsThePrimaryCommitAloneAndTheMonitorsLossChangesNothing() async throws {
        let monitor = try await MonitorClient(cluster: cluster)
        let a = cluster.primary, b = cluster.standby
        try await monitor.waitUntil("in sync", timeoutSeconds: 60) { s in s.node(b.name)?.promotable == true && s.node(a.name)?.reported == "primary" }
        let ledger = WriteLedger()
        let writers = (0..<2).map { w in Task { await self.write(as: w, ledger: ledger) } }
        defer { ledger.stop() }
        try await ledger.waitForMoreAcks(10, timeoutSeconds: 60)

        cluster.kill(b)
        try await monitor.waitUntil("node-a commits alone, node-b not promotable", timeoutSeconds: 30) { s in
            s.node(a.name)?.reported == "wait_primary" && s.node(b.name)?.promotable == false && s.epoch == 1
        }
        try await ledger.waitForMoreAcks(10, timeoutSeconds: 30)
        try cluster.start(b)
        try await monitor.waitUntil("back in sync", timeoutSeconds: 60) { s in
            s.node(a.name)?.reported == "primary" && s.node(b.name)?.reported == "secondary" && s.node(b.name)?.promotable == true
        }
        try await ledger.waitForMoreAcks(10, timeoutSeconds: 30)

        // The monitor is lost: nothing changes, writes go on in sync mode.
        cluster.kill(cluster.monitor!)
        try await ledger.waitForMoreAcks(20, timeoutSeconds: 30)
        try cluster.start(cluster.monitor!)
        try await monitor.waitUntil("the restarted monitor sees the same formation", timeoutSeconds: 60) { s in
            s.deciding && s.epoch == 1 && s.node(a.name)?.goal == "primary" && s.node(b.name)?.promotable == true
        }
        try await ledger.waitForMoreAcks(10, timeoutSeconds: 30)
        ledger.stop()
        for writer in writers { await writer.value }

        let api = APIClient(port: a.apiPort, caPath: cluster.certificates + "/ca.pem")
        let connection = try await api.connect()
        defer { Task { await connection.close() } }
        let r = try await connection.request(.GET, "/db/query?q=" + "SELECT id FROM t".addingPercentEncoding(withAllowedCharacters: .alphanumerics)!,
                                             headers: [("X-Apiary-Tenant", Self.tenant)])
        XCTAssertEqual(ledger.acknowledged.subtracting(Self.ids(in: r)), [])
        let report = try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", a.apiPort), standby: ("127.0.0.1", b.apiPort), waitMs: 30_000)
        XCTAssertTrue(report.consistent, report.text)
    }

    /// The topology watch (for gateways): a long poll that answers when the writer changes,
    /// with the new epoch and writer, and after its wait with the same version when nothing does.
    func testTheTopologyWatchAnswersWhenThePrimaryChanges() async throws {
        let monitor = try await MonitorClient(cluster: cluster)
        try await monitor.waitUntil("in sync", timeoutSeconds: 60) { s in s.node("node-b")?.promotable == true && s.node("node-a")?.reported == "primary" }
        let gateway = try ClusterCredentials(directory: cluster.certificates, name: "gateway").clusterClient()
        func topology(_ query: String) async throws -> TopologyBody {
            let c = try await HTTPSConnection.connect(host: "127.0.0.1", port: cluster.monitor!.apiPort, tls: gateway, group: MultiThreadedEventLoopGroup.singleton)
            defer { Task { await c.close() } }
            let r = try await c.request(.GET, "/topology" + query)
            XCTAssertEqual(r.status, 200, r.text)
            return try JSONDecoder().decode(TopologyBody.self, from: Data(r.body))
        }
        let now = try await topology("")
        XCTAssertEqual(now.writer, "node-a")
        XCTAssertTrue(now.writerReady)
        XCTAssertEqual(now.epoch, 1)
        // Nothing changes: the watch ends after its wait, with the same version.
        let unchanged = try await topology("?after=\(now.version)&wait_ms=200")
        XCTAssertEqual(unchanged.version, now.version)
        XCTAssertEqual(unchanged.writer, "node-a")
        // The primary dies: a watch that was waiting answers with the new writer and epoch.
        let watch = Task { try await topology("?after=\(now.version)&wait_ms=30000") }
        cluster.kill(cluster.primary)
        var seen = try await watch.value
        XCTAssertGreaterThan(seen.version, now.version)
        while !(seen.writer == "node-b" && seen.writerReady) {
            seen = try await topology("?after=\(seen.version)&wait_ms=30000")
        }
        XCTAssertEqual(seen.epoch, 2)
        // An application's client has no certificate; a certificate of a foreign CA fails the handshake (MonitorProcessTests).
    }

    /// One client: inserts ids `writer, writer + 3, …`, each with its own idempotency key and
    /// retried (to whichever node answers as primary) until it is acknowledged.
    func write(as writer: Int, ledger: WriteLedger) async {
        let ca = cluster.certificates + "/ca.pem"
        let nodes = [cluster.primary, cluster.standby]
        var target = 0
        var connection: HTTPSConnection?
        if writer == 0 {
            while !ledger.stopped {
                if let c = try? await APIClient(port: nodes[target].apiPort, caPath: ca).connect() {
                    // The tenant first (a write never makes one); on a node that is not the
                    // writer both fail, and the loop tries the other.
                    _ = try? await c.request(.POST, "/admin/tenants", headers: [("Content-Type", "application/json")],
                                             body: Array("{\"name\": \"\(Self.tenant)\"}".utf8))
                    let r = try? await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", Self.tenant)],
                                                 body: Array(#"["CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, writer INTEGER)"]"#.utf8))
                    await c.close()
                    if r?.status == 200, !(r?.text.contains("\"error\"") ?? true) { break }
                }
                target = 1 - target
                try? await Task.sleep(for: .milliseconds(20)) // pacing a retry loop, not ordering events
            }
            ledger.tableReady()
        }
        await ledger.waitForTable()
        var id = writer
        while !ledger.stopped {
            let key = "w\(writer)-\(id)"
            let body = Array("[[\"INSERT INTO t(id, writer) VALUES(?, ?)\", \(id), \(writer)]]".utf8)
            do {
                if connection == nil || connection?.isOpen != true {
                    connection = try await APIClient(port: nodes[target].apiPort, caPath: ca).connect()
                }
                let r = try await connection!.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", Self.tenant), ("Idempotency-Key", key)], body: body)
                if r.status == 200, !r.text.contains("\"error\"") {
                    ledger.acknowledge(id)
                    id += 3
                    continue
                }
                if r.status == 200 { XCTFail("insert \(id) answered with an error: \(r.text)") ; return }
            } catch {
                await connection?.close()
                connection = nil
            }
            // Not the primary (503), unreachable, or outcome unknown: the same key, maybe elsewhere.
            await connection?.close()
            connection = nil
            target = 1 - target
            try? await Task.sleep(for: .milliseconds(20)) // pacing a retry loop, not ordering events
        }
        await connection?.close()
    }

    static func ids(in response: HTTPSConnection.Response) -> [Int] { (response.integerRows ?? []).compactMap(\.first) }
}

/// What the writers were told, and a way to wait for more of it.
final class WriteLedger: @unchecked Sendable {
    private let condition = NSCondition()
    private var acked = Set<Int>()
    private var ackCount = 0
    private var lastWaitedCount = 0
    private var isStopped = false
    private var table = false

    func acknowledge(_ id: Int) { condition.withLock { acked.insert(id); ackCount += 1; condition.broadcast() } }
    func stop() { condition.withLock { isStopped = true; condition.broadcast() } }
    var stopped: Bool { condition.withLock { isStopped } }
    var acknowledged: Set<Int> { condition.withLock { acked } }
    func tableReady() { condition.withLock { table = true; condition.broadcast() } }

    func waitForTable() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            Thread.detachNewThread {
                self.condition.withLock { while !self.table && !self.isStopped { self.condition.wait() } }
                c.resume()
            }
        }
    }

    /// Waits until `count` more writes were acknowledged than at the previous call.
    func waitForMoreAcks(_ count: Int, timeoutSeconds: Double) async throws {
        let ok = await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
            Thread.detachNewThread {
                let deadline = Date().addingTimeInterval(timeoutSeconds)
                let ok = self.condition.withLock { () -> Bool in
                    let target = self.lastWaitedCount + count
                    while self.ackCount < target { if !self.condition.wait(until: deadline) { return self.ackCount >= target } }
                    self.lastWaitedCount = self.ackCount
                    return true
                }
                c.resume(returning: ok)
            }
        }
        if !ok { throw NodeError("fewer than \(count) writes acknowledged within \(timeoutSeconds)s") }
    }
}

/// The monitor's `/status`, with the operator's certificate.
struct MonitorClient {
    let host: String
    let port: Int
    let tls: TLSConfiguration

    init(cluster: LocalCluster) async throws {
        host = cluster.monitor!.host
        port = cluster.monitor!.apiPort
        tls = try ClusterCredentials(directory: cluster.certificates, name: "operator").clusterClient()
    }

    func status() async throws -> StatusBody {
        let c = try await HTTPSConnection.connect(host: host, port: port, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await c.close() } }
        let r = try await c.request(.GET, "/status")
        guard r.status == 200 else { throw NodeError("monitor status \(r.status): \(r.text)") }
        return try JSONDecoder().decode(StatusBody.self, from: Data(r.body))
    }

    /// Polls the monitor's status (bounded) until `condition` holds.
    func waitUntil(_ what: String, timeoutSeconds: Double, _ condition: (StatusBody) -> Bool) async throws {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        var last: StatusBody?
        while Date() < deadline {
            if let s = try? await status() {
                if condition(s) { return }
                last = s
            }
            try await Task.sleep(for: .milliseconds(50)) // polling a condition, bounded by the deadline
        }
        throw NodeError("not within \(timeoutSeconds)s: \(what); the monitor's last status: \(last.map { "\($0)" } ?? "none")")
    }
}

extension StatusBody {
    func node(_ id: String) -> Node? { nodes.first { $0.id == id } }
}
