import ApiaryCore
import ApiaryReplication
import SimulationSupport
import XCTest

final class ReplicationCodecTests: XCTestCase {
    private let tenant = try! TenantID("acme-1")
    private let other = try! TenantID("globex")

    /// One of every message, with values at their edges.
    private var everyMessage: [Message] {
        let record = Record(epoch: Epoch(7), lsn: 42, dbSizePages: 3, checksum: .max,
                            pages: [Page(number: 1, bytes: [1, 2, 3]), Page(number: 3, bytes: [])])
        return [
            .hello(Hello(nodeID: "node-b", epoch: Epoch(9), tenants: [
                TenantPosition(tenant: tenant, appliedLSN: 10, appliedChecksum: 0xABCD, lastLSN: 13, tail: [
                    RecordSummary(lsn: 11, epoch: Epoch(8), checksum: 1),
                    RecordSummary(lsn: 12, epoch: Epoch(9), checksum: 2),
                ], history: [
                    RecordSummary(lsn: 9, epoch: Epoch(7), checksum: 3),
                    RecordSummary(lsn: 10, epoch: Epoch(8), checksum: 0xABCD),
                ]),
                .empty(other),
            ])),
            .hello(Hello(nodeID: "", epoch: .zero, tenants: [])),
            .welcome(Welcome(epoch: Epoch(9), nodeID: "node-a")),
            .reject(Reject(epoch: Epoch(9), code: .staleEpoch, reason: "épоch – older ✓")),
            .record(RecordMessage(epoch: Epoch(9), tenant: tenant, committedLSN: 41, record: record)),
            .ack(Ack(epoch: Epoch(9), tenant: tenant, lsn: .max, leaseMs: 2_000)),
            .primaryHeartbeat(PrimaryHeartbeat(epoch: Epoch(9), sentAtMs: -5, committed: [
                TenantCommitted(tenant: tenant, committedLSN: 41), TenantCommitted(tenant: other, committedLSN: 0),
            ])),
            .primaryHeartbeat(PrimaryHeartbeat(epoch: Epoch(9), sentAtMs: .max, committed: [])),
            .standbyHeartbeat(StandbyHeartbeat(epoch: Epoch(9), echoSentAtMs: 123, leaseMs: 0)),
            .rewind(Rewind(epoch: Epoch(9), tenant: tenant, toLSN: 0)),
            .snapshotBegin(SnapshotBegin(epoch: Epoch(9), tenant: tenant, lsn: 40, dbSizePages: 2)),
            .snapshotPages(SnapshotPages(epoch: Epoch(9), tenant: tenant, pages: [Page(number: 2, bytes: Array(repeating: 9, count: 4096))])),
            .snapshotPages(SnapshotPages(epoch: Epoch(9), tenant: tenant, pages: [])),
            .snapshotEnd(SnapshotEnd(epoch: Epoch(9), tenant: tenant, lsn: 40, checksum: 77)),
        ]
    }

    func testEveryMessageRoundTrips() throws {
        for message in everyMessage {
            let frame = WireCodec.encodeFrame(message)
            XCTAssertEqual(try WireCodec.decode(frame: frame), message, message.kind)
            XCTAssertEqual(try WireCodec.decode(body: Array(frame[4...])), message, message.kind)
        }
    }

    func testFrameDecoderReassemblesArbitraryChunks() throws {
        var stream: [UInt8] = []
        for message in everyMessage { stream += WireCodec.encodeFrame(message) }
        var rng = SimRandom(seed: 99)
        for _ in 0..<50 {
            var decoder = FrameDecoder()
            var decoded: [Message] = []
            var offset = 0
            while offset < stream.count {
                let chunk = min(stream.count - offset, rng.int(1...300))
                decoder.append(stream[offset..<offset + chunk])
                offset += chunk
                while let message = try decoder.next() { decoded.append(message) }
            }
            XCTAssertEqual(decoded, everyMessage)
            XCTAssertEqual(decoder.bufferedBytes, 0)
        }
    }

    func testFrameLengthOutOfBoundsIsRejectedBeforeTheBodyArrives() {
        for length in [UInt32(0), UInt32(WireCodec.frameBodyBytesMax + 1), UInt32.max] {
            var w = ByteWriter()
            w.write(length)
            var decoder = FrameDecoder()
            decoder.append(w.bytes)
            XCTAssertThrowsError(try decoder.next(), "length \(length)") { XCTAssertTrue($0 is DecodeError) }
        }
    }

