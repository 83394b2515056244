#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import ApiaryCore

/// One tenant's append-only replication log (DESIGN §4): a directory of segment files holding
/// CRC32C-framed ``Record``s with consecutive lsns.
///
/// On disk: segments named by their first lsn (`00000000000000000001.log`), each starting
/// with a header that carries its base, the (epoch, lsn, checksum) before its first record
/// (see `SegmentHeader`), then frames of u32 length, u32 CRC32C, ``Record/encoded()``.
///
/// Durability: ``append(_:)`` writes, ``sync()`` makes every append before it durable;
/// ``truncate(after:)``, ``reset(base:lsn:checksum:)`` and ``applyRetention(keepingFrom:)``
/// are durable when they return. A failed call leaves the log as it was before the call
/// (or, when even undoing fails, refuses further use with ``LogError/Code/unusable`` until
/// opened again); it never leaves half a record that a later open would misread.
///
/// Threading: NOT thread-safe. The caller MUST serialise every access (one owning thread,
/// actor or queue per log). Calls block on disk I/O and MUST NOT run on an event loop or
/// Swift's cooperative pool (DESIGN §4).
public final class ReplicationLog {
    // MARK: Options

    public struct Options: Sendable, Equatable {
        /// A new segment starts when the next frame would push the active segment past this
        /// size. A single record larger than this gets a segment of its own.
        public var segmentBytesMax: Int
        /// Largest record payload (``Record/encoded()``) accepted on append and on read.
        /// MUST NOT be lowered below the size of records already in the log: a larger frame
        /// found on disk reads as damage.
        public var recordBytesMax: Int
        /// How much history ``applyRetention(keepingFrom:)`` keeps *below* its floor, for
        /// readers (a reconnecting standby) that are a little behind. Segments entirely below
        /// the floor are removed, oldest first, while the log is larger than this. Records at or
        /// above the floor are never removed, so the floor, not this bound, decides the log's
        /// size when a reader lags far behind: the caller bounds that by moving the floor up
        /// (the lagging reader then needs a snapshot).
        public var retainedBytesMax: Int

        public init(segmentBytesMax: Int = 64 << 20, recordBytesMax: Int = 64 << 20, retainedBytesMax: Int = 256 << 20) {
            self.segmentBytesMax = segmentBytesMax
            self.recordBytesMax = recordBytesMax
            self.retainedBytesMax = retainedBytesMax
        }
    }

    // MARK: State

    /// The log's directory, as given to ``init(directory:options:)``.
    public let directory: String
    public let options: Options
    /// Bytes of torn tail (a partial or damaged last frame with nothing valid after it) that
    /// opening cut off the last segment; 0 when the log was closed cleanly. After a crash it
    /// also counts the zeros written ahead of the appends (see `reserve(through:)`).
    public private(set) var recoveredTornTailBytes: Int

    /// Oldest first; never empty. The last one is the active segment, the only one written.
    private var segments: [Segment]
    private var activeFD: Int32
    /// Held open for directory fsyncs and as the lock that keeps a second instance out.
    private var directoryFD: Int32
    /// One descriptor for reads from an older segment, so catch-up reads are not an open each.
    private var readCache: (path: String, fd: Int32)?
    /// The last position known durable, and the active segment's size at that point: what a
    /// failed ``sync()`` rolls back to. Every segment but the active one is wholly durable.
    private var durableLast: LogPosition
    private var durableEndOffset: Int
    /// The active segment file's size: past the durable end it holds zeros written ahead of
    /// the appends (see ``reserve(through:)``).
    private var activeFileBytes: Int
    /// Frames appended since the last sync, not yet written: ``sync()`` writes them at once.
    private var unsynced: [UInt8] = []
    /// The active segment's bytes from the start of the block holding the durable end to that
    /// end: a direct write rewrites that block whole.
    private var blockPrefix: [UInt8] = []
    /// Direct, synchronous writes to the active segment; nil where the file system has none.
    private var direct: DirectWriter?
    /// The file system accepted `O_DIRECT` at open but refused a direct write: page cache from
    /// then on.
    private var directUnsupported = false
    /// Set when a failure could not be undone; every later call refuses with it.
    private var failure: LogError?
    private var isClosed = false

    // MARK: Opening

