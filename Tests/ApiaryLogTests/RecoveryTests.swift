import ApiaryCore
import Foundation
@testable import ApiaryLog
import XCTest

/// Opening a log that a crash or the disk damaged: torn tails are cut, anything else is
/// reported as corruption naming the file and byte offset.
final class RecoveryTests: XCTestCase {
    private let frame = frameBytes()
    private let firstSegment = "/00000000000000000001.log"

    /// A directory holding records 1...count in one segment, synced and closed.
    private func makeLog(count: LSN, options: ReplicationLog.Options = .init()) throws -> String {
        let dir = try makeTemporaryDirectory(self)
        let log = try ReplicationLog(directory: dir, options: options)
        try appendRecords(log, 1...count)
        log.close()
        return dir
    }

    /// Byte offset of record `lsn`'s frame in the first segment.
    private func offset(of lsn: LSN) -> Int { 40 + Int(lsn - 1) * frame }

    // MARK: Torn tails

    func testTornTailPartialFrameIsCut() throws {
        let dir = try makeLog(count: 5)
        for cut in [10, frame - 1, frame - 8, frame - 9] { // inside the payload, inside the header
            try truncateFile(dir + firstSegment, to: offset(of: 5) + frame - cut)
            let log = try ReplicationLog(directory: dir)
            XCTAssertEqual(log.recoveredTornTailBytes, frame - cut, "cut \(cut)")
            XCTAssertEqual(log.last, LogPosition(makeRecord(lsn: 4)))
            XCTAssertEqual(try fileSize(dir + firstSegment), offset(of: 5))
            // The next append lands right after the last whole record and reads back.
            try appendRecords(log, 5...5)
            log.close()
            let again = try ReplicationLog(directory: dir)
            XCTAssertEqual(again.recoveredTornTailBytes, 0)
            XCTAssertEqual(try again.record(at: 5), makeRecord(lsn: 5))
        }
    }

    func testTornTailBadCRCInLastFrameIsCut() throws {
        let dir = try makeLog(count: 5)
        try flipByte(dir + firstSegment, at: offset(of: 5) + 8 + 50) // inside the last payload
        let log = try ReplicationLog(directory: dir)
        XCTAssertEqual(log.recoveredTornTailBytes, frame)
        XCTAssertEqual(log.last.lsn, 4)
        XCTAssertEqual(try log.records(from: 1, countMax: 10, bytesMax: 1 << 20), (1...4).map { makeRecord(lsn: $0) })
    }

    func testTornTailOfZerosOrGarbageIsCut() throws {
        let dir = try makeLog(count: 3)
        // A file extended by a crash before its data reached the disk reads as zeros.
        try appendBytes(dir + firstSegment, [UInt8](repeating: 0, count: 3 * frame))
        var log = try ReplicationLog(directory: dir)
        XCTAssertEqual(log.recoveredTornTailBytes, 3 * frame)
        XCTAssertEqual(log.last.lsn, 3)
        log.close()
        try appendBytes(dir + firstSegment, [1, 2, 3, 4, 5])
        log = try ReplicationLog(directory: dir)
        XCTAssertEqual(log.recoveredTornTailBytes, 5)
        XCTAssertEqual(log.last.lsn, 3)
    }

