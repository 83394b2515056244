/// One database page image as SQLite wrote it.
public struct Page: Hashable, Sendable {
    /// 1-based page number, as in SQLite.
    public var number: UInt32
    public var bytes: [UInt8]

    public init(number: UInt32, bytes: [UInt8]) {
        precondition(number >= 1, "page numbers start at 1, got \(number)")
        self.number = number
        self.bytes = bytes
    }
}

/// One committed transaction of one tenant: the unit of replication.
///
/// A record holds every page the transaction changed (the last image of each) and the
/// database size after the commit. Applying records `1...n` in order to an empty file yields
/// the primary's database at lsn `n`; `checksum` is the rolling database checksum after it.
public struct Record: Hashable, Sendable {
    public var epoch: Epoch
    public var lsn: LSN
    /// Database size in pages after this commit. Pages past it are cut off (VACUUM shrinks).
    public var dbSizePages: UInt32
    /// ``PageHashes/checksum`` of the database after applying this record.
    public var checksum: UInt64
    public var pages: [Page]

    public init(epoch: Epoch, lsn: LSN, dbSizePages: UInt32, checksum: UInt64, pages: [Page]) {
        self.epoch = epoch
        self.lsn = lsn
        self.dbSizePages = dbSizePages
        self.checksum = checksum
        self.pages = pages
    }

    /// Size of the page payload, for batch and buffer limits.
    public var byteCount: Int { pages.reduce(0) { $0 + $1.bytes.count + 4 } + 32 }
}

// MARK: - Binary form

extension Record {
    /// Largest page SQLite allows; a decoded size beyond it is corruption, not data.
    public static let pageSizeMax = 65536
    /// Bound on pages in one record: a 4 GiB database of 64 KiB pages.
    public static let pagesMax = 262_144

    /// Layout (big-endian): epoch u64, lsn u64, dbSizePages u32, checksum u64,
    /// pageCount u32, then per page: number u32, length u32, bytes.
    public func encode(into w: inout ByteWriter) {
        w.write(epoch.rawValue)
        w.write(lsn)
        w.write(dbSizePages)
        w.write(checksum)
        w.write(UInt32(pages.count))
        for page in pages {
            w.write(page.number)
            w.write(UInt32(page.bytes.count))
            w.write(page.bytes)
        }
    }

    public static func decode(from r: inout ByteReader) throws -> Record {
        let epoch = Epoch(try r.read(UInt64.self))
        let lsn = try r.read(UInt64.self)
        let dbSize = try r.read(UInt32.self)
        let checksum = try r.read(UInt64.self)
        let count = Int(try r.read(UInt32.self))
        guard count <= pagesMax else { throw DecodeError("record claims \(count) pages (max \(pagesMax))") }
        var pages: [Page] = []
        pages.reserveCapacity(count)
        for _ in 0..<count {
            let number = try r.read(UInt32.self)
            guard number >= 1 else { throw DecodeError("page number 0") }
            let length = Int(try r.read(UInt32.self))
            guard length <= pageSizeMax else { throw DecodeError("page of \(length) bytes (max \(pageSizeMax))") }
            pages.append(Page(number: number, bytes: try r.read(count: length)))
        }
        return Record(epoch: epoch, lsn: lsn, dbSizePages: dbSize, checksum: checksum, pages: pages)
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        encode(into: &w)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> Record {
        var r = ByteReader(bytes)
        let record = try decode(from: &r)
        guard r.isAtEnd else { throw DecodeError("\(r.remaining) trailing bytes after record") }
        return record
    }
}
