import ApiaryCore

/// Finds the frames of the commit SQLite is about to publish, by reading the WAL file.
///
/// Facts relied on (SQLite's `wal.c` header comment, "WAL FILE FORMAT", and `walEncodeFrame`,
/// `walDecodeFrame`, `walChecksumBytes`, `sqlite3WalFrames`):
/// - The header is 32 bytes: magic 0x377f0682/0x377f0683 (the low bit says the checksum reads
///   32-bit words big-endian), format version 3007000, page size, checkpoint sequence,
///   salt-1, salt-2, checksum-1, checksum-2 (over the first 24 bytes). All big-endian.
/// - A frame is a 24-byte header (page number, db size in pages after commit or 0 for a
///   non-commit frame, salt-1, salt-2, checksum-1, checksum-2) and one page image.
/// - The checksum is cumulative: frame n's is computed over its first 8 header bytes and its
///   page, seeded with frame n-1's (frame 1's with the header's). A frame is valid only when
///   its salts equal the header's and its checksum matches: that is how SQLite itself tells
///   live frames from leftovers of an earlier WAL generation.
/// - A writer restarting the WAL after a full checkpoint writes a new header (salt-1 + 1, new
///   random salt-2) at offset 0 and frames from offset 32 again; old frames stay behind it
///   until overwritten and fail the salt check.
/// - Frames of a transaction bigger than the page cache are written before the commit
///   (spilled, db size 0) and may be rewritten in place before it; checksums from the first
///   rewritten frame on are recomputed before the commit's sync (`walRewriteChecksums`),
///   so at the sync every frame up to the commit frame is valid and final.
/// - With SQLITE_IOCAP_POWERSAFE_OVERWRITE (pinned by our VFS) no padding frames follow the
///   commit frame; the sync comes straight after it.
struct WALScanner {
    static let headerBytes = 32
    static let frameHeaderBytes = 24

    /// Where capture stands: the first frame not yet shipped, in the WAL generation `salts`.
    struct Position: Equatable {
        var salts: (UInt32, UInt32)
        var offset: Int
        var checksum: (UInt32, UInt32)
        static func == (a: Position, b: Position) -> Bool {
            a.salts == b.salts && a.offset == b.offset && a.checksum == b.checksum
        }
    }

    /// One commit's frames, ready to ship.
    struct Commit {
        var pages: [Page]
        var dbSizePages: UInt32
        /// Offset of the commit's first frame: zeroing its header invalidates the commit.
        var firstFrameOffset: Int
        /// Where capture stands once this commit is shipped.
        var next: Position
    }

    private(set) var position: Position?
    let pageSize: Int

    init(pageSize: Int) { self.pageSize = pageSize }

