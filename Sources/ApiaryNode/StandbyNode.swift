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

/// One tenant on the standby: its log and its database file.
///
/// The core's storage actions of a tenant must keep their order. Two serial queues keep it
/// where it matters while taking the database work off the ack path: `ioQueue` appends and
/// truncates the log (persist → ack is the commit's critical path), `applyQueue` writes the
/// database (apply, snapshots). That is safe because an apply only reads records that are
/// persisted and committed, which no later truncation removes (the core truncates only
/// records after the applied lsn), and the log itself is guarded by `logLock`.
final class StandbyTenant: @unchecked Sendable {
    let id: TenantID
    private let unguardedLog: ReplicationLog
    private let logLock = NSLock()
    let applyQueue: DispatchQueue
    let databasePath: String
    let appliedPath: String
    /// A snapshot being received; and the marker of one being installed (`SnapshotInstall.swift`).
    let scratchPath: String
    let installMarkerPath: String
    var hashes: PageHashes
    /// Touched on `applyQueue` only.
    var applied: AppliedState {
        didSet { published.withLock { $0 = applied } }
    }
    /// Persists asked for and not yet appended (see the group fsync in `StandbyNode`).
    let persistsQueued = LockedValue(0)
    /// The tenant was dropped: storage work still queued for it is skipped (its files go).
    let removed = LockedValue(false)
    /// Work handed to `ioQueue` and not yet finished. Event loop only.
    var ioPending = 0
    /// The highest lsn the core asked to apply (each record's checksum is checked on the way),
    /// and whether a pass that will reach it is already scheduled.
    let applyTarget = LockedValue(ApplyTarget())
    /// What the database file durably holds, readable from any thread (status, verify).
    let published = LockedValue(AppliedState())
    let ioQueue: DispatchQueue

    init(id: TenantID, layout: DataLayout, logOptions: ReplicationLog.Options, logger: Logger = Logger(label: "apiary.standby")) throws {
        self.id = id
        try layout.createTenantDirectory(id)
        unguardedLog = try ReplicationLog(directory: layout.log(id), options: logOptions)
        databasePath = layout.database(id)
        appliedPath = layout.applied(id)
        scratchPath = layout.snapshotScratch(id)
        installMarkerPath = layout.snapshotInstallMarker(id)
        ioQueue = DispatchQueue(label: "apiary.standby.\(id).log")
        applyQueue = DispatchQueue(label: "apiary.standby.\(id).apply")
        // Read from the files below, once a snapshot install a crash interrupted is finished:
        // until then the database and the applied state may disagree.
        applied = AppliedState()
        hashes = PageHashes()
        if try !finishOrUndoInterruptedSnapshotInstall(logger: logger) {
            applied = try AppliedState.read(from: appliedPath)
            hashes = try DatabaseFile.pageHashes(of: databasePath)
        }
        let initial = applied
        published.withLock { $0 = initial }
        try recover()
    }

    func withLog<T>(_ body: (ReplicationLog) throws -> T) rethrows -> T {
        logLock.lock()
        defer { logLock.unlock() }
        return try body(unguardedLog)
    }

    /// `body` under the log's lock if it is free now, else nil (an apply pass holds it).
    func withLogIfFree<T>(_ body: (ReplicationLog) throws -> T) rethrows -> T? {
        guard logLock.try() else { return nil }
        defer { logLock.unlock() }
        return try body(unguardedLog)
    }

    /// After a crash in the middle of applying, redo the interrupted range from the log (page
    /// images are whole, so applying them again is idempotent), then check the database.
    private func recover() throws {
        if applied.applyingThroughLSN > applied.lsn {
            try applyRecords(through: applied.applyingThroughLSN, redoing: true)
        }
        guard hashes.checksum == applied.checksum else {
            throw NodeError("tenant \(id): database checksum \(hashes.checksum) differs from the applied state \(applied.checksum) at lsn \(applied.lsn); resync this standby")
        }
    }