    /// Opens the log in `directory`, creating the directory (not its parents) and an empty log
    /// at base (epoch 0, lsn 0, checksum 0) if there is none.
    ///
    /// Recovery: leftover temporary files are removed, an interrupted ``reset(base:lsn:checksum:)``
    /// is finished, every segment is read and checked (headers, frame CRCs, lsn and base
    /// continuity) and the in-memory index is built. A torn tail — a partial or damaged frame
    /// in the last segment with no valid record after it — is cut off and reported in
    /// ``recoveredTornTailBytes``; any other damage throws ``LogError/Code/corrupt`` naming the
    /// file and byte offset.
    ///
    /// - Parameters:
    ///   - directory: One directory per tenant log. Its parent MUST exist. Only one open log
    ///     may use it at a time (enforced with `flock`: a second open throws `.locked`).
    ///   - options: Limits; see ``Options``.
    public init(directory: String, options: Options = Options()) throws {
        precondition(options.recordBytesMax >= Frame.payloadBytesMin && options.recordBytesMax <= Int(UInt32.max),
                     "recordBytesMax \(options.recordBytesMax) must be within \(Frame.payloadBytesMin)...\(UInt32.max)")
        precondition(options.segmentBytesMax > SegmentHeader.byteCount, "segmentBytesMax \(options.segmentBytesMax) too small")
        precondition(options.retainedBytesMax >= 0, "retainedBytesMax \(options.retainedBytesMax) is negative")
        self.directory = directory
        self.options = options

        if try POSIX.makeDirectory(directory) { try Self.syncDirectory(Self.parent(of: directory)) }
        let dirFD = try POSIX.open(directory, flags: O_RDONLY | O_DIRECTORY)
        let opened: Recovered
        do {
            try POSIX.lockExclusive(dirFD, path: directory)
            opened = try Self.recover(directory: directory, directoryFD: dirFD, options: options)
        } catch {
            POSIX.close(dirFD)
            throw error
        }
        directoryFD = dirFD
        segments = opened.segments
        activeFD = opened.activeFD
        recoveredTornTailBytes = opened.tornTailBytes
        durableLast = opened.segments[opened.segments.count - 1].last
        durableEndOffset = opened.segments[opened.segments.count - 1].endOffset
        activeFileBytes = durableEndOffset // recovery cut any zeros or torn tail
        try activeChanged()
    }

    /// After the active segment or its durable end changed outside ``sync()``: reopen the direct
    /// writer on it and read back the partial block before the durable end.
    private func activeChanged() throws {
        let active = segments[segments.count - 1]
        unsynced = []
        let blockStart = DirectWriter.alignDown(durableEndOffset)
        // A new descriptor every time: a reset can put a new file under the same name.
        direct = nil
        blockPrefix = try POSIX.pread(activeFD, count: durableEndOffset - blockStart, offset: blockStart, path: active.path)
        if !directUnsupported { direct = DirectWriter.open(path: active.path) }
    }

    deinit { closeDescriptors() }

    /// Releases the files and the directory lock. Later calls throw ``LogError/Code/unusable``.
    /// Appends not yet synced are synced first; if that fails they are dropped, so a caller that
    /// must know calls ``sync()`` itself before closing.
    public func close() {
        guard !isClosed else { return }
        // Give back the zeros written ahead; a crash keeps them, and recovery cuts them then.
        let active = segments[segments.count - 1]
        if failure == nil {
            // Unsynced appends are made durable (a failed sync drops them, as ever).
            try? sync()
            let end = segments[segments.count - 1].endOffset
            if failure == nil, activeFileBytes > end {
                try? POSIX.ftruncate(activeFD, size: end, path: active.path)
            }
        }
        closeDescriptors()
        isClosed = true
    }

    // MARK: Reading the state

    /// The last record's position, or the base if the log holds no record.
    public var last: LogPosition { segments[segments.count - 1].last }

    /// The last position known durable: ``last`` after a successful ``sync()``.
    public var lastDurable: LogPosition { durableLast }

    /// The state before the first retained record: what a snapshot or retention left behind.
    public var base: LogPosition { segments[0].base }

    /// The lowest lsn still readable, or nil if the log holds no record.
    public var firstRetainedLSN: LSN? {
        let first = segments[0].firstLSN
        return first <= last.lsn ? first : nil
    }

    /// Whether syncs write directly to the disk (`O_DIRECT`), not through the page cache.
    public var writesDirectly: Bool { direct != nil }

