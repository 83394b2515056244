import ApiaryCore
import CApiaryVFS
import CSQLite
import Foundation

/// One entry of SQL with its parameters, as a client sent it (see `SQLiteConnection.run`).
public struct SQLStatement: Sendable, Equatable {
    public var sql: String
    public var parameters: [SQLValue]
    /// nil when every parameter is positional; otherwise one name per parameter, "" for a
    /// positional one (rqlite's named parameters, `["... :name", {"name": value}]`).
    public var parameterNames: [String]?
    /// At most this long to run, in ms, when less than the node's own limit for a statement
    /// (rqlite's `db_timeout`); nil: the node's limit.
    public var timeMsMax: Int?
    public init(_ sql: String, _ parameters: [SQLValue] = [], names: [String]? = nil) {
        precondition(names == nil || names!.count == parameters.count, "one name per parameter")
        self.sql = sql
        self.parameters = parameters
        self.parameterNames = names
    }
    public var byteCount: Int {
        sql.utf8.count + (parameterNames?.reduce(0) { $0 + $1.utf8.count } ?? 0) + parameters.reduce(0) { total, value in
            switch value {
            case .text(let s): return total + s.utf8.count
            case .blob(let b): return total + b.count
            default: return total + 8
            }
        }
    }
}

/// The outcome of one statement: rqlite reports these side by side in `results`.
public enum StatementResult: Sendable, Equatable, Codable {
    case success(StatementOutcome)
    case failure(String)
}

/// A tenant's SQLite database on the primary: one writer thread doing group commit, and a
/// pool of read-only connections.
///
/// Every commit passes through the capture hook before it is visible, so a reader never sees
/// a write that the sink did not make durable (DESIGN §9.4).
public final class TenantDatabase: @unchecked Sendable {
    public struct Options: Sendable {
        /// Requests folded into one transaction at most.
        public var batchRequestsMax = 256
        /// SQL and parameter bytes folded into one transaction at most.
        public var batchBytesMax = 4 << 20
        /// Requests waiting for the writer at most; past it callers get `queueFull`.
        public var queueRequestsMax = 8192
        /// Bytes of one statement at most.
        public var statementBytesMax = 1 << 20
        /// Rows one statement may return at most.
        public var rowsMax = 100_000
        /// Bytes of values one statement may return at most.
        public var resultBytesMax = 64 << 20
        /// How long one tenant statement may run.
        public var statementTimeMs = 5_000
        /// How long an idempotency key is kept (then a retry with it runs again).
        public var idempotencyKeyLifetimeMs: Int64 = 24 * 3_600_000
        /// Idempotency keys kept per tenant at most; past it the oldest are dropped first.
        public var idempotencyKeysMax = 100_000
        /// How long all the statements of one request may run together. Past it a write
        /// request is undone as a whole and a query stops; without it, a request of many slow
        /// statements would hold a tenant's writer for hours (invariant 8).
        public var requestTimeMs = 15_000
        var statementLimits: StatementLimits { StatementLimits(rowsMax: rowsMax, resultBytesMax: resultBytesMax, timeMs: statementTimeMs) }
        /// Read-only connections (and queries running at once) at most.
        public var readersMax = 4
        /// Read-only connections kept open while no query runs: a quiet tenant (there may be
        /// thousands) holds two, not `readersMax` (each is three files and a page cache). Two:
        /// the event loops of a 2-core node each read inline with one; with one, the other
        /// loop's read went to a reader thread, which opened a connection and closed it again
        /// (reads by key +20-40% with two).
        public var readersIdleMax = 2
        /// A query is first tried on the caller's thread (the connection's event loop) with an
        /// idle reader connection, for at most this much of the loop thread's CPU time: a read by key takes microseconds,
        /// and handing it to a reader thread and back cost more than the read (two thread
        /// wake-ups). Past it, it runs again on a reader thread. 0: never inline.
        public var inlineReadBudgetMs = 1
        /// After a query ran past the inline budget, how long the tenant's queries go straight
        /// to the reader threads (a tenant sending slow queries must not cost the loop a budget each).
        public var inlineReadPauseMs = 1_000
        /// Test seam, empty in production: called with each connection the database opens for
        /// tenant SQL (the writer's, each reader's) before first use, e.g. to register a SQL
        /// function that a test uses as a latch.
        var onConnectionOpened: (@Sendable (OpaquePointer) -> Void)?
        /// Test seam, empty in production: functions (lower-case names) tenant SQL may call
        /// beyond the sandbox's allow-list, i.e. those `onConnectionOpened` registers.
        var extraAllowedFunctions: Set<String> = []
        public init() {}

        /// Opens a connection for tenant SQL, with the test seams applied.
        func openConnection(path: String, readOnly: Bool) throws -> SQLiteConnection {
            let connection = try SQLiteConnection(path: path, readOnly: readOnly)
            connection.sandbox.extraAllowedFunctions = extraAllowedFunctions
            onConnectionOpened?(connection.handle)
            return connection
        }
    }

    public let tenant: TenantID
    public let path: String
    public let options: Options
    private let writer: TenantWriter
    let readers: ReaderPool

