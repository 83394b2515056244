import ApiaryCore
import CSQLite
import Foundation
import XCTest
@testable import ApiaryStorage

/// A request's whole run time is bounded, not only each statement's (invariant 8), and a
/// request that runs out of time is undone as a whole.
final class RequestLimitsTests: XCTestCase {
    func open(_ dir: TemporaryDirectory, _ adjust: (inout TenantDatabase.Options) -> Void) throws -> TenantDatabase {
        var options = TenantDatabase.Options()
        // `hold_ms(n)` returns after at least n ms of the monotonic clock: a statement that
        // surely outlasts a request limit shorter than n, however fast the machine.
        options.onConnectionOpened = { handle in
            sqlite3_create_function_v2(handle, "hold_ms", 1, SQLITE_UTF8, nil, { context, _, arguments in
                let ms = UInt64(max(0, sqlite3_value_int64(arguments![0]!)))
                let end = monotonicNs() + ms * 1_000_000
                while monotonicNs() < end { usleep(1_000) }
                sqlite3_result_int64(context, Int64(ms))
            }, nil, nil, nil)
        }
        options.extraAllowedFunctions = ["hold_ms"]
        adjust(&options)
        return try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db",
                                  sink: ReplicaSink(replicaPath: dir.path + "/replica.db"), options: options)
    }

    func failures(_ results: [StatementResult]) -> [String] {
        results.compactMap { if case .failure(let m) = $0 { return m } else { return nil } }
    }

    /// Found in review: after SQLite rolled the transaction back (here: the time limit's
    /// interrupt), the request's later statements ran in autocommit mode and committed on
    /// their own, while the request was answered "not applied".
    func testNothingOfARequestCommitsAfterSQLiteRolledItBack() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir) { $0.statementTimeMs = 200 }
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        let results = try await db.execute([SQLStatement(LimitsTests.endlessInsert), SQLStatement("INSERT INTO t VALUES (99)")])
        XCTAssertEqual(failures(results).count, 2, "\(results)")
        let rows = try await db.rows("SELECT count(*) FROM t WHERE x = 99")
        XCTAssertEqual(rows, [[.integer(0)]], "a statement after the rollback committed alone")
        try await db.mustExecute("INSERT INTO t VALUES (1)")
        let after = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(after, [[.integer(1)]])
    }

    func testAWriteRequestPastItsTimeIsUndoneAsAWhole() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir) { $0.requestTimeMs = 300; $0.statementTimeMs = 60_000 }
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        // Each statement is within its own limit; together they are not.
        let results = try await db.execute([SQLStatement("INSERT INTO t VALUES (1)"), SQLStatement("SELECT hold_ms(400)"),
                                            SQLStatement("INSERT INTO t VALUES (2)")])
        let messages = failures(results)
        XCTAssertEqual(messages.count, 3, "\(results)")
        XCTAssertTrue(messages.allSatisfy { $0.contains("ran longer than its limit of 300 ms") }, "\(messages)")
        let rows = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(rows, [[.integer(0)]], "part of a request that ran out of time was applied")
    }

    func testAStatementIsStoppedAtTheRequestsDeadline() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir) { $0.requestTimeMs = 300; $0.statementTimeMs = 60_000 }
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        let write = try await db.execute([SQLStatement("INSERT INTO t VALUES (1)"), SQLStatement(LimitsTests.endlessInsert)])
        XCTAssertEqual(failures(write).count, 2, "\(write)")
        XCTAssertTrue(failures(write)[1].contains("ran longer than its limit of 300 ms"), "\(write)")
        let read = try await db.query([SQLStatement("SELECT 1"), SQLStatement(LimitsTests.endless)])
        guard case .failure(let message) = read[1] else { return XCTFail("an endless query must be stopped: \(read)") }
        XCTAssertTrue(message.contains("ran longer than its limit of 300 ms"), message)
        let rows = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(rows, [[.integer(0)]])
    }

    func testAQueryPastItsTimeRunsNoMoreStatements() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir) { $0.requestTimeMs = 300; $0.statementTimeMs = 60_000 }
        defer { db.close() }
        let results = try await db.query([SQLStatement("SELECT hold_ms(400)"), SQLStatement("SELECT 1")])
        guard case .success = results[0], case .failure(let message) = results[1] else { return XCTFail("\(results)") }
        XCTAssertTrue(message.contains("limit of 300 ms"), message)
    }

    /// Found in review: each statement was bounded, the request not, so one request of many
    /// large queries could hold any amount of memory.
    func testARequestsResultsAreBoundedTogether() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir) { $0.resultBytesMax = 100_000 }
        defer { db.close() }
        let big = "SELECT zeroblob(40000)" // within the limit alone
        let read = try await db.query([SQLStatement(big), SQLStatement(big), SQLStatement(big), SQLStatement("SELECT 1")])
        let summary = read.map { result -> String in if case .failure(let m) = result { return m } else { return "ok" } }
        XCTAssertEqual(summary[0], "ok")
        XCTAssertEqual(summary[1], "ok")
        XCTAssertTrue(summary[2].contains("request's results passed its limit of 100000 bytes"), "\(summary)")
        XCTAssertEqual(summary[3], "ok", "a small result still fits in what is left")
        try await db.mustExecute("CREATE TABLE t (x)")
        let write = try await db.execute([SQLStatement("INSERT INTO t VALUES (1)"), SQLStatement(big), SQLStatement(big),
                                          SQLStatement(big), SQLStatement("INSERT INTO t VALUES (2)")])
        XCTAssertTrue(failures(write).count >= 2, "\(write)")
        let rows = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(rows, [[.integer(0)]], "a write request past its result limit is undone as a whole")
    }
}