    /// Number of segment files, for metrics.
    public var segmentCount: Int { segments.count }

    /// Total size of the segment files in bytes, for metrics and retention.
    public var sizeBytes: Int { segments.reduce(0) { $0 + $1.endOffset } }

    // MARK: Appending

    /// Appends a record. It is written but not durable until ``sync()`` returns.
    ///
    /// - Parameter record: MUST have `lsn == last.lsn + 1` and `epoch >= last.epoch` (else
    ///   `.outOfOrder`); its encoding MUST fit ``Options/recordBytesMax`` and the record codec's
    ///   limits (else `.tooLarge`).
    /// - Throws: `.diskFull` or `.io` when space for it cannot be set aside; the log is then as
    ///   it was before the call. When the record starts a new segment, the old one is synced
    ///   first; if that fails, the error is ``sync()``'s, with its effect. (The record itself
    ///   is written by the next ``sync()``, and read back from memory until then.)
    public func append(_ record: Record) throws {
        try checkUsable()
        let previous = last
        guard previous.lsn < LSN.max - 1, record.lsn == previous.lsn + 1 else {
            throw LogError(.outOfOrder, "append of lsn \(record.lsn) after lsn \(previous.lsn); expected lsn \(previous.lsn &+ 1)", path: directory)
        }
        guard record.epoch >= previous.epoch else {
            throw LogError(.outOfOrder, "append of lsn \(record.lsn) in epoch \(record.epoch), older than the log's epoch \(previous.epoch)", path: directory)
        }
        try checkEncodable(record)

        let frame = Frame.encode(record)
        var active = segments[segments.count - 1]
        if !active.isEmpty, active.endOffset + frame.count > options.segmentBytesMax {
            try roll()
            active = segments[segments.count - 1]
        }
        let offset = active.endOffset
        // Space first, so that the write at sync time cannot find the disk full.
        try reserve(through: offset + frame.count)
        unsynced.append(contentsOf: frame)
        segments[segments.count - 1].append(frameAt: offset, bytes: frame.count, position: LogPosition(record))
    }

    /// Makes every append so far durable (`fsync` of the active segment; older segments were
    /// synced when the log rolled past them).
    ///
    /// - Throws: `.io` or `.diskFull` when `fsync` fails. The appends since the previous
    ///   successful sync are then discarded (the file is cut back to ``lastDurable``), because
    ///   after a failed `fsync` the kernel may have dropped them without writing them; ``last``
    ///   says where the log stands and the caller MAY append them again.
    public func sync() throws {
        try checkUsable()
        let active = segments[segments.count - 1]
        guard active.last != durableLast || active.endOffset != durableEndOffset else { return }
        // One durable write per record, in order. A disk may persist the blocks of one write in
        // any order, and past the last record lie zeros written ahead, not the file's end: a
        // crash during a write of several records could leave a whole later record after a
        // torn earlier one, which recovery rightly reads as damage in the middle. With one
        // record per write, a torn write is always the last record, a torn tail. (The
        // standby's bursts are mostly one record; catching up pays a flush per record.)
        let base = DirectWriter.alignDown(durableEndOffset)
        let written = blockPrefix + unsynced
        do {
            var lsn = durableLast.lsn + 1
            while lsn <= active.lastLSN {
                let frame = active.frameRange(of: lsn)
                try writeDurably(written, base: base, frame, path: active.path)
                lsn += 1
            }
        } catch let error as LogError {
            rollBackToDurable(after: error)
            throw error
        }
        blockPrefix = Array(written[(DirectWriter.alignDown(active.endOffset) - base)...])
        unsynced = []
        durableLast = active.last
        durableEndOffset = active.endOffset
    }

    /// Writes the bytes of `frame` (file offsets; `written` holds the file from `base`)
    /// durably: directly with the block before it, or through the page cache and `fdatasync`.
    private func writeDurably(_ written: [UInt8], base: Int, _ frame: Range<Int>, path: String) throws {
        if let direct {
            let blockStart = DirectWriter.alignDown(frame.lowerBound)
            do {
                try direct.write(prefix: written[(blockStart - base)..<(frame.lowerBound - base)],
                                 written[(frame.lowerBound - base)..<(frame.upperBound - base)], at: blockStart)
                return
            } catch let error as LogError where error.errno == EINVAL {
                // Direct I/O promised at open, refused at write (some FUSE or network file
                // systems): use the page cache from now on.
                directUnsupported = true
                self.direct = nil
            }
        }
        try POSIX.pwrite(activeFD, Array(written[(frame.lowerBound - base)..<(frame.upperBound - base)]), offset: frame.lowerBound, path: path)
        try POSIX.fdatasync(activeFD, path: path)
    }