    /// Opens (creating if needed) the tenant's database at `path`.
    ///
    /// A new database is created with Apiary's page size and reserved bytes, in WAL mode; its
    /// initial pages (written by SQLite outside the WAL when it switches to WAL mode) are
    /// handed to the sink as the first commit, so a replica built from the records alone is
    /// byte-identical. An existing database is checkpointed so that the file alone holds it.
    /// - Parameter initialHashes: called with the page hashes of the file before the first
    ///   commit, for the caller to check against its log (and redo the last commit) —
    ///   the file is closed while it runs.
    public init(
        tenant: TenantID,
        path: String,
        sink: any CommitSink,
        options: Options = Options(),
        writerPool: BlockingPool = .writers,
        readerPool: BlockingPool = .readers,
        beforeOpen: ((PageHashes) throws -> Void)? = nil
    ) throws {
        self.tenant = tenant
        self.path = path
        self.options = options
        let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? nil
        let isNew = (size ?? 0) == 0
        if isNew {
            try Self.create(path: path)
        } else {
            try Self.checkpointAndCheckFormat(path: path)
        }
        try beforeOpen?(try DatabaseFile.pageHashes(of: path))

        let connection = try options.openConnection(path: path, readOnly: false)
        try connection.exec("PRAGMA synchronous=FULL")
        try connection.exec("PRAGMA busy_timeout=5000")
        let hashes = try DatabaseFile.pageHashes(of: path)
        let capture = WALCapture(tenant: tenant, sink: sink, hashes: hashes, pageSize: DatabaseFile.pageSize)
        let sqlitePath = String(cString: sqlite3_db_filename(connection.handle, "main"))
        StorageVFS.register(capture, databasePath: sqlitePath)
        if isNew {
            // The bootstrap commit: the file as SQLite created it.
            let pages = try DatabaseFile.allPages(of: path)
            try sink.commit(tenant: tenant, CapturedCommit(pages: pages, dbSizePages: UInt32(pages.count), checksum: hashes.checksum))
        }
        writer = TenantWriter(connection: connection, capture: capture, sqlitePath: sqlitePath, options: options, pool: writerPool)
        readers = ReaderPool(path: path, options: options, pool: readerPool)
    }

    private static func create(path: String) throws {
        let c = try SQLiteConnection(path: path, readOnly: false)
        var reserve = Int32(DatabaseFile.reservedBytesPerPage)
        let rc = sqlite3_file_control(c.handle, "main", SQLITE_FCNTL_RESERVE_BYTES, &reserve)
        guard rc == SQLITE_OK else { throw c.lastError }
        try c.exec("PRAGMA page_size=\(DatabaseFile.pageSize)")
        try c.exec("PRAGMA journal_mode=WAL")
        try checkFormat(c)
    }

    /// Folds an existing database's WAL into its file (SQLite recovers the committed frames on
    /// open) and empties it, after checking that the file is in Apiary's format.
    public static func checkpointAndCheckFormat(path: String) throws {
        let c = try SQLiteConnection(path: path, readOnly: false)
        try checkFormat(c)
        // Folds the WAL into the file (SQLite recovers committed frames on open) and empties it.
        try c.exec("PRAGMA wal_checkpoint(TRUNCATE)")
    }

    private static func checkFormat(_ c: SQLiteConnection) throws {
        let pageSize = try c.scalar("PRAGMA page_size")
        guard pageSize == DatabaseFile.pageSize else {
            throw StorageError(.wrongFormat, "\(c.path): page size \(pageSize), Apiary uses \(DatabaseFile.pageSize)")
        }
        let mode = try c.run("PRAGMA journal_mode").rows.first?.first
        guard mode == .text("wal") else { throw StorageError(.wrongFormat, "\(c.path): not in WAL mode") }
        // Byte 20 of the database header: "reserved space at the end of each page".
        var reserve: Int32 = -1
        sqlite3_file_control(c.handle, "main", SQLITE_FCNTL_RESERVE_BYTES, &reserve)
        guard reserve == Int32(DatabaseFile.reservedBytesPerPage) else {
            throw StorageError(.wrongFormat, "\(c.path): \(reserve) reserved bytes per page, Apiary needs \(DatabaseFile.reservedBytesPerPage)")
        }
    }

    // MARK: - Writes and reads

    /// Runs `statements` in the tenant's next group commit.
    ///
    /// Without `transaction` each statement stands alone (a failing one does not undo the
    /// others); with it, the first failure undoes the request's earlier statements and skips
    /// the rest. Either way the request never affects another request in the same batch.
    /// - Throws: `StorageError` when the whole request failed: the queue is full, the commit
    ///   failed (the message says whether its outcome is unknown), the database is closed.
    public func execute(_ statements: [SQLStatement], transaction: Bool = false, idempotencyKey: String? = nil) async throws -> [StatementResult] {
        try await withCheckedThrowingContinuation { continuation in
            execute(statements, transaction: transaction, idempotencyKey: idempotencyKey) { continuation.resume(with: $0) }
        }
    }

