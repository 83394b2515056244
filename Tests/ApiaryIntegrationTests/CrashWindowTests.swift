import ApiaryNode
import ApiaryStorage
import Foundation
import XCTest

/// A primary stopped inside a commit, exactly where its WAL frames are in the file but its log
/// record is not durable, or halfway through undoing a failed commit, restarts and holds every
/// acknowledged write (issue 8). Thirty `kill -9`s under load never hit these windows, so the
/// node stops itself there through a test seam (`APIARY_TEST_EXIT_AT`, `TestExitPoint.swift`):
/// `_exit` keeps the page cache, as a `kill -9` does, so SQLite's recovery at the next open sees
/// whatever the WAL holds.
final class CrashWindowTests: NodeProcessTestCase {
    let tenant = [("X-Apiary-Tenant", "acme")]

    /// Starts the nodes; the primary with the seam armed at `exitAt`. Restarts go without it.
    func startCluster(primaryArguments: [String], withStandby: Bool, exitAt: String) throws {
        directory = NSTemporaryDirectory() + "apiary-crash-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(), primaryArguments: primaryArguments)
        try cluster.prepareCertificates()
        var armed = cluster.primary
        armed.environment["APIARY_TEST_EXIT_AT"] = exitAt
        try cluster.start(armed)
        if withStandby { try cluster.start(cluster.standby) }
    }