    // MARK: Reading records

    /// The record with lsn `lsn`, or nil if the log does not hold it (0, above ``last``, or
    /// below ``firstRetainedLSN``).
    ///
    /// - Throws: `.corrupt` (naming file and offset) if the bytes on disk fail their checks;
    ///   `.io` if reading fails.
    public func record(at lsn: LSN) throws -> Record? {
        try checkUsable()
        guard let index = segmentIndex(holding: lsn) else { return nil }
        return try readRecord(lsn, segmentIndex: index).record
    }

    /// Consecutive records starting at `lsn`, at most `countMax` of them and at most
    /// `bytesMax` bytes of payload (``Record/encoded()`` size) in all — except that the first
    /// record is always returned, whatever its size, so a reader always makes progress.
    /// The result is thus bounded by `max(bytesMax, recordBytesMax)`.
    ///
    /// - Parameters:
    ///   - lsn: The first lsn wanted (0 reads as 1). Above ``last`` gives an empty result.
    ///   - countMax: MUST be at least 1.
    ///   - bytesMax: MUST be at least 1.
    /// - Throws: `.notRetained` if `lsn` lies below ``firstRetainedLSN`` (the reader needs a
    ///   snapshot); `.corrupt` or `.io` as for ``record(at:)``.
    public func records(from lsn: LSN, countMax: Int, bytesMax: Int) throws -> [Record] {
        precondition(countMax >= 1 && bytesMax >= 1, "records(from:) needs countMax >= 1 and bytesMax >= 1, got \(countMax), \(bytesMax)")
        try checkUsable()
        let from = max(lsn, 1)
        guard from <= last.lsn else { return [] }
        guard let first = firstRetainedLSN, from >= first else {
            throw LogError(.notRetained, "lsn \(from) is below the first retained lsn \(firstRetainedLSN.map(String.init) ?? "(none; base \(last.lsn))")", path: directory)
        }
        var result: [Record] = []
        var bytes = 0
        var next = from
        var index = segmentIndex(holding: from)!
        while result.count < countMax, next <= last.lsn {
            if next > segments[index].lastLSN { index += 1 }
            let (record, payloadBytes) = try readRecord(next, segmentIndex: index)
            if !result.isEmpty, bytes + payloadBytes > bytesMax { break }
            result.append(record)
            bytes += payloadBytes
            next += 1
        }
        return result
    }

    // MARK: Cutting and resetting

    /// Discards every record with lsn greater than `lsn`, durably before returning: for a
    /// standby dropping an unconfirmed tail, or a primary undoing a commit that failed.
    ///
    /// - Parameter lsn: MUST NOT lie below the base of the oldest retained segment (that is,
    ///   below `firstRetainedLSN - 1`), else `.notRetained`. At or above ``last`` it is a no-op.
    /// - Throws: `.notRetained`; `.corrupt` if the record at `lsn` cannot be read back;
    ///   `.io`/`.diskFull` on failure, after which the log is `.unusable` until reopened (a
    ///   reopen sees a consistent prefix: newer segments are removed before older ones are cut).
    public func truncate(after lsn: LSN) throws {
        try checkUsable()
        guard lsn < last.lsn else { return }
        guard lsn >= segments[0].base.lsn else {
            throw LogError(.notRetained, "cannot truncate after lsn \(lsn): the log starts after lsn \(segments[0].base.lsn)", path: directory)
        }
        // The newest segment whose base is at or below lsn: if lsn ends one segment and is
        // the base of the next, the next is kept (empty), so the active segment stays the newest.
        let keep = segments.lastIndex { $0.base.lsn <= lsn }!
        let kept = segments[keep]
        let newLast = lsn == kept.base.lsn ? kept.base : LogPosition(try readRecord(lsn, segmentIndex: keep).record)
        let newEndOffset = lsn == kept.lastLSN ? kept.endOffset : kept.frameRange(of: lsn + 1).lowerBound
        if keep == segments.count - 1, newEndOffset >= durableEndOffset {
            // Only records never written: forgetting them is all there is to do.
            unsynced.removeLast(kept.endOffset - newEndOffset)
            segments[keep].cut(toEndOffset: newEndOffset, last: newLast)
            return
        }

        dropReadCache()
        let keptFD = keep == segments.count - 1 ? activeFD : try POSIX.open(kept.path, flags: O_RDWR)
        do {
            // Newest first, each removal made durable before the next, so that a crash part-way
            // leaves a log without gaps.
            while segments.count - 1 > keep {
                try POSIX.unlink(segments[segments.count - 1].path)
                segments.removeLast()
                try POSIX.fsync(directoryFD, path: directory)
            }
            if keptFD != activeFD {
                POSIX.close(activeFD)
                activeFD = keptFD
            }
            try POSIX.ftruncate(activeFD, size: newEndOffset, path: kept.path)
            activeFileBytes = newEndOffset
            try POSIX.fsync(activeFD, path: kept.path)
        } catch let error as LogError {
            if keptFD != activeFD { POSIX.close(keptFD) }
            failure = error
            throw error
        }
        segments[keep].cut(toEndOffset: newEndOffset, last: newLast)
        durableLast = newLast
        durableEndOffset = newEndOffset
        do { try activeChanged() } catch let error as LogError {
            failure = error
            throw error
        }
    }