    /// ``execute(_:transaction:)`` for callers on an event loop: `done` runs on the writer
    /// thread (or at once for a refused request) and must only hand the result on.
    /// - Parameter idempotencyKey: when given, the request runs at most once while the key is
    ///   kept (``Options/idempotencyKeyLifetimeMs``): the key and the request's results are
    ///   stored in the same transaction as its writes, so a retry (also on another node after a
    ///   failover) gets the first results instead of applying again. A request whose commit
    ///   failed stored nothing, so its retry runs.
    public func execute(_ statements: [SQLStatement], transaction: Bool = false, idempotencyKey: String? = nil,
                        then done: @escaping @Sendable (Result<[StatementResult], any Error>) -> Void) {
        for s in statements where s.byteCount > options.statementBytesMax {
            return done(.failure(StorageError(.badRequest, "statement of \(s.byteCount) bytes exceeds the limit of \(options.statementBytesMax)")))
        }
        if let key = idempotencyKey, key.isEmpty || key.utf8.count > Idempotency.keyBytesMax {
            return done(.failure(StorageError(.badRequest, "an idempotency key has 1...\(Idempotency.keyBytesMax) bytes")))
        }
        writer.submit(WriteJob(statements: statements, transaction: transaction, idempotencyKey: idempotencyKey, done: done))
    }

    /// Requests committed together, in order, in one transaction, each in its own savepoint and
    /// outside a transaction of its own (rqlite's queued writes: a batch of many clients'
    /// requests). One request's failure, even one that makes SQLite roll the transaction back,
    /// is its own: the others commit. A commit that fails fails them all. `done` gets one
    /// result per request, in order, once all are answered (on the writer thread).
    public func execute(group requests: [[SQLStatement]], then done: @escaping @Sendable ([Result<[StatementResult], any Error>]) -> Void) {
        let answers = GroupAnswers(count: requests.count, done: done)
        var jobs: [WriteJob] = []
        for (i, statements) in requests.enumerated() {
            if let s = statements.first(where: { $0.byteCount > options.statementBytesMax }) {
                answers.set(i, .failure(StorageError(.badRequest, "statement of \(s.byteCount) bytes exceeds the limit of \(options.statementBytesMax)")))
                continue
            }
            jobs.append(WriteJob(statements: statements, transaction: false) { answers.set(i, $0) })
        }
        for job in jobs.dropLast() { job.joinsNext = true }
        writer.submit(group: jobs)
    }

    /// Runs read-only statements on a reader connection (sees only committed, durable data).
    /// - Parameter transaction: the statements read one snapshot, in one read transaction
    ///   (rqlite's `?transaction` on a query); without it each reads the latest commit.
    public func query(_ statements: [SQLStatement], transaction: Bool = false) async throws -> [StatementResult] {
        try await readers.run { connection in
            // Without an inline deadline it always returns results.
            try self.runQuery(statements, transaction: transaction, on: connection, inline: false)!
        }
    }

    /// ``query(_:transaction:)`` on the calling thread, if a reader connection is idle and the
    /// statements finish within ``Options/inlineReadBudgetMs``; nil otherwise, and the caller
    /// runs ``query(_:transaction:)`` (reads change nothing: running one again is harmless).
    /// After a query that ran past the budget, none is tried inline for
    /// ``Options/inlineReadPauseMs``.
    public func queryInline(_ statements: [SQLStatement], transaction: Bool = false) -> [StatementResult]? {
        // Short SQL only: preparing a statement is not interruptible.
        guard options.inlineReadBudgetMs > 0, statements.allSatisfy({ $0.byteCount <= Self.inlineStatementBytesMax }) else { return nil }
        // The budget is the loop thread's CPU time, not the clock's: on a busy machine a read
        // waits for a core now and then, and that costs the loop nothing. The thread's CPU
        // clock is a system call (3.7% of a read's CPU when read three times), the monotonic
        // clock is not: a thread uses no more CPU than time passes, so the CPU clock is read
        // again only when the monotonic clock says the budget may be spent.
        let budgetNs = UInt64(options.inlineReadBudgetMs) * 1_000_000
        let started = (cpu: threadCPUNs(), clock: monotonicNs())
        let outcome: [StatementResult]?? = readers.withIdleConnection { connection in
            connection.withInlineBounds(cpuNs: budgetNs, started: started, lengthMax: Self.inlineValueBytesMax, checkEvery: 100) {
                try? runQuery(statements, transaction: transaction, on: connection, inline: true)
            }
        }
        guard let ran = outcome else { return nil } // no idle connection
        // Past the budget, whether it finished or not: the tenant's next reads go to the threads.
        if ran == nil || (monotonicNs() - started.clock > budgetNs && threadCPUNs() - started.cpu > budgetNs) {
            readers.skipInline(forNs: UInt64(max(options.inlineReadPauseMs, 0)) * 1_000_000)
        }
        return ran
    }

    /// The SQL of a statement read inline, at most.
    static let inlineStatementBytesMax = 4096
    /// A string or blob made while reading inline, at most (its function is one VM instruction).
    static let inlineValueBytesMax: Int32 = 1 << 20

