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
        func commit(tenant: TenantID, _ commit: CapturedCommit) throws -> UInt64 {
            let record = Record(epoch: Epoch(1), lsn: log.last.lsn + 1, dbSizePages: commit.dbSizePages, checksum: commit.checksum, pages: commit.pages)
            try log.append(record)
            try log.sync()
            return record.lsn
        }
    }

    var root: String!
    var layout: DataLayout!
    let tenant = try! TenantID("acme")

    override func setUpWithError() throws {
        root = NSTemporaryDirectory() + "apiary-standby-" + UUID().uuidString
        layout = DataLayout(root: root)
        try layout.createTenantDirectory(tenant)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: root)
    }

    /// Runs `commits` on a primary whose commits go into the standby's log directory (as if
    /// streamed there), and returns the records.
    func streamedRecords(_ commits: (TenantDatabase) async throws -> Void) async throws -> [Record] {
        let log = try ReplicationLog(directory: layout.log(tenant))
        let db = try TenantDatabase(tenant: tenant, path: root + "/primary.db", sink: LogSink(log: log))
        try await commits(db)
        db.close()
        defer { log.close() }
        return try log.records(from: 1, countMax: 1000, bytesMax: .max)
    }

    func testInterruptedApplyIsRedoneFromTheIntent() async throws {
        let records = try await streamedRecords { db in
            try await db.mustExecute("CREATE TABLE t (x)")
            for i in 0..<30 { try await db.mustExecute("INSERT INTO t VALUES (\(i))") }
            // Commits that grow the file and touch pages the ones before did not.
            try await db.mustExecute("CREATE TABLE big (x)")
            for _ in 0..<10 { try await db.mustExecute("INSERT INTO big VALUES (zeroblob(5000))") }
        }
        XCTAssertGreaterThan(records.count, 30)

        // The standby died while applying: the last pass completed through record 10 and the
        // interrupted one, whose intent says "through the last", had written all but its last
        // three records (later pages already in the file when the redo starts at 11), then a
        // torn page of the last.
        for r in records.dropLast(3) {
            try DatabaseFile.writePages(r.pages, dbSizePages: r.dbSizePages, to: layout.database(tenant))
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
        XCTAssertEqual(try DatabaseFile.query(copyOf: layout.database(tenant), "SELECT count(*) FROM big"), [[.integer(10)]])
    }

    /// A redo still refuses a log whose end does not give the primary's checksum.
    func testARedoThatEndsAtTheWrongChecksumIsRefused() async throws {
        let records = try await streamedRecords { db in
            try await db.mustExecute("CREATE TABLE t (x)")
            for i in 0..<5 { try await db.mustExecute("INSERT INTO t VALUES (\(i))") }
        }
        // Applied through the CREATE TABLE; the redo's records (the inserts) leave some page alone.
        let applied = records[1]
        for r in records.prefix(2) { try DatabaseFile.writePages(r.pages, dbSizePages: r.dbSizePages, to: layout.database(tenant)) }
        let rewritten = Set(records.dropFirst(2).flatMap { $0.pages.map(\.number) })
        guard let untouched = (1...applied.dbSizePages).first(where: { !rewritten.contains($0) }) else {
            return XCTFail("every page is rewritten by the redo: no page to damage")
        }
        // That page changed behind the standby's back: no redo can repair it.
        try DatabaseFile.Writer(path: layout.database(tenant)).write([Page(number: untouched, bytes: [UInt8](repeating: 0xCD, count: DatabaseFile.pageSize))], dbSizePages: nil)
        try AppliedState(lsn: applied.lsn, checksum: applied.checksum, applyingThroughLSN: records.last!.lsn).write(to: layout.applied(tenant))
        XCTAssertThrowsError(try StandbyTenant(id: tenant, layout: layout, logOptions: ReplicationLog.Options())) { error in
            XCTAssertTrue(String(describing: error).contains("replicas diverged"), "\(error)")
        }
    }

    func testADatabaseThatDisagreesWithItsAppliedStateIsRefused() throws {
        try DatabaseFile.writePages([Page(number: 1, bytes: [UInt8](repeating: 7, count: DatabaseFile.pageSize))], dbSizePages: 1, to: layout.database(tenant))
        try AppliedState(lsn: 3, checksum: 12345, applyingThroughLSN: 3).write(to: layout.applied(tenant))
        XCTAssertThrowsError(try StandbyTenant(id: tenant, layout: layout, logOptions: ReplicationLog.Options())) { error in
            XCTAssertTrue(String(describing: error).contains("resync this standby"), "\(error)")
        }
    }

    // MARK: - Snapshot installs a crash interrupted (SnapshotInstall.swift; end to end: SnapshotInstallTests)

    /// The standby's database and applied state at record `appliedIndex`, its log holding
    /// every record, and the scratch file holding a snapshot of the last: the state a crash
    /// leaves just after the install marker became durable.
    func interruptedInstall(_ records: [Record], appliedIndex: Int) throws -> SnapshotInstallMarker {
        for r in records.prefix(appliedIndex + 1) { try DatabaseFile.writePages(r.pages, dbSizePages: r.dbSizePages, to: layout.database(tenant)) }
        let applied = records[appliedIndex]
        try AppliedState(lsn: applied.lsn, checksum: applied.checksum, applyingThroughLSN: applied.lsn).write(to: layout.applied(tenant))
        for r in records { try DatabaseFile.writePages(r.pages, dbSizePages: r.dbSizePages, to: layout.snapshotScratch(tenant)) }
        let marker = SnapshotInstallMarker(epoch: Epoch(1), lsn: records.last!.lsn, checksum: records.last!.checksum)
        try marker.write(to: layout.snapshotInstallMarker(tenant))
        return marker
    }

    func testAnInstallWithADurableMarkerIsFinishedAtStartAndAgainAfterACrashBeforeTheMarkerWentAway() async throws {
        let records = try await streamedRecords { db in
            try await db.mustExecute("CREATE TABLE t (x)")
            for i in 0..<10 { try await db.mustExecute("INSERT INTO t VALUES (\(i))") }
        }
        let marker = try interruptedInstall(records, appliedIndex: 3)
        for pass in 1...2 {
            let standby = try StandbyTenant(id: tenant, layout: layout, logOptions: ReplicationLog.Options())
            XCTAssertEqual(standby.applied, AppliedState(lsn: marker.lsn, checksum: marker.checksum, applyingThroughLSN: marker.lsn), "pass \(pass)")
            XCTAssertEqual(standby.hashes.checksum, marker.checksum)
            XCTAssertEqual(standby.withLog { $0.last.lsn }, marker.lsn)
            XCTAssertEqual(standby.withLog { $0.firstRetainedLSN }, nil, "the log starts after the snapshot")
            standby.withLog { $0.close() }
            XCTAssertFalse(FileManager.default.fileExists(atPath: layout.snapshotScratch(tenant)))
            XCTAssertFalse(FileManager.default.fileExists(atPath: layout.snapshotInstallMarker(tenant)))
            XCTAssertEqual(try DatabaseFile.query(copyOf: layout.database(tenant), "SELECT count(*) FROM t"), [[.integer(10)]])
            // As if the node died after writing the applied state, before removing the marker:
            // every step runs again (no scratch to rename, a log reset already, ...).
            try marker.write(to: layout.snapshotInstallMarker(tenant))
        }
    }

    func testAMarkerWhoseDatabaseIsNotTheSnapshotIsRefused() async throws {
        let records = try await streamedRecords { db in
            try await db.mustExecute("CREATE TABLE t (x)")
            for i in 0..<5 { try await db.mustExecute("INSERT INTO t VALUES (\(i))") }
        }
        _ = try interruptedInstall(records, appliedIndex: 2)
        // The scratch is gone, so it was renamed: but the database is still the old one.
        try FileManager.default.removeItem(atPath: layout.snapshotScratch(tenant))
        XCTAssertThrowsError(try StandbyTenant(id: tenant, layout: layout, logOptions: ReplicationLog.Options())) { error in
            XCTAssertTrue(String(describing: error).contains("resync this standby"), "\(error)")
        }
        XCTAssertTrue(FileManager.default.fileExists(atPath: layout.snapshotInstallMarker(tenant)), "the marker stays")
    }

    func testAScratchFileWithoutAMarkerIsRemovedAtStart() async throws {
        let records = try await streamedRecords { db in
            try await db.mustExecute("CREATE TABLE t (x)")
            for i in 0..<5 { try await db.mustExecute("INSERT INTO t VALUES (\(i))") }
        }
        _ = try interruptedInstall(records, appliedIndex: 2)
        try FileManager.default.removeItem(atPath: layout.snapshotInstallMarker(tenant)) // died before the marker
        let standby = try StandbyTenant(id: tenant, layout: layout, logOptions: ReplicationLog.Options())
        XCTAssertEqual(standby.applied.lsn, records[2].lsn, "the old state stands")
        XCTAssertEqual(standby.hashes.checksum, records[2].checksum)
        XCTAssertEqual(standby.withLog { $0.last.lsn }, records.last!.lsn, "the log is untouched")
        standby.withLog { $0.close() }
        XCTAssertFalse(FileManager.default.fileExists(atPath: layout.snapshotScratch(tenant)))
    }
}

extension TenantDatabase {
    func mustExecute(_ sql: String) async throws {
        let r = try await execute([SQLStatement(sql)])
        guard case .success = r[0] else { throw StorageError(.badRequest, "\(sql): \(r)") }
    }
}
