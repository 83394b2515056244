import ApiaryCore
import Foundation
import XCTest
@testable import ApiaryStorage

/// Idempotency keys in the writer: the same key twice applies once and answers the first
/// results; a request whose commit failed stored nothing; tenants cannot touch the keys.
final class IdempotencyTests: XCTestCase {
    var directory: TemporaryDirectory!
    var sink: ReplicaSink!
    var db: TenantDatabase!

    override func setUp() async throws {
        directory = TemporaryDirectory()
        sink = ReplicaSink(replicaPath: directory.path + "/replica.db")
        db = try TenantDatabase(tenant: try TenantID("acme"), path: directory.path + "/acme.db", sink: sink)
        try await db.mustExecute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    }

    override func tearDown() {
        db?.close()
        db = nil
        directory = nil
    }

    func count() async throws -> [[SQLValue]] { try await db.rows("SELECT count(*) FROM t") }

    func testTheSameKeyTwiceAppliesOnceAndAnswersTheFirstResults() async throws {
        let insert = [SQLStatement("INSERT INTO t (v) VALUES ('x')"), SQLStatement("SELECT max(id) FROM t")]
        let first = try await db.execute(insert, idempotencyKey: "k-1")
        let second = try await db.execute(insert, idempotencyKey: "k-1")
        XCTAssertEqual(second, first, "a retry must get the first answer")
        let rowsAfterRetry = try await count()
        XCTAssertEqual(rowsAfterRetry, [[.integer(1)]], "a retry applied again")
        // Another key is another request.
        _ = try await db.execute(insert, idempotencyKey: "k-2")
        let rows = try await count()
        XCTAssertEqual(rows, [[.integer(2)]])
        // The replica holds the key with the write: after a failover the retry is answered too.
        let keys = try readWithPlainSQLite(sink.replicaPath, "SELECT count(*) FROM _apiary_idempotency")
        XCTAssertEqual(keys, [[.integer(2)]])
    }

    /// A key sent again with another request is refused and runs nothing: the client would
    /// otherwise get an old answer for work never done. The first request's key still answers
    /// its own retry; a key stored before fingerprints were kept (a bare array) still works.
    func testAKeyReusedForAnotherRequestIsRefusedAndRunsNothing() async throws {
        _ = try await db.execute([SQLStatement("INSERT INTO t (v) VALUES (?)", [.text("a")])], idempotencyKey: "k")
        do {
            _ = try await db.execute([SQLStatement("INSERT INTO t (v) VALUES (?)", [.text("b")])], idempotencyKey: "k")
            XCTFail("a key reused with other parameters must be refused")
        } catch let error as StorageError {
            XCTAssertEqual(error.code, .idempotencyKeyReused)
        }
        do {
            _ = try await db.execute([SQLStatement("INSERT INTO t (v) VALUES (?)", [.text("a")])], transaction: true, idempotencyKey: "k")
            XCTFail("a key reused with another transaction flag must be refused")
        } catch let error as StorageError {
            XCTAssertEqual(error.code, .idempotencyKeyReused)
        }
        let repeatResult = try await db.execute([SQLStatement("INSERT INTO t (v) VALUES (?)", [.text("a")])], idempotencyKey: "k")
        guard case .success = repeatResult.first else { return XCTFail("\(repeatResult)") }
        let rows = try await count()
        XCTAssertEqual(rows, [[.integer(1)]], "nothing ran but the first request")

        // A key kept by an older version: its results as a bare array, no fingerprint.
        let old = try JSONEncoder().encode([StatementResult.failure("from before")])
        let hex = old.map { String(format: "%02x", $0) }.joined()
        try await db.withWriter { try $0.exec("INSERT INTO _apiary_idempotency (key, results, expires_ms) VALUES ('old', x'\(hex)', 9999999999999)") }
        let answered = try await db.execute([SQLStatement("INSERT INTO t (v) VALUES ('z')")], idempotencyKey: "old")
        XCTAssertEqual(answered, [.failure("from before")])
    }

    /// A keyed request whose results hold an infinite real (JSON has no such number) runs and
    /// keeps its key: its retry gets the same answer.
    func testAKeyedRequestWithInfiniteResultsIsKept() async throws {
        let request = [SQLStatement("INSERT INTO t (v) VALUES ('inf')"), SQLStatement("SELECT 1e999, -1e999")]
        let first = try await db.execute(request, idempotencyKey: "inf")
        guard case .success = first.first, case .success(let outcome) = first.last else { return XCTFail("\(first)") }
        XCTAssertEqual(outcome.rows.first, [.real(.infinity), .real(-.infinity)])
        let again = try await db.execute(request, idempotencyKey: "inf")
        XCTAssertEqual(again, first)
        let rows = try await count()
        XCTAssertEqual(rows, [[.integer(1)]])
    }

    func testKeysInOneBatchAnswerTheFirstOfThem() async throws {
        async let a = db.execute([SQLStatement("INSERT INTO t (v) VALUES ('a')")], idempotencyKey: "same")
        async let b = db.execute([SQLStatement("INSERT INTO t (v) VALUES ('a')")], idempotencyKey: "same")
        let (ra, rb) = try await (a, b)
        XCTAssertEqual(ra, rb)
        let rows = try await count()
        XCTAssertEqual(rows, [[.integer(1)]])
    }