    /// Applies the log's records after the applied lsn, through `lsn`, to the database file.
    /// - Parameter redoing: the file may already hold pages of records in the range (a pass
    ///   that died part-way wrote them). Then only the end of the range is a state the primary
    ///   had: the file mixes later pages into every state before it, so the checksum is checked
    ///   after the last record only. A normal pass checks it after every record.
    /// - Returns: the database checksum afterwards.
    @discardableResult
    func applyRecords(through lsn: LSN, redoing: Bool = false) throws -> UInt64 {
        guard lsn > applied.lsn else { return applied.checksum }
        // Intent first: a crash part-way leaves a mix of pages that only a redo repairs.
        var intent = applied
        intent.applyingThroughLSN = lsn
        try intent.write(to: appliedPath)
        var next = applied.lsn + 1
        var last = applied
        let writer = try DatabaseFile.Writer(path: databasePath)
        while next <= lsn {
            let records = try withLog { try $0.records(from: next, countMax: 256, bytesMax: 32 << 20) }
            guard !records.isEmpty else { throw NodeError("tenant \(id): log has no record \(next) to apply") }
            for record in records where record.lsn <= lsn {
                try writer.write(record.pages, dbSizePages: record.dbSizePages)
                hashes.apply(pages: record.pages, dbSizePages: record.dbSizePages)
                guard hashes.checksum == record.checksum || (redoing && record.lsn < lsn) else {
                    throw NodeError("tenant \(id): after applying lsn \(record.lsn) the database checksum is \(hashes.checksum), the primary's was \(record.checksum): replicas diverged")
                }
                last = AppliedState(lsn: record.lsn, checksum: record.checksum, applyingThroughLSN: record.lsn)
                next = record.lsn + 1
            }
        }
        try writer.sync()
        try last.write(to: appliedPath)
        applied = last
        // Applied records live on in the database; keep the log within its bound.
        try withLog { try $0.applyRetention(keepingFrom: last.lsn + 1) }
        published.withLock { $0 = last }
        return last.checksum
    }
}

/// What the next apply pass of a tenant must reach.
struct ApplyTarget {
    var lsn: LSN = 0
    /// The primary's checksum at `lsn`.
    var checksum: UInt64 = 0
    var passScheduled = false
}

/// A value behind a lock.
final class LockedValue<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ value: T) { self.value = value }
    func withLock<R>(_ body: (inout T) -> R) -> R {
        lock.lock()
        defer { lock.unlock() }
        return body(&value)
    }
}

/// `lsn checksum applyingThroughLSN` of a standby tenant, durable.
struct AppliedState: Equatable {
    var lsn: LSN = 0
    var checksum: UInt64 = 0
    var applyingThroughLSN: LSN = 0

    static func read(from path: String) throws -> AppliedState {
        guard let data = FileManager.default.contents(atPath: path) else { return AppliedState() }
        let parts = String(decoding: data, as: UTF8.self).split(whereSeparator: \.isWhitespace).compactMap { UInt64($0) }
        guard parts.count == 3 else { throw NodeError("\(path) is damaged: expected 'lsn checksum applyingThrough'") }
        return AppliedState(lsn: parts[0], checksum: parts[1], applyingThroughLSN: parts[2])
    }

    func write(to path: String) throws {
        try DurableFile.replace(path, with: Array("\(lsn) \(checksum) \(applyingThroughLSN)\n".utf8))
    }
}

/// The standby's replication: the pure core on one event loop; storage actions on each
/// tenant's serial queue.
final class StandbyNode: @unchecked Sendable, ConnectionEvents {
    let name: String
    let layout: DataLayout
    let loop: any EventLoop
    let group: any EventLoopGroup
    let credentials: ClusterCredentials
    let primaryHost: String
    let primaryPort: Int
    let logger: Logger
    let ids: ConnectionIDs