    /// Drops every record and starts the log empty at the given base (after a snapshot
    /// install), durably before returning. ``last`` is then the base and
    /// ``firstRetainedLSN`` nil until the next append (which MUST have lsn `lsn + 1`).
    ///
    /// Crash safety: the new segment is first written and synced under a `.reset` name; then
    /// the old segments are removed and it is renamed into place. Opening a log that holds a
    /// complete `.reset` file finishes the reset; an incomplete one is discarded and the old
    /// log stands.
    ///
    /// - Parameters:
    ///   - epoch: The snapshot's epoch.
    ///   - lsn: The snapshot's lsn; MUST be below `LSN.max`.
    ///   - checksum: The database checksum at `lsn`.
    /// - Throws: `.io`/`.diskFull`. A failure before the new segment is in place leaves the
    ///   old log; one after it makes the log `.unusable` until reopened (which finishes the reset).
    public func reset(base epoch: Epoch, lsn: LSN, checksum: UInt64) throws {
        precondition(lsn < LSN.max - 1, "reset to lsn \(lsn): lsn space exhausted")
        try checkUsable()
        let base = LogPosition(epoch: epoch, lsn: lsn, checksum: checksum)
        let resetPath = path(SegmentName.reset(firstLSN: lsn + 1))
        let finalPath = path(SegmentName.log(firstLSN: lsn + 1))
        let newFD = try Self.createSegmentFile(at: resetPath, base: base, directoryFD: directoryFD, directory: directory)
        do {
            dropReadCache()
            for segment in segments { try POSIX.unlink(segment.path) }
            try POSIX.fsync(directoryFD, path: directory)
            try POSIX.rename(resetPath, to: finalPath)
            try POSIX.fsync(directoryFD, path: directory)
        } catch let error as LogError {
            POSIX.close(newFD)
            failure = error
            throw error
        }
        POSIX.close(activeFD)
        activeFD = newFD
        segments = [Segment(path: finalPath, base: base)]
        durableLast = base
        durableEndOffset = SegmentHeader.byteCount
        activeFileBytes = SegmentHeader.byteCount
        do { try activeChanged() } catch let error as LogError {
            failure = error
            throw error
        }
    }

    /// Removes old segments: those lying entirely below `lsn` (every record in them has a
    /// smaller lsn), oldest first, while the log is larger than ``Options/retainedBytesMax``.
    /// Never removes the active segment nor any record at or above `lsn`. Durable when it
    /// returns.
    ///
    /// - Parameter lsn: The lowest lsn any reader still needs (e.g. the standby's next lsn
    ///   on a primary; the first lsn not yet applied to the database on a standby).
    public func applyRetention(keepingFrom lsn: LSN) throws {
        try checkUsable()
        var total = sizeBytes
        while segments.count > 1, segments[0].lastLSN < lsn, total > options.retainedBytesMax {
            let oldest = segments[0]
            if readCache?.path == oldest.path { dropReadCache() }
            try POSIX.unlink(oldest.path)
            segments.removeFirst()
            total -= oldest.endOffset
            // Oldest first, each removal durable before the next: a crash leaves no gap.
            try POSIX.fsync(directoryFD, path: directory)
        }
    }

