import ApiaryCore
import ApiaryNode
import ApiaryReplication
import ApiaryStorage
import ApiaryTLS
import Foundation
import NIOCore
import NIOPosix
import XCTest

/// Two real `apiary node` processes on loopback, replicating over mutual TLS.
final class ReplicatedClusterTests: NodeProcessTestCase {

    override func setUp() async throws {
        directory = NSTemporaryDirectory() + "apiary-it-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               primaryArguments: ["--standby-wait-ms", "1000"], standbyArguments: ["--log-level", "debug"])
        try cluster.startBoth()
        try await cluster.createTenant("acme")
    }

    var api: APIClient { APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem") }

    func verify() async throws -> ClusterVerifier.Report {
        try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", cluster.primary.apiPort), standby: ("127.0.0.1", cluster.standby.apiPort), waitMs: 20_000)
    }

    /// Several tenants committing at once: each has its own log and commit order, and the
    /// standby persists some on its replication loop and the rest through their queues, in
    /// parallel (`StandbyNode`). Every tenant ends identical on both nodes.
    func testManyTenantsWritingAtOnceEndIdentical() async throws {
        let tenants = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
        for tenant in tenants { try await cluster.createTenant(tenant) }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for tenant in tenants {
                for client in 0..<3 {
                    group.addTask {
                        let c = try await self.api.connect()
                        defer { Task { await c.close() } }
                        let create = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", tenant)],
                                                         body: Array(#"["CREATE TABLE IF NOT EXISTS kv (id INTEGER PRIMARY KEY, client INTEGER)"]"#.utf8))
                        XCTAssertEqual(create.status, 200, create.text)
                        for i in 0..<60 {
                            let r = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", tenant)],
                                                        body: Array("[[\"INSERT INTO kv(client) VALUES(?)\", \(client * 1000 + i)]]".utf8))
                            XCTAssertEqual(r.status, 200, r.text)
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        let report = try await verify()
        XCTAssertTrue(report.consistent, report.text)
        for tenant in tenants {
            XCTAssertTrue(report.text.contains(tenant), "tenant \(tenant) missing from verify: \(report.text)")
            let rows = try DatabaseFile.query(copyOf: directory + "/node-b/tenants/\(tenant)/db.sqlite", "SELECT count(*) FROM kv")
            XCTAssertEqual(rows, [[.integer(180)]], tenant)
        }
    }

    /// The issue's acceptance run: 10,000 writes from concurrent clients, the standby killed
    /// (-9) mid-run and restarted; it catches up; both nodes hold every acknowledged write and
    /// `ctl verify` finds identical checksums.
    func testTenThousandWritesSurviveAStandbyCrashAndBothReplicasAreIdentical() async throws {
        let setup = try await api.connect()
        let created = try await setup.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")],
                                              body: Array(#"["CREATE TABLE kv (id INTEGER PRIMARY KEY, client INTEGER, payload TEXT)"]"#.utf8))
        XCTAssertEqual(created.status, 200, created.text)
        await setup.close()

        let clients = 16, writesPerClient = 625
        let acked = AckedWrites()
        let killAt = 3_000
        let cluster = self.cluster!
        let api = self.api
        let directory = self.directory!
        async let chaos: Void = {
            // Kill the standby once a third of the writes are acknowledged, restart it a second later.
            // Cancelled when the clients fail first: then stop waiting (a cancelled sleep
            // returns at once, so the loop would otherwise spin forever).
            while acked.count < killAt {
                guard !Task.isCancelled else { return }
                try? await Task.sleep(for: .milliseconds(20))
            }
            cluster.kill(cluster.standby, signal: SIGKILL)
            try? await Task.sleep(for: .seconds(1))
            do {
                try cluster.start(cluster.standby)
            } catch {
                let log = (try? String(contentsOfFile: directory + "/logs/node-b.log", encoding: .utf8)) ?? ""
                XCTFail("the standby did not come back after kill -9: \(error)\n\(log.split(separator: "\n").suffix(10).joined(separator: "\n"))")
            }
        }()
        // Without a standby every write waits out --standby-wait-ms: a standby that does not
        // come back must fail the test, not stall it for hours.
        let deadline = ContinuousClock.now + .seconds(240)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for client in 0..<clients {
                group.addTask {
                    let connection = try await api.connect()
                    defer { Task { await connection.close() } }
                    var i = 0
                    var attempts = 0
                    while i < writesPerClient {
                        attempts += 1
                        guard attempts < writesPerClient * 20, ContinuousClock.now < deadline else {
                            throw NodeError("client \(client) made no progress (\(i) of \(writesPerClient) writes after \(attempts) attempts)")
                        }
                        let id = client * 1_000_000 + i
                        let body = Array("[[\"INSERT INTO kv VALUES (?, ?, ?)\", \(id), \(client), \"\(String(repeating: "x", count: 100))\"]]".utf8)
                        let response = try await connection.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: body)
                        switch response.status {
                        case 200:
                            XCTAssertFalse(response.text.contains("\"error\""), response.text)
                            acked.add(id)
                            i += 1
                        case 503:
                            // Not executed (standby unavailable): safe to retry the same write.
                            try await Task.sleep(for: .milliseconds(50))
                        case 500:
                            // Outcome unknown: the id may exist; move on, never count it as acked.
                            XCTAssertEqual(response.header("X-Apiary-Outcome"), "unknown")
                            acked.unknown(id)
                            i += 1
                        default:
                            XCTFail("unexpected answer \(response.status): \(response.text)")
                            i += 1
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        await chaos
        XCTAssertGreaterThanOrEqual(acked.count, clients * writesPerClient - acked.unknownCount)
        XCTAssertTrue(cluster.isRunning(cluster.standby), "the standby was restarted")

        // The standby caught up: same checksum at the same lsn.
        let report = try await verify()
        XCTAssertTrue(report.consistent, report.text)

        // Every acknowledged write is on the primary…
        let reader = try await api.connect()
        let rows = try await reader.request(.GET, "/db/query?q=SELECT%20count(*)%20FROM%20kv", headers: [("X-Apiary-Tenant", "acme")])
        await reader.close()
        XCTAssertEqual(rows.status, 200, rows.text)
        cluster.stopAll()
        let primaryIDs = Set(try DatabaseFile.query(copyOf: directory + "/node-a/tenants/acme/db.sqlite", "SELECT id FROM kv").compactMap { row -> Int? in
            if case .integer(let v) = row[0] { return Int(v) } else { return nil }
        })
        // …and on the standby's own database file.
        let standbyIDs = Set(try DatabaseFile.query(copyOf: directory + "/node-b/tenants/acme/db.sqlite", "SELECT id FROM kv").compactMap { row -> Int? in
            if case .integer(let v) = row[0] { return Int(v) } else { return nil }
        })
        let ackedIDs = acked.ids
        XCTAssertTrue(ackedIDs.isSubset(of: primaryIDs), "\(ackedIDs.subtracting(primaryIDs).count) acknowledged writes missing on the primary")
        XCTAssertTrue(ackedIDs.isSubset(of: standbyIDs), "\(ackedIDs.subtracting(standbyIDs).count) acknowledged writes missing on the standby")
        XCTAssertEqual(primaryIDs.count, standbyIDs.count)
        XCTAssertTrue(primaryIDs == standbyIDs, "the replicas hold different rows: \(primaryIDs.symmetricDifference(standbyIDs).count) differ")
    }

    func testWritesFailHonestlyWhileTheStandbyIsDownAndResumeAfter() async throws {
        try await cluster.createTenant("t1")
        cluster.kill(cluster.standby, signal: SIGKILL)
        let connection = try await api.connect()
        let response = try await connection.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "t1")], body: Array(#"["CREATE TABLE t (x)"]"#.utf8))
        XCTAssertEqual(response.status, 503, "a sync primary never commits alone: \(response.text)")
        XCTAssertTrue(response.text.contains("standby unavailable"), response.text)
        try cluster.start(cluster.standby)
        var status = 0
        for _ in 0..<50 where status != 200 {
            status = try await connection.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "t1")], body: Array(#"["CREATE TABLE IF NOT EXISTS t (x)"]"#.utf8)).status
            if status != 200 { try await Task.sleep(for: .milliseconds(100)) }
        }
        XCTAssertEqual(status, 200)
        await connection.close()
        let report = try await verify()
        XCTAssertTrue(report.consistent, report.text)
    }

    func testPeersWithAForeignOrNonNodeCertificateAreRefused() async throws {
        // A node certificate from another CA: the TLS handshake fails, nothing is exchanged.
        let otherCA = directory + "/other-ca"
        try CertificateAuthority.create(in: otherCA).issue(PeerIdentity(role: .node, name: "node-b"), into: otherCA)
        // It trusts our CA, so the refusal can only come from the primary.
        let intruder = try ClusterCredentials(certificatePath: otherCA + "/node-b.pem", keyPath: otherCA + "/node-b.key",
                                              caPath: cluster.certificates + "/ca.pem")
        let foreign = try await rawReplicationConnection(port: cluster.primary.replicationPort, credentials: intruder)
        XCTAssertTrue(foreign.bytes.isEmpty, "no replication frame for a foreign certificate")
        XCTAssertTrue(foreign.closedByServer, "the primary hangs up on a foreign certificate")

        // A gateway certificate from our CA: TLS succeeds, replication says no and hangs up.
        let gateway = try await rawReplicationConnection(port: cluster.primary.replicationPort,
                                                         credentials: ClusterCredentials(directory: cluster.certificates, name: "gateway"))
        XCTAssertTrue(gateway.handshakeCompleted)
        XCTAssertTrue(gateway.closedByServer)
        let message = try WireCodec.decode(frame: gateway.bytes)
        guard case .reject(let reject) = message else { return XCTFail("expected a reject, got \(message)") }
        XCTAssertEqual(reject.code, .wrongRole)

        // A node certificate from our CA, but not the node named as this primary's standby.
        try CertificateAuthority.load(from: cluster.certificates).issue(PeerIdentity(role: .node, name: "node-c"), into: cluster.certificates)
        let other = try await rawReplicationConnection(port: cluster.primary.replicationPort,
                                                       credentials: ClusterCredentials(directory: cluster.certificates, name: "node-c"))
        XCTAssertTrue(other.handshakeCompleted)
        XCTAssertTrue(other.closedByServer)
        guard case .reject(let notStandby) = try WireCodec.decode(frame: other.bytes) else { return XCTFail("expected a reject") }
        XCTAssertEqual(notStandby.code, .unexpectedPeer)
        XCTAssertTrue(notStandby.reason.contains("'node-c' is not this primary's standby"), notStandby.reason)

        // The real standby is unaffected.
        let report = try await verify()
        XCTAssertTrue(report.consistent, report.text)
    }

    /// Manual failover (until the monitor exists): the primary dies (-9), the standby is
    /// promoted, and it serves every write that was acknowledged (invariant 2), in epoch 2.
    func testPromotedStandbyServesEveryAcknowledgedWrite() async throws {
        let setup = try await api.connect()
        _ = try await setup.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: Array(#"["CREATE TABLE kv (id INTEGER PRIMARY KEY)"]"#.utf8))
        await setup.close()
        let acked = AckedWrites()
        let api = self.api
        try await withThrowingTaskGroup(of: Void.self) { group in
            for client in 0..<4 {
                group.addTask {
                    let c = try await api.connect()
                    for i in 0..<100 {
                        let id = client * 1000 + i
                        let r = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: Array("[[\"INSERT INTO kv VALUES (?)\", \(id)]]".utf8))
                        if r.status == 200 { acked.add(id) }
                    }
                    await c.close()
                }
            }
            try await group.waitForAll()
        }
        XCTAssertEqual(acked.count, 400)
        cluster.kill(cluster.primary, signal: SIGKILL)

        // The operator's CLI, as a failover drill would run it.
        let promoted = try cluster.promoteWithCtl(cluster.standby)
        XCTAssertEqual(promoted.status, 0, promoted.output)
        XCTAssertTrue(promoted.output.contains("\"epoch\":2"), promoted.output)

        let newPrimary = try await APIClient(port: cluster.standby.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        let rows = try await newPrimary.request(.GET, "/db/query?q=SELECT%20id%20FROM%20kv", headers: [("X-Apiary-Tenant", "acme")])
        XCTAssertEqual(rows.status, 200, rows.text)
        let object = try JSONSerialization.jsonObject(with: Data(rows.body)) as? [String: Any]
        let values = ((object?["results"] as? [[String: Any]])?.first?["values"] as? [[Int]]) ?? []
        let present = Set(values.map { $0[0] })
        XCTAssertTrue(acked.ids.isSubset(of: present), "\(acked.ids.subtracting(present).count) acknowledged writes lost in failover")
        let write = try await newPrimary.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: Array(#"[["INSERT INTO kv VALUES (?)", 999999]]"#.utf8))
        XCTAssertEqual(write.status, 200, write.text)
        await newPrimary.close()
    }

    func testOnlyAnOperatorMayPromote() async throws {
        let connection = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem", asOperator: false).connect()
        let response = try await connection.request(.POST, "/admin/promote")
        XCTAssertEqual(response.status, 403)
        await connection.close()
    }

    func testStatusNeedsAnOperatorCertificate() async throws {
        let connection = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem", asOperator: false).connect()
        let response = try await connection.request(.GET, "/status")
        XCTAssertEqual(response.status, 403)
        XCTAssertFalse(response.text.contains("acme"))
        await connection.close()
    }
}

/// Writes the clients saw acknowledged, and those whose outcome is unknown.
final class AckedWrites: @unchecked Sendable {
    private let lock = NSLock()
    private var acked: Set<Int> = []
    private var unknownIDs: Set<Int> = []
    func add(_ id: Int) { lock.withLock { _ = acked.insert(id) } }
    func unknown(_ id: Int) { lock.withLock { _ = unknownIDs.insert(id) } }
    var count: Int { lock.withLock { acked.count } }
    var unknownCount: Int { lock.withLock { unknownIDs.count } }
    var ids: Set<Int> { lock.withLock { acked } }
}
