import ApiaryCore
import CSQLite
import Foundation
import XCTest
@testable import ApiaryStorage

final class CaptureTests: XCTestCase {
    var dir: TemporaryDirectory!
    var sink: ReplicaSink!
    var db: TenantDatabase!
    /// `test_gate('name')` in this database's tenant SQL (`SQLGates`).
    var gates: SQLGates!

    override func setUp() async throws {
        dir = TemporaryDirectory()
        sink = ReplicaSink(replicaPath: dir.path + "/replica.db")
        gates = SQLGates()
        var options = TenantDatabase.Options()
        gates.install(on: &options)
        db = try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: sink, options: options)
    }

    override func tearDown() async throws {
        gates?.openAll()
        db?.close()
        db = nil
        dir = nil
    }

    /// The replica built from captured commits alone equals the primary, page for page.
    func assertReplicaMatches(file: StaticString = #filePath, line: UInt = #line) async throws {
        let primaryChecksum = try await db.writerChecksum
        let replica = try DatabaseFile.pageHashes(of: sink.replicaPath)
        XCTAssertEqual(replica.checksum, primaryChecksum, "replica differs from the primary", file: file, line: line)
        // The primary's file after a checkpoint holds the same pages as the replica.
        try await db.withWriter { try $0.exec("PRAGMA wal_checkpoint(TRUNCATE)") }
        let primaryFile = try DatabaseFile.pageHashes(of: db.path)
        XCTAssertEqual(primaryFile.checksum, replica.checksum, "primary file differs from the replica", file: file, line: line)
    }

    func assertRows(_ sql: String, _ expected: [[SQLValue]], file: StaticString = #filePath, line: UInt = #line) async throws {
        let rows = try await db.rows(sql)
        XCTAssertEqual(rows, expected, sql, file: file, line: line)
    }

    func testNewDatabaseHasApiaryFormatAndBootstrapCommit() async throws {
        XCTAssertEqual(sink.commitCount, 1, "the file as created is shipped as the first commit")
        let header = try Array(Data(contentsOf: URL(fileURLWithPath: db.path)).prefix(100))
        XCTAssertEqual(Int(header[16]) << 8 | Int(header[17]), 4096, "page size")
        XCTAssertEqual(header[20], 32, "reserved bytes per page")
        XCTAssertEqual(header[18], 2, "WAL write version")
        try await assertReplicaMatches()
    }

    func testDDLAndWritesAreCapturedAndReplicaIsAValidDatabase() async throws {
        try await db.mustExecute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB)")
        try await db.mustExecute("CREATE INDEX kv_v ON kv(v)")
        for i in 0..<50 { try await db.mustExecute("INSERT INTO kv VALUES (?, ?)", [.text("k\(i)"), .blob(Array(repeating: UInt8(i), count: 100))]) }
        try await db.mustExecute("ALTER TABLE kv ADD COLUMN extra INTEGER DEFAULT 7")
        XCTAssertGreaterThanOrEqual(sink.commitCount, 1 + 3 + 1)
        try await assertReplicaMatches()
        let rows = try readWithPlainSQLite(sink.replicaPath, "SELECT count(*), sum(extra) FROM kv")
        XCTAssertEqual(rows, [[.integer(50), .integer(350)]])
    }

    func testTransactionOfMoreThan2000PagesSpillsAndIsCapturedWhole() async throws {
        try await db.mustExecute("CREATE TABLE big (id INTEGER PRIMARY KEY, payload BLOB)")
        // A small page cache forces SQLite to spill frames to the WAL before the commit.
        try await db.withWriter { try $0.exec("PRAGMA cache_size=50") }
        let before = sink.commitCount
        var statements: [SQLStatement] = []
        for i in 0..<2500 { statements.append(SQLStatement("INSERT INTO big VALUES (?, zeroblob(3000) || ?)", [.integer(Int64(i)), .text("row\(i)")])) }
        let results = try await db.execute(statements, transaction: true)
        XCTAssertTrue(results.allSatisfy { if case .success = $0 { return true } else { return false } })
        XCTAssertEqual(sink.commitCount, before + 1, "one transaction, one commit")
        XCTAssertGreaterThan(sink.lastCommit!.pages.count, 2000)
        try await assertReplicaMatches()
        XCTAssertEqual(try readWithPlainSQLite(sink.replicaPath, "SELECT count(*) FROM big"), [[.integer(2500)]])
    }

    func testCaptureContinuesAcrossWALRestartAfterCheckpoint() async throws {
        try await db.mustExecute("CREATE TABLE t (x)")
        for round in 0..<4 {
            for i in 0..<20 { try await db.mustExecute("INSERT INTO t VALUES (?)", [.integer(Int64(round * 100 + i))]) }
            // RESTART makes the next writer start the WAL over from its header (new salts).
            let mode = round % 2 == 0 ? "RESTART" : "TRUNCATE"
            try await db.withWriter { try $0.exec("PRAGMA wal_checkpoint(\(mode))") }
            try await assertReplicaMatches()
        }
        XCTAssertEqual(try readWithPlainSQLite(sink.replicaPath, "SELECT count(*) FROM t"), [[.integer(80)]])
    }

    /// A commit's frames are found from where SQLite's WAL writes ended, not from the file's
    /// size: an fstat per commit makes Linux (6.13+, multigrain timestamps) dirty the WAL's
    /// inode at every commit, and the log's durable write then pays for writing it too.
    func testCommitsFindTheirFramesWithoutAskingTheFileSystem() async throws {
        try await db.mustExecute("CREATE TABLE t (x)")
        // No automatic checkpoint inside a round: its WAL sync may ask for the size (once, and
        // legitimately), which would blur what the rounds count. The WAL starts over at each
        // round's end, where assertReplicaMatches checkpoints.
        try await db.withWriter { try $0.exec("PRAGMA cache_size=20"); try $0.exec("PRAGMA wal_autocheckpoint=0") }
        for round in 0..<3 {
            let (queriesBefore, commitsBefore) = try await db.withWriter { ($0.walSizeQueries, $0.commitsCaptured) }
            for i in 0..<30 { try await db.mustExecute("INSERT INTO t VALUES (?)", [.integer(Int64(round * 100 + i))]) }
            // A transaction spilling frames before its commit, and one rewriting spilled pages.
            try await db.execute((0..<400).map { _ in SQLStatement("INSERT INTO t VALUES (zeroblob(2000))") }, transaction: true)
            try await db.execute([SQLStatement("UPDATE t SET x = zeroblob(1900) WHERE rowid % 3 = 0")], transaction: true)
            let (queries, commits) = try await db.withWriter { ($0.walSizeQueries, $0.commitsCaptured) }
            XCTAssertEqual(commits - commitsBefore, 32, "round \(round)")
            XCTAssertEqual(queries, queriesBefore, "round \(round): commits asked for the WAL's size")
            try await assertReplicaMatches() // also checkpoints: the next round starts the WAL over
        }
    }

    func testVacuumShrinksTheReplicaToo() async throws {
        try await db.mustExecute("CREATE TABLE t (x BLOB)")
        try await db.execute((0..<200).map { _ in SQLStatement("INSERT INTO t VALUES (zeroblob(4000))") }, transaction: true)
        try await db.mustExecute("DELETE FROM t WHERE rowid > 10")
        let sizeBefore = sink.lastCommit!.dbSizePages
        try await db.withWriter { try $0.exec("VACUUM") }
        XCTAssertLessThan(sink.lastCommit!.dbSizePages, sizeBefore / 4)
        try await assertReplicaMatches()
        XCTAssertEqual(try readWithPlainSQLite(sink.replicaPath, "SELECT count(*) FROM t"), [[.integer(10)]])
    }

    func testFailedCaptureRollsBackAndNoReaderEverSeesIt() async throws {
        try await db.mustExecute("CREATE TABLE t (x)")
        try await db.mustExecute("INSERT INTO t VALUES (1)")
        sink.failure = "standby unavailable"
        do {
            _ = try await db.execute([SQLStatement("INSERT INTO t VALUES (2)")])
            XCTFail("the commit must fail when capture fails")
        } catch let error as StorageError {
            XCTAssertEqual(error.code, .commitFailed)
            XCTAssertEqual(error.message, "standby unavailable", "the client hears the sink's reason")
        }
        try await assertRows("SELECT x FROM t ORDER BY x", [[.integer(1)]])
        sink.failure = nil
        try await db.mustExecute("INSERT INTO t VALUES (3)")
        try await assertRows("SELECT x FROM t ORDER BY x", [[.integer(1)], [.integer(3)]])
        try await assertReplicaMatches()
    }

    func testFailedCommitIsNotReplayedByRecoveryAfterACrash() async throws {
        try await db.mustExecute("CREATE TABLE t (x)")
        try await db.mustExecute("INSERT INTO t VALUES (1)")
        sink.failure = "standby unavailable"
        _ = try? await db.execute([SQLStatement("INSERT INTO t VALUES (2)")])
        // Simulate a crash: copy the files as they are on disk now (WAL included, with the
        // failed commit's frames) and let SQLite's WAL recovery open the copy.
        let crashed = dir.path + "/crashed.db"
        for suffix in ["", "-wal"] {
            try FileManager.default.copyItem(atPath: db.path + suffix, toPath: crashed + suffix)
        }
        let connection = try SQLiteConnection(path: crashed, readOnly: false)
        XCTAssertEqual(try connection.run("SELECT x FROM t ORDER BY x").rows, [[.integer(1)]])
    }

    func testGroupCommitIsolatesRequestsAndFoldsThemIntoFewerCommits() async throws {
        try await db.mustExecute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
        let before = sink.commitCount
        // The writer holds a first request at its gate while all 200 queue, so they arrive while
        // a batch runs however fast the machine is.
        let holder = Submitted(db, "SELECT test_gate('hold')")
        try await gates.reached("hold")
        let requests = (0..<200).map { i in
            // Every 10th request fails (duplicate key) and must not fail its neighbours.
            let key = i % 10 == 0 ? 0 : i
            return Submitted(db, [SQLStatement("INSERT INTO t VALUES (?)", [.integer(Int64(key))])])
        }
        gates.open("hold")
        _ = try await holder.value
        var outcomes: [Int: [StatementResult]] = [:]
        for (i, request) in requests.enumerated() { outcomes[i] = try await request.value }
        let failures = outcomes.values.filter { if case .failure = $0[0] { return true } else { return false } }.count
        XCTAssertEqual(failures, 19, "all but the first insert of key 0 fail, alone")
        try await assertRows("SELECT count(*) FROM t", [[.integer(181)]])
        // (Fewer than 200 held even without batching: the 19 failed requests change no page.)
        XCTAssertEqual(sink.commitCount - before, 1, "the requests that queued while a batch ran share its commit")
        try await assertReplicaMatches()
    }

    /// Requests that arrive while a batch runs join it before its commit instead of waiting a
    /// whole commit cycle for the next (found profiling the insert benchmark).
    func testRequestsArrivingWhileABatchRunsJoinItsCommit() async throws {
        try await db.mustExecute("CREATE TABLE t (x)")
        let before = sink.commitCount
        let db = self.db!
        // The writer holds the first request inside its statement until the gate opens.
        let first = Submitted(db, "INSERT INTO t SELECT 3000000 WHERE test_gate('slow')")
        try await gates.reached("slow")
        let second = Submitted(db, "INSERT INTO t VALUES (-1)")
        let third = Submitted(db, "INSERT INTO t VALUES (-2)")
        gates.open("slow")
        let results = try await [first.value, second.value, third.value]
        for r in results {
            guard case .success = r[0] else { return XCTFail("\(r)") }
        }
        try await assertRows("SELECT x FROM t ORDER BY x", [[.integer(-2)], [.integer(-1)], [.integer(3_000_000)]])
        XCTAssertEqual(sink.commitCount - before, 1, "the two late requests joined the running batch's commit")
        try await assertReplicaMatches()
    }

    func testTransactionRequestIsAllOrNothingWhileOthersStandAlone() async throws {
        try await db.mustExecute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
        let tx = try await db.execute([SQLStatement("INSERT INTO t VALUES (1)"), SQLStatement("INSERT INTO t VALUES (1)"), SQLStatement("INSERT INTO t VALUES (2)")], transaction: true)
        XCTAssertEqual(tx.count, 2, "stops at the first failure")
        try await assertRows("SELECT count(*) FROM t", [[.integer(0)]])
        let loose = try await db.execute([SQLStatement("INSERT INTO t VALUES (1)"), SQLStatement("INSERT INTO t VALUES (1)"), SQLStatement("INSERT INTO t VALUES (2)")])
        XCTAssertEqual(loose.count, 3)
        try await assertRows("SELECT x FROM t ORDER BY x", [[.integer(1)], [.integer(2)]])
    }

    func testTenantSQLCannotEscapeTheSandbox() async throws {
        for sql in ["BEGIN", "COMMIT", "SAVEPOINT x", "ATTACH DATABASE '/tmp/other.db' AS o", "PRAGMA journal_mode=DELETE", "PRAGMA synchronous=OFF", "PRAGMA writable_schema=ON", "SELECT load_extension('x')"] {
            let results = try await db.execute([SQLStatement(sql)])
            guard case .failure(let message) = results[0] else { return XCTFail("\(sql) must be refused") }
            XCTAssertTrue(message.contains("not authorized") || message.contains("no such function"), "\(sql): \(message)")
        }
        try await db.mustExecute("PRAGMA user_version=3")
    }

    func testReopenKeepsDataAndCaptureGoesOn() async throws {
        try await db.mustExecute("CREATE TABLE t (x)")
        try await db.mustExecute("INSERT INTO t VALUES (1)")
        db.close()
        db = try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: sink)
        try await db.mustExecute("INSERT INTO t VALUES (2)")
        try await assertRows("SELECT count(*) FROM t", [[.integer(2)]])
        try await assertReplicaMatches()
    }
}
