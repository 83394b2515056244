import ApiaryNode
import ApiaryStorage
import Foundation
import XCTest

/// Commits skip SQLite's WAL fsync because the replication log is fsynced first; after a crash
/// the database is redone from the log. This loses the WAL outright (as a power cut could lose
/// unsynced frames) and checks that every acknowledged write comes back from the log.
final class RedoTests: XCTestCase {
    func testLostWALFramesAreRedoneFromTheLog() async throws {
        let (cluster, directory, api) = try startSinglePrimary("redo")
        var c = try await api.connect()
        try await createTenant("acme", on: c)
        try await executeEach(["CREATE TABLE kv (id INTEGER PRIMARY KEY)"] + (0..<50).map { "INSERT INTO kv VALUES (\($0))" }, tenant: "acme", on: c)
        await c.close()
        cluster.kill(cluster.primary, signal: SIGKILL)

        let db = directory + "/node-a/tenants/acme/db.sqlite"
        let walBytes = (try? FileManager.default.attributesOfItem(atPath: db + "-wal")[.size] as? Int) ?? 0
        XCTAssertGreaterThan(walBytes, 0, "the commits are in the WAL, not yet checkpointed")
        try FileManager.default.removeItem(atPath: db + "-wal")
        try? FileManager.default.removeItem(atPath: db + "-shm")
        let withoutWAL = try DatabaseFile.query(copyOf: db, "SELECT count(*) FROM sqlite_master")
        XCTAssertEqual(withoutWAL, [[.integer(0)]], "without its WAL the file lacks even the table")

        try cluster.start(cluster.primary)
        c = try await api.connect()
        let rows = try await c.request(.GET, "/db/query?q=SELECT%20count(*)%20FROM%20kv", headers: [("X-Apiary-Tenant", "acme")])
        await c.close()
        XCTAssertEqual(rows.status, 200, rows.text)
        XCTAssertTrue(rows.text.contains("[[50]]"), "every acknowledged insert is back: \(rows.text)")
        let log = (try? String(contentsOfFile: directory + "/logs/node-a.log", encoding: .utf8)) ?? ""
        XCTAssertTrue(log.contains("redid logged commits"), "the node says it redid commits")
    }
}