    /// Bad bytes throw ``DecodeError``; nothing crashes and nothing decodes to garbage silently
    /// (every truncation of a valid frame fails).
    func testBadBytesThrowAndNeverCrash() {
        for message in everyMessage {
            let body = Array(WireCodec.encodeFrame(message)[4...])
            for cut in 0..<body.count {
                XCTAssertThrowsError(try WireCodec.decode(body: Array(body[..<cut])), "\(message.kind) cut at \(cut)")
            }
            XCTAssertThrowsError(try WireCodec.decode(body: body + [0]), "\(message.kind) with a trailing byte")
        }
        var rng = SimRandom(seed: 7)
        let bodies = everyMessage.map { Array(WireCodec.encodeFrame($0)[4...]) }
        for _ in 0..<20_000 {
            var body = rng.chance(0.3) ? rng.bytes(rng.int(0...64)) : rng.pick(bodies)
            for _ in 0..<rng.int(1...4) where !body.isEmpty {
                body[rng.int(0...(body.count - 1))] = UInt8(truncatingIfNeeded: rng.next())
            }
            do { _ = try WireCodec.decode(body: body) } catch { XCTAssertTrue(error is DecodeError) }
        }
    }

    func testUnknownTypeAndMalformedFieldsAreDecodeErrors() {
        XCTAssertThrowsError(try WireCodec.decode(body: [0]))
        XCTAssertThrowsError(try WireCodec.decode(body: [200, 1, 2, 3]))
        XCTAssertThrowsError(try WireCodec.decode(body: []))

        // A tenant id that is not a valid TenantID.
        var w = ByteWriter()
        w.write(UInt8(8)) // rewind
        w.write(UInt64(1))
        w.write(string: "Not/A/Tenant")
        w.write(UInt64(0))
        XCTAssertThrowsError(try WireCodec.decode(body: w.bytes))

        // A lease beyond a day.
        w = ByteWriter()
        w.write(UInt8(7)) // standbyHeartbeat
        w.write(UInt64(1))
        w.write(Int64(0))
        w.write(Int64(86_400_001))
        XCTAssertThrowsError(try WireCodec.decode(body: w.bytes))

        // A hello claiming more tail summaries than records beyond its applied lsn.
        w = ByteWriter()
        w.write(UInt8(1))
        w.write(UInt32(0x4150_5250))
        w.write(Hello.currentProtocolVersion)
        w.write(string: "node-b")
        w.write(UInt64(1))
        w.write(UInt32(1))
        w.write(string: "acme-1")
        w.write(UInt64(5)); w.write(UInt64(0)); w.write(UInt64(5))
        w.write(UInt32(1)); w.write(UInt64(1)); w.write(UInt64(1))
        XCTAssertThrowsError(try WireCodec.decode(body: w.bytes))
    }

    func testHelloOfAnotherVersionDecodesToItsVersionOnly() throws {
        var w = ByteWriter()
        w.write(UInt8(1))
        w.write(UInt32(0x4150_5250))
        w.write(UInt16(99))
        w.write([0xDE, 0xAD, 0xBE, 0xEF]) // a body laid out some other way
        guard case .hello(let hello) = try WireCodec.decode(body: w.bytes) else { return XCTFail("not a hello") }
        XCTAssertEqual(hello.protocolVersion, 99)

        w = ByteWriter()
        w.write(UInt8(1))
        w.write(UInt32(0x4854_5450)) // "HTTP": not a replication peer
        w.write(UInt16(1))
        XCTAssertThrowsError(try WireCodec.decode(body: w.bytes))
    }

    func testLongRejectReasonIsCutOnACharacterBoundary() throws {
        let reason = String(repeating: "é", count: 1_000) // 2,000 UTF-8 bytes
        let frame = WireCodec.encodeFrame(.reject(Reject(epoch: .zero, code: .protocolViolation, reason: reason)))
        guard case .reject(let decoded) = try WireCodec.decode(frame: frame) else { return XCTFail("not a reject") }
        XCTAssertEqual(decoded.reason, String(repeating: "é", count: 512))
    }
}
