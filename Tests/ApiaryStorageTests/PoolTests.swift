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
}