    // MARK: - Internals

    private func checkUsable() throws {
        if isClosed { throw LogError(.unusable, "the log is closed", path: directory) }
        if let failure {
            throw LogError(.unusable, "an earlier failure left the log in an unknown state (\(failure.message)); open it again", path: failure.path ?? directory)
        }
    }

    private func checkEncodable(_ record: Record) throws {
        // Mirror the decoder's limits: a record accepted here must read back.
        guard record.pages.count <= Record.pagesMax else {
            throw LogError(.tooLarge, "record lsn \(record.lsn) has \(record.pages.count) pages (max \(Record.pagesMax))", path: directory)
        }
        if let page = record.pages.first(where: { $0.bytes.count > Record.pageSizeMax }) {
            throw LogError(.tooLarge, "record lsn \(record.lsn) has a page of \(page.bytes.count) bytes (max \(Record.pageSizeMax))", path: directory)
        }
        let payloadBytes = Frame.payloadBytes(of: record)
        guard payloadBytes <= options.recordBytesMax else {
            throw LogError(.tooLarge, "record lsn \(record.lsn) is \(payloadBytes) bytes (recordBytesMax \(options.recordBytesMax))", path: directory)
        }
    }

    /// Starts a new segment after the active one.
    private func roll() throws {
        // The segment being left MUST be durable before a newer one exists: recovery treats
        // damage in any segment but the last as corruption, never as a torn tail.
        try sync()
        // Only the last segment may end in zeros (recovery cuts them there, and reads them as
        // damage anywhere else): give back the preallocated tail, durably, first.
        let leaving = segments[segments.count - 1]
        if activeFileBytes > leaving.endOffset {
            try POSIX.ftruncate(activeFD, size: leaving.endOffset, path: leaving.path)
            try POSIX.fdatasync(activeFD, path: leaving.path)
        }
        let base = last
        let newPath = path(SegmentName.log(firstLSN: base.lsn + 1))
        let newFD = try Self.createSegmentFile(at: newPath, base: base, directoryFD: directoryFD, directory: directory)
        POSIX.close(activeFD)
        activeFD = newFD
        segments.append(Segment(path: newPath, base: base))
        durableLast = base
        durableEndOffset = SegmentHeader.byteCount
        activeFileBytes = SegmentHeader.byteCount
        do { try activeChanged() } catch let error as LogError {
            failure = error
            throw error
        }
    }

    /// Zeros written ahead of the appends, up to this many bytes at a time: a quarter of what
    /// the segment already holds, between 64 KiB and 1 MiB, so that a quiet tenant's log
    /// (there may be thousands) sets aside little disk and a busy one writes zeros rarely.
    static let preallocationBytesMin = 64 << 10
    static let preallocationBytesMax = 1 << 20
    private static let zeros = [UInt8](repeating: 0, count: preallocationBytesMax)

    /// Makes sure the active segment file already reaches `end` (rounded up to a whole block),
    /// writing zeros ahead in chunks of ``preallocationBytesMin``...``preallocationBytesMax``
    /// (at most up to the segment bound), synced at once.
    ///
    /// Why: a sync that grows the file must also write its new size, a second write on every
    /// commit; writes into zeros written earlier (as PostgreSQL does with its WAL segments)
    /// only need their data flushed, and cannot run out of space. Zeros, not `fallocate`: ext4
    /// marks fallocated extents unwritten, and converting them is again a metadata write. They
    /// are synced here so that no dirty page lingers under a later direct write. The zeros
    /// read as a torn tail on recovery, which cuts them off.
    /// - Throws: `.diskFull` (or `.io`) when not even `end` fits; the file is as before.
    private func reserve(through end: Int) throws {
        let needed = DirectWriter.alignUp(end)
        guard needed > activeFileBytes else { return }
        let chunk = min(Self.preallocationBytesMax, max(Self.preallocationBytesMin, activeFileBytes / 4))
        let ahead = max(needed, min(DirectWriter.alignUp(activeFileBytes + chunk), DirectWriter.alignUp(options.segmentBytesMax)))
        do {
            try writeZeros(through: ahead)
        } catch {
            // A nearly full disk: settle for what this frame needs.
            try writeZeros(through: needed)
        }
    }