    /// Runs the statements of one query on `connection`. `inline` (within
    /// ``SQLiteConnection/withInlineBounds(cpuNs:lengthMax:checkEvery:_:)``): nil when a
    /// statement was interrupted or made a value past the bounds.
    private func runQuery(_ statements: [SQLStatement], transaction: Bool, on connection: SQLiteConnection,
                          inline: Bool) throws -> [StatementResult]? {
        // A deferred transaction: its snapshot is taken by the first statement's read.
        // (A statement interrupted by a time limit may end it early; the rest then read on
        // their own, and the COMMIT's error is of no interest.)
        let snapshot = transaction && statements.count > 1
        if snapshot { try connection.execPrepared("BEGIN") }
        defer { if snapshot { try? connection.execPrepared("COMMIT") } }
        var budget = RequestBudget(options: self.options)
        var results: [StatementResult] = []
        for s in statements {
            guard let limits = budget.limitsForNextStatement(s) else {
                results.append(.failure(budget.spentMessage))
                continue
            }
            do {
                let outcome = try connection.runTenantSQL(s, limits: limits)
                budget.spend(outcome)
                results.append(.success(outcome))
            } catch {
                // Inline, an interrupt or a value past the inline bounds means: not here. (Its
                // own limits' errors, the same statement meets again on a reader thread.)
                if inline, let stopped = error as? SQLiteError, stopped.code == SQLITE_INTERRUPT || stopped.code == SQLITE_TOOBIG {
                    return nil
                }
                results.append(.failure(budget.message(for: error)))
            }
        }
        return results
    }

    /// Runs `body` on the writer thread, between batches (admin work: VACUUM, checkpoints).
    public func withWriter<T: Sendable>(_ body: @escaping @Sendable (WriterAccess) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            writer.submitAdmin { access in
                do { continuation.resume(returning: try body(access)) } catch { continuation.resume(throwing: error) }
            }
        }
    }

    /// Copies the database as of its last commit into `path` (a plain file of pages), with
    /// writes paused meanwhile: the copy is consistent with ``WriterAccess/checksum``.
    /// - Returns: the copy's size in pages and checksum.
    /// - Parameter whilePaused: runs while writes are paused (to read the matching log position).
    public func copyForSnapshot<T: Sendable>(to path: String, whilePaused: @escaping @Sendable () -> T) async throws -> (dbSizePages: UInt32, checksum: UInt64, paused: T) {
        let source = self.path
        return try await withWriter { access in
            // A FULL checkpoint copies every committed frame into the file (waiting for readers).
            let result = try access.connection.run("PRAGMA wal_checkpoint(FULL)").rows.first ?? []
            guard result.count == 3, result[0] == .integer(0), result[1] == result[2] else {
                throw StorageError(.io, "checkpoint for a snapshot did not complete: \(result)")
            }
            let pageCount = try DatabaseFile.copy(source, to: path)
            let copied = try DatabaseFile.pageHashes(of: path).checksum
            guard copied == access.checksum else {
                throw StorageError(.corrupt, "snapshot copy checksum \(copied) differs from the database's \(access.checksum)")
            }
            return (pageCount, copied, whilePaused())
        }
    }

    /// Stops the writer (after the queued work) and closes every connection.
    public func close() {
        writer.stop()
        readers.close()
    }

    deinit { close() }
}

/// The writer connection, lent to admin work on the writer thread.
public struct WriterAccess {
    let connection: SQLiteConnection
    let capture: WALCapture
    public func exec(_ sql: String) throws {
        do { try connection.exec(sql) } catch { throw capture.lastFailure.map { StorageError(.commitFailed, String(describing: $0)) } ?? error }
    }
    public var checksum: UInt64 { capture.hashes.checksum }
    public var commitsCaptured: Int { capture.commitsCaptured }
    /// WAL syncs that asked the file system for the WAL's size (see `WALCapture.onWALSync`).
    public var walSizeQueries: Int { capture.fileSizeQueries }
}

// MARK: - Writer

/// The answers of a group of requests, handed on once all are in.
private final class GroupAnswers: @unchecked Sendable {
    private let lock = NSLock()
    private var results: [Result<[StatementResult], any Error>?]
    private var missing: Int
    private let done: @Sendable ([Result<[StatementResult], any Error>]) -> Void

    init(count: Int, done: @escaping @Sendable ([Result<[StatementResult], any Error>]) -> Void) {
        results = Array(repeating: nil, count: count)
        missing = count
        self.done = done
        if count == 0 { done([]) }
    }

    func set(_ index: Int, _ result: Result<[StatementResult], any Error>) {
        let all: [Result<[StatementResult], any Error>]? = lock.withLock {
            results[index] = result
            missing -= 1
            return missing == 0 ? results.map { $0! } : nil
        }
        if let all { done(all) }
    }
}

final class WriteJob {
    let statements: [SQLStatement]
    let transaction: Bool
    /// A client's idempotency key: the request runs at most once while the key is kept.
    let idempotencyKey: String?
    let done: @Sendable (Result<[StatementResult], any Error>) -> Void
    /// Its key came with another request before: it is refused, nothing ran (writer thread).
    var keyReused = false
    /// Its key came with this request before: it is answered what it was then, and wrote
    /// nothing now (writer thread).
    var replayed = false
    /// The next job belongs to the same group: the writer takes a group into one transaction
    /// whole, never split (set before submission).
    var joinsNext = false

