import ApiaryCore
import CApiaryVFS
import CSQLite
import Foundation
import XCTest
@testable import ApiaryStorage

/// The SQL sandbox (DESIGN §4, invariant 7): what tenant SQL may and may not reach, checked
/// against the system's own SQLite build (Debian's turns on the FTS3 tokenizer interface,
/// extension loading, the statement virtual table and 250,000-parameter statements).
final class SandboxTests: XCTestCase {
    var directory: TemporaryDirectory!
    var db: TenantDatabase!

    override func setUp() async throws {
        directory = TemporaryDirectory()
        db = try TenantDatabase(tenant: try TenantID("acme"), path: directory.path + "/acme.db",
                                sink: ReplicaSink(replicaPath: directory.path + "/replica.db"))
        try await db.mustExecute("CREATE TABLE t (id INTEGER PRIMARY KEY, v)")
    }

    override func tearDown() {
        db?.close()
        db = nil
        directory = nil
    }

    /// The message of a statement that must fail, through the writer or a reader.
    func refusal(_ sql: String, _ parameters: [SQLValue] = [], write: Bool = false,
                 file: StaticString = #filePath, line: UInt = #line) async throws -> String {
        let statements = [SQLStatement(sql, parameters)]
        let results = write ? try await db.execute(statements) : try await db.query(statements)
        guard case .failure(let message) = results[0] else {
            XCTFail("\(sql) must be refused, got \(results)", file: file, line: line)
            return ""
        }
        return message
    }

    func value(_ sql: String, file: StaticString = #filePath, line: UInt = #line) async throws -> SQLValue? {
        let results = try await db.query([SQLStatement(sql)])
        guard case .success(let outcome) = results[0] else {
            XCTFail("\(sql) must run, got \(results)", file: file, line: line)
            return nil
        }
        return outcome.rows.first?.first
    }

    // MARK: Functions: an allow-list, matched on the function's name

    /// Found by a new user: `fts3_tokenizer('simple')` returned a pointer from inside the
    /// process, and registering a forged one crashed the node with a segmentation fault.
    func testTheFTS3TokenizerInterfaceIsClosed() async throws {
        for write in [false, true] {
            let leak = try await refusal("SELECT hex(fts3_tokenizer('simple'))", write: write)
            XCTAssertTrue(leak.contains("not authorized"), leak)
            let forge = try await refusal("SELECT fts3_tokenizer('simple', x'4141414141414141')", write: write)
            XCTAssertTrue(forge.contains("not authorized"), forge)
            // A bound blob passes SQLite's own check even with the interface off
            // (sqlite3_value_frombind): only the authorizer stops this one.
            let bound = try await refusal("SELECT fts3_tokenizer('simple', ?)", [.blob(Array(repeating: 0x41, count: 8))], write: write)
            XCTAssertTrue(bound.contains("not authorized"), bound)
        }
        // Full-text search itself still works, with the built-in tokenizer.
        try await db.mustExecute("CREATE VIRTUAL TABLE f USING fts3(x)")
        try await db.mustExecute("INSERT INTO f VALUES ('hello sandbox')")
        let hits = try await value("SELECT count(*) FROM f WHERE f MATCH 'sandbox'")
        XCTAssertEqual(hits, .integer(1))
    }

    func testFunctionsOffTheListAreRefusedByName() async throws {
        for sql in ["SELECT load_extension('/lib/x86_64-linux-gnu/libc.so.6')",
                    "SELECT sqlite_compileoption_get(0)", "SELECT sqlite_compileoption_used('ENABLE_FTS3')",
                    "SELECT fts5(NULL)", "SELECT rtreenode(2, x'00')", "SELECT sqlite_log(1, 'x')"] {
            let message = try await refusal(sql)
            XCTAssertTrue(message.contains("not authorized"), "\(sql): \(message)")
        }
        // …also inside a view, where the function is only reached when the view is used.
        try await db.mustExecute("CREATE VIEW leak AS SELECT sqlite_compileoption_get(0) AS o")
        let throughView = try await refusal("SELECT * FROM leak")
        XCTAssertTrue(throughView.contains("not authorized"), throughView)
    }