    // Event-loop-only state.
    private var core: StandbyReplication
    private let channels = ReplicationChannels()
    /// The connection being dialled, until it is reported connected or failed (exactly once:
    /// a TCP connection whose TLS handshake fails or stalls closes without ever connecting,
    /// and the core must hear of it, or it waits in "connecting" forever).
    private var dialling: ConnectionID?
    /// The newer epoch a primary last claimed and this node refused to adopt.
    private var refusedEpoch: Epoch?
    private var tenants: [TenantID: StandbyTenant] = [:]
    /// Set when storage failed in a way that breaks an invariant: the node stops replicating.
    private(set) var fatal: NodeError?
    /// Set once promotion starts: nothing more is taken from the old primary.
    private var promoting = false
    /// Whether the standby streams from its primary now (set on the loop after each event):
    /// only then does the API send applications there (``NodeRoles/redirectTarget``).
    private let streaming = LockedValue(false)
    var isStreaming: Bool { streaming.withLock { $0 } }
    /// Called once, on the loop, when the standby stops because its file system is full
    /// (``stop(_:cause:)``): the node waits for room and starts again from what is durable.
    var onStoppedForFullDisk: (@Sendable () -> Void)?
    /// The tenant whose records were last persisted on the loop itself, and when.
    private var lastInline: (tenant: TenantID, atNs: UInt64)?
    /// Another tenant persisted inline this recently: this one goes through its queue.
    static let inlineExclusiveNs: UInt64 = 2_000_000

    private func inlineAllowed(for tenant: TenantID) -> Bool {
        guard let last = lastInline, last.tenant != tenant else { return true }
        return DispatchTime.now().uptimeNanoseconds - last.atNs > Self.inlineExclusiveNs
    }

    /// Dropped tenants whose files are being deleted (event loop only).
    private var beingRemoved: [StandbyTenant] = []

    /// Snapshot chunks handed to the apply queue and not yet written.
    private var snapshotChunksQueued = 0
    static let snapshotChunksQueuedMax = 16

    private func setReading(_ on: Bool) {
        if let id = core.streamingConnection, let channel = channels[id] {
            channel.setOption(ChannelOptions.autoRead, value: on).whenComplete { _ in }
            if on { channel.read() }
        }
    }

    let logOptions: ReplicationLog.Options

    init(name: String, epoch: Epoch, config: ReplicationConfig, layout: DataLayout, logOptions: ReplicationLog.Options, primaryHost: String, primaryPort: Int,
         group: any EventLoopGroup, loop: any EventLoop, credentials: ClusterCredentials, ids: ConnectionIDs, logger: Logger) throws {
        self.name = name
        self.layout = layout
        self.loop = loop
        self.group = group
        self.credentials = credentials
        self.primaryHost = primaryHost
        self.primaryPort = primaryPort
        self.logger = logger
        self.ids = ids
        self.logOptions = logOptions
        var logs: [TenantID: StandbyTenantLog] = [:]
        layout.removeDroppedLeftovers()
        // Dropped tenants are not deleted here: a former primary's system database may hold a
        // drop the cluster never committed (its log is counted applied when it rejoins). They
        // go once the system database is applied from the primary (`removeDroppedTenants`).
        for id in try layout.existingTenants() {
            let tenant = try StandbyTenant(id: id, layout: layout, logOptions: logOptions, logger: logger)
            tenants[id] = tenant
            var tail: [RecordSummary] = []
            let lastLSN = tenant.withLog { $0.last.lsn }
            if lastLSN > tenant.applied.lsn {
                for r in try tenant.withLog({ try $0.records(from: tenant.applied.lsn + 1, countMax: Int(lastLSN - tenant.applied.lsn), bytesMax: .max) }) {
                    tail.append(RecordSummary(r))
                }
            }
            // The last applied records the log still holds: a former primary's tell the new
            // primary where their histories part (the rejoin's report of what is discarded).
            var history: [RecordSummary] = []
            let applied = tenant.applied.lsn
            let base = tenant.withLog { $0.base.lsn }
            if applied > base {
                for lsn in max(base + 1, applied + 1 - min(applied, LSN(TenantPosition.historyMax)))...applied {
                    guard let r = try tenant.withLog({ try $0.record(at: lsn) }) else { history = []; continue }
                    history.append(RecordSummary(r))
                }
            }
            logs[id] = StandbyTenantLog(appliedLSN: applied, appliedChecksum: tenant.applied.checksum, tail: tail, history: history)
        }
        core = StandbyReplication(nodeID: name, epoch: epoch, config: config, tenants: logs, now: monotonicNowMs())
    }

