import ApiaryCore
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// What SQLite's WAL recovery will replay when a database is next opened, read before SQLite
/// opens it, and a way to make that replay end earlier.
///
/// Why (issue 8): the capture runs inside SQLite's WAL sync, after the commit's frames are
/// written, so they are in the file (the page cache is enough: a `kill -9` keeps it) before the
/// sink has made the commit's record durable. A process that dies there leaves a valid commit
/// in the WAL that the replication log lacks; recovery would bring it back and the database
/// would match no lsn of the log. The primary therefore cuts the WAL back to the last state its
/// log holds before SQLite opens the file (`PrimaryNode.openDatabase`).
///
/// Facts relied on, from SQLite's `wal.c` (`walIndexRecover`, `walDecodeFrame`) and `os_unix.c`
/// (`unixLockSharedMemory`), 3.40:
/// - The first connection to a database whose -shm no other connection holds truncates the -shm,
///   so the wal-index is rebuilt from the WAL file by recovery: what a dead process had in its
///   wal-index does not matter, only the WAL file does.
/// - Recovery ignores a WAL whose magic or header checksum is wrong. Otherwise it reads frames
///   from offset 32 in order and stops at the first invalid one (salts not the header's, page
///   number 0, or a cumulative checksum that does not match); the last commit frame (db size not
///   0) before that point is where the recovered WAL ends. Nothing after an invalid frame is read.
/// - Recovery replays every valid commit, also those a checkpoint had already copied into the
///   database file: the file alone is a consistent state only when nothing was checkpointed from
///   the WAL's frames, and each state below is the file with the WAL's commits up to it applied.
/// So zeroing the 24-byte header of the frame after a commit (its salts) makes recovery end at
/// that commit, whatever follows. `WALScanner` validates frames the same way.
public enum WALRecovery {
    /// One state SQLite's recovery could leave the database in.
    public struct State: Sendable, Equatable {
        /// The database's rolling checksum in this state (``PageHashes``).
        public var checksum: UInt64
        /// How many of the WAL's commits it includes (0: the database file alone).
        public var commits: Int
        /// Where the frame after this state starts: invalidating it ends recovery here.
        let nextFrameOffset: Int
    }

    /// The states recovery could leave the database at `databasePath` in: the file alone, then
    /// the file with each of its WAL's valid commits applied, in order. The last is what SQLite
    /// would recover if opened now. Empty when there is no WAL or recovery would ignore it.
    /// MUST be called while no connection has the database open (the node's start, before the
    /// tenant's database opens): the WAL must not change meanwhile.
    /// - Throws: I/O errors; `CaptureError.walFormat` for a WAL SQLite would refuse.
    public static func states(ofDatabase databasePath: String) throws -> [State] {
        let walPath = databasePath + "-wal"
        let fd = open(walPath, O_RDONLY | O_CLOEXEC)
        if fd < 0 && errno == ENOENT { return [] }
        guard fd >= 0 else { throw StorageError.io("open", path: walPath, errno: errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw StorageError.io("stat", path: walPath, errno: errno) }
        // Not even one frame (the usual case: the open before the crash emptied the WAL).
        guard Int(st.st_size) >= WALScanner.headerBytes + WALScanner.frameHeaderBytes + DatabaseFile.pageSize else { return [] }
        let read = { (offset: Int, count: Int) throws -> [UInt8] in
            var buffer = [UInt8](repeating: 0, count: count)
            let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
            guard got == count else { throw StorageError.io("read", path: walPath, errno: got < 0 ? errno : EIO) }
            return buffer
        }
        var hashes = try DatabaseFile.pageHashes(of: databasePath)
        var states = [State(checksum: hashes.checksum, commits: 0, nextFrameOffset: WALScanner.headerBytes)]
        let valid = try WALScanner.forEachRecoverableCommit(fileSize: Int(st.st_size), pageSize: DatabaseFile.pageSize, read: read) { pages, dbSizePages, next in
            hashes.apply(pages: pages, dbSizePages: dbSizePages)
            states.append(State(checksum: hashes.checksum, commits: states.count, nextFrameOffset: next))
        }
        return valid ? states : []
    }

    /// Makes recovery end at `state` (one of ``states(ofDatabase:)``, not the last): zeroes the
    /// header of the frame after it and syncs the WAL, so that neither the next open nor one
    /// after a power cut replays what follows. MUST be called while no connection has the
    /// database open.
    public static func discardCommits(after state: State, ofDatabase databasePath: String) throws {
        let walPath = databasePath + "-wal"
        let fd = open(walPath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw StorageError.io("open", path: walPath, errno: errno) }
        defer { close(fd) }
        let zeros = [UInt8](repeating: 0, count: WALScanner.frameHeaderBytes)
        let written = zeros.withUnsafeBytes { pwrite(fd, $0.baseAddress, zeros.count, off_t(state.nextFrameOffset)) }
        guard written == zeros.count else { throw StorageError.io("write", path: walPath, errno: written < 0 ? errno : EIO) }
        guard fsync(fd) == 0 else { throw StorageError.io("fsync", path: walPath, errno: errno) }
    }
}