    /// Found in review: ALTER TABLE runs SQLite's internal functions under the tenant's
    /// authorizer, and an allow-list without them refused every schema migration.
    func testAlterTableWorksAndItsInternalFunctionsStayInternal() async throws {
        try await db.mustExecute("CREATE TABLE m (a, b, c)")
        try await db.mustExecute("ALTER TABLE m RENAME TO m2")
        try await db.mustExecute("ALTER TABLE m2 RENAME COLUMN a TO aa")
        try await db.mustExecute("ALTER TABLE m2 DROP COLUMN c")
        try await db.mustExecute("ALTER TABLE m2 ADD COLUMN d")
        let columns = try await db.rows("SELECT group_concat(name) FROM pragma_table_info('m2')")
        XCTAssertEqual(columns, [[.text("aa,b,d")]])
        let direct = try await refusal("SELECT sqlite_rename_test('main', 'CREATE TABLE q(a)', 0, 'x', 0, 0, 0)")
        XCTAssertTrue(direct.contains("no such function"), direct)
        // What ALTER TABLE may do to temp's schema table, a tenant may not.
        for sql in ["UPDATE temp.sqlite_temp_master SET sql = 'x'", "UPDATE sqlite_master SET sql = 'x'"] {
            let message = try await refusal(sql, write: true)
            XCTAssertFalse(message.isEmpty, sql)
        }
    }

    func testListedFunctionsRun() async throws {
        let json = try await value(#"SELECT json_extract('{"a":[1,2,3]}', '$.a[2]')"#)
        XCTAssertEqual(json, .integer(3))
        let arrow = try await value(#"SELECT '{"a":"b"}' ->> '$.a'"#)
        XCTAssertEqual(arrow, .text("b"))
        let date = try await value("SELECT date('2026-12-07', '+1 day')")
        XCTAssertEqual(date, .text("2026-12-08"))
        let math = try await value("SELECT round(sqrt(16) + pi() - pi(), 1)")
        XCTAssertEqual(math, .real(4.0))
        let text = try await value("SELECT upper(substr(printf('%s-%d', 'ab', 7), 1, 3)) || hex(x'0a')")
        XCTAssertEqual(text, .text("AB-0A"))
        try await db.mustExecute("INSERT INTO t (v) VALUES ('x'), ('y')")
        let window = try await value("SELECT group_concat(r) FROM (SELECT row_number() OVER (ORDER BY id) AS r FROM t)")
        XCTAssertEqual(window, .text("1,2"))
        let version = try await value("SELECT sqlite_version() IS NOT NULL")
        XCTAssertEqual(version, .integer(1))
    }

    // MARK: No other file, no connection-local state

    func testNoStatementReachesAnotherFile() async throws {
        let target = directory.path + "/copy.db"
        for sql in ["ATTACH DATABASE '\(target)' AS other", "VACUUM INTO '\(target)'", "VACUUM"] {
            for write in [false, true] {
                let message = try await refusal(sql, write: write)
                XCTAssertFalse(message.isEmpty, sql)
            }
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: target), "a statement wrote another file")
        // Apiary's own VACUUM (admin work on the writer) still runs, and leaves the limit in place.
        try await db.withWriter { try $0.exec("VACUUM") }
        for write in [false, true] {
            let after = try await refusal("VACUUM INTO '\(target)'", write: write)
            XCTAssertFalse(after.isEmpty)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: target), "a statement wrote another file after an admin VACUUM")
        let attachLimit = try await db.withWriter { sqlite3_limit($0.connection.handle, SQLITE_LIMIT_ATTACHED, -1) }
        XCTAssertEqual(attachLimit, 0)
    }

    /// TEMP objects live on one connection: not replicated, lost at failover, and on a reader
    /// they would carry over from one request into another.
    func testTemporaryObjectsAreRefused() async throws {
        for sql in ["CREATE TEMP TABLE scratch (x)", "CREATE TABLE temp.scratch (x)",
                    "CREATE TEMP VIEW tv AS SELECT 1", "CREATE TEMP TRIGGER tt AFTER INSERT ON t BEGIN SELECT 1; END"] {
            for write in [false, true] {
                let message = try await refusal(sql, write: write)
                XCTAssertTrue(message.contains("not authorized"), "\(sql): \(message)")
            }
        }
        // ORMs look for a table main lacks in temp: introspection may read it (always empty).
        let results = try await db.query([SQLStatement("PRAGMA temp.table_info(t)"), SQLStatement("PRAGMA temp.index_list(t)")])
        for result in results {
            guard case .success(let outcome) = result else { return XCTFail("temp introspection must run: \(results)") }
            XCTAssertTrue(outcome.rows.isEmpty)
        }
        let setting = try await refusal("PRAGMA temp.journal_mode", write: true)
        XCTAssertTrue(setting.contains("not authorized"), setting)
    }

