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
        let header: Header
        switch try Self.parseHeader(try read(0, Self.headerBytes), pageSize: pageSize) {
        case .valid(let h): header = h
        // A header being rewritten; SQLite syncs it before writing frames, so no commit yet.
        case .badChecksum: return nil
        case .badMagic(let magic): throw CaptureError.walFormat("bad WAL magic \(String(magic, radix: 16))")
        }
        let salts = header.salts

        var start: Position
        if let position, position.salts == salts {
            start = position
        } else {
            start = Position(salts: salts, offset: Self.headerBytes, checksum: header.checksum)
            position = start // a new generation: nothing of it shipped yet
        }

        let frameBytes = Self.frameHeaderBytes + pageSize
        var offset = start.offset
        var running = start.checksum
        var images: [UInt32: [UInt8]] = [:]
        var committed: (images: [UInt32: [UInt8]], dbSize: UInt32, next: Position)?
        while offset + frameBytes <= fileSize {
            let frame = try read(offset, frameBytes)
            guard let valid = try Self.validFrame(frame, header: header, running: running) else { break }
            running = valid.checksum
            images[valid.pageNumber] = Array(frame[Self.frameHeaderBytes...])
            offset += frameBytes
            if valid.dbSize != 0 {
                committed = (images, valid.dbSize, Position(salts: salts, offset: offset, checksum: running))
            }
        }
        guard let committed else { return nil }
        let pages = committed.images.keys.sorted().map { Page(number: $0, bytes: committed.images[$0]!) }
        return Commit(pages: pages, dbSizePages: committed.dbSize, firstFrameOffset: start.offset, next: committed.next)
    }

    /// Every commit that SQLite's WAL recovery (`walIndexRecover`) would replay from a WAL, in
    /// order, from its first frame: recovery validates frames as `scan` does and stops at the
    /// first invalid one. Used before SQLite opens a database, not while it writes.
    /// - Parameters:
    ///   - fileSize: the WAL file's size.
    ///   - read: reads `count` bytes at `offset`; throws on I/O error.
    ///   - body: called with each commit's pages (the last image of each) and db size, and the
    ///     offset of the frame after the commit.
    /// - Returns: false when recovery would ignore the WAL altogether (too short for a header, a
    ///   bad magic or header checksum: `walIndexRecover` then recovers no frame).
    /// - Throws: `CaptureError.walFormat` for a WAL with a valid header that recovery would refuse
    ///   (an unknown version) or whose page size is not `pageSize`.
    static func forEachRecoverableCommit(fileSize: Int, pageSize: Int, read: (_ offset: Int, _ count: Int) throws -> [UInt8],
                                         _ body: (_ pages: [Page], _ dbSizePages: UInt32, _ nextFrameOffset: Int) throws -> Void) throws -> Bool {
        guard fileSize > Self.headerBytes else { return false }
        let header: Header
        switch try parseHeader(try read(0, headerBytes), pageSize: pageSize) {
        case .valid(let h): header = h
        case .badMagic, .badChecksum: return false
        }
        let frameBytes = frameHeaderBytes + pageSize
        var offset = headerBytes
        var running = header.checksum
        var images: [UInt32: [UInt8]] = [:]
        while offset + frameBytes <= fileSize {
            let frame = try read(offset, frameBytes)
            guard let valid = try validFrame(frame, header: header, running: running) else { break }
            running = valid.checksum
            images[valid.pageNumber] = Array(frame[frameHeaderBytes...])
            offset += frameBytes
            if valid.dbSize != 0 {
                try body(images.keys.sorted().map { Page(number: $0, bytes: images[$0]!) }, valid.dbSize, offset)
                images.removeAll(keepingCapacity: true)
            }
        }
        return true
    }

    /// A WAL header's fields that frames are checked against.
    struct Header {
        var salts: (UInt32, UInt32)
        var checksum: (UInt32, UInt32)
        var bigEndianWords: Bool
    }

    enum HeaderCheck {
        case valid(Header)
        /// Not a WAL header (recovery ignores the whole file).
        case badMagic(UInt32)
        /// A WAL header whose checksum does not match: one being written (recovery ignores it too).
        case badChecksum
    }

    /// Checks a WAL header in the order `walIndexRecover` does: magic, then checksum (either wrong:
    /// the WAL holds nothing), then version (unknown: SQLite refuses to open the database).
    /// - Throws: `CaptureError.walFormat` for an unknown version or a page size other than `pageSize`.
    static func parseHeader(_ header: [UInt8], pageSize: Int) throws -> HeaderCheck {
        var r = ByteReader(header)
        let magic = try r.read(UInt32.self)
        guard magic == 0x377F_0682 || magic == 0x377F_0683 else { return .badMagic(magic) }
        let bigEndianWords = magic & 1 == 1
        let version = try r.read(UInt32.self)
        let headerPageSize = Int(try r.read(UInt32.self))
        _ = try r.read(UInt32.self) // checkpoint sequence
        let salts = (try r.read(UInt32.self), try r.read(UInt32.self))
        let stored = (try r.read(UInt32.self), try r.read(UInt32.self))
        guard checksum(header[0..<24], seed: (0, 0), bigEndianWords: bigEndianWords) == stored else { return .badChecksum }
        guard version == 3_007_000 else { throw CaptureError.walFormat("unknown WAL version \(version)") }
        guard headerPageSize == pageSize else {
            throw CaptureError.walFormat("WAL page size \(headerPageSize), database uses \(pageSize)")
        }
        return .valid(Header(salts: salts, checksum: stored, bigEndianWords: bigEndianWords))
    }

    /// The frame's page number, db size and cumulative checksum if it is valid after a frame whose
    /// checksum was `running` (`walDecodeFrame`: salts equal the header's, page number not 0,
    /// checksum over its first 8 header bytes and its page, seeded with `running`, matches).
    static func validFrame(_ frame: [UInt8], header: Header, running: (UInt32, UInt32)) throws -> (pageNumber: UInt32, dbSize: UInt32, checksum: (UInt32, UInt32))? {
        var fr = ByteReader(frame)
        let pageNumber = try fr.read(UInt32.self)
        let dbSize = try fr.read(UInt32.self)
        let frameSalts = (try fr.read(UInt32.self), try fr.read(UInt32.self))
        let stored = (try fr.read(UInt32.self), try fr.read(UInt32.self))
        guard pageNumber != 0, frameSalts == header.salts else { return nil }
        var sum = checksum(frame[0..<8], seed: running, bigEndianWords: header.bigEndianWords)
        sum = checksum(frame[frameHeaderBytes...], seed: sum, bigEndianWords: header.bigEndianWords)
        guard sum == stored else { return nil }
        return (pageNumber, dbSize, sum)
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