    func testAFailedCommitStoresNoKeySoTheRetryRuns() async throws {
        sink.failure = "standby unavailable"
        do {
            _ = try await db.execute([SQLStatement("INSERT INTO t (v) VALUES ('y')")], idempotencyKey: "k-fail")
            XCTFail("the commit must fail")
        } catch {}
        sink.failure = nil
        let retry = try await db.execute([SQLStatement("INSERT INTO t (v) VALUES ('y')")], idempotencyKey: "k-fail")
        guard case .success(let outcome) = retry[0] else { return XCTFail("\(retry)") }
        XCTAssertEqual(outcome.rowsAffected, 1, "the retry of a failed commit must run")
        let rows = try await count()
        XCTAssertEqual(rows, [[.integer(1)]])
    }

    func testExpiredKeysRunAgainAndTheCountIsBounded() async throws {
        db.close()
        var options = TenantDatabase.Options()
        options.idempotencyKeyLifetimeMs = -1 // already expired when stored
        options.idempotencyKeysMax = 5
        db = try TenantDatabase(tenant: try TenantID("acme"), path: directory.path + "/acme.db", sink: sink, options: options)
        _ = try await db.execute([SQLStatement("INSERT INTO t (v) VALUES ('z')")], idempotencyKey: "old")
        _ = try await db.execute([SQLStatement("INSERT INTO t (v) VALUES ('z')")], idempotencyKey: "old")
        let rows = try await count()
        XCTAssertEqual(rows, [[.integer(2)]], "an expired key no longer holds the request back")
        db.close()
        options.idempotencyKeyLifetimeMs = 3_600_000
        db = try TenantDatabase(tenant: try TenantID("acme"), path: directory.path + "/acme.db", sink: sink, options: options)
        for i in 0..<20 { _ = try await db.execute([SQLStatement("SELECT 1")], idempotencyKey: "bounded-\(i)") }
        let kept = try await db.withWriter { try $0.connection.scalar("SELECT count(*) FROM _apiary_idempotency") }
        XCTAssertLessThanOrEqual(kept, 5, "keys past the bound must go")
    }

    func testTenantSQLCannotTouchTheKeys() async throws {
        _ = try await db.execute([SQLStatement("SELECT 1")], idempotencyKey: "private")
        for sql in ["SELECT * FROM _apiary_idempotency", "DELETE FROM _apiary_idempotency", "DROP TABLE _apiary_idempotency",
                    "UPDATE _apiary_idempotency SET expires_ms = 0", "ALTER TABLE _apiary_idempotency RENAME TO x",
                    "CREATE TRIGGER spy AFTER INSERT ON _apiary_idempotency BEGIN SELECT 1; END",
                    "CREATE INDEX i ON _APIARY_IDEMPOTENCY (expires_ms)", "CREATE TABLE _apiary_mine (x)"] {
            let results = try await db.execute([SQLStatement(sql)])
            guard case .failure(let message) = results[0] else { return XCTFail("\(sql) must be refused") }
            XCTAssertTrue(message.contains("not authorized") || message.contains("prohibited"), "\(sql): \(message)")
        }
        let read = try await db.query([SQLStatement("SELECT key FROM _apiary_idempotency")])
        guard case .failure = read[0] else { return XCTFail("a reader must not read the keys") }
    }
}

/// rqlite's `?transaction` on a query: the statements read one snapshot. A write commits while
/// the first statement is held at a gate; with a transaction the second statement still sees
/// the table as the first did, without one it sees the write.
final class ReadTransactionTests: XCTestCase {
    func counts(transaction: Bool) async throws -> [[[SQLValue]]] {
        let directory = TemporaryDirectory()
        let gates = SQLGates()
        var options = TenantDatabase.Options()
        gates.install(on: &options)
        let db = try TenantDatabase(tenant: try TenantID("acme"), path: directory.path + "/acme.db",
                                    sink: ReplicaSink(replicaPath: directory.path + "/replica.db"), options: options)
        defer { db.close() }
        defer { gates.openAll() }
        try await db.mustExecute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        try await db.mustExecute("INSERT INTO t VALUES (1)")
        let read = Task {
            try await db.query([SQLStatement("SELECT count(*), test_gate('between') FROM t"), SQLStatement("SELECT count(*) FROM t")],
                               transaction: transaction)
        }
        try await gates.reached("between")
        try await db.mustExecute("INSERT INTO t VALUES (2)") // commits while the first statement waits
        gates.open("between")
        return try await read.value.map { result in
            guard case .success(let outcome) = result else { return [] }
            return outcome.rows.map { [$0[0]] }
        }
    }

    func testAQueryWithATransactionReadsOneSnapshot() async throws {
        let counts = try await counts(transaction: true)
        XCTAssertEqual(counts, [[[.integer(1)]], [[.integer(1)]]])
    }

    /// The table of each column is kept (rqlite's `qualify_columns`), "" for an expression.
    func testColumnsKnowTheirTables() async throws {
        let directory = TemporaryDirectory()
        let db = try TenantDatabase(tenant: try TenantID("acme"), path: directory.path + "/acme.db", sink: ReplicaSink(replicaPath: directory.path + "/replica.db"))
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        let results = try await db.query([SQLStatement("SELECT id, id + 1 AS n FROM t")])
        guard case .success(let outcome)? = results.first else { return XCTFail("\(results)") }
        XCTAssertEqual(outcome.columnTables, ["t", ""])
    }

    func testWithoutOneEachStatementReadsTheLatestCommit() async throws {
        let counts = try await counts(transaction: false)
        XCTAssertEqual(counts, [[[.integer(1)]], [[.integer(2)]]])
    }
}