    func testVirtualTablesOnlyFromListedModules() async throws {
        try await db.mustExecute("CREATE VIRTUAL TABLE r USING rtree(id, x0, x1)")
        try await db.mustExecute("CREATE VIRTUAL TABLE f5 USING fts5(body)")
        let tokenize = try await refusal("CREATE VIRTUAL TABLE tok USING fts3tokenize('simple')", write: true)
        XCTAssertTrue(tokenize.contains("not authorized"), tokenize)
        let statements = try await refusal("SELECT sql FROM sqlite_stmt")
        XCTAssertTrue(statements.contains("prohibited"), statements)
    }

    func testOnlyIntrospectionPragmas() async throws {
        for sql in ["PRAGMA journal_mode=DELETE", "PRAGMA writable_schema=ON", "PRAGMA synchronous=OFF", "PRAGMA page_size=8192",
                    "SELECT * FROM pragma_compile_options"] {
            let message = try await refusal(sql, write: true)
            XCTAssertTrue(message.contains("not authorized") || message.contains("prohibited"), "\(sql): \(message)")
        }
        let info = try await db.query([SQLStatement("PRAGMA table_info(t)")])
        guard case .success(let outcome) = info[0] else { return XCTFail("table_info must run: \(info)") }
        XCTAssertEqual(outcome.rows.count, 2)
        let pageSize = try await value("PRAGMA page_size") // read, not set
        XCTAssertEqual(pageSize, .integer(4096))
    }

    // MARK: Hardening and limits

    func testEveryConnectionIsHardened() throws {
        for readOnly in [false, true] {
            let connection = try SQLiteConnection(path: directory.path + "/acme.db", readOnly: readOnly)
            let handle = connection.handle
            XCTAssertEqual(apiary_db_config_flag(handle, SQLITE_DBCONFIG_DEFENSIVE), 1)
            XCTAssertEqual(apiary_db_config_flag(handle, SQLITE_DBCONFIG_TRUSTED_SCHEMA), 0)
            XCTAssertEqual(apiary_db_config_flag(handle, SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER), 0)
            XCTAssertEqual(apiary_db_config_flag(handle, SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION), 0)
            XCTAssertEqual(sqlite3_limit(handle, SQLITE_LIMIT_ATTACHED, -1), 0)
            XCTAssertEqual(sqlite3_limit(handle, SQLITE_LIMIT_VARIABLE_NUMBER, -1), 32_766)
            XCTAssertEqual(sqlite3_limit(handle, SQLITE_LIMIT_LENGTH, -1), 32 << 20)
        }
    }

    func testLimitsRefuseOversizedValuesAndStatements() async throws {
        let big = try await refusal("SELECT length(zeroblob(40000000))")
        XCTAssertTrue(big.contains("too big"), big)
        let placeholders = Array(repeating: "?", count: 40_000).joined(separator: ",")
        let tooMany = try await refusal("SELECT count(*) FROM t WHERE id IN (\(placeholders))", Array(repeating: .integer(1), count: 40_000))
        XCTAssertTrue(tooMany.contains("too many SQL variables"), tooMany)
        let deep = Array(repeating: "1", count: 2_000).joined(separator: " + ") // a left-deep tree
        let depth = try await refusal("SELECT \(deep)")
        XCTAssertTrue(depth.contains("maximum depth 500"), depth)
        let like = try await refusal("SELECT 'a' LIKE '\(String(repeating: "%", count: 2_000))'")
        XCTAssertTrue(like.contains("too complex"), like)
        // The node is unharmed: an ordinary statement still runs.
        let one = try await value("SELECT 1")
        XCTAssertEqual(one, .integer(1))
    }
}
