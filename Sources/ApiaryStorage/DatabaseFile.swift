import ApiaryCore
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Direct page I/O on a database file that no SQLite connection has open: the standby's
/// apply, a primary's redo of its last logged commit at startup, snapshots.
public enum DatabaseFile {
    /// Apiary's fixed page size (DESIGN §4). Set when a database is created, never changed.
    public static let pageSize = 4096
    /// Bytes reserved at the end of every page for the at-rest cipher's nonce and tag.
    public static let reservedBytesPerPage = 32

    /// Writes page images and cuts the file to `dbSizePages`, then fsyncs.
    /// Idempotent: writing the same record twice leaves the same file.
    public static func writePages(_ pages: [Page], dbSizePages: UInt32, to path: String) throws {
        let writer = try Writer(path: path)
        try writer.write(pages, dbSizePages: dbSizePages)
        try writer.sync()
    }

    /// Applies many records' pages with one fsync at the end.
    public final class Writer {
        let fd: Int32
        let path: String

        public init(path: String) throws {
            fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw StorageError.io("open", path: path, errno: errno) }
            self.path = path
        }

        deinit { close(fd) }

        /// Writes page images (not yet durable) and cuts the file to `dbSizePages`; nil keeps the
        /// size (snapshot chunks arrive before the snapshot's end says how large it is).
        public func write(_ pages: [Page], dbSizePages: UInt32?) throws {
            for page in pages where page.number <= dbSizePages ?? .max {
                guard page.bytes.count == pageSize else {
                    throw StorageError(.corrupt, "page \(page.number) has \(page.bytes.count) bytes, expected \(pageSize)")
                }
                let offset = off_t(Int(page.number) - 1) * off_t(pageSize)
                let written = page.bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, pageSize, offset) }
                guard written == pageSize else { throw StorageError.io("write", path: path, errno: written < 0 ? errno : ENOSPC) }
            }
            guard let dbSizePages else { return }
            guard ftruncate(fd, off_t(dbSizePages) * off_t(pageSize)) == 0 else { throw StorageError.io("truncate", path: path, errno: errno) }
        }

        public func sync() throws {
            guard fsync(fd) == 0 else { throw StorageError.io("fsync", path: path, errno: errno) }
        }
    }

    /// Reads every page of the file (a file whose size is not a whole number of pages is corrupt).
    public static func forEachPage(of path: String, _ body: (UInt32, UnsafeRawBufferPointer) throws -> Void) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 && errno == ENOENT { return }
        guard fd >= 0 else { throw StorageError.io("open", path: path, errno: errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw StorageError.io("stat", path: path, errno: errno) }
        guard Int(st.st_size) % pageSize == 0 else {
            throw StorageError(.corrupt, "\(path): size \(st.st_size) is not a multiple of the page size \(pageSize)")
        }
        let count = Int(st.st_size) / pageSize
        var buffer = [UInt8](repeating: 0, count: pageSize)
        for i in 0..<count {
            let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, pageSize, off_t(i) * off_t(pageSize)) }
            guard got == pageSize else { throw StorageError.io("read", path: path, errno: got < 0 ? errno : EIO) }
            try buffer.withUnsafeBytes { try body(UInt32(i + 1), $0) }
        }
    }

    /// Copies a file page by page, a bounded chunk at a time, and fsyncs the copy.
    /// - Returns: the number of pages copied.
    public static func copy(_ source: String, to destination: String, chunkPages: Int = 256) throws -> UInt32 {
        try? FileManager.default.removeItem(atPath: destination)
        let writer = try Writer(path: destination)
        var next: UInt32 = 1
        while true {
            let chunk = try pages(of: source, from: next, countMax: chunkPages)
            guard !chunk.isEmpty else { break }
            try writer.write(chunk, dbSizePages: nil)
            next += UInt32(chunk.count)
        }
        try writer.sync()
        return next - 1
    }

    /// Pages `first...first+countMax-1` of a file (fewer at its end): a bounded read for streaming.
    public static func pages(of path: String, from first: UInt32, countMax: Int) throws -> [Page] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw StorageError.io("open", path: path, errno: errno) }
        defer { close(fd) }
        var pages: [Page] = []
        var number = first
        while pages.count < countMax {
            var buffer = [UInt8](repeating: 0, count: pageSize)
            let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, pageSize, off_t(Int(number) - 1) * off_t(pageSize)) }
            if got == 0 { break }
            guard got == pageSize else { throw StorageError.io("read", path: path, errno: got < 0 ? errno : EIO) }
            pages.append(Page(number: number, bytes: buffer))
            number += 1
        }
        return pages
    }

    /// The rolling checksum state of a file's pages.
    public static func pageHashes(of path: String) throws -> PageHashes {
        var hashes = PageHashes()
        try forEachPage(of: path) { number, image in hashes.set(page: number, image: image) }
        return hashes
    }

    /// All pages of a file, for a bootstrap record or a snapshot.
    public static func allPages(of path: String) throws -> [Page] {
        var pages: [Page] = []
        try forEachPage(of: path) { number, image in pages.append(Page(number: number, bytes: Array(image))) }
        return pages
    }
}

/// An operational storage error with a code the caller can act on.
public struct StorageError: Error, CustomStringConvertible, Equatable {
    public enum Code: Equatable, Sendable {
        case io, diskFull, corrupt, queueFull, commitFailed, closed, badRequest, wrongFormat
        /// An idempotency key sent again with another request: nothing ran.
        case idempotencyKeyReused
    }
    public let code: Code
    public let message: String
    /// What failed a commit (the sink's error), for callers that map it to an answer.
    public let cause: (any Error)?

    public init(_ code: Code, _ message: String, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public static func == (a: StorageError, b: StorageError) -> Bool { a.code == b.code && a.message == b.message }

    static func io(_ operation: String, path: String, errno code: Int32) -> StorageError {
        let reason = String(cString: strerror(code))
        return StorageError(code == ENOSPC ? .diskFull : .io, "\(operation) \(path): \(reason)")
    }

    public var description: String { message }
}

extension DatabaseFile {
    /// Runs a query on a private copy of a database file (for operators' and tests'
    /// inspection of a standby's file, which must not be opened in place while it replicates).
    public static func query(copyOf path: String, _ sql: String) throws -> [[SQLValue]] {
        let copy = path + ".inspect-\(getpid())"
        defer { for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: copy + suffix) } }
        for suffix in ["", "-wal"] where FileManager.default.fileExists(atPath: path + suffix) {
            try? FileManager.default.removeItem(atPath: copy + suffix)
            try FileManager.default.copyItem(atPath: path + suffix, toPath: copy + suffix)
        }
        let connection = try SQLiteConnection(path: copy, readOnly: false)
        return try connection.run(sql).rows
    }
}
