import ApiaryCore
import Foundation
import XCTest
@testable import ApiaryStorage

final class PoolTests: XCTestCase {
    func threadCount() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? 0 }

    /// Many tenants share a small pool: every write completes, each tenant's commits stay
    /// serial, and opening more tenants does not add threads (DESIGN §4's bounded pool).
    func testManyTenantsShareABoundedPoolOfThreads() async throws {
        let dir = TemporaryDirectory()
        let writers = BlockingPool(threads: 2, name: "test-writer")
        let readers = BlockingPool(threads: 2, name: "test-reader")
        let before = threadCount()
        var databases: [TenantDatabase] = []
        for i in 0..<30 {
            let sink = ReplicaSink(replicaPath: dir.path + "/replica-\(i).db")
            let db = try TenantDatabase(tenant: try TenantID("t\(i)"), path: dir.path + "/t\(i).db", sink: sink,
                                        writerPool: writers, readerPool: readers)
            try await db.mustExecute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
            databases.append(db)
        }
        let dbs = databases
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (i, db) in dbs.enumerated() {
                for j in 0..<20 {
                    group.addTask {
                        let r = try await db.execute([SQLStatement("INSERT INTO t VALUES (?)", [.integer(Int64(i * 100 + j))])])
                        guard case .success = r[0] else { throw StorageError(.badRequest, "insert failed: \(r)") }
                        _ = try await db.query([SQLStatement("SELECT count(*) FROM t")])
                    }
                }
            }
            try await group.waitForAll()
        }
        for db in dbs {
            let rows = try await db.rows("SELECT count(*) FROM t")
            XCTAssertEqual(rows, [[.integer(20)]])
        }
        XCTAssertLessThan(threadCount() - before, 10, "threads grew with the number of tenants")
        for db in dbs { db.close() }
    }

    /// A busy tenant keeps its pool thread between batches only while no other tenant waits
    /// for one: with a single thread, a write to a quiet tenant is not stuck behind a backlog.
    func testABusyTenantYieldsItsThreadWhenAnotherWaits() async throws {
        let dir = TemporaryDirectory()
        let writers = BlockingPool(threads: 1, name: "test-writer-1")
        let gates = SQLGates()
        var options = TenantDatabase.Options()
        options.batchRequestsMax = 1 // one commit per request: a long line of batches
        gates.install(on: &options)
        let busy = try TenantDatabase(tenant: try TenantID("busy"), path: dir.path + "/busy.db", sink: ReplicaSink(replicaPath: dir.path + "/rb.db"),
                                      options: options, writerPool: writers)
        let quiet = try TenantDatabase(tenant: try TenantID("quiet"), path: dir.path + "/quiet.db", sink: ReplicaSink(replicaPath: dir.path + "/rq.db"),
                                       writerPool: writers)
        defer { busy.close(); quiet.close() }
        defer { gates.openAll() }
        try await busy.mustExecute("CREATE TABLE t (x)")
        try await quiet.mustExecute("CREATE TABLE t (x)")
        // The busy tenant's first write holds the only thread at its gate while 199 more queue.
        let finished = LockedCounter()
        let backlog = [Submitted(busy, "INSERT INTO t SELECT 0 WHERE test_gate('first')") { finished.increment() }]
            + (1..<200).map { i in Submitted(busy, "INSERT INTO t VALUES (\(i))") { finished.increment() } }
        try await gates.reached("first")
        // One write elsewhere now waits for the same thread. How many busy writes were answered
        // before it is read on the writer thread as it is answered, not whenever the test wakes.
        let finishedBeforeQuiet = LockedCounter()
        let write = Submitted(quiet, "INSERT INTO t VALUES (1)") {
            finishedBeforeQuiet.increment(by: finished.value)
        }
        gates.open("first")
        guard case .success = try await write.value[0] else { return XCTFail("the quiet tenant's write failed") }
        XCTAssertLessThan(finishedBeforeQuiet.value, 150, "the quiet tenant waited for most of the busy one's backlog")
        for request in backlog {
            guard case .success = try await request.value[0] else { return XCTFail("a busy tenant's write failed") }
        }
    }
}

extension PoolTests {
    /// Concurrent queries open up to `readersMax` connections; once they are done a quiet
    /// tenant keeps only `readersIdleMax` of them open.
    func testAQuietTenantKeepsFewReaderConnections() async throws {
        let dir = TemporaryDirectory()
        let db = try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: ReplicaSink(replicaPath: dir.path + "/r.db"))
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (x)")
        let slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 300000) SELECT count(*) FROM c"
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<8 { group.addTask { _ = try await db.query([SQLStatement(slow)]) } }
            try await group.waitForAll()
        }
        XCTAssertTrue((1...db.options.readersIdleMax).contains(db.readers.idleCount), "\(db.readers.idleCount) idle")
        XCTAssertLessThan(db.options.readersIdleMax, db.options.readersMax)
    }
}

final class LockedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func increment(by n: Int = 1) { lock.lock(); count += n; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return count }
}

