import ApiaryCore
import CApiaryVFS
import CSQLite
import Foundation

/// A commit captured from the WAL, before any reader can see it.
public struct CapturedCommit: Sendable {
    public var pages: [Page]
    public var dbSizePages: UInt32
    /// The rolling database checksum after this commit.
    public var checksum: UInt64
    /// The commit's frames in the WAL file; nil for a new database's first commit, whose pages
    /// SQLite wrote into the database file itself.
    public var frames: WALFrames? = nil
}

/// A captured commit's frames in the WAL file, lent to the sink for the length of its `commit`
/// call so that it can make them invalid before it forgets a failed commit (see
/// ``CommitSink/commit(tenant:_:)``).
public final class WALFrames: @unchecked Sendable {
    /// SQLite's open WAL file: valid only while the capture hook runs, on the writer thread.
    private let file: UnsafeMutablePointer<sqlite3_file>
    private let firstFrameOffset: Int
    private(set) var isInvalidated = false

    init(file: UnsafeMutablePointer<sqlite3_file>, firstFrameOffset: Int) {
        self.file = file
        self.firstFrameOffset = firstFrameOffset
    }

    /// Makes the commit's frames invalid on disk, durably, so that SQLite's WAL recovery after a
    /// crash cannot replay them. SQLite does not publish a commit whose sync failed (wal.c never
    /// appends it to the wal-index), but recovery replays any frame chain with valid salts and
    /// checksums up to a commit frame; zeroing the first frame's header (its salts) ends the
    /// valid chain before the commit. Idempotent. MUST be called, if at all, inside the sink's
    /// `commit`, on its thread. Stops the process if the WAL cannot be written or synced: a
    /// restart could replay the commit otherwise.
    public func invalidate() {
        guard !isInvalidated else { return }
        let zeros = [UInt8](repeating: 0, count: WALScanner.frameHeaderBytes)
        let written = zeros.withUnsafeBytes { apiary_file_write(file, $0.baseAddress, Int32(zeros.count), sqlite3_int64(firstFrameOffset)) }
        let synced = apiary_file_sync(file)
        precondition(written == SQLITE_OK && synced == SQLITE_OK,
                     "cannot invalidate the frames of a failed commit at WAL offset \(firstFrameOffset): a restart could replay them")
        isInvalidated = true
    }
}

/// Receives each captured commit of a tenant (the replication layer, or a local log).
public protocol CommitSink: AnyObject, Sendable {
    /// Makes `commit` durable where the node's mode requires (local log; the standby's log
    /// in sync mode). It runs on the tenant's writer thread and MAY block, boundedly.
    /// Throwing fails the SQLite commit: nothing of it becomes visible, and the thrown
    /// error's description is what the writing clients are told. The capture then makes the
    /// commit's frames invalid in the WAL (``WALFrames/invalidate()``) if the sink has not.
    ///
    /// A sink that keeps a commit it then fails (the primary's log) MUST call
    /// `commit.frames?.invalidate()` before it removes the commit from where it keeps it: the
    /// other order leaves a moment in which the WAL holds a valid commit that is nowhere else,
    /// and a crash then would have SQLite's recovery bring it back.
    ///
    /// Returns the commit's position where the sink keeps it (the primary's lsn: what clients
    /// see as rqlite's `raft_index`), 0 when it has none.
    func commit(tenant: TenantID, _ commit: CapturedCommit) throws -> UInt64

    /// True when a commit that `commit` accepted is durable without SQLite's WAL fsync: the
    /// sink keeps it in a log from which the owner redoes the database after a crash
    /// (``TenantDatabase/redo``). False makes every commit pay the WAL fsync as well.
    var isDurableOnCommit: Bool { get }
}

/// Captures one database's commits at the WAL sync (the VFS hook) and hands them to a sink.
final class WALCapture: @unchecked Sendable {
    let tenant: TenantID
    let sink: any CommitSink
    /// The position the sink gave the last commit it accepted (writer thread).
    private(set) var lastCommitPosition: UInt64 = 0
    private(set) var hashes: PageHashes
    private var scanner: WALScanner
    /// The error that failed the last commit, reported to its clients instead of SQLite's
    /// generic "disk I/O error". Only the writer thread touches this object.
    var lastFailure: (any Error)?
    /// Commits shipped since open, for tests and metrics.
    private(set) var commitsCaptured = 0
    /// WAL syncs that had to ask the file system for the WAL's size (for tests).
    private(set) var fileSizeQueries = 0

    init(tenant: TenantID, sink: any CommitSink, hashes: PageHashes, pageSize: Int) {
        self.tenant = tenant
        self.sink = sink
        self.hashes = hashes
        self.scanner = WALScanner(pageSize: pageSize)
    }

