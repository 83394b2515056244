import XCTest
@testable import ApiaryCore

final class PageHashesTests: XCTestCase {
    func page(_ n: UInt32, _ byte: UInt8) -> Page { Page(number: n, bytes: [UInt8](repeating: byte, count: 64)) }

    func testChecksumAfterApplyingPredictsApplyWithoutChangingAnything() {
        var hashes = PageHashes()
        hashes.apply(pages: [page(1, 1), page(2, 2), page(3, 3)], dbSizePages: 3)
        let before = hashes
        let pages = [page(2, 9), page(4, 4)]
        let predicted = hashes.checksum(afterApplying: pages, dbSizePages: 4)
        XCTAssertEqual(hashes, before, "predicting must not change the hashes")
        hashes.apply(pages: pages, dbSizePages: 4)
        XCTAssertEqual(hashes.checksum, predicted)
    }

    func testShrinkingDropsPagesFromTheChecksum() {
        var a = PageHashes(), b = PageHashes()
        a.apply(pages: [page(1, 1), page(2, 2), page(3, 3)], dbSizePages: 3)
        XCTAssertEqual(a.checksum(afterApplying: [], dbSizePages: 1), { var h = PageHashes(); h.apply(pages: [page(1, 1)], dbSizePages: 1); return h.checksum }())
        a.apply(pages: [], dbSizePages: 1)
        b.apply(pages: [page(1, 1)], dbSizePages: 1)
        XCTAssertEqual(a.checksum, b.checksum)
    }

    func testOrderOfPagesDoesNotMatterButContentAndNumberDo() {
        var a = PageHashes(), b = PageHashes(), c = PageHashes(), d = PageHashes()
        a.apply(pages: [page(1, 1), page(2, 2)], dbSizePages: 2)
        b.apply(pages: [page(2, 2), page(1, 1)], dbSizePages: 2)
        c.apply(pages: [page(1, 2), page(2, 1)], dbSizePages: 2)  // same images, swapped numbers
        d.apply(pages: [page(1, 1), page(2, 3)], dbSizePages: 2)
        XCTAssertEqual(a.checksum, b.checksum)
        XCTAssertNotEqual(a.checksum, c.checksum)
        XCTAssertNotEqual(a.checksum, d.checksum)
    }

    func testRewritingAPageWithItsOldImageRestoresTheChecksum() {
        var h = PageHashes()
        h.apply(pages: [page(1, 1), page(2, 2)], dbSizePages: 2)
        let original = h.checksum
        h.apply(pages: [page(2, 7)], dbSizePages: 2)
        XCTAssertNotEqual(h.checksum, original)
        h.apply(pages: [page(2, 2)], dbSizePages: 2)
        XCTAssertEqual(h.checksum, original)
    }

    func testTenantIDsAreSafeNames() {
        for good in ["acme", "a", "tenant-1", "x_y", String(repeating: "a", count: 64)] { XCTAssertNoThrow(try TenantID(good), good) }
        for bad in ["", "../etc", "Acme", "a/b", "-a", "_a", "a b", String(repeating: "a", count: 65), "é"] {
            XCTAssertThrowsError(try TenantID(bad), bad)
        }
    }

    func testRecordDecodingRejectsTruncatedAndOversizedInput() {
        let record = Record(epoch: Epoch(3), lsn: 7, dbSizePages: 2, checksum: 42, pages: [page(1, 1), page(2, 2)])
        let bytes = record.encoded()
        XCTAssertEqual(try Record.decode(bytes), record)
        for cut in [0, 1, 10, bytes.count - 1] {
            XCTAssertThrowsError(try Record.decode(Array(bytes.prefix(cut))), "cut at \(cut)")
        }
        XCTAssertThrowsError(try Record.decode(bytes + [0]), "trailing bytes")
        var huge = ByteWriter()
        huge.write(UInt64(1)); huge.write(UInt64(1)); huge.write(UInt32(1)); huge.write(UInt64(0))
        huge.write(UInt32.max) // page count
        XCTAssertThrowsError(try Record.decode(huge.bytes))
    }
}