    /// The tenants the system database (as applied here) says were dropped; none when it
    /// cannot be read (the standby then keeps their files until its next start).
    static func droppedTenants(in systemDatabase: String, logger: Logger) -> Set<TenantID> {
        guard FileManager.default.fileExists(atPath: systemDatabase) else { return [] }
        do {
            return Set(try DatabaseFile.texts("SELECT name FROM dropped_tenants", from: systemDatabase).compactMap { try? TenantID($0) })
        } catch let error as SQLiteError where error.message.contains("no such table") {
            return []
        } catch {
            logger.warning("cannot read which tenants were dropped; their files stay until the next start", metadata: ["error": "\(error)"])
            return []
        }
    }

    // MARK: - Events (event loop)

    func tick() {
        guard fatal == nil, !promoting else { return }
        interpret(core.onTick(now: monotonicNowMs()))
    }

    func connected(_ id: ConnectionID, channel: any Channel, peer: ApiaryReplication.PeerIdentity) {
        guard dialling == id else { channel.close(promise: nil); return } // given up on already
        dialling = nil
        guard fatal == nil, !promoting else { channel.close(promise: nil); return }
        channels[id] = channel
        logger.info("connected to primary", metadata: ["primary": "\(peer.nodeID)", "connection": "\(id)"])
        interpret(core.onConnected(id, peer: peer, now: monotonicNowMs()))
    }

    func received(_ id: ConnectionID, _ message: Result<Message, DecodeError>) {
        guard channels[id] != nil, fatal == nil, !promoting else { return }
        switch message {
        case .success(let m): interpret(core.onMessage(m, from: id, now: monotonicNowMs()))
        case .failure(let e): interpret(core.onDecodeError(id, e, now: monotonicNowMs()))
        }
    }

    func disconnected(_ id: ConnectionID) {
        if dialling == id {
            dialling = nil
            guard fatal == nil, !promoting else { return }
            return interpret(core.onConnectFailed(now: monotonicNowMs()))
        }
        guard channels.forget(id) else { return }
        interpret(core.onDisconnected(id, now: monotonicNowMs()))
    }

    // MARK: - Actions (event loop)

    /// Whether applications are sent to the primary (``isStreaming``), and a line when that
    /// changes: operators (and tests) see when a standby starts answering 503 instead.
    private func noteStreaming() {
        let now = core.streamingConnection != nil && fatal == nil && !promoting
        let was = streaming.withLock { was in defer { was = now }; return was }
        if was != now {
            logger.notice(now ? "streaming from the primary: applications are redirected to it"
                              : "not streaming from the primary: applications get 503 until it streams again")
        }
    }

