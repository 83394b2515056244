import ApiaryCore

// MARK: - Framing

/// The replication wire format: length-prefixed frames, big-endian.
///
/// ```
/// frame   = bodyLength u32 (1...frameBodyBytesMax) · body
/// body    = type u8 · payload
/// ```
/// Hand-written on ``ByteWriter``/``ByteReader`` so the core stays free of NIO; a NIO shell
/// reads the u32 length itself and hands the body to ``decode(body:)``.
/// Decoding never trusts a count: every length is bounded before anything is allocated, and
/// bad bytes throw ``DecodeError`` (the connection is then closed), never crash.
public enum WireCodec {
    /// Bytes of the length prefix.
    public static let lengthPrefixBytes = 4
    /// Largest record (``Record/byteCount``) a frame can carry, whatever the configuration says.
    public static let recordBytesMax = 64 << 20
    /// Largest frame body: a 64 MiB record plus headroom for the message header and the 4 bytes
    /// per page that the encoding holds beyond ``Record/byteCount`` (512 KiB at 512-byte pages).
    public static let frameBodyBytesMax = recordBytesMax + (1 << 20)

    /// Hard wire bounds, independent of configuration, so that a decoder never allocates
    /// beyond what a frame could honestly hold.
    static let tenantsMax = 100_000
    static let tailMax = 65_536
    static let nodeIDBytesMax = 256
    static let reasonBytesMax = 1024
    static let pagesPerSnapshotMessageMax = 65_536

    /// The first bytes of every hello ("APRP"), so that a stray client is told apart from a
    /// peer speaking another protocol version.
    static let helloMagic: UInt32 = 0x4150_5250

    enum TypeCode: UInt8 {
        case hello = 1, welcome, reject, record, ack, primaryHeartbeat, standbyHeartbeat, rewind
        case snapshotBegin, snapshotPages, snapshotEnd
    }

    /// The whole frame (length prefix included) for `message`.
    /// - Precondition: the body fits in ``frameBodyBytesMax`` (the primary refuses records
    ///   larger than ``ReplicationConfig/recordBytesMax`` before they get here).
    public static func encodeFrame(_ message: Message) -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        w.write(UInt32(0)) // patched below
        encodeBody(message, into: &w)
        let bodyLength = w.bytes.count - lengthPrefixBytes
        precondition(bodyLength <= frameBodyBytesMax, "\(message.kind) frame body of \(bodyLength) bytes exceeds \(frameBodyBytesMax)")
        w.patch(UInt32(bodyLength), at: 0)
        return w.bytes
    }

    /// Checks a frame's length prefix; throws when it is out of bounds (close the connection).
    public static func validateBodyLength(_ length: UInt32) throws -> Int {
        let n = Int(length)
        guard n >= 1, n <= frameBodyBytesMax else {
            throw DecodeError("frame body of \(n) bytes (must be 1...\(frameBodyBytesMax))")
        }
        return n
    }

    /// Decodes one frame body (type byte and payload, without the length prefix).
    public static func decode(body: [UInt8]) throws -> Message {
        var r = ByteReader(body)
        let rawType = try r.read(UInt8.self)
        guard let type = TypeCode(rawValue: rawType) else { throw DecodeError("unknown message type \(rawType)") }
        let message = try decodePayload(type, from: &r)
        guard r.isAtEnd else { throw DecodeError("\(r.remaining) trailing bytes after \(message.kind)") }
        return message
    }

    /// Decodes one whole frame (length prefix included), as produced by ``encodeFrame(_:)``.
    public static func decode(frame: [UInt8]) throws -> Message {
        var r = ByteReader(frame)
        let length = try validateBodyLength(try r.read(UInt32.self))
        guard r.remaining == length else { throw DecodeError("frame says \(length) body bytes, has \(r.remaining)") }
        return try decode(body: Array(frame[lengthPrefixBytes...]))
    }
}

// MARK: - Stream decoding

