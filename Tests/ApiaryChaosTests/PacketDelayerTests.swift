@testable import ApiaryChaos
import XCTest

/// The delay fault's pure parts: what the schedule decides per packet, and how the delayer
/// reads packet ids from the kernel's messages. (The delayer at work, on real packets between
/// zones: `ZoneNetworkTests.testADelayBetweenTheZonesHoldsEachPacket`.)
final class PacketDelayerTests: XCTestCase {
    func testEachPacketIsHeldTheDelayGiveOrTakeTheJitter() {
        let schedule = DelaySchedule(delayMs: 50, jitterMs: 20)
        var rng = SeededGenerator(seed: 7)
        let holds = (0..<10_000).map { _ in schedule.holdMs(using: &rng) }
        XCTAssertTrue(holds.allSatisfy { (30...70).contains($0) }, "\(holds.min()!)...\(holds.max()!)")
        XCTAssertEqual(holds.min(), 30, "the whole range is used")
        XCTAssertEqual(holds.max(), 70)
        var fixed = SeededGenerator(seed: 7)
        XCTAssertTrue((0..<100).allSatisfy { _ in DelaySchedule(delayMs: 50).holdMs(using: &fixed) == 50 }, "no jitter: the delay exactly")
    }

    func testTheReorderedShareGoesAtOnce() {
        let schedule = DelaySchedule(delayMs: 50, jitterMs: 0, reorderPercent: 25)
        var rng = SeededGenerator(seed: 11)
        let holds = (0..<20_000).map { _ in schedule.holdMs(using: &rng) }
        let atOnce = holds.filter { $0 == 0 }.count
        XCTAssertTrue((4_500...5_500).contains(atOnce), "\(atOnce) of 20,000 sent at once for 25%")
        XCTAssertTrue(holds.allSatisfy { $0 == 0 || $0 == 50 })
    }

    func testTheSameSeedGivesTheSameDelays() {
        let schedule = DelaySchedule(delayMs: 100, jitterMs: 40, reorderPercent: 10)
        var a = SeededGenerator(seed: 3), b = SeededGenerator(seed: 3)
        XCTAssertEqual((0..<50).map { _ in schedule.holdMs(using: &a) }, (0..<50).map { _ in schedule.holdMs(using: &b) })
    }

    /// Two packet messages in one read (as the kernel batches them), each with attributes
    /// before and after its packet header: both ids, in order; other messages are skipped.
    func testPacketIDsAreReadFromABatchOfMessages() {
        func message(type: UInt16, attributes: [UInt8]) -> [UInt8] {
            let body: [UInt8] = [2, 0, 0, 1] + attributes // nfgenmsg: AF_INET, version, queue 1
            return PacketDelayer.little32Bytes(UInt32(16 + body.count)) + PacketDelayer.little16Bytes(type) + [0, 0] + [UInt8](repeating: 0, count: 8) + body
        }
        let packet = (PacketDelayer.subsystemQueue << 8) | PacketDelayer.messagePacket
        let mark = PacketDelayer.attribute(9, [0, 0, 0, 1])
        let first = message(type: packet, attributes: mark + PacketDelayer.attribute(PacketDelayer.attributePacketHeader, PacketDelayer.big32(0x0102_0304) + [8, 0, 3]))
        let other = message(type: 2, attributes: PacketDelayer.big32(0)) // an ack: no packet
        let second = message(type: packet, attributes: PacketDelayer.attribute(PacketDelayer.attributePacketHeader, PacketDelayer.big32(77) + [8, 0, 3]) + mark)
        XCTAssertEqual(PacketDelayer.packetIDs(in: (first + other + second)[...]), [0x0102_0304, 77])
        XCTAssertEqual(PacketDelayer.packetIDs(in: Array(first.prefix(10))[...]), [], "a cut-off message yields nothing")
    }
}