    private func interpret(_ actions: [StandbyAction]) {
        loop.preconditionInEventLoop()
        defer { noteStreaming() }
        guard !promoting else { return }
        // Persists done inline, reported once this list's actions have all run, in order.
        var persisted: [(TenantID, LSN)] = []
        defer {
            for (tenantID, lsn) in persisted where fatal == nil && !promoting {
                interpret(core.onPersisted(tenantID, throughLSN: lsn, now: monotonicNowMs()))
            }
        }
        for (index, action) in actions.enumerated() {
            switch action {
            case .connect:
                connect()
            case .send(let id, let message):
                if !channels.send(message, on: id) { interpret(core.onDisconnected(id, now: monotonicNowMs())) }
            case .closeConnection(let id, let reason):
                channels.close(id, reason: reason, logger: logger)
            case .persist(let tenantID, let record):
                guard let tenant = tenantOrCreate(tenantID) else { break }
                // A burst of records (one read from the primary) is appended in order and
                // fsynced once, after its last record; the report is cumulative.
                let burstContinues: Bool = {
                    guard index + 1 < actions.count, case .persist(let next, _) = actions[index + 1] else { return false }
                    return next == tenantID
                }()
                if tenant.ioPending == 0, inlineAllowed(for: tenantID) {
                    // Nothing queued for this log, no apply pass reading it, and no other tenant
                    // syncing here lately: append here, on the replication loop, which serves
                    // only this stream and would otherwise hand the record to a queue thread and
                    // wait for it (two thread wake-ups on every commit's path). With several
                    // tenants busy, their queues sync in parallel instead of one after another.
                    do {
                        let done: Void? = try tenant.withLogIfFree { log in
                            try log.append(record)
                            if !burstContinues { try log.sync() }
                        }
                        if done != nil {
                            lastInline = (tenantID, DispatchTime.now().uptimeNanoseconds)
                            if !burstContinues { persisted.append((tenantID, record.lsn)) }
                            break
                        }
                    } catch {
                        stop(NodeError("tenant \(tenantID): \(error)"), cause: error)
                        return
                    }
                }
                tenant.persistsQueued.withLock { $0 += 1 }
                let synced = LockedValue(false)
                storage(tenantID, on: \.ioQueue) { tenant in
                    let last = tenant.persistsQueued.withLock { count -> Bool in
                        count -= 1
                        return count == 0
                    }
                    try tenant.withLog { log in
                        try log.append(record)
                        if last { try log.sync() }
                    }
                    synced.withLock { $0 = last }
                } then: {
                    if synced.withLock({ $0 }) {
                        self.interpret(self.core.onPersisted(tenantID, throughLSN: record.lsn, now: monotonicNowMs()))
                    }
                }
            case .truncateLog(let tenantID, let afterLSN):
                storage(tenantID, on: \.ioQueue) { tenant in try tenant.withLog { try $0.truncate(after: afterLSN) } } then: {}
            case .apply(let tenantID, let throughLSN, let checksum):
                // Applying is off the ack path, and each pass costs several fsyncs (intent,
                // database, applied state): passes wait `applyCoalesceMs` and take everything
                // asked for by then, so the disk sees a few passes a second, not one per record.
                guard let tenant = tenantOrCreate(tenantID) else { break }
                let schedule = tenant.applyTarget.withLock { target -> Bool in
                    if throughLSN > target.lsn { (target.lsn, target.checksum) = (throughLSN, checksum) }
                    defer { target.passScheduled = true }
                    return !target.passScheduled
                }
                guard schedule else { break }
                storage(tenantID, on: \.applyQueue, afterMs: Self.applyCoalesceMs) { tenant in
                    let target = tenant.applyTarget.withLock { target -> ApplyTarget in
                        target.passScheduled = false
                        return target
                    }
                    let after = try tenant.applyRecords(through: target.lsn)
                    // (A snapshot install or promotion may have moved the file past the target.)
                    if tenant.applied.lsn == target.lsn, after != target.checksum {
                        throw NodeError("tenant \(tenantID): checksum \(after) after applying lsn \(target.lsn), primary says \(target.checksum): replicas diverged")
                    }
                } then: {
                    // The system database may now say that tenants were dropped.
                    if tenantID == .system { self.removeDroppedTenants() }
                }
            case .beginSnapshot(let tenantID, _, _):
                storage(tenantID, on: \.applyQueue) { tenant in
                    // Empty: pages of an earlier, unfinished snapshot must not mix into this one.
                    try tenant.discardSnapshotScratch()
                    _ = try DatabaseFile.Writer(path: tenant.scratchPath) // creates it
                } then: {}
            case .writeSnapshotPages(let tenantID, let pages):
                // Backpressure: stop reading from the primary while snapshot writes lag, so the
                // queue of chunks (~1 MiB each) stays bounded (invariant 8).
                snapshotChunksQueued += 1
                if snapshotChunksQueued == Self.snapshotChunksQueuedMax { setReading(false) }
                storage(tenantID, on: \.applyQueue) { tenant in try DatabaseFile.Writer(path: tenant.scratchPath).write(pages, dbSizePages: nil) } then: {
                    self.snapshotChunksQueued -= 1
                    if self.snapshotChunksQueued == Self.snapshotChunksQueuedMax / 2 { self.setReading(true) }
                }
            case .installSnapshot(let tenantID, let lsn, let dbSizePages, let checksum):
                installSnapshot(tenantID, lsn: lsn, dbSizePages: dbSizePages, checksum: checksum)
            case .abandonSnapshot(let tenantID):
                storage(tenantID, on: \.applyQueue) { tenant in try tenant.discardSnapshotScratch() } then: {}
            case .epochStale(let newer):
                // A peer's word never moves this node's epoch (NodeState.adopting): only the
                // monitor's or an operator's does. The core has closed the connection; it dials
                // again and is refused again until then, so say it once per epoch.
                if refusedEpoch != newer {
                    refusedEpoch = newer
                    logger.warning("the primary claims epoch \(newer), newer than this node's \(core.epoch); not following it without the monitor's word")
                }
            }
        }
    }