    var api: APIClient { APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem") }
    var primaryDatabase: String { directory + "/node-a/tenants/acme/db.sqlite" }

    /// The table (lsn 2, after the tenant's bootstrap at lsn 1) and `count` acknowledged inserts
    /// (lsns 3...), one commit each: each waits for its answer.
    func createAndInsert(_ count: Int, on connection: HTTPSConnection) async throws -> Set<Int> {
        try await createTenant("acme", on: connection)
        try await executeEach(["CREATE TABLE kv (id INTEGER PRIMARY KEY)"], tenant: "acme", on: connection)
        var acked: Set<Int> = []
        for id in 0..<count {
            let r = try await connection.request(.POST, "/db/execute", headers: tenant, body: Array("[[\"INSERT INTO kv VALUES (?)\", \(id)]]".utf8))
            XCTAssertEqual(r.status, 200, r.text)
            if r.status == 200 { acked.insert(id) }
        }
        return acked
    }

    /// Sends an insert the seam stops the primary in; waits until the process is gone.
    func insertStoppedBySeam(_ id: Int, on connection: HTTPSConnection, point: String) async throws {
        do {
            let r = try await connection.request(.POST, "/db/execute", headers: tenant, body: Array("[[\"INSERT INTO kv VALUES (?)\", \(id)]]".utf8))
            XCTFail("the primary answered \(r.status) instead of stopping at the seam: \(r.text)")
        } catch {
            // The connection died with the process: the outcome is unknown to this client.
        }
        cluster.kill(cluster.primary) // waits for the exit
        let log = (try? String(contentsOfFile: directory + "/logs/node-a.log", encoding: .utf8)) ?? ""
        XCTAssertTrue(log.contains("test seam APIARY_TEST_EXIT_AT: exiting at \(point)"), "the primary stopped at the seam, not elsewhere")
    }

    /// What SQLite's recovery makes of the primary's files as they are on disk now.
    func idsRecoverableFromTheFiles() throws -> Set<Int> {
        Set(try DatabaseFile.query(copyOf: primaryDatabase, "SELECT id FROM kv").compactMap { row -> Int? in
            if case .integer(let v) = row[0] { return Int(v) } else { return nil }
        })
    }

    func idsServed(by port: Int) async throws -> Set<Int> {
        let c = try await APIClient(port: port, caPath: cluster.certificates + "/ca.pem").connect()
        let rows = try await c.request(.GET, "/db/query?q=SELECT%20id%20FROM%20kv", headers: tenant)
        await c.close()
        XCTAssertEqual(rows.status, 200, rows.text)
        let object = try JSONSerialization.jsonObject(with: Data(rows.body)) as? [String: Any]
        let values = ((object?["results"] as? [[String: Any]])?.first?["values"] as? [[Int]]) ?? []
        return Set(values.map { $0[0] })
    }

    func idsInStandbyFile() throws -> Set<Int> {
        Set(try DatabaseFile.query(copyOf: directory + "/node-b/tenants/acme/db.sqlite", "SELECT id FROM kv").compactMap { row -> Int? in
            if case .integer(let v) = row[0] { return Int(v) } else { return nil }
        })
    }

    func verify() async throws -> ClusterVerifier.Report {
        try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", cluster.primary.apiPort), standby: ("127.0.0.1", cluster.standby.apiPort), waitMs: 20_000)
    }

    // MARK: - A commit's frames in the WAL, its record not yet durable

    func testAPrimaryStoppedBeforeItsLogSyncRestartsWithEveryAcknowledgedWrite() async throws {
        // lsn 1 bootstrap, 2 the table, 3...12 ten acknowledged inserts, 13 the stopped one.
        try startCluster(primaryArguments: ["--mode", "single"], withStandby: false, exitAt: "commit-before-log-sync@13")
        let c = try await api.connect()
        let acked = try await createAndInsert(10, on: c)
        try await insertStoppedBySeam(1000, on: c, point: "commit-before-log-sync")
        await c.close()

        // The window is real: SQLite's recovery would bring back the commit the log lacks.
        XCTAssertEqual(try idsRecoverableFromTheFiles(), acked.union([1000]), "the stopped commit's frames are in the WAL")

        try cluster.start(cluster.primary)
        let log = (try? String(contentsOfFile: directory + "/logs/node-a.log", encoding: .utf8)) ?? ""
        XCTAssertTrue(log.contains("discarded WAL commits the log lacks"), "the node says it cut the WAL back")
        let served = try await idsServed(by: cluster.primary.apiPort)
        XCTAssertEqual(served, acked, "every acknowledged write, and not the commit the log never made durable")
        let next = try await api.connect()
        try await executeEach(["INSERT INTO kv VALUES (2000)"], tenant: "acme", on: next)
        await next.close()
        let after = try await idsServed(by: cluster.primary.apiPort)
        XCTAssertEqual(after, acked.union([2000]))
    }

    /// The same with a standby, which may or may not have received the record the primary lost:
    /// after the restart both nodes hold the same database.
    func testAPrimaryStoppedBeforeItsLogSyncRestartsAndMatchesItsStandby() async throws {
        try startCluster(primaryArguments: ["--standby-wait-ms", "5000"], withStandby: true, exitAt: "commit-before-log-sync@13")
        let c = try await api.connect()
        let acked = try await createAndInsert(10, on: c)
        try await insertStoppedBySeam(1000, on: c, point: "commit-before-log-sync")
        await c.close()
        XCTAssertEqual(try idsRecoverableFromTheFiles(), acked.union([1000]), "the stopped commit's frames are in the WAL")

        try cluster.start(cluster.primary)
        var report = try await verify()
        XCTAssertTrue(report.consistent, report.text)
        let next = try await api.connect()
        try await executeEach(["INSERT INTO kv VALUES (2000)"], tenant: "acme", on: next)
        await next.close()
        report = try await verify()
        XCTAssertTrue(report.consistent, report.text)
        let served = try await idsServed(by: cluster.primary.apiPort)
        XCTAssertEqual(served, acked.union([2000]))
        cluster.stopAll()
        XCTAssertEqual(try idsInStandbyFile(), acked.union([2000]))
    }

    // MARK: - A failed commit, half undone

    func testAPrimaryStoppedHalfwayThroughUndoingAFailedCommitRestarts() async throws {
        try startCluster(primaryArguments: ["--standby-wait-ms", "1500"], withStandby: true, exitAt: "failed-commit-half-undone")
        let c = try await api.connect()
        let acked = try await createAndInsert(10, on: c)
        // Without its standby a sync primary fails the next commit; the seam stops the node
        // while it undoes it.
        cluster.kill(cluster.standby)
        try await insertStoppedBySeam(1000, on: c, point: "failed-commit-half-undone")
        await c.close()
        // Halfway, the frames are already invalid and the record still in the log: at no point
        // does the WAL hold a commit the log lacks (the redo puts this one back).
        XCTAssertEqual(try idsRecoverableFromTheFiles(), acked, "the failed commit's frames are invalidated before its record leaves the log")

        try cluster.start(cluster.primary)
        try cluster.start(cluster.standby)
        var report = try await verify()
        XCTAssertTrue(report.consistent, report.text)
        let next = try await api.connect()
        try await executeEach(["INSERT INTO kv VALUES (2000)"], tenant: "acme", on: next)
        await next.close()
        report = try await verify()
        XCTAssertTrue(report.consistent, report.text)
        // The failed insert was never answered: it may be there or not, the same on both nodes.
        let served = try await idsServed(by: cluster.primary.apiPort)
        XCTAssertTrue(acked.union([2000]).isSubset(of: served), "acknowledged writes missing: \(acked.union([2000]).subtracting(served))")
        XCTAssertTrue(served.isSubset(of: acked.union([1000, 2000])), "writes nobody sent: \(served.subtracting(acked.union([1000, 2000])))")
        cluster.stopAll()
        XCTAssertEqual(try idsInStandbyFile(), served)
    }
}
