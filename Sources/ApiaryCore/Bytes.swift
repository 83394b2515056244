/// Appends big-endian integers and byte strings to a growing array.
///
/// Hand-written rather than NIO's ByteBuffer so that pure cores and the log stay free of NIO.
public struct ByteWriter: Sendable {
    public var bytes: [UInt8] { storage }
    // Inlinable integer writes specialise in the calling module (the codecs' hot loops)
    // instead of going through generic witness tables on every field.
    @usableFromInline var storage: [UInt8]

    public init(capacity: Int = 256) {
        storage = []
        storage.reserveCapacity(capacity)
    }

    @inlinable
    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.bigEndian) { storage.append(contentsOf: $0) }
    }

    public mutating func write(_ raw: [UInt8]) { storage.append(contentsOf: raw) }

    public mutating func write<C: Collection>(contentsOf raw: C) where C.Element == UInt8 {
        storage.append(contentsOf: raw)
    }

    /// A length-prefixed (u32) UTF-8 string.
    public mutating func write(string: String) {
        let utf8 = Array(string.utf8)
        write(UInt32(utf8.count))
        write(utf8)
    }

    /// Overwrites 4 bytes at `offset` (for lengths known only after the body is written).
    public mutating func patch(_ value: UInt32, at offset: Int) {
        withUnsafeBytes(of: value.bigEndian) { raw in
            for i in 0..<4 { storage[offset + i] = raw[i] }
        }
    }
}

/// Reads what ``ByteWriter`` wrote; every read is bounds-checked and throws ``DecodeError``.
public struct ByteReader: Sendable {
    public let bytes: [UInt8]
    public var offset: Int { cursor }
    @usableFromInline var cursor: Int

    public init(_ bytes: [UInt8], offset: Int = 0) {
        self.bytes = bytes
        cursor = offset
    }

    @inlinable public var remaining: Int { bytes.count - cursor }
    public var isAtEnd: Bool { cursor == bytes.count }

    @inlinable
    public mutating func read<T: FixedWidthInteger>(_: T.Type) throws -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw DecodeError("truncated: need \(size) bytes at offset \(cursor), have \(remaining)") }
        var value: T = 0
        for i in 0..<size { value = (value << 8) | T(bytes[cursor + i]) }
        cursor += size
        return value
    }

    public mutating func read(count: Int) throws -> [UInt8] {
        guard count >= 0, remaining >= count else { throw DecodeError("truncated: need \(count) bytes at offset \(cursor), have \(remaining)") }
        defer { cursor += count }
        return Array(bytes[cursor..<cursor + count])
    }

    /// A length-prefixed (u32) UTF-8 string of at most `lengthMax` bytes.
    public mutating func readString(lengthMax: Int = 4096) throws -> String {
        let length = Int(try read(UInt32.self))
        guard length <= lengthMax else { throw DecodeError("string of \(length) bytes (max \(lengthMax))") }
        let raw = try read(count: length)
        guard let s = String(validating: raw, as: UTF8.self) else { throw DecodeError("string is not UTF-8") }
        return s
    }
}

/// Bytes that do not form a valid message or record.
public struct DecodeError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