    private func connect() {
        let id = ids.make()
        dialling = id
        ClusterTransport.connect(host: primaryHost, port: primaryPort, group: group, credentials: credentials, id: id,
                                 events: self, driverLoop: loop, timeoutMs: core.config.peerTimeoutMs)
            .whenComplete { result in
                self.loop.execute {
                    guard case .failure = result, self.dialling == id else { return }
                    self.dialling = nil
                    guard self.fatal == nil, !self.promoting else { return }
                    self.interpret(self.core.onConnectFailed(now: monotonicNowMs()))
                }
            }
    }

    private func installSnapshot(_ tenantID: TenantID, lsn: LSN, dbSizePages: UInt32, checksum: UInt64) {
        guard let tenant = tenantOrCreate(tenantID) else { return }
        let epoch = core.epoch
        // Both queues wait for the install: database work before it finishes first, and log
        // appends after it (records past the snapshot) come after the log's reset.
        tenant.ioPending += 1
        tenant.ioQueue.async { tenant.applyQueue.sync {
            defer { self.loop.execute { tenant.ioPending -= 1 } }
            guard !tenant.removed.withLock({ $0 }) else { return }
            do {
                try DatabaseFile.writePages([], dbSizePages: dbSizePages, to: tenant.scratchPath) // cut to size, fsync
                let hashes = try DatabaseFile.pageHashes(of: tenant.scratchPath)
                guard hashes.checksum == checksum else {
                    try tenant.discardSnapshotScratch()
                    self.loop.execute { self.interpret(self.core.onSnapshotFailed(tenantID, now: monotonicNowMs())) }
                    return
                }
                TestExitPoint.reached(.snapshotScratchVerified, tenant: tenantID, lsn: lsn)
                // From here the install only moves forward, after a crash too (SnapshotInstall.swift).
                let marker = SnapshotInstallMarker(epoch: epoch, lsn: lsn, checksum: checksum)
                try marker.write(to: tenant.installMarkerPath)
                TestExitPoint.reached(.snapshotMarkerWritten, tenant: tenantID, lsn: lsn)
                try tenant.completeSnapshotInstall(marker, verified: hashes)
                // Applies asked for before belong to the replaced history.
                tenant.applyTarget.withLock { $0.lsn = lsn; $0.checksum = checksum }
                self.logger.notice("installed a snapshot", metadata: ["tenant": "\(tenantID)", "lsn": "\(lsn)", "pages": "\(dbSizePages)"])
                self.loop.execute {
                    self.interpret(self.core.onSnapshotInstalled(tenantID, lsn: lsn, now: monotonicNowMs()))
                    if tenantID == .system { self.removeDroppedTenants() }
                }
            } catch {
                self.loop.execute { self.stop(NodeError("tenant \(tenantID): installing a snapshot failed: \(error)"), cause: error) }
            }
        } }
    }

    /// Runs a storage action on the tenant's queue, then `then` on the event loop. A storage
    /// failure stops replication: acking or applying past it could break invariants 1 or 6.
    private func storage(_ tenantID: TenantID, on queue: KeyPath<StandbyTenant, DispatchQueue>, afterMs delayMs: Int = 0,
                         _ work: @escaping (StandbyTenant) throws -> Void, then: @escaping () -> Void) {
        guard let tenant = tenantOrCreate(tenantID) else { return }
        let counted = queue == \StandbyTenant.ioQueue
        if counted { tenant.ioPending += 1 }
        let run = {
            guard !tenant.removed.withLock({ $0 }) else {
                // Skipped, but what follows the work still happens (a snapshot chunk's count
                // comes down; the core ignores what concerns a removed tenant).
                self.loop.execute {
                    if counted { tenant.ioPending -= 1 }
                    if self.fatal == nil { then() }
                }
                return
            }
            do {
                try work(tenant)
                self.loop.execute {
                    if counted { tenant.ioPending -= 1 }
                    if self.fatal == nil { then() }
                }
            } catch {
                self.loop.execute {
                    if counted { tenant.ioPending -= 1 }
                    self.stop(NodeError("tenant \(tenantID): \(error)"), cause: error)
                }
            }
        }
        if delayMs > 0 {
            tenant[keyPath: queue].asyncAfter(deadline: .now() + .milliseconds(delayMs), execute: run)
        } else {
            tenant[keyPath: queue].async(execute: run)
        }
    }

