import ApiaryCore
@testable import ApiaryLog
import Foundation
import XCTest

/// The log's API on a healthy disk: append, sync, reopen, read, roll, truncate, reset, retention.
final class ReplicationLogTests: XCTestCase {
    // MARK: Opening and appending

    func testNewLogIsEmptyAtZeroBase() throws {
        let dir = try makeTemporaryDirectory(self) + "/tenant"
        let log = try ReplicationLog(directory: dir)
        XCTAssertEqual(log.last, .zero)
        XCTAssertNil(log.firstRetainedLSN)
        XCTAssertNil(try log.record(at: 1))
        XCTAssertEqual(try log.records(from: 1, countMax: 10, bytesMax: 1 << 20), [])
        XCTAssertEqual(try segmentFiles(dir), ["00000000000000000001.log"])
        XCTAssertEqual(log.recoveredTornTailBytes, 0)
    }

    func testAppendSyncReopenRoundTrip() throws {
        let dir = try makeTemporaryDirectory(self)
        do {
            let log = try ReplicationLog(directory: dir)
            try appendRecords(log, 1...10)
            try log.append(makeRecord(lsn: 11, epoch: 2, pageCount: 0))
            try log.append(makeRecord(lsn: 12, epoch: 2, pageCount: 5, pageBytes: 4096))
            XCTAssertEqual(log.last, LogPosition(makeRecord(lsn: 12, epoch: 2)))
            XCTAssertEqual(log.lastDurable.lsn, 10)
            try log.sync()
            XCTAssertEqual(log.lastDurable.lsn, 12)
            log.close()
        }
        let log = try ReplicationLog(directory: dir)
        XCTAssertEqual(log.recoveredTornTailBytes, 0)
        XCTAssertEqual(log.last, LogPosition(epoch: Epoch(2), lsn: 12, checksum: makeRecord(lsn: 12).checksum))
        XCTAssertEqual(log.firstRetainedLSN, 1)
        for lsn in LSN(1)...10 { XCTAssertEqual(try log.record(at: lsn), makeRecord(lsn: lsn)) }
        XCTAssertEqual(try log.record(at: 11), makeRecord(lsn: 11, epoch: 2, pageCount: 0))
        XCTAssertEqual(try log.record(at: 12), makeRecord(lsn: 12, epoch: 2, pageCount: 5, pageBytes: 4096))
        XCTAssertNil(try log.record(at: 13))
        XCTAssertNil(try log.record(at: 0))
        // And it keeps going where it left off.
        try log.append(makeRecord(lsn: 13, epoch: 2))
        XCTAssertEqual(try log.record(at: 13), makeRecord(lsn: 13, epoch: 2))
    }

    func testOutOfOrderAppendRefused() throws {
        let log = try ReplicationLog(directory: try makeTemporaryDirectory(self))
        try appendRecords(log, 1...3, epoch: 5)
        assertLogError(.outOfOrder) { try log.append(makeRecord(lsn: 5, epoch: 5)) } // gap
        assertLogError(.outOfOrder) { try log.append(makeRecord(lsn: 3, epoch: 5)) } // repeat
        assertLogError(.outOfOrder) { try log.append(makeRecord(lsn: 1, epoch: 5)) } // back
        assertLogError(.outOfOrder) { try log.append(makeRecord(lsn: 4, epoch: 4)) } // older epoch
        XCTAssertEqual(log.last.lsn, 3)
        try log.append(makeRecord(lsn: 4, epoch: 6)) // a newer epoch is fine
        XCTAssertEqual(log.last.epoch, Epoch(6))
    }