    init(statements: [SQLStatement], transaction: Bool, idempotencyKey: String? = nil, done: @escaping @Sendable (Result<[StatementResult], any Error>) -> Void) {
        self.statements = statements
        self.transaction = transaction
        self.idempotencyKey = idempotencyKey
        self.done = done
    }

    /// Answers it: the refusal of a reused key, or its results.
    func finish(_ results: [StatementResult]) {
        if keyReused {
            done(.failure(StorageError(.idempotencyKeyReused, "the Idempotency-Key was used before with another request; nothing ran (use a new key for new work)")))
        } else {
            done(.success(results))
        }
    }
    var byteCount: Int { statements.reduce(0) { $0 + $1.byteCount } + (idempotencyKey?.utf8.count ?? 0) }
}

/// The tenant's one writer: a mailbox drained on the shared writer pool, one batch at a time,
/// so that the tenant's commits stay serial while the pool's threads stay bounded.
final class TenantWriter: @unchecked Sendable {
    private let connection: SQLiteConnection
    private let capture: WALCapture
    private let sqlitePath: String
    private let options: TenantDatabase.Options
    private let pool: BlockingPool
    private let condition = NSCondition()
    private var jobs: [WriteJob] = []
    private var admin: [(WriterAccess) -> Void] = []
    private var scheduled = false
    private var stopping = false
    /// Writer thread only.
    private lazy var idempotency = Idempotency(lifetimeMs: options.idempotencyKeyLifetimeMs, keysMax: options.idempotencyKeysMax)

    init(connection: SQLiteConnection, capture: WALCapture, sqlitePath: String, options: TenantDatabase.Options, pool: BlockingPool) {
        self.connection = connection
        self.capture = capture
        self.sqlitePath = sqlitePath
        self.options = options
        self.pool = pool
    }

    func submit(_ job: WriteJob) {
        var startsDrain = false
        let refusal: StorageError? = condition.withLock {
            guard !stopping else { return StorageError(.closed, "tenant database is closed") }
            guard jobs.count < options.queueRequestsMax else {
                return StorageError(.queueFull, "write queue full (\(options.queueRequestsMax) requests waiting); retry later")
            }
            jobs.append(job)
            startsDrain = claimDrain()
            return nil
        }
        if startsDrain { startDrain() }
        // Answered outside the lock: the answer may come straight back with another request.
        if let refusal { job.done(.failure(refusal)) }
    }

    /// `group`, in order, to be committed in one transaction (each job in its own savepoint, as
    /// in any batch): all queued, or all refused.
    func submit(group: [WriteJob]) {
        var startsDrain = false
        let refusal: StorageError? = condition.withLock {
            guard !stopping else { return StorageError(.closed, "tenant database is closed") }
            guard jobs.count + group.count <= options.queueRequestsMax else {
                return StorageError(.queueFull, "write queue full (\(options.queueRequestsMax) requests waiting); retry later")
            }
            jobs += group
            startsDrain = !group.isEmpty && claimDrain()
            return nil
        }
        if startsDrain { startDrain() }
        if let refusal { for job in group { job.done(.failure(refusal)) } }
    }

    func submitAdmin(_ work: @escaping (WriterAccess) -> Void) {
        let starts: Bool = condition.withLock {
            admin.append(work)
            return claimDrain()
        }
        if starts { startDrain() }
    }

    /// Whether the caller is the one to start a drain (none runs or is scheduled).
    /// Caller holds `condition`.
    private func claimDrain() -> Bool {
        guard !scheduled else { return false }
        scheduled = true
        return true
    }

    /// Called after `claimDrain` said so, outside `condition`: the pool thread that takes the
    /// drain would otherwise wake only to wait for the submitter's lock.
    private func startDrain() {
        pool.submit { [self] in drainOnce() }
    }

    /// Waits for queued work to finish, then releases the database's capture registration.
    /// Idempotent (deinit calls it again).
    func stop() {
        condition.lock()
        stopping = true
        while scheduled { condition.wait() }
        condition.unlock()
        StorageVFS.unregister(capture, databasePath: sqlitePath)
    }

    /// Batches (each with the admin work before it) while there are any. Between batches the
    /// thread goes back in line only if another tenant waits for one (tenants take turns);
    /// otherwise it goes straight on, sparing a hand-off to another pool thread per commit.
    private func drainOnce() {
        while true {
            condition.lock()
            let adminWork = admin
            admin.removeAll()
            let batch = takeJobs(countMax: options.batchRequestsMax, bytesMax: options.batchBytesMax, orOne: true)
            condition.unlock()

            for work in adminWork { work(WriterAccess(connection: connection, capture: capture)) }
            if !batch.isEmpty { commit(batch) }

            condition.lock()
            if jobs.isEmpty && admin.isEmpty {
                scheduled = false
                condition.broadcast()
                condition.unlock()
                return
            }
            condition.unlock()
            if pool.hasWaitingWork {
                pool.submit { [self] in drainOnce() }
                return
            }
        }
    }