    func testTornTailInEmptyLastSegmentIsCut() throws {
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 2 * frame)
        let dir = try makeLog(count: 4, options: options) // segments 1-2, 3-4
        let last = dir + "/00000000000000000003.log"
        try truncateFile(last, to: 40 + 3)
        let log = try ReplicationLog(directory: dir, options: options)
        XCTAssertEqual(log.recoveredTornTailBytes, 3)
        XCTAssertEqual(log.last.lsn, 2)
        XCTAssertEqual(log.segmentCount, 2)
        try appendRecords(log, 3...3)
        XCTAssertEqual(try log.record(at: 3), makeRecord(lsn: 3))
    }

    // MARK: Corruption

    func testCorruptMiddleRecordNamesFileAndOffset() throws {
        let dir = try makeLog(count: 5)
        try flipByte(dir + firstSegment, at: offset(of: 3) + 8 + 40)
        let error = assertLogError(.corrupt) { try ReplicationLog(directory: dir) }
        XCTAssertEqual(error?.path, dir + firstSegment)
        XCTAssertEqual(error?.offset, offset(of: 3))
        XCTAssertTrue(error?.description.contains(dir + firstSegment) ?? false, error?.description ?? "")
        XCTAssertTrue(error?.description.contains("byte \(offset(of: 3))") ?? false, error?.description ?? "")
        // Nothing was cut: the damage stays for an operator to inspect.
        XCTAssertEqual(try fileSize(dir + firstSegment), offset(of: 6))
    }

    func testCorruptLengthFieldInMiddleIsNotMistakenForTornTail() throws {
        let dir = try makeLog(count: 5)
        // A length that runs past the end of the file would look like a torn frame, but
        // intact records follow it.
        try flipByte(dir + firstSegment, at: offset(of: 2))
        let error = assertLogError(.corrupt) { try ReplicationLog(directory: dir) }
        XCTAssertEqual(error?.offset, offset(of: 2))
    }

    func testCorruptLastFrameOfNonLastSegment() throws {
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 2 * frame)
        let dir = try makeLog(count: 5, options: options) // segments 1-2, 3-4, 5
        let middle = dir + "/00000000000000000003.log"
        try flipByte(middle, at: 40 + frame + 8 + 20) // lsn 4, the last frame of its segment
        let error = assertLogError(.corrupt) { try ReplicationLog(directory: dir, options: options) }
        XCTAssertEqual(error?.path, middle)
        XCTAssertEqual(error?.offset, 40 + frame)

        // A truncated non-last segment is no torn tail either (segments are synced before a roll).
        let dir2 = try makeLog(count: 5, options: options)
        try truncateFile(dir2 + "/00000000000000000003.log", to: 40 + frame + 5)
        assertLogError(.corrupt) { try ReplicationLog(directory: dir2, options: options) }
    }

    func testLSNGapWithinSegmentIsCorrupt() throws {
        let dir = try makeTemporaryDirectory(self)
        var bytes = SegmentHeader(base: .zero).encoded()
        for lsn: LSN in [1, 2, 4] { bytes += Frame.encode(makeRecord(lsn: lsn)) }
        try Data(bytes).write(to: URL(fileURLWithPath: dir + firstSegment))
        let error = assertLogError(.corrupt) { try ReplicationLog(directory: dir) }
        XCTAssertEqual(error?.offset, offset(of: 3))
        XCTAssertTrue(error?.message.contains("lsn 4") ?? false, error?.message ?? "")
    }

    func testEpochGoingBackIsCorrupt() throws {
        let dir = try makeTemporaryDirectory(self)
        var bytes = SegmentHeader(base: .zero).encoded()
        bytes += Frame.encode(makeRecord(lsn: 1, epoch: 3))
        bytes += Frame.encode(makeRecord(lsn: 2, epoch: 2))
        try Data(bytes).write(to: URL(fileURLWithPath: dir + firstSegment))
        assertLogError(.corrupt) { try ReplicationLog(directory: dir) }
    }

    func testMissingSegmentIsCorrupt() throws {
        let options = ReplicationLog.Options(segmentBytesMax: 40 + 2 * frame)
        let dir = try makeLog(count: 6, options: options) // segments 1-2, 3-4, 5-6
        try FileManager.default.removeItem(atPath: dir + "/00000000000000000003.log")
        let error = assertLogError(.corrupt) { try ReplicationLog(directory: dir, options: options) }
        XCTAssertEqual(error?.path, dir + "/00000000000000000005.log")
    }

    func testSegmentWithWrongNameOrBadHeaderIsCorrupt() throws {
        let dir = try makeLog(count: 2)
        try FileManager.default.moveItem(atPath: dir + firstSegment, toPath: dir + "/00000000000000000002.log")
        assertLogError(.corrupt) { try ReplicationLog(directory: dir) }

        let dir2 = try makeLog(count: 2)
        try flipByte(dir2 + firstSegment, at: 20)
        let error = assertLogError(.corrupt) { try ReplicationLog(directory: dir2) }
        XCTAssertEqual(error?.offset, 0)
    }

    func testOversizedFrameIsRejectedOnRead() throws {
        // Written with a generous limit, reopened with a smaller one: the frame is refused, not read.
        let dir = try makeTemporaryDirectory(self)
        var log = try ReplicationLog(directory: dir)
        try appendRecords(log, 1...1, pageCount: 1, pageBytes: 5000)
        try appendRecords(log, 2...2)
        log.close()
        let error = assertLogError(.corrupt) { try ReplicationLog(directory: dir, options: .init(recordBytesMax: 1000)) }
        XCTAssertTrue(error?.message.contains("recordBytesMax") ?? false, error?.message ?? "")
        log = try ReplicationLog(directory: dir)
        XCTAssertEqual(log.last.lsn, 2)
    }

    func testDamageAfterOpenIsReportedOnRead() throws {
        let dir = try makeLog(count: 3)
        let log = try ReplicationLog(directory: dir)
        try flipByte(dir + firstSegment, at: offset(of: 2) + 8 + 30)
        let error = assertLogError(.corrupt) { try log.record(at: 2) }
        XCTAssertEqual(error?.path, dir + firstSegment)
        XCTAssertEqual(error?.offset, offset(of: 2))
        XCTAssertEqual(try log.record(at: 3), makeRecord(lsn: 3))
    }

    // MARK: Interrupted operations

    func testLeftoverTemporaryFilesAreRemoved() throws {
        let dir = try makeLog(count: 2)
        let leftover = dir + "/00000000000000000003.log.tmp"
        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: leftover))
        try Data([1]).write(to: URL(fileURLWithPath: dir + "/operator-notes.txt"))
        let log = try ReplicationLog(directory: dir)
        XCTAssertEqual(log.last.lsn, 2)
        XCTAssertFalse(FileManager.default.fileExists(atPath: leftover))
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/operator-notes.txt"), "foreign files are left alone")
    }

    func testInterruptedResetIsFinished() throws {
        let dir = try makeLog(count: 4)
        // A crash after the reset segment was synced, before the old segments were removed.
        let base = LogPosition(epoch: Epoch(5), lsn: 99, checksum: 77)
        try Data(SegmentHeader(base: base).encoded()).write(to: URL(fileURLWithPath: dir + "/00000000000000000100.reset"))
        let log = try ReplicationLog(directory: dir)
        XCTAssertEqual(log.last, base)
        XCTAssertNil(log.firstRetainedLSN)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir).sorted(), ["00000000000000000100.log"])
    }

    func testIncompleteResetIsDiscarded() throws {
        let dir = try makeLog(count: 4)
        let header = SegmentHeader(base: LogPosition(epoch: Epoch(5), lsn: 99, checksum: 77)).encoded()
        try Data(header[..<30]).write(to: URL(fileURLWithPath: dir + "/00000000000000000100.reset"))
        let log = try ReplicationLog(directory: dir)
        XCTAssertEqual(log.last, LogPosition(makeRecord(lsn: 4)))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir).sorted(), ["00000000000000000001.log"])
    }
}
