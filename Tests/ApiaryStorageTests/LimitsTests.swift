import ApiaryCore
import Foundation
import XCTest
@testable import ApiaryStorage

final class LimitsTests: XCTestCase {
    /// Databases a failed test left deadlocked: never released, so their deinit cannot hang the run.
    nonisolated(unsafe) static var deadlocked: [TenantDatabase] = []

    func open(_ dir: TemporaryDirectory, _ adjust: (inout TenantDatabase.Options) -> Void) throws -> TenantDatabase {
        var options = TenantDatabase.Options()
        adjust(&options)
        return try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db",
                                  sink: ReplicaSink(replicaPath: dir.path + "/replica.db"), options: options)
    }

    static let endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    /// An insert that never ends on its own.
    static let endlessInsert = "INSERT INTO t " + endless.replacingOccurrences(of: "SELECT count(*) FROM c", with: "SELECT x FROM c")

    func testARunawayQueryIsStoppedAtTheTimeLimitAndTheReaderServesOn() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir) { $0.statementTimeMs = 200 }
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        let results = try await db.query([SQLStatement(Self.endless)])
        guard case .failure(let message) = results[0] else { return XCTFail("an endless query must be stopped") }
        XCTAssertTrue(message.contains("longer than the limit of 200 ms"), message)
        let after = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(after, [[.integer(0)]])
    }

    /// rqlite's `db_timeout`: a statement that asks for less time than the node's limit is
    /// stopped at what it asked for, on the reader and on the writer; one that asks for more
    /// gets the node's limit. (The statements never end on their own: the message names the
    /// bound that stopped them, whatever the machine's speed.)
    func testAStatementIsStoppedAtTheShorterOfItsOwnBoundAndTheNodes() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir) { $0.statementTimeMs = 2_000 }
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        var query = SQLStatement(Self.endless)
        query.timeMsMax = 50
        guard case .failure(let read)? = try await db.query([query]).first else { return XCTFail("an endless query must be stopped") }
        XCTAssertTrue(read.contains("longer than the limit of 50 ms"), read)
        var insert = SQLStatement(Self.endlessInsert)
        insert.timeMsMax = 60
        guard case .failure(let write)? = try await db.execute([insert]).first else { return XCTFail("an endless insert must be stopped") }
        XCTAssertTrue(write.contains("longer than the limit of 60 ms"), write)
        query.timeMsMax = 60_000
        guard case .failure(let capped)? = try await db.query([query]).first else { return XCTFail("an endless query must be stopped") }
        XCTAssertTrue(capped.contains("longer than the limit of 2000 ms"), "the node's limit holds against a longer ask: \(capped)")
        let rows = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(rows, [[.integer(0)]], "the stopped insert left nothing behind")
    }

    func testARunawayWriteIsStoppedAndDoesNotBlockTheWriter() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir) { $0.statementTimeMs = 200 }
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        let results = try await db.execute([SQLStatement(Self.endlessInsert)])
        guard case .failure(let message) = results[0] else { return XCTFail("an endless insert must be stopped") }
        XCTAssertTrue(message.contains("limit"), message)
        try await db.mustExecute("INSERT INTO t VALUES (1)")
        let rows = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(rows, [[.integer(1)]], "the stopped insert left nothing behind")
    }

    /// A group (queued writes: many clients' requests) commits in one transaction, and one
    /// request that makes SQLite roll the transaction back (a runaway insert stopped at the
    /// limit) fails alone: the others commit, together, and a statement too large is refused
    /// alone. (Each request of the group once ran as one request: the runaway took all.)
    func testAGroupCommitsTogetherAndEachRequestFailsAlone() async throws {
        let dir = TemporaryDirectory()
        var options = TenantDatabase.Options()
        options.statementTimeMs = 100
        options.statementBytesMax = 1_000
        let sink = ReplicaSink(replicaPath: dir.path + "/replica.db")
        let db = try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: sink, options: options)
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        let commitsBefore = sink.commitCount
        let tooLarge = "INSERT INTO t VALUES ('" + String(repeating: "x", count: 2_000) + "')"
        let group = [[SQLStatement("INSERT INTO t VALUES (1)")], [SQLStatement(Self.endlessInsert)], [SQLStatement(tooLarge)],
                     [SQLStatement("INSERT INTO t VALUES (2)"), SQLStatement("INSERT INTO missing VALUES (3)")], [SQLStatement("INSERT INTO t VALUES (4)")]]
        let results = await withCheckedContinuation { done in db.execute(group: group) { done.resume(returning: $0) } }
        XCTAssertEqual(results.count, 5)
        guard case .success(let runaway) = results[1], case .failure(let stopped)? = runaway.first else { return XCTFail("\(results[1])") }
        XCTAssertTrue(stopped.contains("limit"), stopped)
        guard case .failure(let refusal) = results[2] else { return XCTFail("a statement too large is refused: \(results[2])") }
        XCTAssertTrue("\(refusal)".contains("exceeds the limit"), "\(refusal)")
        guard case .success(let mixed) = results[3], mixed.count == 2, case .success = mixed[0], case .failure = mixed[1] else { return XCTFail("\(results[3])") }
        for i in [0, 4] { guard case .success(let r) = results[i], case .success = r.first else { return XCTFail("\(results[i])") } }
        let rows = try await db.rows("SELECT group_concat(x) FROM (SELECT x FROM t ORDER BY rowid)")
        XCTAssertEqual(rows, [[.text("1,2,4")]], "the others committed, in order")
        XCTAssertEqual(sink.commitCount, commitsBefore + 1, "in one commit")
    }

    /// After SQLite rolls a batch back, its retry takes no requests that arrived meanwhile: a
    /// stream of runaway requests cannot keep a good one from committing (found in review).
    /// Gates, not sleeps, put each request where the test needs it: no statement's speed matters.
    func testARetryAfterARollbackTakesNoNewcomers() async throws {
        let dir = TemporaryDirectory()
        let gates = SQLGates()
        let db = try open(dir) { $0.statementTimeMs = 300; gates.install(on: &$0) }
        defer { db.close() }
        defer { gates.openAll() }
        try await db.mustExecute("CREATE TABLE t (x)")
        // Holds the writer inside the first request of its batch until the test opens the gate.
        let busy = "INSERT INTO t SELECT -1 WHERE test_gate('busy')"
        // A runaway that waits at its gate once it runs, then runs into the time limit, which
        // rolls back the whole transaction.
        let gatedRunaway = "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c WHERE test_gate('r2')"
        final class Answers: @unchecked Sendable {
            private let lock = NSLock()
            private var names: [String] = []
            func add(_ name: String) { lock.withLock { names.append(name) } }
            var order: [String] { lock.withLock { names } }
        }
        let answered = Answers()
        func submit(_ name: String, _ sql: String) -> Submitted { Submitted(db, sql) { answered.add(name) } }
        let first = submit("busy", busy)
        try await gates.reached("busy")
        // Both wait while the busy request runs, so they join its batch late; r2 rolls it back.
        let r2 = submit("r2", gatedRunaway)
        let good = submit("good", "INSERT INTO t VALUES (1)")
        gates.open("busy")
        try await gates.reached("r2")
        // Arrives while r2 runs: it must wait for the next batch, not join the retry.
        let r3 = submit("r3", Self.endlessInsert)
        gates.open("r2")
        for request in [first, good] {
            guard case .success = try await request.value[0] else { return XCTFail("a good request failed") }
        }
        for request in [r2, r3] {
            guard case .failure = try await request.value[0] else { return XCTFail("a runaway request succeeded") }
        }
        let order = answered.order
        XCTAssertEqual(order.firstIndex(of: "r2"), 0, "\(order)")
        XCTAssertLessThan(try XCTUnwrap(order.firstIndex(of: "good")), try XCTUnwrap(order.firstIndex(of: "r3")),
                          "the retry took the newcomer: \(order)")
        let rows = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(rows, [[.integer(2)]])
    }

    /// A request refused at once (the queue is full) is answered outside the writer's lock: an
    /// answer that submits again straight away, as an event loop answering the next pipelined
    /// request does, must not deadlock on that lock (found in review).
    func testARefusalAnsweredAtOnceMaySubmitAgain() async throws {
        let dir = TemporaryDirectory()
        let gates = SQLGates()
        let db = try open(dir) { $0.queueRequestsMax = 1; gates.install(on: &$0) }
        try await db.mustExecute("CREATE TABLE t (x)")
        // The writer holds this one inside its statement until the gate opens…
        let running = Submitted(db, "INSERT INTO t SELECT -1 WHERE test_gate('busy')")
        try await gates.reached("busy")
        // …so this one stays in the queue.
        let queued = Submitted(db, "INSERT INTO t VALUES (1)")
        // The queue is full now: the next request is refused at once, and its answer submits
        // another one (also refused at once) from inside the callback.
        let answered = DispatchSemaphore(value: 0)
        final class Outcome: @unchecked Sendable { var first: String?; var second: String? }
        let outcome = Outcome()
        Thread.detachNewThread {
            db.execute([SQLStatement("INSERT INTO t VALUES (2)")]) { first in
                outcome.first = (try? first.get()).map { "\($0)" } ?? "\(first)"
                db.execute([SQLStatement("INSERT INTO t VALUES (3)")]) { second in
                    outcome.second = (try? second.get()).map { "\($0)" } ?? "\(second)"
                    answered.signal()
                }
            }
        }
        guard answered.wait(timeout: .now() + 10) == .success else {
            // Deadlocked: the writer is stuck too, so closing (even by deinit) would hang; keep it.
            Self.deadlocked.append(db)
            return XCTFail("a refusal answered under the writer's lock deadlocked the submit it made")
        }
        defer { db.close() }
        defer { gates.openAll() }
        XCTAssertTrue(outcome.first?.contains("queue full") ?? false, outcome.first ?? "nil")
        XCTAssertTrue(outcome.second?.contains("queue full") ?? false, outcome.second ?? "nil")
        gates.open("busy")
        _ = try await running.value
        _ = try await queued.value
    }

    /// SQLite rolls back the whole transaction on an interrupt; the batch's other requests
    /// must still be applied (they run again without the culprit).
    func testARunawayRequestDoesNotFailItsNeighboursInTheSameBatch() async throws {
        let dir = TemporaryDirectory()
        let gates = SQLGates()
        let db = try open(dir) { $0.statementTimeMs = 300; gates.install(on: &$0) }
        defer { db.close() }
        defer { gates.openAll() }
        try await db.mustExecute("CREATE TABLE t (x)")
        let runaway = Self.endlessInsert
        // The writer holds a first request at its gate while all 20 queue: they join its batch,
        // so the runaway has neighbours in its transaction however the threads are scheduled.
        let holder = Submitted(db, "SELECT test_gate('hold')")
        try await gates.reached("hold")
        let requests = (0..<20).map { i in
            let pair = [SQLStatement("INSERT INTO t VALUES (\(i))"), SQLStatement(i == 7 ? runaway : "SELECT 1")]
            return Submitted(db, pair)
        }
        gates.open("hold")
        guard case .success = try await holder.value[0] else { return XCTFail("the holding request failed") }
        var outcomes: [Int: [StatementResult]] = [:]
        for (i, request) in requests.enumerated() { outcomes[i] = try await request.value }
        for (i, results) in outcomes {
            if i == 7 {
                guard case .failure(let first) = results[0] else { return XCTFail("the culprit's first statement was undone: \(results)") }
                XCTAssertTrue(first.contains("not applied"), first)
            } else {
                XCTAssertTrue(results.allSatisfy { if case .success = $0 { return true } else { return false } }, "request \(i): \(results)")
            }
        }
        let rows = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(rows, [[.integer(19)]])
    }

    func testResultsAreBoundedInRowsAndBytes() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir) { $0.rowsMax = 50; $0.resultBytesMax = 10_000 }
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        try await db.execute((0..<100).map { _ in SQLStatement("INSERT INTO t VALUES (randomblob(300))") }, transaction: true)
        let many = try await db.query([SQLStatement("SELECT rowid FROM t")])
        guard case .failure(let rowsMessage) = many[0] else { return XCTFail("more than rowsMax rows must fail") }
        XCTAssertTrue(rowsMessage.contains("more than 50 rows"), rowsMessage)
        let big = try await db.query([SQLStatement("SELECT x FROM t LIMIT 40")])
        guard case .failure(let bytesMessage) = big[0] else { return XCTFail("more than resultBytesMax must fail") }
        XCTAssertTrue(bytesMessage.contains("larger than 10000 bytes"), bytesMessage)
        let fine = try await db.query([SQLStatement("SELECT x FROM t LIMIT 10")])
        guard case .success(let outcome) = fine[0] else { return XCTFail("a small result must pass: \(fine)") }
        XCTAssertEqual(outcome.rows.count, 10)
    }
}