    /// Takes queued jobs in order, within the bounds, groups whole (`orOne`: the first job, or
    /// group, even past them). Caller holds `condition`.
    private func takeJobs(countMax: Int, bytesMax: Int, orOne: Bool) -> [WriteJob] {
        var count = 0
        var bytes = 0
        // Jobs up to the end of the last whole group (a lone job is a group of one).
        var whole = 0
        for job in jobs {
            let fits = count < countMax && bytes + job.byteCount <= bytesMax
            guard fits || (orOne && whole == 0) else { break }
            count += 1
            bytes += job.byteCount
            if !job.joinsNext { whole = count }
        }
        let taken = Array(jobs.prefix(whole))
        jobs.removeFirst(whole)
        return taken
    }

    /// Requests that arrived while a batch ran, taken into the same transaction before its
    /// commit (within the batch bounds): otherwise they would wait a whole commit cycle, and
    /// a bigger batch is one record and one round trip for more requests.
    private func lateJobs(after batch: [WriteJob]) -> [WriteJob] {
        let count = batch.count
        guard count < options.batchRequestsMax else { return [] }
        let bytes = batch.reduce(0) { $0 + $1.byteCount }
        condition.lock()
        defer { condition.unlock() }
        guard !jobs.isEmpty, !stopping else { return [] }
        return takeJobs(countMax: options.batchRequestsMax - count, bytesMax: options.batchBytesMax - bytes, orOne: false)
    }

    /// One group commit: each request in its own savepoint, all in one transaction.
    ///
    /// Some errors make SQLite roll back the whole transaction, not just the statement
    /// (SQLITE_INTERRUPT from the time limit, SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM: "Response
    /// To Errors Within A Transaction" in the SQLite docs). The request that caused it is then
    /// answered alone (nothing of it applied) and the others run again in a new transaction,
    /// so one request never fails its neighbours. Each retry drops one request: bounded.
    private func commit(_ batch: [WriteJob]) {
        var pending = batch
        // Late requests join the first attempt only: after a rollback the batch only shrinks,
        // so retries stay bounded however many troublesome requests keep arriving.
        var takesLateJobs = true
        while !pending.isEmpty {
            do {
                try connection.execPrepared("BEGIN IMMEDIATE")
            } catch {
                for job in pending { job.done(.failure(StorageError(.io, "cannot begin a transaction: \(error)"))) }
                return
            }
            var results: [[StatementResult]] = []
            var rolledBack: (index: Int, results: [StatementResult])?
            var index = 0
            while rolledBack == nil {
                if index == pending.count {
                    let late = takesLateJobs ? lateJobs(after: pending) : []
                    if late.isEmpty { break }
                    pending += late
                }
                let result = run(pending[index])
                if sqlite3_get_autocommit(connection.handle) != 0 {
                    rolledBack = (index, result)
                    break
                }
                results.append(result)
                index += 1
            }
            if let (index, result) = rolledBack {
                takesLateJobs = false
                let culprit = pending.remove(at: index)
                culprit.done(.success(Self.notApplied(result)))
                continue
            }
            let captured = capture.commitsCaptured
            do {
                try connection.execPrepared("COMMIT")
            } catch {
                // The commit failed (capture refused it or I/O): nothing of the batch is visible.
                capture.stopIfShipped(since: captured, failure: error)
                try? connection.execPrepared("ROLLBACK")
                let cause = capture.lastFailure
                let reason = cause.map { String(describing: $0) } ?? "commit failed: \(error)"
                capture.lastFailure = nil
                for job in pending { job.done(.failure(StorageError(.commitFailed, reason, cause: cause))) }
                return
            }
            let position = capture.commitsCaptured > captured ? capture.lastCommitPosition : 0
            for (job, result) in zip(pending, results) { job.finish(position > 0 && !job.replayed ? Self.stamped(result, position) : result) }
            return
        }
    }

    /// `results` of a request whose commit has `position`: each statement that wrote says so.
    static func stamped(_ results: [StatementResult], _ position: UInt64) -> [StatementResult] {
        results.map { result in
            guard case .success(var outcome) = result, !outcome.isReadOnly else { return result }
            outcome.commitPosition = position
            return .success(outcome)
        }
    }

    /// The answer for a request whose transaction SQLite rolled back: its failing statement
    /// says why; statements that had succeeded say they were undone.
    static func notApplied(_ results: [StatementResult]) -> [StatementResult] {
        let reason = results.lazy.compactMap { r -> String? in if case .failure(let m) = r { return m } else { return nil } }.first ?? "rolled back"
        return results.map { r in
            switch r {
            case .failure: return r
            case .success: return .failure("not applied: the request was rolled back (\(reason))")
            }
        }
    }

