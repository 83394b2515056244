import ApiaryMonitor
import ApiaryNode
import Foundation
import XCTest

/// A former primary that committed a record its standby never received rejoins after the
/// failover and reports exactly what it discarded (issue 8, "Rejoin"): the record's lsn and
/// epoch, in the new primary's log and in the monitor's history. The record was never
/// acknowledged (its client lost the connection), every acknowledged write survives, and both
/// replicas end identical.
///
/// The window (the record durable on the primary, never sent) is reached through a test seam
/// (`APIARY_TEST_EXIT_AT=commit-logged-before-send@LSN`, `TestExitPoint.swift`), since killing
/// under load hits it only by chance.
final class RejoinTests: NodeProcessTestCase {
    static let tenant = [("X-Apiary-Tenant", "rejoin")]

    func testARejoiningPrimaryReportsExactlyTheRecordsItDiscarded() async throws {
        directory = NSTemporaryDirectory() + "apiary-rejoin-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               monitorArguments: ["--tick-interval-ms", "20"])
        try cluster.prepareCertificates()
        try cluster.start(cluster.monitor!)
        // The tenant's bootstrap is lsn 1, its table lsn 2, the inserts lsn 3 on: the seam stops
        // node-a in the commit of lsn 20 (no other tenant of this test gets that far).
        let seamLSN = 20
        var armed = cluster.primary
        armed.environment["APIARY_TEST_EXIT_AT"] = "commit-logged-before-send@\(seamLSN)"
        try cluster.start(armed)
        try cluster.start(cluster.standby)
        let a = cluster.primary, b = cluster.standby
        let monitor = try await MonitorClient(cluster: cluster)
        try await monitor.waitUntil("node-a primary, node-b promotable", timeoutSeconds: 60) { s in
            s.node(a.name)?.reported == "primary" && s.node(b.name)?.promotable == true
        }

        let onA = try await APIClient(port: a.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        try await createTenant("rejoin", on: onA)
        try await executeEach(["CREATE TABLE kv (id INTEGER PRIMARY KEY)"], tenant: "rejoin", on: onA)
        var acked: Set<Int> = []
        for id in 3..<seamLSN {
            let r = try await onA.request(.POST, "/db/execute", headers: Self.tenant, body: Array("[[\"INSERT INTO kv VALUES (?)\", \(id)]]".utf8))
            XCTAssertEqual(r.status, 200, r.text)
            if r.status == 200 { acked.insert(id) }
        }
        // The insert of lsn 20: node-a makes it durable in its own log and stops before sending it.
        do {
            let r = try await onA.request(.POST, "/db/execute", headers: Self.tenant, body: Array("[[\"INSERT INTO kv VALUES (?)\", \(seamLSN)]]".utf8))
            XCTFail("node-a answered \(r.status) instead of stopping at the seam: \(r.text)")
        } catch {
            // The connection died with the process: the client was never told it committed.
        }
        await onA.close()
        cluster.kill(a) // waits for the exit
        let aLog = (try? String(contentsOfFile: directory + "/logs/node-a.log", encoding: .utf8)) ?? ""
        XCTAssertTrue(aLog.contains("exiting at commit-logged-before-send, tenant rejoin, lsn \(seamLSN)"), "node-a stopped at the seam")

        // The monitor promotes node-b (epoch 2), which writes its own lsn 20.
        try await monitor.waitUntil("node-b promoted", timeoutSeconds: 60) { s in
            s.epoch == 2 && s.node(b.name)?.reported == "wait_primary"
        }
        let onB = try await APIClient(port: b.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        let r = try await onB.request(.POST, "/db/execute", headers: Self.tenant, body: Array("[[\"INSERT INTO kv VALUES (?)\", 1000]]".utf8))
        XCTAssertEqual(r.status, 200, r.text)
        acked.insert(1000)
        await onB.close()

        // node-a restarts (without the seam), steps down and rejoins by itself.
        try cluster.start(a)
        try await monitor.waitUntil("node-a rejoined as node-b's standby", timeoutSeconds: 60) { s in
            s.node(a.name)?.reported == "secondary" && s.node(a.name)?.promotable == true
        }

        // The report: exactly lsn 20 of epoch 1, in node-b's log and in the monitor's history.
        let expected = "node node-a discards tenant rejoin's lsn \(seamLSN) (epoch 1): not on the primary's history; histories part after lsn \(seamLSN - 1); replaced by a snapshot"
        XCTAssertTrue(cluster.waitForOutput(of: b, containing: expected, timeoutSeconds: 10), "node-b's log names what node-a discarded")
        let events = try ctl(["events"])
        XCTAssertEqual(events.status, 0, events.output)
        XCTAssertTrue(events.output.contains("rejoin: \(expected)"), events.output)
        XCTAssertEqual(events.output.components(separatedBy: "rejoin: node").count - 1, 1, "recorded once: \(events.output)")

        // Nothing acknowledged is lost, the discarded insert is gone, and the replicas agree.
        let report = try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", b.apiPort), standby: ("127.0.0.1", a.apiPort), waitMs: 30_000)
        XCTAssertTrue(report.consistent, report.text)
        let check = try await APIClient(port: b.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        defer { Task { await check.close() } }
        let rows = try await check.request(.GET, "/db/query?q=" + "SELECT id FROM kv".addingPercentEncoding(withAllowedCharacters: .alphanumerics)!,
                                           headers: Self.tenant)
        XCTAssertEqual(rows.status, 200, rows.text)
        XCTAssertEqual(Set((rows.integerRows ?? []).compactMap(\.first)), acked)
    }
}