    private func writeZeros(through target: Int) throws {
        let active = segments[segments.count - 1]
        var offset = activeFileBytes
        do {
            while offset < target {
                let count = min(Self.zeros.count, target - offset)
                try POSIX.pwrite(activeFD, count == Self.zeros.count ? Self.zeros : Array(Self.zeros[..<count]), offset: offset, path: active.path)
                offset += count
            }
            try POSIX.fdatasync(activeFD, path: active.path)
            activeFileBytes = target
        } catch let error as LogError {
            // Give the partial zeros back (they hold no frame; nothing depends on them).
            if (try? POSIX.ftruncate(activeFD, size: activeFileBytes, path: active.path)) == nil {
                activeFileBytes = max(activeFileBytes, offset)
            }
            throw error
        }
    }

    /// After a failed fsync: cut the active segment back to its last durable state.
    private func rollBackToDurable(after error: LogError) {
        let index = segments.count - 1
        do {
            // A write that failed part-way may have left frames on disk past the durable end.
            unsynced = []
            try POSIX.ftruncate(activeFD, size: durableEndOffset, path: segments[index].path)
            activeFileBytes = durableEndOffset
            // Records of this sync written before the failure should not come back after a
            // crash. Best effort: the disk just failed a sync; if this fails too they may, and
            // they were never acknowledged (a standby's handshake rewinds what the primary lacks).
            try? POSIX.fdatasync(activeFD, path: segments[index].path)
            segments[index].cut(toEndOffset: durableEndOffset, last: durableLast)
        } catch let undo as LogError {
            failure = LogError(undo.code, "could not undo appends after a failed sync (\(error.message)): \(undo.message)", path: segments[index].path)
        } catch {
            failure = LogError(.io, "\(error)", path: segments[index].path)
        }
    }

    /// The index of the segment holding record `lsn`, or nil if no segment does.
    private func segmentIndex(holding lsn: LSN) -> Int? {
        guard lsn >= 1, lsn <= last.lsn, lsn >= segments[0].firstLSN else { return nil }
        // Binary search for the last segment whose first lsn is at or below lsn.
        var low = 0, high = segments.count - 1
        while low < high {
            let mid = (low + high + 1) / 2
            if segments[mid].firstLSN <= lsn { low = mid } else { high = mid - 1 }
        }
        return lsn <= segments[low].lastLSN ? low : nil
    }

    /// Reads and verifies one indexed record: a single positioned read of its whole frame.
    private func readRecord(_ lsn: LSN, segmentIndex index: Int) throws -> (record: Record, payloadBytes: Int) {
        let segment = segments[index]
        let range = segment.frameRange(of: lsn)
        let frame: [UInt8]
        if index == segments.count - 1, range.lowerBound >= durableEndOffset {
            frame = Array(unsynced[(range.lowerBound - durableEndOffset)..<(range.upperBound - durableEndOffset)])
        } else {
            let fd = try readDescriptor(segmentIndex: index)
            frame = try POSIX.pread(fd, count: range.count, offset: range.lowerBound, path: segment.path)
        }
        func corrupt(_ reason: String) -> LogError {
            LogError(.corrupt, "record lsn \(lsn): \(reason)", path: segment.path, offset: range.lowerBound)
        }
        guard frame.count == range.count else { throw corrupt("file ends inside the record (\(frame.count) of \(range.count) bytes)") }
        var header = ByteReader(frame)
        let length = Int(try header.read(UInt32.self))
        let crc = try header.read(UInt32.self)
        guard length == range.count - Frame.headerBytes else {
            throw corrupt("frame length \(length) differs from the indexed \(range.count - Frame.headerBytes)")
        }
        switch Frame.check(payload: Array(frame[Frame.headerBytes...]), crc: crc) {
        case .invalid(let reason):
            throw corrupt(reason)
        case .valid(let record):
            guard record.lsn == lsn else { throw corrupt("holds lsn \(record.lsn)") }
            return (record, length)
        }
    }

    private func readDescriptor(segmentIndex index: Int) throws -> Int32 {
        if index == segments.count - 1 { return activeFD }
        let path = segments[index].path
        if let cache = readCache, cache.path == path { return cache.fd }
        dropReadCache()
        let fd = try POSIX.open(path, flags: O_RDONLY)
        readCache = (path, fd)
        return fd
    }

