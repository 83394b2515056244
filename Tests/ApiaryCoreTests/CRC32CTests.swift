@testable import ApiaryCore
import XCTest

final class CRC32CTests: XCTestCase {
    /// The CPU instruction and the table must agree on every length and alignment (the tail
    /// loop, the 8-byte loop, unaligned starts) and on continued seeds.
    func testInstructionAndTableAgree() throws {
        guard CRC32C.hardware else { throw XCTSkip("this CPU has no CRC-32C instruction; the table is used alone") }
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<20_000).map { _ in UInt8.random(in: 0...255, using: &generator) }
        for length in Array(0...40) + [63, 64, 65, 4095, 4096, 4097, 12_345, 19_990] {
            for offset in [0, 1, 3, 7] where offset + length <= bytes.count {
                let seed = UInt32.random(in: 0...UInt32.max, using: &generator)
                let slice = bytes[offset..<(offset + length)]
                let table = slice.withUnsafeBufferPointer { CRC32C.tableUpdate(seed, $0) }
                XCTAssertEqual(CRC32C.checksum(slice, seed: seed), table, "length \(length) offset \(offset)")
            }
        }
    }
}