/// Splits a byte stream into messages, for shells without a framing layer and for tests.
///
/// Memory is bounded: a length prefix over ``WireCodec/frameBodyBytesMax`` throws at once, so
/// the buffer holds at most one frame plus what the caller appended since its last `next()`.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    private var start = 0

    public init() {}

    /// Bytes received and not yet returned as messages.
    public var bufferedBytes: Int { buffer.count - start }

    public mutating func append<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        buffer.append(contentsOf: bytes)
    }

    /// The next complete message, or nil when more bytes are needed.
    /// - Throws: ``DecodeError`` on malformed input; the stream is then unusable.
    public mutating func next() throws -> Message? {
        guard bufferedBytes >= WireCodec.lengthPrefixBytes else { return nil }
        var header = ByteReader(buffer, offset: start)
        let length = try WireCodec.validateBodyLength(try header.read(UInt32.self))
        let bodyStart = start + WireCodec.lengthPrefixBytes
        guard buffer.count - bodyStart >= length else { return nil }
        let body = Array(buffer[bodyStart..<bodyStart + length])
        start = bodyStart + length
        // Compact once the consumed prefix dominates, so the buffer does not grow forever.
        if start > 4096, start * 2 > buffer.count {
            buffer.removeSubrange(0..<start)
            start = 0
        }
        return try WireCodec.decode(body: body)
    }
}

// MARK: - Encoding

extension WireCodec {
    static func encodeBody(_ message: Message, into w: inout ByteWriter) {
        switch message {
        case .hello(let m):
            w.write(TypeCode.hello.rawValue)
            w.write(helloMagic)
            w.write(m.protocolVersion)
            w.write(string: m.nodeID)
            w.write(m.epoch.rawValue)
            w.write(UInt32(m.tenants.count))
            for t in m.tenants {
                w.write(string: t.tenant.rawValue)
                w.write(t.appliedLSN)
                w.write(t.appliedChecksum)
                w.write(t.lastLSN)
                w.write(UInt32(t.tail.count))
                for s in t.tail {
                    w.write(s.epoch.rawValue)
                    w.write(s.checksum)
                }
                w.write(UInt32(t.history.count))
                for s in t.history {
                    w.write(s.epoch.rawValue)
                    w.write(s.checksum)
                }
            }
        case .welcome(let m):
            w.write(TypeCode.welcome.rawValue)
            w.write(m.epoch.rawValue)
            w.write(string: m.nodeID)
        case .reject(let m):
            w.write(TypeCode.reject.rawValue)
            w.write(m.epoch.rawValue)
            w.write(m.code.rawValue)
            w.write(string: truncated(m.reason, bytesMax: reasonBytesMax))
        case .record(let m):
            w.write(TypeCode.record.rawValue)
            w.write(m.epoch.rawValue)
            w.write(string: m.tenant.rawValue)
            w.write(m.committedLSN)
            m.record.encode(into: &w)
        case .ack(let m):
            w.write(TypeCode.ack.rawValue)
            w.write(m.epoch.rawValue)
            w.write(string: m.tenant.rawValue)
            w.write(m.lsn)
            w.write(m.leaseMs)
        case .primaryHeartbeat(let m):
            w.write(TypeCode.primaryHeartbeat.rawValue)
            w.write(m.epoch.rawValue)
            w.write(m.sentAtMs)
            w.write(UInt32(m.committed.count))
            for c in m.committed {
                w.write(string: c.tenant.rawValue)
                w.write(c.committedLSN)
            }
        case .standbyHeartbeat(let m):
            w.write(TypeCode.standbyHeartbeat.rawValue)
            w.write(m.epoch.rawValue)
            w.write(m.echoSentAtMs)
            w.write(m.leaseMs)
        case .rewind(let m):
            w.write(TypeCode.rewind.rawValue)
            w.write(m.epoch.rawValue)
            w.write(string: m.tenant.rawValue)
            w.write(m.toLSN)
        case .snapshotBegin(let m):
            w.write(TypeCode.snapshotBegin.rawValue)
            w.write(m.epoch.rawValue)
            w.write(string: m.tenant.rawValue)
            w.write(m.lsn)
            w.write(m.dbSizePages)
        case .snapshotPages(let m):
            w.write(TypeCode.snapshotPages.rawValue)
            w.write(m.epoch.rawValue)
            w.write(string: m.tenant.rawValue)
            w.write(UInt32(m.pages.count))
            for page in m.pages {
                w.write(page.number)
                w.write(UInt32(page.bytes.count))
                w.write(page.bytes)
            }
        case .snapshotEnd(let m):
            w.write(TypeCode.snapshotEnd.rawValue)
            w.write(m.epoch.rawValue)
            w.write(string: m.tenant.rawValue)
            w.write(m.lsn)
            w.write(m.checksum)
        }
    }
}