    private func run(_ job: WriteJob) -> [StatementResult] {
        var results: [StatementResult] = []
        do { try connection.execPrepared("SAVEPOINT request") } catch {
            return job.statements.map { _ in .failure("cannot start request: \(error)") }
        }
        let fingerprint = job.idempotencyKey == nil ? 0 : Idempotency.fingerprint(job.statements, transaction: job.transaction)
        if let key = job.idempotencyKey {
            do {
                switch try idempotency.lookUp(key, fingerprint: fingerprint, on: connection) {
                case .repeated(let first)?:
                    try? connection.execPrepared("RELEASE request")
                    job.replayed = true
                    return first
                case .otherRequest?:
                    try? connection.execPrepared("RELEASE request")
                    job.keyReused = true
                    return []
                case nil:
                    break
                }
            } catch {
                try? connection.execPrepared("ROLLBACK TO request")
                try? connection.execPrepared("RELEASE request")
                return job.statements.map { _ in .failure("not applied: the idempotency key could not be checked (\(error))") }
            }
        }
        var budget = RequestBudget(options: options)
        // Each statement of a non-transaction request is undone alone when it fails; a lone
        // statement needs no savepoint of its own (the request's is the same thing).
        let perStatement = !job.transaction && job.statements.count > 1
        for statement in job.statements {
            guard let limits = budget.limitsForNextStatement(statement) else {
                // Spent between statements: the request is undone as a whole, not cut in two.
                try? connection.execPrepared("ROLLBACK TO request")
                try? connection.execPrepared("RELEASE request")
                return job.statements.map { _ in .failure(budget.spentMessage) }
            }
            if perStatement { try? connection.execPrepared("SAVEPOINT statement") }
            do {
                let outcome = try connection.runTenantSQL(statement, limits: limits)
                budget.spend(outcome)
                results.append(.success(outcome))
                if perStatement { try? connection.execPrepared("RELEASE statement") }
            } catch {
                if budget.isRequestLimit(error), sqlite3_get_autocommit(connection.handle) == 0 {
                    // Past the request's own bound: undone as a whole, as when its time is spent.
                    let message = budget.message(for: error)
                    try? connection.execPrepared("ROLLBACK TO request")
                    try? connection.execPrepared("RELEASE request")
                    return job.statements.map { _ in .failure("not applied: \(message)") }
                }
                results.append(.failure(budget.message(for: error)))
                if sqlite3_get_autocommit(connection.handle) != 0 {
                    // SQLite rolled the whole transaction back (an interrupt, a full disk): run
                    // nothing more, or the request's later statements would commit on their own,
                    // outside the batch, while the request is answered "not applied".
                    return results + job.statements.dropFirst(results.count).map { _ in .failure("not run: the request was rolled back") }
                }
                if !perStatement {
                    try? connection.execPrepared("ROLLBACK TO request")
                    if job.transaction { break }
                } else {
                    try? connection.execPrepared("ROLLBACK TO statement")
                    try? connection.execPrepared("RELEASE statement")
                }
            }
        }
        if let key = job.idempotencyKey, sqlite3_get_autocommit(connection.handle) == 0 {
            // In the request's savepoint: stored exactly when the request's writes are.
            do {
                try idempotency.remember(key, fingerprint: fingerprint, results: results, on: connection)
            } catch {
                try? connection.execPrepared("ROLLBACK TO request")
                try? connection.execPrepared("RELEASE request")
                return job.statements.map { _ in .failure("not applied: the idempotency key could not be stored (\(error))") }
            }
        }
        try? connection.execPrepared("RELEASE request")
        return results
    }
}

/// The run time left to one request: each statement runs within the statement limit or what
/// is left of the request's, whichever ends first.
struct RequestBudget {
    let requestTimeMs: Int
    let base: StatementLimits
    let deadlineNs: UInt64
    /// Result bytes the request's statements may still return together: the per-statement
    /// bound alone let one request of many large queries hold gigabytes (found in review).
    private(set) var resultBytesLeft: Int
    private var resultBytesBound = false

    init(options: TenantDatabase.Options) {
        requestTimeMs = options.requestTimeMs
        base = options.statementLimits
        deadlineNs = monotonicNs() + UInt64(max(options.requestTimeMs, 0)) * 1_000_000
        resultBytesLeft = options.resultBytesMax
    }

    /// The limits of the next statement, or nil when the request's time or result bytes are spent.
    mutating func limitsForNextStatement(_ statement: SQLStatement) -> StatementLimits? {
        let now = monotonicNs()
        guard now < deadlineNs, resultBytesLeft > 0 else { return nil }
        let leftMs = Int((deadlineNs - now + 999_999) / 1_000_000)
        var limits = base
        if limits.timeMs == 0 || leftMs < limits.timeMs { limits.timeMs = leftMs }
        if let asked = statement.timeMsMax, asked > 0, asked < limits.timeMs { limits.timeMs = asked }
        resultBytesBound = resultBytesLeft < limits.resultBytesMax
        limits.resultBytesMax = min(limits.resultBytesMax, resultBytesLeft)
        return limits
    }

    /// Counts a statement's results against the request's.
    mutating func spend(_ outcome: StatementOutcome) {
        resultBytesLeft -= outcome.resultBytes
    }