    private func dropReadCache() {
        if let cache = readCache { POSIX.close(cache.fd) }
        readCache = nil
    }

    private func closeDescriptors() {
        guard !isClosed else { return }
        dropReadCache()
        direct = nil
        POSIX.close(activeFD)
        POSIX.close(directoryFD) // also releases the flock
    }

    private func path(_ name: String) -> String { Self.join(directory, name) }

    static func join(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    static func parent(of path: String) -> String {
        var trimmed = Substring(path)
        while trimmed.count > 1, trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        guard let slash = trimmed.lastIndex(of: "/") else { return "." }
        return slash == trimmed.startIndex ? "/" : String(trimmed[..<slash])
    }

    static func syncDirectory(_ path: String) throws {
        let fd = try POSIX.open(path, flags: O_RDONLY | O_DIRECTORY)
        defer { POSIX.close(fd) }
        try POSIX.fsync(fd, path: path)
    }

    /// Writes a segment holding only a header, atomically: under a temporary name, synced,
    /// then renamed into place and the directory synced. Returns a read-write descriptor.
    static func createSegmentFile(at path: String, base: LogPosition, directoryFD: Int32, directory: String) throws -> Int32 {
        let temporary = path + SegmentName.temporarySuffix
        let fd = try POSIX.open(temporary, flags: O_RDWR | O_CREAT | O_TRUNC)
        do {
            try POSIX.pwrite(fd, SegmentHeader(base: base).encoded(), offset: 0, path: temporary)
            try POSIX.fsync(fd, path: temporary)
            try POSIX.rename(temporary, to: path)
        } catch {
            POSIX.close(fd)
            _ = try? POSIX.unlink(temporary)
            throw error
        }
        do {
            try POSIX.fsync(directoryFD, path: directory)
        } catch {
            POSIX.close(fd)
            throw error
        }
        return fd
    }
}

// MARK: - Segment index

/// The in-memory index of one segment file: where each record's frame starts, so that a
/// read is one positioned read, not a scan.
struct Segment {
    let path: String
    /// The state before this segment's first record.
    let base: LogPosition
    /// Byte offset of each frame; frame `i` holds lsn `base.lsn + 1 + i`.
    private(set) var frameOffsets: [Int] = []
    /// End of the last whole frame: the file's intended size.
    private(set) var endOffset: Int = SegmentHeader.byteCount
    /// The last record's position, or the base.
    private(set) var last: LogPosition

    init(path: String, base: LogPosition) {
        self.path = path
        self.base = base
        self.last = base
    }

    var isEmpty: Bool { frameOffsets.isEmpty }
    var firstLSN: LSN { base.lsn + 1 }
    var lastLSN: LSN { base.lsn + LSN(frameOffsets.count) }

    /// The bytes of the frame holding `lsn`, which MUST be in this segment.
    func frameRange(of lsn: LSN) -> Range<Int> {
        precondition(lsn >= firstLSN && lsn <= lastLSN, "lsn \(lsn) not in segment \(path) (\(firstLSN)...\(lastLSN))")
        let i = Int(lsn - firstLSN)
        let start = frameOffsets[i]
        return start..<(i + 1 < frameOffsets.count ? frameOffsets[i + 1] : endOffset)
    }

    mutating func append(frameAt offset: Int, bytes: Int, position: LogPosition) {
        precondition(offset == endOffset && position.lsn == lastLSN + 1, "segment \(path): frame lsn \(position.lsn) at \(offset) does not follow lsn \(lastLSN) ending at \(endOffset)")
        frameOffsets.append(offset)
        endOffset = offset + bytes
        last = position
    }

    /// Forgets every frame at or after `newEndOffset`, which MUST be a frame boundary.
    mutating func cut(toEndOffset newEndOffset: Int, last newLast: LogPosition) {
        let keep = frameOffsets.firstIndex { $0 >= newEndOffset } ?? frameOffsets.count
        precondition(newEndOffset == (keep < frameOffsets.count ? frameOffsets[keep] : endOffset),
                     "segment \(path): cut at \(newEndOffset) is not a frame boundary")
        precondition(newLast.lsn == base.lsn + LSN(keep), "segment \(path): cut to \(keep) frames but last lsn \(newLast.lsn)")
        frameOffsets.removeSubrange(keep...)
        endOffset = newEndOffset
        last = newLast
    }
}