    /// How long an apply pass waits for more records to fold in.
    static let applyCoalesceMs = 50

    /// Reads which tenants the system database (as applied) says were dropped, and deletes those
    /// this node still holds. On the loop; the read runs on the system tenant's apply queue,
    /// where nothing else writes its database meanwhile.
    private func removeDroppedTenants() {
        guard let system = tenants[.system], fatal == nil, !promoting else { return }
        let (path, logger) = (system.databasePath, self.logger)
        system.applyQueue.async {
            let dropped = Self.droppedTenants(in: path, logger: logger)
            guard !dropped.isEmpty else { return }
            self.loop.execute { for id in dropped.sorted() { self.remove(droppedTenant: id) } }
        }
    }

    /// The core forgets the tenant, its queued storage work is skipped, and its files go once
    /// the work under way on its queues is done. (A promotion meanwhile: the new primary
    /// deletes what is left before it serves.)
    private func remove(droppedTenant id: TenantID) {
        guard fatal == nil, !promoting, id != .system else { return }
        // Told for every dropped name, held or not: what still comes for it is ignored, never
        // made into a tenant again.
        interpret(core.onTenantRemoved(id, now: monotonicNowMs()))
        guard let tenant = tenants.removeValue(forKey: id) else { return }
        tenant.removed.withLock { $0 = true }
        beingRemoved.append(tenant)
        let (layout, logger) = (self.layout, self.logger)
        tenant.ioQueue.async { tenant.applyQueue.sync {
            do {
                try PrimaryNode.removeTenantFiles(id, layout: layout)
                logger.notice("tenant dropped: its files are deleted on this node", metadata: ["tenant": "\(id)"])
            } catch {
                logger.error("a dropped tenant's files could not be deleted; they stay until the next start", metadata: ["tenant": "\(id)", "error": "\(error)"])
            }
            self.loop.execute { self.beingRemoved.removeAll { $0 === tenant } }
        } }
    }

    private func tenantOrCreate(_ id: TenantID) -> StandbyTenant? {
        if let t = tenants[id] { return t }
        do {
            let t = try StandbyTenant(id: id, layout: layout, logOptions: logOptions, logger: logger)
            tenants[id] = t
            return t
        } catch {
            stop(NodeError("tenant \(id): cannot create its storage: \(error)"), cause: error)
            return nil
        }
    }

    /// Stops replicating for good (this process): what failed may have left the in-memory
    /// state unlike the files. A full disk is the one cause that goes away by itself: the log
    /// and the applied state on disk are as they were before the failed write, so the node
    /// starts again from them once there is room (``onStoppedForFullDisk``).
    private func stop(_ error: NodeError, cause: (any Error)? = nil) {
        guard fatal == nil else { return }
        fatal = error
        noteStreaming()
        logger.critical("standby stopped replicating", metadata: ["error": "\(error)"])
        channels.closeAll()
        if let cause, Self.isDiskFull(cause) || DiskSpace.isFull(layout.root) { onStoppedForFullDisk?() }
    }

    static func isDiskFull(_ error: any Error) -> Bool {
        if let e = error as? LogError { return e.code == .diskFull }
        if let e = error as? StorageError { return e.code == .diskFull || (e.cause.map(isDiskFull) ?? false) }
        return false
    }

    // MARK: - Promotion