    var spentMessage: String {
        resultBytesLeft <= 0
            ? "not run: the request's results passed its limit of \(base.resultBytesMax) bytes; split the request or add a LIMIT"
            : "not applied: the request ran longer than its limit of \(requestTimeMs) ms"
    }

    /// Whether `error` came from the request's bounds (its time or its result bytes) rather
    /// than the statement's own.
    func isRequestLimit(_ error: any Error) -> Bool {
        guard let error = error as? SQLiteError else { return false }
        return (error.code == SQLITE_TOOBIG && resultBytesBound) || (error.code == SQLITE_INTERRUPT && monotonicNs() >= deadlineNs)
    }

    /// A statement's error as its client reads it: an interrupt at the request's deadline, or
    /// a result cut by what the request had left, names the request's limit.
    func message(for error: any Error) -> String {
        if let error = error as? SQLiteError, error.code == SQLITE_INTERRUPT, monotonicNs() >= deadlineNs {
            return "request stopped: it ran longer than its limit of \(requestTimeMs) ms"
        }
        if let error = error as? SQLiteError, error.code == SQLITE_TOOBIG, resultBytesBound {
            return "the request's results passed its limit of \(base.resultBytesMax) bytes; split the request or add a LIMIT"
        }
        return String(describing: error)
    }
}

// MARK: - Readers

/// Read-only connections used on the shared reader pool: at most `readersMax` of this tenant's
/// queries run at once, each on a connection of its own; the rest wait in a bounded queue.
final class ReaderPool: @unchecked Sendable {
    private let path: String
    private let options: TenantDatabase.Options
    private let pool: BlockingPool
    private let condition = NSCondition()
    /// Each runs its query and returns how to hand the result to its caller, which happens once
    /// the connection is back among the idle ones when it was the last: the caller's next
    /// query (read inline on its loop) finds it there.
    private var work: [(SQLiteConnection?, (any Error)?) -> () -> Void] = []
    private var idle: [SQLiteConnection] = []
    private var running = 0
    private var closed = false

    init(path: String, options: TenantDatabase.Options, pool: BlockingPool) {
        self.path = path
        self.options = options
        self.pool = pool
    }

    func run<T: Sendable>(_ body: @escaping @Sendable (SQLiteConnection) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            condition.lock()
            defer { condition.unlock() }
            guard !closed else {
                continuation.resume(throwing: StorageError(.closed, "tenant database is closed"))
                return
            }
            guard work.count < options.queueRequestsMax else {
                continuation.resume(throwing: StorageError(.queueFull, "read queue full (\(options.queueRequestsMax) queries waiting); retry later"))
                return
            }
            work.append { connection, openError in
                guard let connection else {
                    return { continuation.resume(throwing: openError ?? StorageError(.closed, "tenant database is closed")) }
                }
                let result = Result { try body(connection) }
                return { continuation.resume(with: result) }
            }
            if running < options.readersMax {
                running += 1
                pool.submit { [self] in runQueued() }
            }
        }
    }

    /// Runs queued queries on one connection until the queue is empty.
    private func runQueued() {
        condition.lock()
        var connection = idle.popLast()
        condition.unlock()
        var openError: (any Error)?
        if connection == nil {
            do { connection = try options.openConnection(path: path, readOnly: true) } catch { openError = error }
        }
        // Called with the lock held: whether this thread is done (no work left), and if so the
        // connection is given back first.
        func doneIfNoWork() -> Bool {
            guard work.isEmpty else { return false }
            running -= 1
            if let connection, !closed, idle.count < options.readersIdleMax { idle.append(connection) }
            return true
        }
        condition.lock()
        // Other threads of the pool may take work meanwhile: looked at again under the lock.
        while !doneIfNoWork() {
            let next = work.removeFirst()
            condition.unlock()
            let answer = next(connection, openError)
            condition.lock()
            let done = doneIfNoWork()
            condition.unlock()
            answer()
            if done { return }
            condition.lock()
        }
        condition.unlock()
    }

    func close() {
        condition.lock()
        closed = true
        idle.removeAll()
        condition.unlock()
    }

    /// Until when no query is tried inline (monotonic ns).
    private var inlineSkippedUntilNs: UInt64 = 0

    /// Runs `body` on this thread with an idle connection, and returns the connection to the
    /// idle ones; nil when none is idle (or inline queries are skipped for now).
    func withIdleConnection<T>(_ body: (SQLiteConnection) -> T) -> T? {
        let now = monotonicNs()
        condition.lock()
        guard !closed, now >= inlineSkippedUntilNs, let connection = idle.popLast() else {
            condition.unlock()
            return nil
        }
        condition.unlock()
        let result = body(connection)
        condition.lock()
        if !closed, idle.count < options.readersIdleMax { idle.append(connection) }
        condition.unlock()
        return result
    }

    func skipInline(forNs ns: UInt64) {
        let until = monotonicNs() + ns
        condition.lock()
        inlineSkippedUntilNs = until
        condition.unlock()
    }

    /// Connections open and waiting for a query (for tests and metrics).
    var idleCount: Int {
        condition.lock()
        defer { condition.unlock() }
        return idle.count
    }
}