    /// Called by the VFS before SQLite's WAL fsync. Returns APIARY_SYNC_WAL, APIARY_SYNC_SKIP
    /// (the sink made the commit durable in the replication log) or an SQLite error code.
    /// - Parameter writtenEnd: where this connection's WAL writes end (-1: unknown), see
    ///   apiary_vfs.h. The commit's frames end there; only when no commit is found below it is
    ///   the file's size asked for, so a wrong bound can cost an fstat but never let a commit
    ///   through unshipped.
    func onWALSync(_ file: UnsafeMutablePointer<sqlite3_file>, writtenEnd: Int64) -> Int32 {
        let read = { (offset: Int, count: Int) throws -> [UInt8] in
            var buffer = [UInt8](repeating: 0, count: count)
            let rc = buffer.withUnsafeMutableBytes { apiary_file_read(file, $0.baseAddress, Int32(count), sqlite3_int64(offset)) }
            guard rc == SQLITE_OK else { throw CaptureError.io("cannot read WAL at offset \(offset) (code \(rc))") }
            return buffer
        }
        // The header alone: wal.c syncs a new WAL generation's header before its first frame.
        if writtenEnd == Int64(WALScanner.headerBytes) { return APIARY_SYNC_WAL }
        let commit: WALScanner.Commit
        do {
            // (A bound past the file's end, which one writer connection cannot produce, fails
            // its reads: that too falls back to the file's size rather than failing the commit.)
            if writtenEnd >= 0, let found = try? scanner.scan(fileSize: Int(writtenEnd), read: read) {
                commit = found
            } else {
                var size: sqlite3_int64 = 0
                guard apiary_file_size(file, &size) == SQLITE_OK else {
                    lastFailure = CaptureError.io("cannot stat WAL")
                    return Int32(APIARY_IOERR_FSTAT)
                }
                fileSizeQueries += 1
                guard let found = try scanner.scan(fileSize: Int(size), read: read) else { return APIARY_SYNC_WAL }
                commit = found
            }
        } catch {
            lastFailure = error
            return Int32(APIARY_IOERR_FSYNC)
        }
        let checksum = hashes.checksum(afterApplying: commit.pages, dbSizePages: commit.dbSizePages)
        let frames = WALFrames(file: file, firstFrameOffset: commit.firstFrameOffset)
        do {
            lastCommitPosition = try sink.commit(tenant: tenant, CapturedCommit(pages: commit.pages, dbSizePages: commit.dbSizePages, checksum: checksum, frames: frames))
        } catch {
            lastFailure = error
            frames.invalidate()
            return Int32(APIARY_IOERR_FSYNC)
        }
        hashes.apply(pages: commit.pages, dbSizePages: commit.dbSizePages)
        precondition(hashes.checksum == checksum, "page hashes diverged from the shipped checksum")
        scanner.accept(commit)
        commitsCaptured += 1
        lastFailure = nil
        return sink.isDurableOnCommit ? APIARY_SYNC_SKIP : APIARY_SYNC_WAL
    }

    func resetPosition() { scanner.reset() }

    /// Called when SQLite reports that one COMMIT failed: stops the process if this capture had
    /// shipped a commit since `captured` (a `commitsCaptured` value), that is, if SQLite failed
    /// after the sync hook (wal.c appends to the wal-index after the sync, and that can fail).
    /// The commit is then durable in the log, maybe on the standby, but SQLite rolled it back:
    /// database and log disagree, and only the redo at the next open reconciles them. Its
    /// clients' outcome is unknown, which a dropped connection tells honestly; answering
    /// "failed" would not be.
    func stopIfShipped(since captured: Int, failure: any Error) {
        precondition(commitsCaptured == captured,
                     "tenant \(tenant): SQLite failed a commit after it was captured and made durable (\(failure)); a restart redoes it from the log")
    }
}

// MARK: - The VFS hook

/// Maps WAL paths (as SQLite names them) to their capture. The hook runs on writer threads.
enum StorageVFS {
    private static let lock = NSLock()
    private static var captures: [String: WALCapture] = [:]
    private static var registered = false

    static func registerOnce() throws {
        lock.lock()
        defer { lock.unlock() }
        guard !registered else { return }
        let rc = apiary_vfs_register { file, walPath, writtenEnd in
            guard let file, let walPath else { return SQLITE_MISUSE }
            let path = String(cString: walPath)
            guard let capture = StorageVFS.capture(forWAL: path) else {
                // Only writer connections of tenant databases write WAL frames, and they register
                // before their first write; anything else syncing a WAL has nothing to ship.
                return SQLITE_OK
            }
            return capture.onWALSync(file, writtenEnd: writtenEnd)
        }
        guard rc == SQLITE_OK else { throw SQLiteError(code: rc, message: "cannot register the apiary VFS") }
        registered = true
    }

    static func register(_ capture: WALCapture, databasePath: String) {
        lock.lock()
        defer { lock.unlock() }
        captures[databasePath + "-wal"] = capture
    }

    /// Removes `capture` only: a database closed after the same file was opened again (a
    /// reopen) must not take the new capture with it — commits would then go unshipped.
    static func unregister(_ capture: WALCapture, databasePath: String) {
        lock.lock()
        defer { lock.unlock() }
        if captures[databasePath + "-wal"] === capture { captures[databasePath + "-wal"] = nil }
    }

    static func capture(forWAL path: String) -> WALCapture? {
        lock.lock()
        defer { lock.unlock() }
        return captures[path]
    }
}
