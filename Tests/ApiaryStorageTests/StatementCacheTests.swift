import ApiaryCore
import CSQLite
import Foundation
import XCTest
@testable import ApiaryStorage

/// Prepared statements are reused; that must change nothing a client can observe.
final class StatementCacheTests: XCTestCase {
    /// The authorizer judges a statement when it is prepared: one prepared for Apiary's own
    /// use (a savepoint) must never be handed to tenant SQL.
    func testAStatementPreparedForApiaryIsNotReusedForTenantSQL() throws {
        let dir = TemporaryDirectory()
        let connection = try SQLiteConnection(path: dir.path + "/c.db", readOnly: false)
        try connection.exec("BEGIN")
        try connection.execPrepared("SAVEPOINT request") // cached in Apiary's mode
        try connection.execPrepared("RELEASE request")
        connection.sandbox.tenantSQL = true
        XCTAssertThrowsError(try connection.run("SAVEPOINT request")) { error in
            XCTAssertTrue(String(describing: error).contains("not authorized"), "\(error)")
        }
        connection.sandbox.tenantSQL = false
        try connection.exec("COMMIT")
    }

    func testTenantsCannotUseApiarysSavepointNamesThroughTheAPI() async throws {
        let dir = TemporaryDirectory()
        let db = try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: ReplicaSink(replicaPath: dir.path + "/r.db"))
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        for sql in ["SAVEPOINT request", "RELEASE request", "ROLLBACK TO request", "SAVEPOINT statement"] {
            let results = try await db.execute([SQLStatement("INSERT INTO t VALUES (1)"), SQLStatement(sql)])
            guard case .failure(let message) = results[1] else { return XCTFail("\(sql) must be refused") }
            XCTAssertTrue(message.contains("not authorized"), "\(sql): \(message)")
        }
        let rows = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(rows, [[.integer(4)]], "the inserts next to the refused statements stand")
    }

    /// A cached statement outlives schema changes: SQLite re-prepares it (and the
    /// authorizer judges it again).
    func testACachedStatementFollowsSchemaChanges() async throws {
        let dir = TemporaryDirectory()
        let db = try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: ReplicaSink(replicaPath: dir.path + "/r.db"))
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        try await db.mustExecute("INSERT INTO t(x) VALUES (1)")
        try await db.mustExecute("DROP TABLE t")
        try await db.mustExecute("CREATE TABLE t (x, y DEFAULT 'new')")
        try await db.mustExecute("INSERT INTO t(x) VALUES (1)")
        let rows = try await db.rows("SELECT x, y FROM t")
        XCTAssertEqual(rows, [[.integer(1), .text("new")]])
        try await db.mustExecute("DROP TABLE t")
        let results = try await db.execute([SQLStatement("INSERT INTO t(x) VALUES (1)")])
        guard case .failure(let message) = results[0] else { return XCTFail("the table is gone") }
        XCTAssertTrue(message.contains("no such table"), message)
    }

    /// A statement kept for reuse is reset after each use: a reader must not stay inside an
    /// old read transaction (it would serve stale rows and hold checkpoints back).
    func testAReaderSeesEachNewCommitThroughTheSameCachedQuery() async throws {
        let dir = TemporaryDirectory()
        let db = try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: ReplicaSink(replicaPath: dir.path + "/r.db"))
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        for i in 1...5 {
            try await db.mustExecute("INSERT INTO t VALUES (\(i))")
            let rows = try await db.rows("SELECT count(*) FROM t")
            XCTAssertEqual(rows, [[.integer(Int64(i))]])
        }
    }

    /// Column names and counts come from the statement as SQLite re-prepared it after a
    /// schema change, not from the cached one (found in review).
    func testACachedSelectStarSeesNewColumns() async throws {
        let dir = TemporaryDirectory()
        let db = try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: ReplicaSink(replicaPath: dir.path + "/r.db"))
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (a, b)")
        try await db.mustExecute("INSERT INTO t VALUES (1, 2)")
        guard case .success(let before) = try await db.query([SQLStatement("SELECT * FROM t")])[0] else { return XCTFail() }
        XCTAssertEqual(before.columns, ["a", "b"])
        try await db.mustExecute("ALTER TABLE t ADD COLUMN c DEFAULT 3")
        guard case .success(let after) = try await db.query([SQLStatement("SELECT * FROM t")])[0] else { return XCTFail() }
        XCTAssertEqual(after.columns, ["a", "b", "c"])
        XCTAssertEqual(after.rows, [[.integer(1), .integer(2), .integer(3)]])
    }
}