    /// Stops replicating, waits out the lease this standby granted (so the old primary has
    /// stopped committing, DESIGN §6), and applies every record it holds — including those the
    /// old primary had not yet told it were committed: they may have been acknowledged.
    /// - Returns: the epoch the node was in.
    /// Why this standby must not be promoted, or nil. A standby that refused a newer epoch
    /// from its primary would become primary of an epoch that already has one (invariant 3).
    /// - Parameter target: the epoch the monitor promotes it into (nil: the next one).
    func promotionRefusal(into target: Epoch?) async -> String? {
        do {
            return try await loop.submit { () -> String? in
                if let fatal = self.fatal { return "this standby stopped replicating: \(fatal)" }
                if let refused = self.refusedEpoch, refused >= target ?? self.core.epoch.next {
                    return "its primary is in epoch \(refused), newer than this standby's \(self.core.epoch): promoting it would make a second primary of that epoch"
                }
                return nil
            }.get()
        } catch {
            return "this standby does not answer"
        }
    }

    /// - Parameter waitForLease: false only for a switchover's hand-over, when the monitor knows
    ///   the former primary drained (it uses no lease from then on).
    func stopForPromotion(waitForLease: Bool = true) async throws -> Epoch {
        let (epoch, tenants) = try await loop.submit { () -> (Epoch, [StandbyTenant]) in
            if let fatal = self.fatal { throw fatal }
            self.promoting = true
            self.channels.closeAll()
            return (self.core.epoch, Array(self.tenants.values))
        }.get()
        // Dropped tenants' files being deleted are gone before the new primary looks.
        for tenant in try await loop.submit({ self.beingRemoved }).get() {
            try await BlockingPool.writers.run { tenant.ioQueue.sync { tenant.applyQueue.sync {} } }
        }
        // The core says how long the lease still binds; nothing grants a new one meanwhile.
        while waitForLease {
            let waitMs = try await loop.submit { self.core.promotionWaitMs(now: monotonicNowMs()) }.get()
            if waitMs == 0 { break }
            try await Task.sleep(for: .milliseconds(waitMs))
        }
        for tenant in tenants {
            try await BlockingPool.writers.run {
                tenant.ioQueue.sync {} // appends in flight finish first
                try tenant.applyQueue.sync {
                    // Durable first: applying reads records still in memory too.
                    let last = try tenant.withLog { log -> LSN in
                        try log.sync()
                        return log.last.lsn
                    }
                    try tenant.applyRecords(through: last)
                    tenant.withLog { $0.close() } // the primary's shell opens it next
                }
            }
        }
        return epoch
    }

    // MARK: - Status

    func status() async -> [TenantStatus] {
        (try? await loop.submit {
            self.tenants.values.map { t in
                // The file's durable state, not the core's (it counts an apply once asked for).
                let s = self.core.status(of: t.id)
                let applied = t.published.withLock { $0 }
                return TenantStatus(tenant: t.id.rawValue, epoch: self.core.epoch.rawValue, lsn: s?.persistedLSN ?? 0,
                                    checksum: applied.checksum, appliedLSN: applied.lsn, standbyAckedLSN: nil)
            }
        }.get()) ?? []
    }

    // MARK: - The keeper's

    /// The monitor's newer epoch: the stream of the older one ends (its primary is stale) and
    /// the next hello carries this one. The caller has recorded it durably.
    func adoptEpoch(_ epoch: Epoch) async throws {
        try await loop.submit {
            if let refused = self.refusedEpoch, refused <= epoch { self.refusedEpoch = nil }
            self.interpret(self.core.onEpochChanged(epoch, now: monotonicNowMs()))
        }.get()
    }

    /// For the monitor: per tenant the last lsn durable in the log; whether the primary's
    /// stream is up (false confirms that this standby lost it).
    func keeperFigures() async -> (tenants: [TenantID: TenantReport], streaming: Bool) {
        (try? await loop.submit {
            var tenants: [TenantID: TenantReport] = [:]
            for id in self.core.tenantIDs {
                guard let s = self.core.status(of: id) else { continue }
                tenants[id] = TenantReport(lsn: s.persistedLSN)
            }
            return (tenants, self.fatal == nil && !self.promoting && self.core.streamingConnection != nil)
        }.get()) ?? ([:], false)
    }

    var epoch: Epoch { get async { (try? await loop.submit { self.core.epoch }.get()) ?? .zero } }

    var fatalError: NodeError? { get async { try? await loop.submit { self.fatal }.get() ?? nil } }
}