    /// Appends land in zeros written ahead (so that a sync flushes data, not a new file size);
    /// the zeros never outlive the active segment, a clean close, or a crash's recovery.
    func testZerosWrittenAheadAreGivenBack() throws {
        let dir = try makeTemporaryDirectory(self)
        let frame = frameBytes(pageCount: 2, pageBytes: 100)
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 3 * frame + frame / 2)
        do {
            let log = try ReplicationLog(directory: dir, options: options)
            try appendRecords(log, 1...2)
            XCTAssertEqual(try fileSize(dir + "/00000000000000000001.log"), DirectWriter.alignUp(options.segmentBytesMax), "written ahead to the segment bound's block")
            try assertZerosOnly(dir + "/00000000000000000001.log", from: log.sizeBytes)
            try appendRecords(log, 3...4) // rolls after lsn 3
            XCTAssertEqual(try segmentFiles(dir), ["00000000000000000001.log", "00000000000000000004.log"])
            XCTAssertEqual(try fileSize(dir + "/00000000000000000001.log"), 40 + 3 * frame, "a segment left behind ends at its last frame")
            XCTAssertGreaterThan(try fileSize(dir + "/00000000000000000004.log"), 40 + frame)
            // No close: as after a crash, the zeros are still there.
        }
        let reopened = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(reopened.last, LogPosition(makeRecord(lsn: 4)))
        XCTAssertEqual(try fileSize(dir + "/00000000000000000004.log"), 40 + frame, "recovery cut the zeros")
        try appendRecords(reopened, 5...5)
        XCTAssertEqual(try reopened.records(from: 1, countMax: 10, bytesMax: 1 << 20), (1...5).map { makeRecord(lsn: $0) })
        reopened.close()
        XCTAssertEqual(try fileSize(dir + "/00000000000000000004.log"), 40 + 2 * frame, "a clean close gives the zeros back")
        let again = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(again.recoveredTornTailBytes, 0)
        XCTAssertEqual(again.last.lsn, 5)
    }

    /// A quiet log sets aside little disk (tenants may number thousands); a busy one writes
    /// zeros ahead in larger chunks, never more than 1 MiB beyond its records.
    func testZerosWrittenAheadGrowWithTheSegment() throws {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir)
        let segment = dir + "/00000000000000000001.log"
        try appendRecords(log, 1...1)
        XCTAssertLessThanOrEqual(try fileSize(segment), 72 << 10, "one small record sets aside about 64 KiB")
        var aheadMax = 0
        for lsn in LSN(2)...LSN(600) {
            try appendRecords(log, lsn...lsn, pageCount: 2, pageBytes: 4096)
            aheadMax = max(aheadMax, try fileSize(segment) - log.sizeBytes)
        }
        XCTAssertGreaterThan(aheadMax, 256 << 10, "a segment of ~5 MiB writes ahead in larger chunks")
        XCTAssertLessThanOrEqual(aheadMax, (1 << 20) + 8192)
    }

    /// A reset can put a new file under the active segment's own name: later syncs must
    /// reach the new file, not the deleted one (found in review).
    func testSyncsAfterAResetToTheSameSegmentNameReachTheNewFile() throws {
        let dir = try makeTemporaryDirectory(self)
        do {
            let log = try ReplicationLog(directory: dir)
            try appendRecords(log, 1...3)
            try log.reset(base: Epoch(1), lsn: 0, checksum: 0) // new 00000000000000000001.log
            try appendRecords(log, 1...2, epoch: 2)
            log.close()
        }
        let reopened = try ReplicationLog(directory: dir)
        XCTAssertEqual(try reopened.records(from: 1, countMax: 10, bytesMax: 1 << 20), (1...2).map { makeRecord(lsn: $0, epoch: 2) })
    }

    /// Each record of a sync is its own durable write, in order: a crash can then only tear
    /// the last one, never leave a whole record after a torn one (which reads as damage).
    func testASyncWritesEachRecordDurablyInOrder() throws {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir)
        try appendRecords(log, 1...1)
        let durableWrites = LockedCount()
        POSIX.faultInjector = { op, path in
            if path.hasSuffix(".log"), op == .fsync { durableWrites.add() }
            return nil
        }
        defer { POSIX.faultInjector = nil }
        for lsn in LSN(2)...LSN(4) { try log.append(makeRecord(lsn: lsn, pageCount: 2, pageBytes: 3000)) }
        try log.sync()
        XCTAssertEqual(durableWrites.value, 3)
    }

    /// A file system that accepts `O_DIRECT` at open but refuses the write (`EINVAL`): the log
    /// goes on through the page cache, and the record is durable all the same.
    func testADirectWriteRefusedWithEINVALFallsBackToThePageCache() throws {
        let dir = try makeTemporaryDirectory(self)
        do {
            let log = try ReplicationLog(directory: dir)
            guard log.writesDirectly else { throw XCTSkip("no direct I/O here") }
            try appendRecords(log, 1...1)
            let refusals = LockedCount()
            POSIX.faultInjector = { op, path in
                guard op == .fsync, path.hasSuffix(".log"), refusals.value == 0 else { return nil }
                refusals.add()
                return EINVAL
            }
            defer { POSIX.faultInjector = nil }
            try log.append(makeRecord(lsn: 2))
            try log.sync()
            XCTAssertEqual(refusals.value, 1)
            XCTAssertFalse(log.writesDirectly)
            try appendRecords(log, 3...3)
            log.close()
        }
        let reopened = try ReplicationLog(directory: dir)
        XCTAssertEqual(try reopened.records(from: 1, countMax: 10, bytesMax: 1 << 20), (1...3).map { makeRecord(lsn: $0) })
    }

    /// Appends wait in memory for the next sync: readable at once, and cut without a write.
    func testUnsyncedAppendsAreReadableAndCutInMemory() throws {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir)
        try appendRecords(log, 1...2)
        try log.append(makeRecord(lsn: 3))
        try log.append(makeRecord(lsn: 4))
        XCTAssertEqual(try log.records(from: 2, countMax: 10, bytesMax: 1 << 20), (2...4).map { makeRecord(lsn: $0) })
        XCTAssertEqual(log.lastDurable.lsn, 2)
        try log.truncate(after: 3)
        XCTAssertEqual(log.last.lsn, 3)
        try log.sync()
        try log.append(makeRecord(lsn: 4, epoch: 2))
        try log.sync()
        log.close()
        let reopened = try ReplicationLog(directory: dir)
        XCTAssertEqual(try reopened.records(from: 1, countMax: 10, bytesMax: 1 << 20),
                       (1...3).map { makeRecord(lsn: $0) } + [makeRecord(lsn: 4, epoch: 2)])
    }

    /// On a file system with direct I/O (ext4, as in CI) syncs bypass the page cache; the rest
    /// of this suite then exercises that path (and the tmpfs in DiskFullTests the other).
    func testSyncsWriteDirectlyWhereTheFileSystemAllows() throws {
        #if os(Linux)
        let dir = try makeTemporaryDirectory(self)
        let stat = Process()
        stat.executableURL = URL(fileURLWithPath: "/usr/bin/stat")
        stat.arguments = ["-f", "-c", "%T", dir]
        let pipe = Pipe()
        stat.standardOutput = pipe
        try stat.run()
        stat.waitUntilExit()
        let type = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        guard type.hasPrefix("ext2/ext3") else { throw XCTSkip("\(dir) is on \(type): direct I/O support unknown") }
        let log = try ReplicationLog(directory: dir)
        XCTAssertTrue(log.writesDirectly)
        #else
        throw XCTSkip("direct I/O is used on Linux only")
        #endif
    }

    /// A huge record's scratch memory is given back after its write (found in review: it
    /// stayed for as long as the log was open); everyday records reuse a small buffer.
    func testADirectWritersScratchMemoryShrinksAfterAHugeRecord() throws {
        let dir = try makeTemporaryDirectory(self)
        let path = dir + "/direct"
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: nil))
        guard let writer = DirectWriter.open(path: path) else { throw XCTSkip("no direct I/O here") }
        let huge = (0..<(3 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        do {
            try writer.write(prefix: [], huge[...], at: 0)
        } catch {
            throw XCTSkip("direct writes refused here: \(error)")
        }
        XCTAssertEqual(writer.retainedBytes, 0, "3 MiB of scratch kept after the write")
        let small = [UInt8](repeating: 7, count: 8192)
        try writer.write(prefix: [], small[...], at: DirectWriter.alignUp(huge.count))
        XCTAssertGreaterThan(writer.retainedBytes, 0)
        XCTAssertLessThanOrEqual(writer.retainedBytes, DirectWriter.keptBytesMax)
        let written = try XCTUnwrap(FileManager.default.contents(atPath: path))
        XCTAssertEqual(Array(written.prefix(huge.count)), huge)
        XCTAssertEqual(Array(written[DirectWriter.alignUp(huge.count)...].prefix(small.count)), small)
    }

    func testTooLargeRecordRefused() throws {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir, options: .init(recordBytesMax: 10_000))
        assertLogError(.tooLarge) { try log.append(makeRecord(lsn: 1, pageCount: 3, pageBytes: 4096)) }
        assertLogError(.tooLarge) {
            try log.append(Record(epoch: .zero, lsn: 1, dbSizePages: 1, checksum: 0,
                                  pages: [Page(number: 1, bytes: [UInt8](repeating: 0, count: Record.pageSizeMax + 1))]))
        }
        XCTAssertEqual(log.last, .zero)
        try log.append(makeRecord(lsn: 1, pageCount: 2, pageBytes: 4096))
        try log.sync()
        log.close() // gives back the zeros written ahead
        XCTAssertEqual(try fileSize(dir + "/00000000000000000001.log"), 40 + frameBytes(pageCount: 2, pageBytes: 4096))
    }

    func testSecondOpenIsLockedAndClosedLogRefuses() throws {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir)
        assertLogError(.locked) { try ReplicationLog(directory: dir) }
        log.close()
        assertLogError(.unusable) { try log.append(makeRecord(lsn: 1)) }
        _ = try ReplicationLog(directory: dir) // the lock went with close
    }

    // MARK: Segments

    func testSegmentRollAndReadsAcrossSegments() throws {
        let dir = try makeTemporaryDirectory(self)
        let frame = frameBytes()
        // Room for three frames per segment.
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 3 * frame)
        do {
            let log = try ReplicationLog(directory: dir, options: options)
            try appendRecords(log, 1...10)
            XCTAssertEqual(log.segmentCount, 4)
            XCTAssertEqual(try segmentFiles(dir), ["00000000000000000001.log", "00000000000000000004.log",
                                                  "00000000000000000007.log", "00000000000000000010.log"])
            XCTAssertEqual(try fileSize(dir + "/00000000000000000004.log"), 40 + 3 * frame)
            XCTAssertEqual(log.sizeBytes, 4 * 40 + 10 * frame)
            XCTAssertEqual(try log.records(from: 2, countMax: 100, bytesMax: 1 << 20), (2...10).map { makeRecord(lsn: $0) })
        }
        let log = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(log.segmentCount, 4)
        XCTAssertEqual(log.last.lsn, 10)
        for lsn in LSN(1)...10 { XCTAssertEqual(try log.record(at: lsn), makeRecord(lsn: lsn)) }
        // Reads hop between segments in any order (the read descriptor cache follows).
        for lsn: LSN in [9, 1, 5, 2, 10, 4] { XCTAssertEqual(try log.record(at: lsn), makeRecord(lsn: lsn)) }
        XCTAssertEqual(try log.records(from: 1, countMax: 100, bytesMax: 1 << 20), (1...10).map { makeRecord(lsn: $0) })
        try appendRecords(log, 11...13)
        XCTAssertEqual(log.segmentCount, 5)
    }

    func testRecordBiggerThanSegmentGetsItsOwnSegment() throws {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir, options: .init(segmentBytesMax: 1000))
        try appendRecords(log, 1...1)
        try appendRecords(log, 2...2, pageCount: 1, pageBytes: 5000)
        try appendRecords(log, 3...3)
        XCTAssertEqual(try segmentFiles(dir), ["00000000000000000001.log", "00000000000000000002.log", "00000000000000000003.log"])
        XCTAssertEqual(try log.record(at: 2), makeRecord(lsn: 2, pageCount: 1, pageBytes: 5000))
    }

    // MARK: Bounded reads

    func testBoundedReads() throws {
        let log = try ReplicationLog(directory: try makeTemporaryDirectory(self), options: .init(segmentBytesMax: 2000))
        try appendRecords(log, 1...20)
        let payload = frameBytes() - 8
        XCTAssertEqual(try log.records(from: 3, countMax: 4, bytesMax: 1 << 20).map(\.lsn), [3, 4, 5, 6])
        XCTAssertEqual(try log.records(from: 3, countMax: 100, bytesMax: 3 * payload).map(\.lsn), [3, 4, 5])
        XCTAssertEqual(try log.records(from: 3, countMax: 100, bytesMax: 3 * payload - 1).map(\.lsn), [3, 4])
        // The first record comes back even when it alone exceeds bytesMax: readers always progress.
        XCTAssertEqual(try log.records(from: 7, countMax: 100, bytesMax: 1).map(\.lsn), [7])
        XCTAssertEqual(try log.records(from: 18, countMax: 100, bytesMax: 1 << 20).map(\.lsn), [18, 19, 20])
        XCTAssertEqual(try log.records(from: 21, countMax: 100, bytesMax: 1 << 20), [])
        XCTAssertEqual(try log.records(from: 0, countMax: 2, bytesMax: 1 << 20).map(\.lsn), [1, 2])
    }

    // MARK: Truncate

    func testTruncateAfterThenReopen() throws {
        let dir = try makeTemporaryDirectory(self)
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 3 * frameBytes())
        do {
            let log = try ReplicationLog(directory: dir, options: options)
            try appendRecords(log, 1...10) // segments 1-3, 4-6, 7-9, 10
            try log.truncate(after: 8) // cuts inside a segment, removes the newest
            XCTAssertEqual(log.last, LogPosition(makeRecord(lsn: 8)))
            XCTAssertEqual(log.lastDurable, log.last)
            XCTAssertEqual(try segmentFiles(dir), ["00000000000000000001.log", "00000000000000000004.log", "00000000000000000007.log"])
            XCTAssertNil(try log.record(at: 9))
            // Appending continues after the cut, with a new history.
            try log.append(makeRecord(lsn: 9, epoch: 2))
            try log.sync()
            try log.truncate(after: 6) // ends exactly at a segment boundary: the next one stays, empty
            XCTAssertEqual(log.last, LogPosition(makeRecord(lsn: 6)))
            XCTAssertEqual(try segmentFiles(dir), ["00000000000000000001.log", "00000000000000000004.log", "00000000000000000007.log"])
            XCTAssertEqual(try fileSize(dir + "/00000000000000000007.log"), 40)
            try log.append(makeRecord(lsn: 7, epoch: 3)) // unsynced, then discarded
            try log.truncate(after: 2)
            XCTAssertEqual(log.last.lsn, 2)
            XCTAssertEqual(try segmentFiles(dir), ["00000000000000000001.log"])
            try log.truncate(after: 100) // nothing after 100: no-op
            XCTAssertEqual(log.last.lsn, 2)
            try appendRecords(log, 3...4, epoch: 4)
            log.close()
        }
        let log = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(log.recoveredTornTailBytes, 0)
        XCTAssertEqual(log.last, LogPosition(makeRecord(lsn: 4, epoch: 4)))
        XCTAssertEqual(try log.records(from: 1, countMax: 10, bytesMax: 1 << 20),
                       [makeRecord(lsn: 1), makeRecord(lsn: 2), makeRecord(lsn: 3, epoch: 4), makeRecord(lsn: 4, epoch: 4)])
        try log.truncate(after: 0) // down to the base
        XCTAssertEqual(log.last, .zero)
        XCTAssertNil(log.firstRetainedLSN)
    }

    func testTruncateBelowFirstRetainedIsRefused() throws {
        let log = try ReplicationLog(directory: try makeTemporaryDirectory(self))
        try log.reset(base: Epoch(2), lsn: 50, checksum: 7)
        try appendRecords(log, 51...55, epoch: 2)
        assertLogError(.notRetained) { try log.truncate(after: 49) }
        try log.truncate(after: 50)
        XCTAssertEqual(log.last, LogPosition(epoch: Epoch(2), lsn: 50, checksum: 7))
    }

    // MARK: Reset

    func testResetThenReopenKnowsBase() throws {
        let dir = try makeTemporaryDirectory(self)
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 3 * frameBytes())
        let base = LogPosition(epoch: Epoch(9), lsn: 1000, checksum: 0xABCD)
        do {
            let log = try ReplicationLog(directory: dir, options: options)
            try appendRecords(log, 1...8)
            try log.reset(base: base.epoch, lsn: base.lsn, checksum: base.checksum)
            XCTAssertEqual(log.last, base)
            XCTAssertNil(log.firstRetainedLSN)
            XCTAssertEqual(log.segmentCount, 1)
            XCTAssertNil(try log.record(at: 5))
            assertLogError(.notRetained) { try log.records(from: 5, countMax: 1, bytesMax: 1) }
            assertLogError(.outOfOrder) { try log.append(makeRecord(lsn: 9, epoch: 9)) }
        }
        XCTAssertEqual(try segmentFiles(dir), ["00000000000000001001.log"])
        do {
            let log = try ReplicationLog(directory: dir, options: options)
            XCTAssertEqual(log.last, base)
            XCTAssertNil(log.firstRetainedLSN)
            try appendRecords(log, 1001...1002, epoch: 9)
        }
        let log = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(log.firstRetainedLSN, 1001)
        XCTAssertEqual(log.last, LogPosition(makeRecord(lsn: 1002, epoch: 9)))
        // A reset to a lower lsn (a diverged history replaced by a snapshot) works the same.
        try log.reset(base: Epoch(10), lsn: 3, checksum: 1)
        XCTAssertEqual(try segmentFiles(dir), ["00000000000000000004.log"])
        XCTAssertEqual(log.last, LogPosition(epoch: Epoch(10), lsn: 3, checksum: 1))
        // Again at the same base: the new segment takes the name of the one it replaces.
        try appendRecords(log, 4...5, epoch: 10)
        try log.reset(base: Epoch(11), lsn: 3, checksum: 2)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["00000000000000000004.log"])
        XCTAssertNil(try log.record(at: 4))
        log.close()
        let reopened = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(reopened.last, LogPosition(epoch: Epoch(11), lsn: 3, checksum: 2))
        XCTAssertNil(reopened.firstRetainedLSN)
    }

    // MARK: Retention

    func testRetentionRemovesOldSegmentsButKeepsWhatIsAsked() throws {
        let dir = try makeTemporaryDirectory(self)
        let frame = frameBytes()
        let segmentBytes = 40 + 3 * frame
        let options = ReplicationLog.Options(segmentBytesMax: segmentBytes, retainedBytesMax: 2 * segmentBytes)
        let log = try ReplicationLog(directory: dir, options: options)
        try appendRecords(log, 1...14) // segments 1-3, 4-6, 7-9, 10-12, 13-14

        // Floor 8: segments 1 and 4 lie below it; removing the oldest brings the log down
        // towards retainedBytesMax, but never a record at or above the floor.
        try log.applyRetention(keepingFrom: 8)
        XCTAssertEqual(try segmentFiles(dir), ["00000000000000000007.log", "00000000000000000010.log", "00000000000000000013.log"])
        XCTAssertEqual(log.firstRetainedLSN, 7)
        XCTAssertNil(try log.record(at: 6))
        XCTAssertEqual(try log.record(at: 7), makeRecord(lsn: 7))
        assertLogError(.notRetained) { try log.records(from: 6, countMax: 1, bytesMax: 1) }

        // Within retainedBytesMax nothing more goes, even below the floor.
        let small = try ReplicationLog(directory: try makeTemporaryDirectory(self), options: options)
        try appendRecords(small, 1...5)
        try small.applyRetention(keepingFrom: 100)
        XCTAssertEqual(small.segmentCount, 2)

        // With no history wanted, everything below the floor goes, but never the active segment.
        log.close()
        let strict = try ReplicationLog(directory: dir, options: .init(segmentBytesMax: segmentBytes, retainedBytesMax: 0))
        try strict.applyRetention(keepingFrom: 12)
        XCTAssertEqual(try segmentFiles(dir), ["00000000000000000010.log", "00000000000000000013.log"])
        try strict.applyRetention(keepingFrom: 1000)
        XCTAssertEqual(try segmentFiles(dir), ["00000000000000000013.log"])
        XCTAssertEqual(strict.firstRetainedLSN, 13)
        XCTAssertEqual(strict.last.lsn, 14)
        strict.close()

        let reopened = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(reopened.firstRetainedLSN, 13)
        XCTAssertEqual(try reopened.records(from: 13, countMax: 10, bytesMax: 1 << 20).map(\.lsn), [13, 14])
    }
}

final class LockedCount: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add() { lock.lock(); count += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return count }
}
