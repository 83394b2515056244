import ApiaryCore
@testable import ApiaryLog
import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// Failures the kernel can report (EIO on write or fsync, a truncate that fails too), injected
/// through `POSIX.faultInjector`: the log must end as it was before the failed call, or refuse
/// further use until reopened, and never leave half a record behind.
final class FaultInjectionTests: XCTestCase {
    override func tearDown() {
        POSIX.faultInjector = nil
        super.tearDown()
    }

    /// Fails every `operation` on files whose path ends in `suffix` with `code`.
    private func inject(_ operation: POSIX.Operation, on suffix: String, errno code: Int32) {
        POSIX.faultInjector = { op, path in op == operation && path.hasSuffix(suffix) ? code : nil }
    }

    private let segment = "/00000000000000000001.log"

    func testFailedWriteLeavesNoPartialFrame() throws {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir)
        try appendRecords(log, 1...3)
        let size = log.sizeBytes

        inject(.write, on: segment, errno: EIO)
        try log.append(makeRecord(lsn: 4)) // written (half of it, then failing) by the sync
        let error = assertLogError(.io) { try log.sync() }
        XCTAssertEqual(error?.path, dir + segment)
        XCTAssertTrue(error?.message.contains("Input/output error") ?? false, error?.message ?? "")
        XCTAssertEqual(log.last.lsn, 3)
        XCTAssertNil(try log.record(at: 4))
        try assertZerosOnly(dir + segment, from: size, "the half-written frame was cut off")

        POSIX.faultInjector = nil
        try appendRecords(log, 4...4)
        log.close()
        let reopened = try ReplicationLog(directory: dir)
        XCTAssertEqual(reopened.recoveredTornTailBytes, 0)
        XCTAssertEqual(try reopened.records(from: 1, countMax: 10, bytesMax: 1 << 20), (1...4).map { makeRecord(lsn: $0) })
    }

    func testENOSPCOnWriteIsDiskFull() throws {
        let log = try ReplicationLog(directory: try makeTemporaryDirectory(self))
        inject(.write, on: segment, errno: ENOSPC)
        assertLogError(.diskFull) { try log.append(makeRecord(lsn: 1)) }
        inject(.write, on: segment, errno: EDQUOT)
        assertLogError(.diskFull) { try log.append(makeRecord(lsn: 1)) }
        XCTAssertEqual(log.last, .zero)
    }

    func testFailedSyncDiscardsUnsyncedAppends() throws {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir)
        try appendRecords(log, 1...3)
        let size = log.sizeBytes
        try log.append(makeRecord(lsn: 4))
        try log.append(makeRecord(lsn: 5))

        inject(.fsync, on: segment, errno: EIO)
        assertLogError(.io) { try log.sync() }
        // After a failed fsync the kernel may have dropped those pages: they are gone.
        XCTAssertEqual(log.last, LogPosition(makeRecord(lsn: 3)))
        XCTAssertEqual(log.lastDurable, log.last)
        try assertZerosOnly(dir + segment, from: size)
        XCTAssertNil(try log.record(at: 4))

        POSIX.faultInjector = nil
        try appendRecords(log, 4...5, epoch: 2)
        log.close()
        let reopened = try ReplicationLog(directory: dir)
        XCTAssertEqual(reopened.last, LogPosition(makeRecord(lsn: 5, epoch: 2)))
    }

    func testFailedSyncOnRollKeepsTheOldSegmentActive() throws {
        let dir = try makeTemporaryDirectory(self)
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 2 * frameBytes())
        let log = try ReplicationLog(directory: dir, options: options)
        try appendRecords(log, 1...1)
        try log.append(makeRecord(lsn: 2)) // fills the segment, unsynced

        inject(.fsync, on: segment, errno: EIO)
        assertLogError(.io) { try log.append(makeRecord(lsn: 3)) } // the roll syncs first, and fails
        XCTAssertEqual(log.last.lsn, 1)
        XCTAssertEqual(log.segmentCount, 1)
        XCTAssertEqual(try segmentFiles(dir), ["00000000000000000001.log"])

        POSIX.faultInjector = nil
        try appendRecords(log, 2...3)
        XCTAssertEqual(log.segmentCount, 2)
    }

    func testUndoFailureMakesLogUnusableUntilReopened() throws {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir)
        try appendRecords(log, 1...2)

        POSIX.faultInjector = { op, path in path.hasSuffix(self.segment) && op != .fsync ? EIO : nil }
        // Large enough that the injected half write stops inside it.
        try log.append(makeRecord(lsn: 3, pageCount: 2, pageBytes: 4096))
        assertLogError(.io) { try log.sync() } // the write fails half-way, and so does the cut
        POSIX.faultInjector = nil
        let error = assertLogError(.unusable) { try log.append(makeRecord(lsn: 3)) }
        XCTAssertTrue(error?.message.contains("open it again") ?? false, error?.message ?? "")
        assertLogError(.unusable) { try log.sync() }
        log.close()

        // The half frame left behind is a torn tail; the synced records are intact.
        let reopened = try ReplicationLog(directory: dir)
        XCTAssertGreaterThan(reopened.recoveredTornTailBytes, 0)
        XCTAssertEqual(reopened.last, LogPosition(makeRecord(lsn: 2)))
        try appendRecords(reopened, 3...3)
    }

    func testFailedDirectorySyncDuringTruncateMakesLogUnusable() throws {
        let dir = try makeTemporaryDirectory(self)
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 2 * frameBytes())
        let log = try ReplicationLog(directory: dir, options: options)
        try appendRecords(log, 1...6) // segments 1-2, 3-4, 5-6

        let directoryName = "/" + URL(fileURLWithPath: dir).lastPathComponent
        inject(.fsync, on: directoryName, errno: EIO)
        assertLogError(.io) { try log.truncate(after: 1) }
        POSIX.faultInjector = nil
        assertLogError(.unusable) { try log.record(at: 1) }
        log.close()

        // Whatever got removed, the reopened log is a gap-free prefix.
        let reopened = try ReplicationLog(directory: dir, options: options)
        XCTAssertGreaterThanOrEqual(reopened.last.lsn, 1)
        for lsn in 1...reopened.last.lsn { XCTAssertEqual(try reopened.record(at: lsn), makeRecord(lsn: lsn)) }
        try reopened.truncate(after: 1)
        XCTAssertEqual(reopened.last.lsn, 1)
    }
}