// MARK: - Decoding

extension WireCodec {
    static func decodePayload(_ type: TypeCode, from r: inout ByteReader) throws -> Message {
        switch type {
        case .hello:
            let magic = try r.read(UInt32.self)
            guard magic == helloMagic else { throw DecodeError("hello without the Apiary replication magic") }
            let version = try r.read(UInt16.self)
            guard version == Hello.currentProtocolVersion else {
                // Another version may lay the rest out differently: keep only the version so
                // the primary can answer with a clear reject.
                _ = try r.read(count: r.remaining)
                return .hello(Hello(protocolVersion: version, nodeID: "", epoch: .zero, tenants: []))
            }
            let nodeID = try r.readString(lengthMax: nodeIDBytesMax)
            let epoch = try readEpoch(&r)
            let count = try readCount(&r, max: tenantsMax, what: "tenants")
            var tenants: [TenantPosition] = []
            tenants.reserveCapacity(min(count, 1024))
            for _ in 0..<count {
                let tenant = try readTenant(&r)
                let applied = try r.read(UInt64.self)
                let appliedChecksum = try r.read(UInt64.self)
                let last = try r.read(UInt64.self)
                let tailCount = try readCount(&r, max: tailMax, what: "tail summaries")
                guard last >= applied, UInt64(tailCount) <= last - applied else {
                    throw DecodeError("tenant position: applied \(applied), last \(last), \(tailCount) tail summaries")
                }
                var tail: [RecordSummary] = []
                tail.reserveCapacity(min(tailCount, 1024))
                for i in 0..<tailCount {
                    let e = try readEpoch(&r)
                    let c = try r.read(UInt64.self)
                    tail.append(RecordSummary(lsn: applied + 1 + UInt64(i), epoch: e, checksum: c))
                }
                let historyCount = try readCount(&r, max: TenantPosition.historyMax, what: "history summaries")
                guard UInt64(historyCount) <= applied else {
                    throw DecodeError("tenant position: applied \(applied), \(historyCount) history summaries")
                }
                var history: [RecordSummary] = []
                history.reserveCapacity(historyCount)
                for i in 0..<historyCount {
                    let e = try readEpoch(&r)
                    let c = try r.read(UInt64.self)
                    history.append(RecordSummary(lsn: applied - UInt64(historyCount) + 1 + UInt64(i), epoch: e, checksum: c))
                }
                tenants.append(TenantPosition(tenant: tenant, appliedLSN: applied, appliedChecksum: appliedChecksum, lastLSN: last, tail: tail, history: history))
            }
            return .hello(Hello(protocolVersion: version, nodeID: nodeID, epoch: epoch, tenants: tenants))
        case .welcome:
            let epoch = try readEpoch(&r)
            return .welcome(Welcome(epoch: epoch, nodeID: try r.readString(lengthMax: nodeIDBytesMax)))
        case .reject:
            let epoch = try readEpoch(&r)
            let raw = try r.read(UInt8.self)
            guard let code = RejectCode(rawValue: raw) else { throw DecodeError("unknown reject code \(raw)") }
            return .reject(Reject(epoch: epoch, code: code, reason: try r.readString(lengthMax: reasonBytesMax)))
        case .record:
            let epoch = try readEpoch(&r)
            let tenant = try readTenant(&r)
            let committed = try r.read(UInt64.self)
            let record = try Record.decode(from: &r)
            return .record(RecordMessage(epoch: epoch, tenant: tenant, committedLSN: committed, record: record))
        case .ack:
            let epoch = try readEpoch(&r)
            let tenant = try readTenant(&r)
            let lsn = try r.read(UInt64.self)
            return .ack(Ack(epoch: epoch, tenant: tenant, lsn: lsn, leaseMs: try readDuration(&r)))
        case .primaryHeartbeat:
            let epoch = try readEpoch(&r)
            let sentAt = try r.read(Int64.self)
            let count = try readCount(&r, max: tenantsMax, what: "committed entries")
            var committed: [TenantCommitted] = []
            committed.reserveCapacity(min(count, 1024))
            for _ in 0..<count {
                let tenant = try readTenant(&r)
                committed.append(TenantCommitted(tenant: tenant, committedLSN: try r.read(UInt64.self)))
            }
            return .primaryHeartbeat(PrimaryHeartbeat(epoch: epoch, sentAtMs: sentAt, committed: committed))
        case .standbyHeartbeat:
            let epoch = try readEpoch(&r)
            let echo = try r.read(Int64.self)
            return .standbyHeartbeat(StandbyHeartbeat(epoch: epoch, echoSentAtMs: echo, leaseMs: try readDuration(&r)))
        case .rewind:
            let epoch = try readEpoch(&r)
            let tenant = try readTenant(&r)
            return .rewind(Rewind(epoch: epoch, tenant: tenant, toLSN: try r.read(UInt64.self)))
        case .snapshotBegin:
            let epoch = try readEpoch(&r)
            let tenant = try readTenant(&r)
            let lsn = try r.read(UInt64.self)
            return .snapshotBegin(SnapshotBegin(epoch: epoch, tenant: tenant, lsn: lsn, dbSizePages: try r.read(UInt32.self)))
        case .snapshotPages:
            let epoch = try readEpoch(&r)
            let tenant = try readTenant(&r)
            let count = try readCount(&r, max: pagesPerSnapshotMessageMax, what: "snapshot pages")
            var pages: [Page] = []
            pages.reserveCapacity(min(count, 1024))
            for _ in 0..<count {
                let number = try r.read(UInt32.self)
                guard number >= 1 else { throw DecodeError("page number 0") }
                let length = Int(try r.read(UInt32.self))
                guard length <= Record.pageSizeMax else { throw DecodeError("page of \(length) bytes (max \(Record.pageSizeMax))") }
                pages.append(Page(number: number, bytes: try r.read(count: length)))
            }
            return .snapshotPages(SnapshotPages(epoch: epoch, tenant: tenant, pages: pages))
        case .snapshotEnd:
            let epoch = try readEpoch(&r)
            let tenant = try readTenant(&r)
            let lsn = try r.read(UInt64.self)
            return .snapshotEnd(SnapshotEnd(epoch: epoch, tenant: tenant, lsn: lsn, checksum: try r.read(UInt64.self)))
        }
    }

