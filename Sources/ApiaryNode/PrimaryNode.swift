import ApiaryCore
import ApiaryLog
import ApiaryMonitor
import ApiaryReplication
import ApiaryStorage
import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOPosix

/// One tenant on the primary: its log (guarded: the writer thread appends, replication reads)
/// and its database.
final class PrimaryTenant: @unchecked Sendable {
    let id: TenantID
    private let lock = NSLock()
    private let log: ReplicationLog
    var database: TenantDatabase!
    /// Replication's log reads and snapshots run here, off the event loops.
    let ioQueue: DispatchQueue

    init(id: TenantID, log: ReplicationLog) {
        self.id = id
        self.log = log
        ioQueue = DispatchQueue(label: "apiary.primary.\(id)")
    }

    /// The same tenant with the same log, for a database opened again (a drop that failed).
    convenience init(reopening tenant: PrimaryTenant) {
        self.init(id: tenant.id, log: tenant.log)
    }

    func withLog<T>(_ body: (ReplicationLog) throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(log)
    }
}

/// The primary's replication: the pure core on one event loop, and the sink that each
/// tenant's writer thread calls at commit.
final class PrimaryNode: @unchecked Sendable, ConnectionEvents, CommitSink {
    let name: String
    let epoch: Epoch
    let layout: DataLayout
    let loop: any EventLoop
    let logger: Logger
    let config: ReplicationConfig

    // Event-loop-only state.
    private var core: PrimaryReplication
    private let channels = ReplicationChannels()
    private var waiters: [TenantLSN: CommitWaiter] = [:]
    /// Told (on the loop) when the core steps down: the node changes its role.
    var onSteppedDown: ((Epoch) -> Void)?
    /// What standbys discarded at a rejoin (``Divergence``), until the monitor has it (event
    /// loop only; bounded: the oldest go first, each is in the node's log anyway).
    private var undeliveredDivergences: [Divergence] = []

    // Guarded by `tenantsLock`.
    private let tenantsLock = NSLock()
    private var tenants: [TenantID: PrimaryTenant] = [:]
    private var opening: [TenantID: Task<PrimaryTenant, any Error>] = [:]
    /// Tenants being dropped or dropped while this node ran: no request reaches them, and
    /// nothing creates them again.
    private var dropped: Set<TenantID> = []
    /// Dropped tenants whose drop ended "outcome unknown" (a subset of `dropped`): the drop may
    /// have reached the standby, which would delete the tenant if promoted, so the tenant stays
    /// closed (no write taken meanwhile could be lost that way) until a drop again finishes.
    private var undecidedDrops: Set<TenantID> = []

    /// A request for a tenant whose drop ended "outcome unknown" (``undecidedDrops``).
    struct DropUndecided: Error, CustomStringConvertible {
        let tenant: TenantID
        var description: String {
            "tenant \(tenant) is being dropped: the drop's outcome is unknown, so it serves nothing until an administrator drops it again (apiary ctl tenant drop \(tenant))"
        }
    }

    struct TenantLSN: Hashable { var tenant: TenantID; var lsn: LSN }

    let logOptions: ReplicationLog.Options

    init(name: String, epoch: Epoch, mode: ReplicationMode, config: ReplicationConfig, standby: String?, layout: DataLayout,
         logOptions: ReplicationLog.Options, loop: any EventLoop, logger: Logger, leaseConfirmed: Bool = true) throws {
        self.name = name
        self.logOptions = logOptions
        self.epoch = epoch
        self.layout = layout
        self.loop = loop
        self.logger = logger
        self.config = config
        layout.removeDroppedLeftovers()
        var logs: [TenantID: PrimaryTenantLog] = [:]
        var opened: [TenantID: PrimaryTenant] = [:]
        for id in try layout.existingTenants() {
            let tenant = try Self.openTenantLog(id, layout: layout, options: logOptions)
            let position = tenant.withLog { $0.last }
            let base = tenant.withLog { $0.base }
            logs[id] = PrimaryTenantLog(last: RecordSummary(lsn: position.lsn, epoch: position.epoch, checksum: position.checksum),
                                        firstLSN: base.lsn + 1, baseChecksum: base.checksum)
            opened[id] = tenant
        }
        core = PrimaryReplication(nodeID: name, epoch: epoch, mode: mode, config: config, standbyNodeID: standby, tenants: logs,
                                  leaseConfirmed: leaseConfirmed, reportsLocalSync: true)
        tenants = opened
        // Open databases after the core knows the tenants: opening may redo the last record.
        for (_, tenant) in opened { try openDatabase(tenant) }
        readsServed.withLock { $0 = leaseConfirmed }
    }

