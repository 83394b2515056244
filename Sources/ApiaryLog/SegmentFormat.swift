import ApiaryCore

// MARK: - Log positions

/// A point in a tenant's history: the state after the record `lsn` (or a snapshot's base).
public struct LogPosition: Hashable, Sendable, CustomStringConvertible {
    public var epoch: Epoch
    public var lsn: LSN
    /// The rolling database checksum (``PageHashes/checksum``) at `lsn`.
    public var checksum: UInt64

    public init(epoch: Epoch, lsn: LSN, checksum: UInt64) {
        self.epoch = epoch
        self.lsn = lsn
        self.checksum = checksum
    }

    public init(_ record: Record) {
        self.init(epoch: record.epoch, lsn: record.lsn, checksum: record.checksum)
    }

    /// The base of a log that has never seen a record.
    public static let zero = LogPosition(epoch: .zero, lsn: 0, checksum: 0)

    public var description: String { "(epoch \(epoch), lsn \(lsn), checksum \(String(checksum, radix: 16)))" }
}

// MARK: - Segment header

/// The fixed header that starts every segment file.
///
/// Layout (big-endian, 40 bytes): magic `APLOG\0\0\1` (8), format version u32, then the base
/// (the state before the segment's first record): epoch u64, lsn u64, checksum u64; then a
/// CRC32C u32 of the 36 bytes before it. Carrying the base lets a log that is empty after a
/// reset (snapshot install) or a truncation still state its last (epoch, lsn, checksum).
struct SegmentHeader: Equatable {
    static let magic: [UInt8] = Array("APLOG".utf8) + [0, 0, 1]
    static let formatVersion: UInt32 = 1
    static let byteCount = 40

    var base: LogPosition

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.byteCount)
        w.write(Self.magic)
        w.write(Self.formatVersion)
        w.write(base.epoch.rawValue)
        w.write(base.lsn)
        w.write(base.checksum)
        w.write(CRC32C.checksum(w.bytes))
        return w.bytes
    }

    /// Decodes a header, or says in plain words why `bytes` are not one.
    static func decode(_ bytes: [UInt8]) -> Result<SegmentHeader, DecodeError> {
        guard bytes.count >= byteCount else {
            return .failure(DecodeError("segment header is \(bytes.count) bytes, expected \(byteCount)"))
        }
        guard Array(bytes[0..<8]) == magic else { return .failure(DecodeError("not a log segment (bad magic)")) }
        var r = ByteReader(Array(bytes[0..<byteCount]), offset: 8)
        do {
            let version = try r.read(UInt32.self)
            let epoch = try r.read(UInt64.self)
            let lsn = try r.read(UInt64.self)
            let checksum = try r.read(UInt64.self)
            let crc = try r.read(UInt32.self)
            guard crc == CRC32C.checksum(bytes[0..<36]) else { return .failure(DecodeError("segment header checksum mismatch")) }
            guard version == formatVersion else {
                return .failure(DecodeError("unsupported segment format version \(version) (this build reads \(formatVersion))"))
            }
            // The next lsn must be representable, as must the file name of the segment.
            guard lsn < LSN.max else { return .failure(DecodeError("base lsn \(lsn) out of range")) }
            return .success(SegmentHeader(base: LogPosition(epoch: Epoch(epoch), lsn: lsn, checksum: checksum)))
        } catch let error as DecodeError {
            return .failure(error)
        } catch {
            return .failure(DecodeError("\(error)"))
        }
    }
}

// MARK: - Record frames

/// How a record sits in a segment: u32 payload length, u32 CRC32C of the payload, payload =
/// ``Record/encoded()``. All big-endian.
enum Frame {
    static let headerBytes = 8
    /// The encoding of a record without pages: epoch, lsn, dbSizePages, checksum, page count.
    static let payloadBytesMin = 8 + 8 + 4 + 8 + 4

    /// The exact size of `record.encoded()`, computed without encoding it.
    static func payloadBytes(of record: Record) -> Int {
        record.pages.reduce(payloadBytesMin) { $0 + 8 + $1.bytes.count }
    }

    /// Encodes the frame in one buffer: the record is written straight after a placeholder
    /// header that is then patched, so the (possibly large) payload is never copied.
    static func encode(_ record: Record) -> [UInt8] {
        var w = ByteWriter(capacity: headerBytes + payloadBytes(of: record))
        w.write(UInt32(0))
        w.write(UInt32(0))
        record.encode(into: &w)
        let length = w.bytes.count - headerBytes
        let crc = CRC32C.checksum(w.bytes[headerBytes...])
        w.patch(UInt32(length), at: 0)
        w.patch(crc, at: 4)
        return w.bytes
    }

    enum Checked {
        case valid(Record)
        /// Not a whole, intact record; the reason, in words, for the error message.
        case invalid(String)
    }

    /// Checks a frame header's claimed length against the limits and the bytes available.
    static func checkLength(_ length: Int, available: Int, recordBytesMax: Int) -> String? {
        if length < payloadBytesMin { return "frame length \(length) is below the smallest record (\(payloadBytesMin) bytes)" }
        if length > recordBytesMax { return "frame length \(length) exceeds recordBytesMax (\(recordBytesMax))" }
        if length > available { return "partial frame: \(length) payload bytes claimed, \(available) present" }
        return nil
    }

    /// Verifies a payload against its CRC and decodes it.
    static func check(payload: [UInt8], crc: UInt32) -> Checked {
        guard CRC32C.checksum(payload) == crc else { return .invalid("payload checksum mismatch") }
        do {
            return .valid(try Record.decode(payload))
        } catch {
            return .invalid("payload does not decode as a record: \(error)")
        }
    }
}

// MARK: - File names

/// Segment files are named by their first lsn, zero-padded to 20 digits so that names sort
/// like numbers: `00000000000000000001.log`.
enum SegmentName {
    static let digits = 20
    static let logSuffix = ".log"
    /// A segment written by ``ReplicationLog/reset(base:lsn:checksum:)`` before the old
    /// segments are removed; recovery finishes the reset when it finds one (see there).
    static let resetSuffix = ".reset"
    /// A file still being written; renamed into place only once complete and synced.
    static let temporarySuffix = ".tmp"

    enum Kind: Equatable {
        case log(firstLSN: LSN)
        case reset(firstLSN: LSN)
        case temporary
    }

    static func log(firstLSN: LSN) -> String { padded(firstLSN) + logSuffix }
    static func reset(firstLSN: LSN) -> String { padded(firstLSN) + resetSuffix }

    /// What a directory entry is; nil for names the log does not own (left alone).
    static func parse(_ name: String) -> Kind? {
        if name.hasSuffix(temporarySuffix) {
            return parse(String(name.dropLast(temporarySuffix.count))) == nil ? nil : .temporary
        }
        for (suffix, isReset) in [(logSuffix, false), (resetSuffix, true)] where name.hasSuffix(suffix) {
            let stem = name.dropLast(suffix.count)
            guard stem.utf8.count == digits, stem.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                  let lsn = LSN(stem) else { return nil }
            return isReset ? .reset(firstLSN: lsn) : .log(firstLSN: lsn)
        }
        return nil
    }

    private static func padded(_ lsn: LSN) -> String {
        let s = String(lsn)
        return String(repeating: "0", count: digits - s.count) + s
    }
}