    /// Cuts `text` to at most `bytesMax` UTF-8 bytes on a character boundary.
    static func truncated(_ text: String, bytesMax: Int) -> String {
        guard text.utf8.count > bytesMax else { return text }
        var result = ""
        for character in text {
            guard result.utf8.count + character.utf8.count <= bytesMax else { break }
            result.append(character)
        }
        return result
    }

    private static func readEpoch(_ r: inout ByteReader) throws -> Epoch {
        Epoch(try r.read(UInt64.self))
    }

    private static func readTenant(_ r: inout ByteReader) throws -> TenantID {
        let raw = try r.readString(lengthMax: TenantID.lengthMax)
        guard let tenant = try? TenantID(stored: raw) else { throw DecodeError("invalid tenant id on the wire") }
        return tenant
    }

    private static func readCount(_ r: inout ByteReader, max: Int, what: String) throws -> Int {
        let count = Int(try r.read(UInt32.self))
        guard count <= max else { throw DecodeError("\(count) \(what) (max \(max))") }
        return count
    }

    /// A lease duration: non-negative and at most a day, so that arithmetic on it cannot overflow.
    private static func readDuration(_ r: inout ByteReader) throws -> Milliseconds {
        let ms = try r.read(Int64.self)
        guard ms >= 0, ms <= 86_400_000 else { throw DecodeError("duration of \(ms) ms out of range") }
        return ms
    }
}
