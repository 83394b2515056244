import ApiaryCore
import ApiaryLog
import ApiaryStorage
import Foundation
import XCTest
@testable import ApiaryNode

/// A standby that died in the middle of applying records repairs its database on restart from
/// the durable "applying through" intent and its log.
final class StandbyRecoveryTests: XCTestCase {
    /// Writes real commits of a tenant into a replication log, as a primary would.
    final class LogSink: CommitSink, @unchecked Sendable {
        let log: ReplicationLog
        var hashes = PageHashes()
        let isDurableOnCommit = false
        init(log: ReplicationLog) { self.log = log }
        func commit(tenant: TenantID, _ commit: CapturedCommit) throws {
            let record = Record(epoch: Epoch(1), lsn: log.last.lsn + 1, dbSizePages: commit.dbSizePages, checksum: commit.checksum, pages: commit.pages)
            try log.append(record)
            try log.sync()
        }
    }

    func testInterruptedApplyIsRedoneFromTheIntent() async throws {
        let root = NSTemporaryDirectory() + "apiary-standby-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: root) }
        let layout = DataLayout(root: root)
        let tenant = try TenantID("acme")
        try layout.createTenantDirectory(tenant)

        // The primary side: commits into the standby's log directory (as if streamed there).
        let primaryPath = root + "/primary.db"
        do {
            let log = try ReplicationLog(directory: layout.log(tenant))
            let db = try TenantDatabase(tenant: tenant, path: primaryPath, sink: LogSink(log: log))
            try await db.mustExecute("CREATE TABLE t (x)")
            for i in 0..<30 { try await db.mustExecute("INSERT INTO t VALUES (\(i))") }
            db.close()
            log.close()
        }
        let records = try { () throws -> [Record] in
            let log = try ReplicationLog(directory: layout.log(tenant))
            defer { log.close() }
            return try log.records(from: 1, countMax: 1000, bytesMax: .max)
        }()
        XCTAssertGreaterThan(records.count, 30)

        // The standby died while applying: intent says "through the last", the file holds the
        // first ten records and a torn half of later pages.
        var partial = PageHashes()
        for r in records.prefix(10) {
            try DatabaseFile.writePages(r.pages, dbSizePages: r.dbSizePages, to: layout.database(tenant))
            partial.apply(pages: r.pages, dbSizePages: r.dbSizePages)
        }
        let last = records.last!
        if let torn = last.pages.first {
            try DatabaseFile.Writer(path: layout.database(tenant)).write([Page(number: torn.number, bytes: [UInt8](repeating: 0xAB, count: DatabaseFile.pageSize))], dbSizePages: nil)
        }
        try AppliedState(lsn: records[9].lsn, checksum: records[9].checksum, applyingThroughLSN: last.lsn).write(to: layout.applied(tenant))

        let standby = try StandbyTenant(id: tenant, layout: layout, logOptions: ReplicationLog.Options())
        XCTAssertEqual(standby.applied.lsn, last.lsn)
        XCTAssertEqual(standby.hashes.checksum, last.checksum)
        XCTAssertEqual(try DatabaseFile.query(copyOf: layout.database(tenant), "SELECT count(*) FROM t"), [[.integer(30)]])
    }

    func testADatabaseThatDisagreesWithItsAppliedStateIsRefused() throws {
        let root = NSTemporaryDirectory() + "apiary-standby-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: root) }
        let layout = DataLayout(root: root)
        let tenant = try TenantID("acme")
        try layout.createTenantDirectory(tenant)
        try DatabaseFile.writePages([Page(number: 1, bytes: [UInt8](repeating: 7, count: DatabaseFile.pageSize))], dbSizePages: 1, to: layout.database(tenant))
        try AppliedState(lsn: 3, checksum: 12345, applyingThroughLSN: 3).write(to: layout.applied(tenant))
        XCTAssertThrowsError(try StandbyTenant(id: tenant, layout: layout, logOptions: ReplicationLog.Options())) { error in
            XCTAssertTrue(String(describing: error).contains("resync this standby"), "\(error)")
        }
    }
}

extension TenantDatabase {
    func mustExecute(_ sql: String) async throws {
        let r = try await execute([SQLStatement(sql)])
        guard case .success = r[0] else { throw StorageError(.badRequest, "\(sql): \(r)") }
    }
}