    /// Scans from the current position to the last valid commit frame.
    /// - Parameters:
    ///   - fileSize: the WAL file's size now.
    ///   - read: reads `count` bytes at `offset`; throws on I/O error.
    /// - Returns: nil when no complete new commit is in the WAL (a header-only sync after a
    ///   restart, or a checkpoint's sync).
    mutating func scan(fileSize: Int, read: (_ offset: Int, _ count: Int) throws -> [UInt8]) throws -> Commit? {
        guard fileSize >= Self.headerBytes else { return nil }
        let header = try read(0, Self.headerBytes)
        var r = ByteReader(header)
        let magic = try r.read(UInt32.self)
        guard magic == 0x377F_0682 || magic == 0x377F_0683 else {
            throw CaptureError.walFormat("bad WAL magic \(String(magic, radix: 16))")
        }
        let bigEndianWords = magic & 1 == 1
        let version = try r.read(UInt32.self)
        guard version == 3_007_000 else { throw CaptureError.walFormat("unknown WAL version \(version)") }
        let headerPageSize = Int(try r.read(UInt32.self))
        guard headerPageSize == pageSize else {
            throw CaptureError.walFormat("WAL page size \(headerPageSize), database uses \(pageSize)")
        }
        _ = try r.read(UInt32.self) // checkpoint sequence
        let salts = (try r.read(UInt32.self), try r.read(UInt32.self))
        let headerChecksum = (try r.read(UInt32.self), try r.read(UInt32.self))
        let computed = Self.checksum(header[0..<24], seed: (0, 0), bigEndianWords: bigEndianWords)
        guard computed == headerChecksum else {
            // A header being rewritten; SQLite syncs it before writing frames, so no commit yet.
            return nil
        }

        var start: Position
        if let position, position.salts == salts {
            start = position
        } else {
            start = Position(salts: salts, offset: Self.headerBytes, checksum: headerChecksum)
            position = start // a new generation: nothing of it shipped yet
        }

        let frameBytes = Self.frameHeaderBytes + pageSize
        var offset = start.offset
        var running = start.checksum
        var images: [UInt32: [UInt8]] = [:]
        var committed: (images: [UInt32: [UInt8]], dbSize: UInt32, next: Position)?
        while offset + frameBytes <= fileSize {
            let frame = try read(offset, frameBytes)
            var fr = ByteReader(frame)
            let pageNumber = try fr.read(UInt32.self)
            let dbSize = try fr.read(UInt32.self)
            let frameSalts = (try fr.read(UInt32.self), try fr.read(UInt32.self))
            let stored = (try fr.read(UInt32.self), try fr.read(UInt32.self))
            guard pageNumber != 0, frameSalts == salts else { break }
            var sum = Self.checksum(frame[0..<8], seed: running, bigEndianWords: bigEndianWords)
            sum = Self.checksum(frame[Self.frameHeaderBytes...], seed: sum, bigEndianWords: bigEndianWords)
            guard sum == stored else { break }
            running = sum
            images[pageNumber] = Array(frame[Self.frameHeaderBytes...])
            offset += frameBytes
            if dbSize != 0 {
                committed = (images, dbSize, Position(salts: salts, offset: offset, checksum: running))
            }
        }
        guard let committed else { return nil }
        let pages = committed.images.keys.sorted().map { Page(number: $0, bytes: committed.images[$0]!) }
        return Commit(pages: pages, dbSizePages: committed.dbSize, firstFrameOffset: start.offset, next: committed.next)
    }

    /// Records that `commit` was shipped: the next scan starts after it.
    mutating func accept(_ commit: Commit) { position = commit.next }

    /// Forgets the position (after a checkpoint that truncated the WAL, or on reopen).
    mutating func reset() { position = nil }

    /// SQLite's WAL checksum (`walChecksumBytes`): Fletcher-like over 32-bit words.
    static func checksum(_ bytes: ArraySlice<UInt8>, seed: (UInt32, UInt32), bigEndianWords: Bool) -> (UInt32, UInt32) {
        precondition(bytes.count % 8 == 0, "WAL checksum over \(bytes.count) bytes, not a multiple of 8")
        var (s1, s2) = seed
        bytes.withUnsafeBytes { raw in
            var i = 0
            while i < raw.count {
                var a = raw.loadUnaligned(fromByteOffset: i, as: UInt32.self)
                var b = raw.loadUnaligned(fromByteOffset: i + 4, as: UInt32.self)
                if bigEndianWords { a = UInt32(bigEndian: a); b = UInt32(bigEndian: b) } else { a = UInt32(littleEndian: a); b = UInt32(littleEndian: b) }
                s1 = s1 &+ a &+ s2
                s2 = s2 &+ b &+ s1
                i += 8
            }
        }
        return (s1, s2)
    }
}

/// Why capturing a commit failed. The commit fails with it; nothing becomes visible.
public enum CaptureError: Error, CustomStringConvertible, Equatable {
    case walFormat(String)
    case io(String)
    /// The sink (replication) refused the commit; its message goes to the client.
    case rejected(String)

    public var description: String {
        switch self {
        case .walFormat(let m): return "WAL format: \(m)"
        case .io(let m): return "WAL I/O: \(m)"
        case .rejected(let m): return m
        }
    }
}
