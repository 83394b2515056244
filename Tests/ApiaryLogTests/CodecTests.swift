import ApiaryCore
@testable import ApiaryLog
import XCTest

/// The byte formats the log relies on: CRC32C, the record codec, segment headers, frames, names.
final class CodecTests: XCTestCase {
    // MARK: CRC32C

    func testCRC32CKnownVectors() {
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        // RFC 3720 (iSCSI) appendix B.4.
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        XCTAssertEqual(CRC32C.checksum((0..<32).map { UInt8($0) }), 0x46DD_794E)
        XCTAssertEqual(CRC32C.checksum((0..<32).reversed().map { UInt8($0) }), 0x113F_DB5C)
        XCTAssertEqual(CRC32C.checksum([UInt8]()), 0)
    }

    func testCRC32CSeedContinuesAndSlicesAgree() {
        let bytes = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let whole = CRC32C.checksum(bytes)
        for split in [0, 1, 7, 8, 9, 500, 999, 1000] {
            let first = CRC32C.checksum(bytes[..<split])
            XCTAssertEqual(CRC32C.checksum(bytes[split...], seed: first), whole, "split at \(split)")
        }
    }

    // MARK: Record codec

    func testRecordRoundTrip() throws {
        let records = [
            makeRecord(lsn: 1, pageCount: 0),
            makeRecord(lsn: 2, epoch: 7, pageCount: 3, pageBytes: 4096),
            Record(epoch: Epoch(UInt64.max), lsn: LSN.max - 1, dbSizePages: UInt32.max, checksum: UInt64.max,
                   pages: [Page(number: UInt32.max, bytes: []), Page(number: 1, bytes: [UInt8](repeating: 0xAB, count: Record.pageSizeMax))]),
        ]
        for record in records {
            let bytes = record.encoded()
            XCTAssertEqual(bytes.count, Frame.payloadBytes(of: record))
            XCTAssertEqual(try Record.decode(bytes), record)
        }
    }

    func testRecordLayoutIsBigEndian() {
        let record = Record(epoch: Epoch(0x0102), lsn: 0x0304, dbSizePages: 0x05, checksum: 0x06,
                            pages: [Page(number: 0x07, bytes: [0xAA, 0xBB])])
        XCTAssertEqual(record.encoded(), [
            0, 0, 0, 0, 0, 0, 1, 2, // epoch
            0, 0, 0, 0, 0, 0, 3, 4, // lsn
            0, 0, 0, 5, // dbSizePages
            0, 0, 0, 0, 0, 0, 0, 6, // checksum
            0, 0, 0, 1, // page count
            0, 0, 0, 7, 0, 0, 0, 2, 0xAA, 0xBB, // page: number, length, bytes
        ])
    }

    func testRecordDecodeRejectsBadBytes() {
        let bytes = makeRecord(lsn: 3).encoded()
        for cut in [0, 1, 31, 32, bytes.count - 1] {
            XCTAssertThrowsError(try Record.decode(Array(bytes[..<cut])), "cut at \(cut)")
        }
        XCTAssertThrowsError(try Record.decode(bytes + [0]), "trailing byte")
        var pageZero = makeRecord(lsn: 3, pageCount: 1).encoded()
        pageZero[32..<36] = [0, 0, 0, 0]
        XCTAssertThrowsError(try Record.decode(pageZero), "page number 0")
        var manyPages = makeRecord(lsn: 3, pageCount: 0).encoded()
        manyPages[28..<32] = [0xFF, 0xFF, 0xFF, 0xFF]
        XCTAssertThrowsError(try Record.decode(manyPages), "absurd page count")
    }

    // MARK: Segment header

    func testSegmentHeaderRoundTripAndLayout() throws {
        let header = SegmentHeader(base: LogPosition(epoch: Epoch(3), lsn: 41, checksum: 0xDEAD_BEEF))
        let bytes = header.encoded()
        XCTAssertEqual(bytes.count, 40)
        XCTAssertEqual(Array(bytes[0..<8]), [0x41, 0x50, 0x4C, 0x4F, 0x47, 0, 0, 1]) // "APLOG\0\0\1"
        XCTAssertEqual(Array(bytes[8..<12]), [0, 0, 0, 1]) // format version
        XCTAssertEqual(try SegmentHeader.decode(bytes).get(), header)
    }

    func testSegmentHeaderRejectsAnyFlippedByteAndShortInput() {
        let bytes = SegmentHeader(base: LogPosition(epoch: Epoch(3), lsn: 41, checksum: 9)).encoded()
        for i in bytes.indices {
            var damaged = bytes
            damaged[i] ^= 0x01
            if case .success = SegmentHeader.decode(damaged) { XCTFail("byte \(i) flipped yet accepted") }
        }
        if case .success = SegmentHeader.decode(Array(bytes[..<39])) { XCTFail("short header accepted") }
    }

    // MARK: Frames and names

    func testFrameLayout() {
        let record = makeRecord(lsn: 5)
        let frame = Frame.encode(record)
        let payload = record.encoded()
        var r = ByteReader(frame)
        XCTAssertEqual(try r.read(UInt32.self), UInt32(payload.count))
        XCTAssertEqual(try r.read(UInt32.self), CRC32C.checksum(payload))
        XCTAssertEqual(Array(frame[8...]), payload)
    }

    func testSegmentNames() {
        XCTAssertEqual(SegmentName.log(firstLSN: 1), "00000000000000000001.log")
        XCTAssertEqual(SegmentName.log(firstLSN: LSN.max), "18446744073709551615.log")
        XCTAssertEqual(SegmentName.parse("00000000000000000042.log"), .log(firstLSN: 42))
        XCTAssertEqual(SegmentName.parse("00000000000000000042.reset"), .reset(firstLSN: 42))
        XCTAssertEqual(SegmentName.parse("00000000000000000042.log.tmp"), .temporary)
        XCTAssertEqual(SegmentName.parse("00000000000000000042.reset.tmp"), .temporary)
        for foreign in ["42.log", "0000000000000000004x.log", "99999999999999999999.log", "notes.txt", "x.tmp", "LOCK"] {
            XCTAssertNil(SegmentName.parse(foreign), foreign)
        }
    }
}