    static func openTenantLog(_ id: TenantID, layout: DataLayout, options: ReplicationLog.Options) throws -> PrimaryTenant {
        try layout.createTenantDirectory(id)
        return PrimaryTenant(id: id, log: try ReplicationLog(directory: layout.log(id), options: options))
    }

    /// Opens the tenant's database, first making it agree with its log: the log is the
    /// truth, and the last logged commit may be missing from the database if the node died
    /// between the log's fsync and SQLite's (pages are whole images, so redoing is safe).
    private func openDatabase(_ tenant: PrimaryTenant) throws {
        let path = layout.database(tenant.id)
        let last = tenant.withLog { $0.last }
        if last.lsn == 0 {
            // Nothing was ever committed: a file here is a creation whose bootstrap commit
            // failed (or crashed). Start the tenant over.
            for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + suffix) }
        }
        let isNew = !FileManager.default.fileExists(atPath: path)
        if isNew && last.lsn > 0 {
            throw NodeError("tenant \(tenant.id): the log reaches lsn \(last.lsn) but the database file is missing")
        }
        if !isNew { try Self.discardWALCommitsTheLogLacks(tenant, path: path, logger: logger) }
        tenant.database = try TenantDatabase(tenant: tenant.id, path: path, sink: self) { hashes in
            guard !isNew, hashes.checksum != last.checksum else { return }
            try Self.redo(tenant, from: hashes.checksum, path: path, logger: self.logger)
        }
    }

    /// Cuts the tenant's WAL back to the last state its log holds, before SQLite opens the file.
    ///
    /// A commit's frames are in the WAL before its record is durable in the log (the capture
    /// runs inside SQLite's WAL sync; the page cache is enough, a `kill -9` keeps it), and a
    /// failed commit's frames were once invalidated only after its record left the log. A
    /// process that died in such a window left a valid commit in the WAL that the log lacks:
    /// SQLite's recovery would bring it back at the next open, and the database would match no
    /// lsn of the log (the redo refuses to start). So: of the states recovery could leave the
    /// database in (`WALRecovery.states`: the file, then each WAL commit in turn), keep the
    /// latest whose checksum the log holds and invalidate the frames after it. The log is read
    /// from its end, as the redo does: normally its last record is the match. When no state
    /// matches, the WAL is left alone and the redo reports the disagreement.
    static func discardWALCommitsTheLogLacks(_ tenant: PrimaryTenant, path: String, logger: Logger) throws {
        let states = try WALRecovery.states(ofDatabase: path)
        guard let recovered = states.last else { return }
        var latest: [UInt64: WALRecovery.State] = [:]
        for state in states { latest[state.checksum] = state }
        let (last, base) = tenant.withLog { ($0.last, $0.base) }
        var keep = latest[last.checksum]
        var lsn = last.lsn
        while keep == nil && lsn > base.lsn + 1 {
            lsn -= 1
            guard let record = try tenant.withLog({ try $0.record(at: lsn) }) else { break }
            keep = latest[record.checksum]
        }
        if keep == nil { keep = latest[base.checksum] }
        guard let keep, keep.commits < recovered.commits else { return }
        try WALRecovery.discardCommits(after: keep, ofDatabase: path)
        logger.notice("discarded WAL commits the log lacks", metadata: [
            "tenant": "\(tenant.id)", "kept": "\(keep.commits)", "discarded": "\(recovered.commits - keep.commits)",
        ])
    }

    /// Brings the database file up to the log's last record. Commits skip SQLite's WAL fsync
    /// (the log is durable first, see `isDurableOnCommit`), so after a crash SQLite recovers
    /// some prefix of the commits; the checksum says which lsn it ended at, and the log's
    /// records after it are written again (whole page images: idempotent).
    static func redo(_ tenant: PrimaryTenant, from checksum: UInt64, path: String, logger: Logger) throws {
        let (last, base) = tenant.withLog { ($0.last, $0.base) }
        var lsn = last.lsn
        var found: LSN?
        while lsn > base.lsn {
            guard let record = try tenant.withLog({ try $0.record(at: lsn) }) else { break }
            if record.checksum == checksum { found = lsn; break }
            lsn -= 1
        }
        if found == nil && base.checksum == checksum { found = base.lsn }
        guard let start = found else {
            throw NodeError("tenant \(tenant.id): the database matches no lsn the log holds (\(base.lsn)...\(last.lsn)); restore it from the standby or a backup")
        }
        var next = start + 1
        let writer = try DatabaseFile.Writer(path: path)
        while next <= last.lsn {
            let records = try tenant.withLog { try $0.records(from: next, countMax: 256, bytesMax: 64 << 20) }
            guard !records.isEmpty else { throw NodeError("tenant \(tenant.id): log record \(next) unreadable during redo") }
            for record in records where record.lsn <= last.lsn {
                try writer.write(record.pages, dbSizePages: record.dbSizePages)
                next = record.lsn + 1
            }
        }
        try writer.sync()
        let redone = try DatabaseFile.pageHashes(of: path).checksum
        guard redone == last.checksum else {
            throw NodeError("tenant \(tenant.id): database and log disagree at lsn \(last.lsn) even after redo; restore it from the standby or a backup")
        }
        logger.notice("redid logged commits missing from the database", metadata: ["tenant": "\(tenant.id)", "from": "\(start + 1)", "through": "\(last.lsn)"])
    }

    /// Tenants this node may hold (its system database not counted): each holds files and a
    /// writer connection open. Set before the node serves.
    var tenantsMax = 10_000

    /// The tenant, created on first use (its bootstrap commit replicates like any other).
    /// - Throws: `TenantLimitReached` when creating it would pass `tenantsMax`.
    func tenant(_ id: TenantID, create: Bool) async throws -> PrimaryTenant? {
        enum Found { case ready(PrimaryTenant), wait(Task<PrimaryTenant, any Error>), absent, full, undecided }
        let found: Found = tenantsLock.withLock {
            if dropped.contains(id) { return undecidedDrops.contains(id) ? .undecided : .absent }
            if let t = tenants[id], opening[id] == nil { return .ready(t) }
            if let task = opening[id] { return .wait(task) }
            guard create else { return .absent }
            guard id == .system || tenants.keys.filter({ $0 != .system }).count < tenantsMax else { return .full }
            let task = Task {
                try await BlockingPool.writers.run {
                    let tenant = try Self.openTenantLog(id, layout: self.layout, options: self.logOptions)
                    // Known before its database opens: the bootstrap commit looks it up.
                    self.tenantsLock.withLock { self.tenants[id] = tenant }
                    do {
                        try self.openDatabase(tenant)
                    } catch {
                        self.tenantsLock.withLock { self.tenants[id] = nil }
                        throw error
                    }
                    return tenant
                }
            }
            opening[id] = task
            return .wait(task)
        }
        switch found {
        case .ready(let t): return t
        case .absent: return nil
        case .undecided: throw DropUndecided(tenant: id)
        case .full: throw TenantLimitReached(max: tenantsMax)
        case .wait(let task):
            defer { tenantsLock.withLock { opening[id] = nil } }
            return try await task.value
        }
    }

    struct TenantLimitReached: Error, CustomStringConvertible {
        let max: Int
        var description: String { "this node holds its maximum of \(max) tenants; drop one or add a cell" }
    }

    /// The tenant if it is open and ready (no waiting: for callers on event loops).
    func openedTenant(_ id: TenantID) -> PrimaryTenant? {
        tenantsLock.withLock { opening[id] == nil && !dropped.contains(id) ? tenants[id] : nil }
    }

    /// Tenants closed by a drop of unknown outcome (``undecidedDrops``), for operators' status.
    var undecidedDropNames: [String] { tenantsLock.withLock { undecidedDrops.map(\.rawValue).sorted() } }

    var allTenants: [PrimaryTenant] {
        tenantsLock.withLock { tenants.values.filter { opening[$0.id] == nil && !dropped.contains($0.id) } }
    }

    // MARK: - Dropping a tenant

    /// Drops tenant `id` from this node: requests stop reaching it, its writer finishes what
    /// it took and stops, `commitDrop` commits the drop (in the system tenant, replicated), and
    /// then the replication core forgets the tenant and its files are deleted.
    ///
    /// The writer stops before the drop commits so that no record of the tenant follows the
    /// drop in the replication stream: a standby never meets a record of a tenant it was told
    /// is gone. If `commitDrop` throws "not executed", the tenant's database is opened again and
    /// it serves on; if it throws "outcome unknown", the tenant stays closed (``DropUndecided``)
    /// until a drop again finishes. `commitDrop` nil: the drop is committed already (a node that
    /// starts finds it).
    func drop(_ id: TenantID, commitDrop: (() async throws -> Void)?) async throws {
        enum Found { case open(PrimaryTenant), undecided(PrimaryTenant), onlyFiles, busy }
        let found: Found = tenantsLock.withLock {
            // Its drop ended "outcome unknown": closed already, and dropped now (one caller only).
            if let t = tenants[id], undecidedDrops.remove(id) != nil { return .undecided(t) }
            // Dropped while this node ran, its files left behind (their deletion failed).
            if commitDrop == nil, dropped.contains(id), tenants[id] == nil { return .onlyFiles }
            guard opening[id] == nil, !dropped.contains(id), let t = tenants[id] else { return .busy }
            dropped.insert(id)
            return .open(t)
        }
        let tenant: PrimaryTenant
        switch found {
        case .busy: throw NodeError("tenant \(id) is not open on this node, or is being dropped")
        case .onlyFiles:
            let layout = self.layout
            try await Self.onOwnThread { try Self.removeTenantFiles(id, layout: layout) }
            return
        case .open(let t), .undecided(let t): tenant = t
        }
        if case .open = found {
            // Blocks until the writer's queued work is done, which runs on the writer pool: on
            // a thread of its own, never on the event loops or the pool.
            try await Self.onOwnThread { tenant.database.close() }
        }
        if let commitDrop {
            do {
                try await commitDrop()
            } catch {
                // Opened again only when the drop surely never committed anywhere: after an
                // unknown outcome (now or in an earlier try) the standby may hold it, and a
                // promoted standby deletes the tenant with whatever it took meanwhile.
                let wasUndecided = if case .undecided = found { true } else { false }
                if wasUndecided || (error as? APIError)?.kind == .outcomeUnknown {
                    tenantsLock.withLock { _ = undecidedDrops.insert(id) }
                    logger.warning("tenant drop of unknown outcome: the tenant serves nothing until it is dropped again",
                                   metadata: ["tenant": "\(id)"])
                } else {
                    try await reopen(tenant)
                }
                throw error
            }
        }
        try await loop.submit { self.interpret(self.core.onTenantRemoved(id, now: monotonicNowMs())) }.get()
        tenantsLock.withLock { tenants[id] = nil }
        // Log reads already handed to the tenant's queue finish before its files go.
        let layout = self.layout
        try await Self.onOwnThread {
            tenant.ioQueue.sync {}
            try Self.removeTenantFiles(id, layout: layout)
        }
        logger.notice("tenant dropped: its files are deleted on this node", metadata: ["tenant": "\(id)"])
    }

    private static func onOwnThread(_ body: @escaping @Sendable () throws -> Void) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            Thread.detachNewThread { continuation.resume(with: Result { try body() }) }
        }
    }

    /// After a drop that did not commit: the same log, its database opened again.
    private func reopen(_ tenant: PrimaryTenant) async throws {
        let again = PrimaryTenant(reopening: tenant)
        // Opened before it is published: nothing may meet it without its database. (An open
        // tenant needs no lookup while opening; only a new one's bootstrap commit does.)
        defer { tenantsLock.withLock { _ = dropped.remove(tenant.id) } }
        try await BlockingPool.writers.run { try self.openDatabase(again) }
        tenantsLock.withLock { tenants[tenant.id] = again }
    }

    /// Deletes a dropped tenant's directory: renamed first (durably) to a name no tenant can
    /// have, so that a crash part-way leaves no half tenant for the next start to open, then
    /// removed; what a crash left is removed at the next start (``removeDroppedLeftovers(layout:)``).
    static func removeTenantFiles(_ id: TenantID, layout: DataLayout) throws {
        let directory = layout.tenantDirectory(id)
        guard FileManager.default.fileExists(atPath: directory) else { return }
        let doomed = layout.tenantsDirectory + "/" + DataLayout.droppedPrefix + id.rawValue
        try? FileManager.default.removeItem(atPath: doomed)
        try DurableFile.rename(directory, to: doomed)
        try FileManager.default.removeItem(atPath: doomed)
    }

    // MARK: - The commit path (a tenant's writer thread)

    /// Logs the commit locally (fsync), hands it to the core and blocks until the core says
    /// it is durable where the mode requires, or failed. On failure the record is removed from
    /// the log again before returning, so that the next commit reuses its lsn (the core's rule).
    func commit(tenant id: TenantID, _ commit: CapturedCommit) throws -> UInt64 {
        guard let tenant = tenantsLock.withLock({ tenants[id] }) else {
            preconditionFailure("commit for tenant \(id) that this node does not know")
        }
        let record = try tenant.withLog { log -> Record in
            let record = Record(epoch: epoch, lsn: log.last.lsn + 1, dbSizePages: commit.dbSizePages, checksum: commit.checksum, pages: commit.pages)
            do {
                try log.append(record)
            } catch {
                throw CommitRejected(failure: nil, message: "write not applied: the local replication log failed: \(error)")
            }
            return record
        }
        if TestExitPoint.isArmed(.commitLoggedBeforeSend, lsn: record.lsn) {
            tenant.withLog { try? $0.sync() }
            TestExitPoint.reached(.commitLoggedBeforeSend, tenant: id, lsn: record.lsn)
        }
        let waiter = CommitWaiter()
        let key = TenantLSN(tenant: id, lsn: record.lsn)
        // The record goes to the standby while the local fsync runs: a commit's latency is
        // then the slower of the two, not their sum. Its client still hears "ok" only after
        // both (this function returns after both). A record the standby got but this node
        // lost in a crash was never acknowledged; the next handshake rewinds the standby.
        loop.execute {
            self.waiters[key] = waiter
            self.interpret(self.core.onLocalRecord(id, record, now: monotonicNowMs()))
        }
        TestExitPoint.reached(.commitBeforeLogSync, tenant: id, lsn: record.lsn)
        tenant.withLog { log in
            do { try log.sync() } catch {
                // The core may already count the record durable on the standby; there is no
                // honest way to take that back here. Stop, and let failover take over.
                preconditionFailure("tenant \(id): fsync of the replication log failed at lsn \(record.lsn): \(error)")
            }
        }
        // Only now may the core count it committed (and tell the standby, which then applies it).
        loop.execute { self.interpret(self.core.onLocalSynced(id, throughLSN: record.lsn, now: monotonicNowMs())) }
        // The core answers within standbyWaitMs; the margin only guards against a stuck loop.
        let outcome = waiter.wait(timeoutMs: Int(config.standbyWaitMs) + 30_000)
        switch outcome {
        case .durable:
            compactLog(tenant, committed: record.lsn)
            return record.lsn
        case .failed(let failure):
            // The commit's frames go first, then its record: a crash in between leaves the
            // record durable in the log and the redo at restart puts the commit back (its
            // clients were never answered, so its outcome is unknown to them). The other order
            // leaves a WAL whose valid commit the log lacks, and SQLite's recovery would bring
            // back a commit that matches no lsn (issue 8).
            commit.frames?.invalidate()
            TestExitPoint.reached(.failedCommitHalfUndone, tenant: id, lsn: record.lsn)
            tenant.withLog { log in
                do { try log.truncate(after: record.lsn - 1) } catch {
                    preconditionFailure("tenant \(id): cannot remove failed record \(record.lsn) from the log: \(error)")
                }
            }
            throw CommitRejected(failure: failure, message: Self.clientMessage(failure))
        case nil:
            preconditionFailure("tenant \(id): replication core did not answer commit \(record.lsn)")
        }
    }

    /// Keeps the log within its retention bound (invariant 8). Everything up to the committed
    /// lsn lives on in the database; a standby that needs older records gets a snapshot.
    private func compactLog(_ tenant: PrimaryTenant, committed lsn: LSN) {
        let compacted = tenant.withLog { log -> LogPosition? in
            let before = log.base.lsn
            do { try log.applyRetention(keepingFrom: lsn) } catch {
                logger.warning("log retention failed", metadata: ["tenant": "\(tenant.id)", "error": "\(error)"])
                return nil
            }
            return log.base.lsn != before ? log.base : nil
        }
        guard let base = compacted else { return }
        loop.execute {
            self.interpret(self.core.onLogCompacted(tenant.id, firstLSN: base.lsn + 1, baseChecksum: base.checksum, now: monotonicNowMs()))
        }
    }

    /// Commits are durable in the replication log before SQLite publishes them; `redo` brings
    /// the database back after a crash, so SQLite's own WAL fsync is not needed.
    let isDurableOnCommit = true

    static func clientMessage(_ failure: CommitFailure) -> String {
        switch failure {
        case .standbyUnavailable: return "standby unavailable: the write was not applied (retry later)"
        case .outcomeUnknown: return "outcome unknown: the standby did not confirm in time; the write may or may not be applied"
        case .overloaded: return "overloaded: too many commits waiting for the standby; the write was not applied"
        case .recordTooLarge: return "transaction too large to replicate; the write was not applied"
        case .steppedDown: return "not primary: this node stepped down; the write was not applied"
        case .draining: return "not applied: a switchover is in progress; retry (the new primary takes writes in moments)"
        }
    }

    // MARK: - Connection events (event loop)

    func connected(_ id: ConnectionID, channel: any Channel, peer: ApiaryReplication.PeerIdentity) {
        channels[id] = channel
        logger.info("replication peer connected", metadata: ["peer": "\(peer.nodeID)", "connection": "\(id)"])
        interpret(core.onConnected(id, peer: peer, now: monotonicNowMs()))
    }

    func received(_ id: ConnectionID, _ message: Result<Message, DecodeError>) {
        guard channels[id] != nil else { return }
        switch message {
        case .success(let m): interpret(core.onMessage(m, from: id, now: monotonicNowMs()))
        case .failure(let e): interpret(core.onDecodeError(id, e, now: monotonicNowMs()))
        }
    }

    func disconnected(_ id: ConnectionID) {
        guard channels.forget(id) else { return }
        interpret(core.onDisconnected(id, now: monotonicNowMs()))
    }

    func tick() {
        interpret(core.onTick(now: monotonicNowMs()))
    }

    // MARK: - Interpreting actions (event loop)

    private func interpret(_ actions: [PrimaryAction]) {
        loop.preconditionInEventLoop()
        for action in actions {
            switch action {
            case .send(let id, let message):
                if !channels.send(message, on: id) { interpret(core.onDisconnected(id, now: monotonicNowMs())) }
            case .closeConnection(let id, let reason):
                channels.close(id, reason: reason, logger: logger)
            case .readLog(let id, let request):
                readLog(id, request)
            case .readLogSummaries(let id, let request):
                readSummaries(id, request)
            case .sendSnapshot(let id, let request):
                sendSnapshot(id, request)
            case .commitDurable(let tenant, let lsn):
                waiters.removeValue(forKey: TenantLSN(tenant: tenant, lsn: lsn))?.resolve(.durable)
            case .commitFailed(let tenant, let lsn, let failure):
                waiters.removeValue(forKey: TenantLSN(tenant: tenant, lsn: lsn))?.resolve(.failed(failure))
            case .stepDown(let newer):
                // The core already refuses commits and leases; the node's role changes now.
                readsServed.withLock { $0 = false }
                logger.warning("stepping down: a newer epoch exists", metadata: ["epoch": "\(newer)"])
                onSteppedDown?(newer)
            case .standbyDiverged(let divergence):
                logger.warning("standby diverged: \(divergence)")
                undeliveredDivergences.append(divergence)
                if undeliveredDivergences.count > 256 { undeliveredDivergences.removeFirst() }
            }
        }
    }

    private func readLog(_ id: ConnectionID, _ request: LogReadRequest) {
        guard let tenant = tenantsLock.withLock({ tenants[request.tenant] }) else { return closeForReadFailure(id) }
        tenant.ioQueue.async {
            let result = Result { () throws -> [Record] in
                let count = Int(request.throughLSN - request.fromLSN + 1)
                let records = try tenant.withLog { try $0.records(from: request.fromLSN, countMax: count, bytesMax: request.bytesMax) }
                var fitting: [Record] = []
                var bytes = 0
                for r in records where r.lsn <= request.throughLSN {
                    if bytes + r.byteCount > request.bytesMax && !(fitting.isEmpty && request.firstRecordMayExceed) { break }
                    bytes += r.byteCount
                    fitting.append(r)
                }
                return fitting
            }
            self.loop.execute {
                switch result {
                case .success(let records): self.interpret(self.core.onLogRead(id, request: request, records: records, now: monotonicNowMs()))
                case .failure: self.closeForReadFailure(id)
                }
            }
        }
    }

    private func readSummaries(_ id: ConnectionID, _ request: SummaryReadRequest) {
        guard let tenant = tenantsLock.withLock({ tenants[request.tenant] }) else { return closeForReadFailure(id) }
        tenant.ioQueue.async {
            let result = Result { () throws -> [RecordSummary] in
                var summaries: [RecordSummary] = []
                guard request.fromLSN <= request.throughLSN else { return [] }
                for lsn in request.fromLSN...request.throughLSN {
                    if let r = try tenant.withLog({ try $0.record(at: lsn) }) { summaries.append(RecordSummary(r)) }
                }
                return summaries
            }
            self.loop.execute {
                switch result {
                case .success(let s): self.interpret(self.core.onLogSummaries(id, request: request, summaries: s, now: monotonicNowMs()))
                case .failure: self.closeForReadFailure(id)
                }
            }
        }
    }

    private func sendSnapshot(_ id: ConnectionID, _ request: SnapshotRequest) {
        guard let tenant = tenantsLock.withLock({ tenants[request.tenant] }), let channel = channels[id] else {
            return interpret(core.onSnapshotFailed(id, request: request, now: monotonicNowMs()))
        }
        let scratch = layout.snapshotScratch(request.tenant)
        Task {
            do {
                // Writes pause while the copy is made, so the copy is exactly the last commit's.
                let copy = try await tenant.database.copyForSnapshot(to: scratch) { tenant.withLog { $0.last.lsn } }
                let lsn = copy.paused
                defer { try? FileManager.default.removeItem(atPath: scratch) }
                // One chunk in flight at a time: a large database never sits in memory whole.
                try await channel.writeAndFlush(Message.snapshotBegin(SnapshotBegin(epoch: request.epoch, tenant: request.tenant, lsn: lsn, dbSizePages: copy.dbSizePages)))
                let chunkPages = (1 << 20) / DatabaseFile.pageSize
                var next: UInt32 = 1
                while next <= copy.dbSizePages {
                    let chunk = try DatabaseFile.pages(of: scratch, from: next, countMax: chunkPages)
                    guard !chunk.isEmpty else { break }
                    try await channel.writeAndFlush(Message.snapshotPages(SnapshotPages(epoch: request.epoch, tenant: request.tenant, pages: chunk)))
                    next += UInt32(chunk.count)
                }
                try await channel.writeAndFlush(Message.snapshotEnd(SnapshotEnd(epoch: request.epoch, tenant: request.tenant, lsn: lsn, checksum: copy.checksum)))
                loop.execute { self.interpret(self.core.onSnapshotSent(id, request: request, lsn: lsn, now: monotonicNowMs())) }
            } catch {
                logger.error("snapshot failed", metadata: ["tenant": "\(request.tenant)", "error": "\(error)"])
                loop.execute { self.interpret(self.core.onSnapshotFailed(id, request: request, now: monotonicNowMs())) }
            }
        }
    }

    private func closeForReadFailure(_ id: ConnectionID) {
        channels.close(id, reason: .localReadFailed, logger: logger)
        interpret(core.onDisconnected(id, now: monotonicNowMs()))
    }

    // MARK: - Status

    func status() async -> [TenantStatus] {
        let tenants = allTenants
        return (try? await loop.submit {
            tenants.map { t in
                let s = self.core.status(of: t.id)
                let last = t.withLog { $0.last }
                return TenantStatus(tenant: t.id.rawValue, epoch: last.epoch.rawValue, lsn: last.lsn, checksum: last.checksum,
                                    appliedLSN: s?.committedLSN ?? last.lsn, standbyAckedLSN: s?.standbyAckedLSN)
            }
        }.get()) ?? []
    }

    /// Strong reads need the standby's lease (sync mode); a primary configured alone holds the
    /// only copy and needs none.
    var holdsLease: Bool {
        get async {
            (try? await loop.submit { self.core.holdsLease(now: monotonicNowMs()) }.get()) ?? false
        }
    }

    /// The core's ``PrimaryReplication/servesReads``, readable from any thread without a hop
    /// to the loop (every read asks); updated on the loop whenever it may change.
    private let readsServed = LockedValue(false)
    var servesReads: Bool { readsServed.withLock { $0 } }

    // MARK: - The keeper's

    /// Stops committing and serving strong reads now (the monitor's word); the core's
    /// `.stepDown` then changes the node's role (`onSteppedDown`).
    func stepDownOrdered() async throws {
        try await loop.submit { self.interpret(self.core.onStepDownOrdered(now: monotonicNowMs())) }.get()
    }

    /// Commits in `mode`, accepts only `standby`, takes new commits unless `draining`.
    func configure(mode: ReplicationMode, standby: NodeID?, draining: Bool) async throws {
        try await loop.submit {
            let now = monotonicNowMs()
            self.interpret(self.core.onStandbyAssigned(standby, now: now))
            self.interpret(self.core.onModeChanged(mode, now: now))
            self.interpret(self.core.onDrainingChanged(draining, now: now))
            // Set up by the monitor for a writer goal: it may use leases (unless handing over).
            if !draining { self.core.onLeaseConfirmed() }
            let serves = self.core.servesReads
            self.readsServed.withLock { $0 = serves }
        }.get()
    }

    /// For the monitor: per tenant the committed lsn and what the standby acknowledged on the
    /// current stream; whether a standby streams.
    func keeperFigures() async -> KeeperFigures {
        (try? await loop.submit {
            var tenants: [TenantID: TenantReport] = [:]
            for id in self.core.tenantIDs {
                guard let s = self.core.status(of: id) else { continue }
                // The ready lsn, not the committed one: a record taken alone may still commit
                // without the standby (PrimaryTenantStatus.readyLSN).
                tenants[id] = TenantReport(lsn: s.readyLSN, standbyLSN: s.standbyAckedLSN)
            }
            return KeeperFigures(tenants: tenants, streaming: self.core.standbyConnection != nil,
                                 holdsLease: self.core.holdsLease(now: monotonicNowMs()), divergences: Array(self.undeliveredDivergences.prefix(64)))
        }.get()) ?? KeeperFigures(tenants: [:], streaming: false, holdsLease: false)
    }

    /// The monitor answered a heartbeat that carried these.
    func divergencesDelivered(_ delivered: [Divergence]) {
        loop.execute { self.undeliveredDivergences.removeAll { delivered.contains($0) } }
    }

    var standbyConnected: Bool {
        get async { (try? await loop.submit { self.core.standbyConnection != nil }.get()) ?? false }
    }
}

/// A commit refused by replication; `message` is what its clients are told.
struct CommitRejected: Error, CustomStringConvertible {
    let failure: CommitFailure?
    let message: String
    var description: String { message }
}

/// One writer thread waiting for the core's verdict on its commit.
final class CommitWaiter: @unchecked Sendable {
    enum Outcome { case durable, failed(CommitFailure) }
    private let condition = NSCondition()
    private var outcome: Outcome?

    func resolve(_ o: Outcome) {
        condition.lock()
        outcome = o
        condition.unlock()
        condition.signal() // after unlocking, so the writer does not wake only to wait for the lock
    }

    func wait(timeoutMs: Int) -> Outcome? {
        let deadline = Date().addingTimeInterval(Double(timeoutMs) / 1000)
        condition.lock()
        defer { condition.unlock() }
        while outcome == nil {
            if !condition.wait(until: deadline) { break }
        }
        return outcome
    }
}

/// One tenant's position, as `/status` and `apiary ctl verify` show it.
public struct TenantStatus: Codable, Sendable, Equatable {
    public var tenant: String
    public var epoch: UInt64
    public var lsn: UInt64
    public var checksum: UInt64
    public var appliedLSN: UInt64
    public var standbyAckedLSN: UInt64?
}
