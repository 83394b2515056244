import ApiaryCore
import Foundation
import XCTest
@testable import ApiaryStorage

/// What rqlite's clients send: named values, several statements in one entry, parameters
/// that do not match; and the per-statement time rqlite reports.
final class ParameterTests: XCTestCase {
    var dir: TemporaryDirectory!
    var db: TenantDatabase!

    override func setUp() async throws {
        dir = TemporaryDirectory()
        db = try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: ReplicaSink(replicaPath: dir.path + "/r.db"))
        try await db.mustExecute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, age INTEGER)")
    }

    override func tearDown() {
        db.close()
    }

    func one(_ statement: SQLStatement) async throws -> StatementResult {
        try await db.execute([statement])[0]
    }

    func testNamedValuesBindByColonAtAndDollarNames() async throws {
        for sql in ["INSERT INTO t(name, age) VALUES(:name, :age)", "INSERT INTO t(name, age) VALUES(@name, @age)",
                    "INSERT INTO t(name, age) VALUES($name, $age)"] {
            let result = try await one(SQLStatement(sql, [.integer(20), .text("fiona")], names: ["age", "name"]))
            guard case .success(let o) = result else { return XCTFail("\(sql): \(result)") }
            XCTAssertEqual(o.rowsAffected, 1)
        }
        let rows = try await db.rows("SELECT name, age FROM t")
        XCTAssertEqual(rows, Array(repeating: [.text("fiona"), .integer(20)], count: 3))
        let queried = try await db.query([SQLStatement("SELECT count(*) FROM t WHERE name = :name", [.text("fiona")], names: ["name"])])
        guard case .success(let o) = queried[0] else { return XCTFail("\(queried)") }
        XCTAssertEqual(o.rows, [[.integer(3)]])
    }

    func testNamedAndPositionalValuesMix() async throws {
        let result = try await one(SQLStatement("INSERT INTO t(name, age) VALUES(?, :age)", [.integer(7), .text("declan")], names: ["age", ""]))
        guard case .success = result else { return XCTFail("\(result)") }
        let rows = try await db.rows("SELECT name, age FROM t")
        XCTAssertEqual(rows, [[.text("declan"), .integer(7)]])
    }

    /// As rqlite (its driver ignores values it has no parameter for): extra names are
    /// ignored; a parameter without a value is refused, naming it.
    func testUnusedNamesAreIgnoredAndMissingOnesRefused() async throws {
        let extra = try await one(SQLStatement("INSERT INTO t(name) VALUES(:name)", [.text("a"), .integer(1)], names: ["name", "unused"]))
        guard case .success = extra else { return XCTFail("\(extra)") }
        let missing = try await one(SQLStatement("INSERT INTO t(name, age) VALUES(:name, :age)", [.text("a")], names: ["name"]))
        guard case .failure(let message) = missing else { return XCTFail("a parameter without a value must be refused") }
        XCTAssertTrue(message.contains(":age"), message)
    }

    func testPositionalCountsMustMatch() async throws {
        for values in [[SQLValue.text("a")], [.text("a"), .integer(1), .integer(2)]] {
            let result = try await one(SQLStatement("INSERT INTO t(name, age) VALUES(?, ?)", values))
            guard case .failure(let message) = result else { return XCTFail("\(values.count) values for 2 parameters must be refused") }
            XCTAssertEqual(message, "statement has 2 parameters, \(values.count) given")
        }
        let count = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(count, [[.integer(0)]])
    }

    /// rqlite's SQLite driver runs every statement of an entry; so does Apiary, each taking
    /// its parameters in turn; the entry's outcome is its last statement's.
    func testSeveralStatementsInOneEntryRunInOrder() async throws {
        let result = try await one(SQLStatement("INSERT INTO t(name) VALUES(?); INSERT INTO t(name) VALUES(?);  -- done\n",
                                                [.text("a"), .text("b")]))
        guard case .success(let o) = result else { return XCTFail("\(result)") }
        XCTAssertEqual(o.lastInsertID, 2)
        XCTAssertEqual(o.rowsAffected, 1)
        XCTAssertFalse(o.isReadOnly)
        let queried = try await db.query([SQLStatement("SELECT 1; SELECT name FROM t ORDER BY id")])
        guard case .success(let q) = queried[0] else { return XCTFail("\(queried)") }
        XCTAssertEqual(q.columns, ["name"])
        XCTAssertEqual(q.rows, [[.text("a")], [.text("b")]])
    }

    /// An entry is one unit: a failing statement in it undoes the statements before it.
    func testAFailingStatementUndoesItsEntry() async throws {
        let results = try await db.execute([SQLStatement("INSERT INTO t(name) VALUES('kept')"),
                                            SQLStatement("INSERT INTO t(name) VALUES('undone'); INSERT INTO nope VALUES(1)")])
        guard case .failure(let message) = results[1] else { return XCTFail("\(results)") }
        XCTAssertTrue(message.contains("no such table"), message)
        let rows = try await db.rows("SELECT name FROM t")
        XCTAssertEqual(rows, [[.text("kept")]])
    }

    func testEveryStatementOfAnEntryPassesTheSandbox() async throws {
        let result = try await one(SQLStatement("SELECT 1; ATTACH DATABASE 'x.db' AS x"))
        guard case .failure(let message) = result else { return XCTFail("ATTACH must be refused in any position") }
        XCTAssertTrue(message.contains("not authorized") || message.contains("too many attached"), message)
    }

    func testCommentsAndEmptyStatementsAreNoStatements() async throws {
        for sql in ["-- nothing", ";", "  ;; ", "/* a */ ; -- b"] {
            let result = try await one(SQLStatement(sql))
            guard case .success(let o) = result else { return XCTFail("\(sql): \(result)") }
            XCTAssertEqual(o.rowsAffected, 0, sql)
        }
        let result = try await one(SQLStatement(";INSERT INTO t(name) VALUES('after a semicolon')"))
        guard case .success(let o) = result else { return XCTFail("\(result)") }
        XCTAssertEqual(o.rowsAffected, 1, "the statement after an empty one runs")
    }

    func testOutcomesCarryTheirTimeButCompareWithoutIt() async throws {
        let result = try await one(SQLStatement("INSERT INTO t(name) VALUES('x')"))
        guard case .success(let o) = result else { return XCTFail("\(result)") }
        XCTAssertGreaterThan(o.timeNs, 0)
        var other = o
        other.timeNs += 1
        XCTAssertEqual(o, other)
    }
}
