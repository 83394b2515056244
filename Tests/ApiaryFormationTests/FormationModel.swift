import ApiaryCore
import ApiaryKeeper
import ApiaryMonitor
import ApiaryReplication
import SimulationSupport

// The pieces of the formation simulator that hold no protocol: parameters, the event queue,
// clocks that drift, databases and disks. `FormationSimulator.swift` puts the real cores on
// top of them (the same ideas as Tests/ApiaryReplicationTests/Simulator.swift, adapted: there
// the monitor was a stub; here it is the real `MonitorCore` and the nodes run `KeeperCore`).

// MARK: - Parameters ("swarm": each run draws its own)

/// How often each fault happens in the fault phase; nil: never in this run.
struct FormationFaultPlan: CustomStringConvertible {
    /// A node process or machine dies, and restarts after a while.
    var nodeCrashMs: Int64?
    /// Of node crashes, the share that are machine deaths: what was not fsynced is lost.
    var loseUnsyncedChance = 0.5
    var monitorCrashMs: Int64?
    /// After a monitor's persist, the chance that it dies before it answers.
    var monitorDiesAfterPersistChance = 0.0
    /// A process stops (GC pause, SIGSTOP, a VM migration) while its clock keeps running.
    var pauseMs: Int64?
    /// Partitions of every shape, each healing after a while.
    var partitionMs: Int64?
    /// Replication connections reset (loss on a TCP stream means the stream breaks).
    var resetMs: Int64?
    var heartbeatDropChance = 0.0
    var heartbeatDuplicateChance = 0.0
    /// Heartbeats and answers held up (up to ~1 s, the keeper's request timeout): reordered.
    var heartbeatLateChance = 0.0
    /// Operator commands: switchover, failover drill, maintenance, promote (forced or not).
    var operatorMs: Int64?
    var forcedPromotionChance = 0.0
    var snapshotFailChance = 0.0

    var description: String {
        let kinds: [(String, Int64?)] = [
            ("nodeCrash", nodeCrashMs), ("monitorCrash", monitorCrashMs), ("pause", pauseMs), ("partition", partitionMs),
            ("reset", resetMs), ("operator", operatorMs),
        ]
        let on = kinds.compactMap { name, ms in ms.map { "\(name)~\($0)ms" } }
        return (on.isEmpty ? "no timed faults" : on.joined(separator: " "))
            + " loseUnsynced=\(loseUnsyncedChance) monitorDiesAfterPersist=\(monitorDiesAfterPersistChance)"
            + " heartbeat(drop=\(heartbeatDropChance) dup=\(heartbeatDuplicateChance) late=\(heartbeatLateChance))"
            + " forced=\(forcedPromotionChance) snapshotFail=\(snapshotFailChance)"
    }
}

struct FormationParameters: CustomStringConvertible {
    var tenantCount = 2
    var pageSizeBytes = 16
    var dbPagesMax: UInt32 = 8
    var replication = ReplicationConfig()
    var monitor = MonitorConfig()
    /// The keeper's heartbeat interval (the real default: 100 ms).
    var keeperIntervalMs: Int64 = 100
    /// How often each replication core ticks (at most half its heartbeat interval).
    var replicationTickMs: Int64 = 25
    var monitorTickMs: Int64 = 100
    /// One way, on the replication connection between the zones.
    var linkDelayMs: ClosedRange<Int64> = 1...4
    /// One way, between a node and the monitor.
    var heartbeatDelayMs: ClosedRange<Int64> = 1...8
    /// An fsync, or a step that writes the node's state file.
    var persistMs: ClosedRange<Int64> = 0...4
    var readMs: ClosedRange<Int64> = 0...2
    /// Between a tenant's writes (one at a time per tenant: one writer thread per tenant).
    var writeIntervalMs: ClosedRange<Int64> = 10...60
    /// Each clock's rate is within 1 ± this of real time.
    var clockRateDeviation: Double = 0
    /// The primary keeps its log only from its last committed record (as the real one does),
    /// else it keeps everything.
    var primaryLogRetention = false
    /// How the primary's shell orders a commit. `true` is what `PrimaryNode.commit` does today:
    /// the record goes to the core while the local log's fsync runs. The core's contract
    /// (`PrimaryReplication.onLocalRecord`) asks for the record only after the local fsync, and
    /// the real order breaks invariants 4 and 6 when the primary's machine dies before that
    /// fsync (see `FormationScenarioTests.testKnownBugRecordHandedToTheCoreBeforeItsLocalFsync`).
    /// The swarm follows the contract unless `APIARY_FORMATION_REAL_COMMIT_ORDER=1`.
    var recordBeforeLocalFsync = true
    /// With `recordBeforeLocalFsync`: the shell reports the fsync to the core
    /// (`onLocalSynced`), as `PrimaryNode` does; false replays known bug A.
    var reportLocalSync = true
    var faultPhaseMs: Int64 = 3_000
    var healPhaseMs: Int64 = 600
    var convergeMs: Int64 = 15_000
    var faults = FormationFaultPlan()

    /// The drift the lease margin covers (docs/monitor.md, DESIGN §6): the primary counts a
    /// lease `L` from when it sent what earned it; the standby promises `L` from when it
    /// answered and waits `L + M` before it commits. Safe while the standby's clock runs at
    /// most `(L + M) / L` times as fast as the primary's: rates within `1 ± M / (2L + M)`.
    var clockRateDeviationBound: Double {
        Double(replication.leaseDriftMarginMs) / Double(2 * replication.leaseMs + replication.leaseDriftMarginMs)
    }

    /// Defaults for scenario tests: the real timers, shortened where a test would wait for them.
    static var scenario: FormationParameters {
        var p = FormationParameters()
        p.replication.heartbeatIntervalMs = 50
        p.replication.peerTimeoutMs = 400
        p.replication.leaseMs = 300
        p.replication.leaseDriftMarginMs = 60
        p.replication.standbyWaitMs = 600
        p.replication.reconnectDelayMs = 50
        p.monitor.primaryTimeoutMs = 400
        p.monitor.standbyTimeoutMs = 400
        p.monitor.startupGraceMs = 1_000
        p.monitor.switchoverTimeoutMs = 3_000
        return p
    }

    static func random(_ rng: inout SimRandom) -> FormationParameters {
        var p = FormationParameters()
        p.tenantCount = rng.int(1...3)
        p.pageSizeBytes = rng.pick([8, 16, 32])
        p.dbPagesMax = UInt32(rng.int(2...12))
        var c = ReplicationConfig()
        c.heartbeatIntervalMs = rng.pick([40, 50, 100])
        p.replicationTickMs = rng.int64(10...(c.heartbeatIntervalMs / 2))
        let maxLink = rng.int64(1...12)
        p.linkDelayMs = rng.int64(0...maxLink)...maxLink
        let maxPersist = rng.int64(0...12)
        p.persistMs = 0...maxPersist
        p.readMs = 0...rng.int64(0...4)
        c.peerTimeoutMs = 3 * c.heartbeatIntervalMs + 2 * maxLink + rng.int64(50...400)
        let roundTripMs = 2 * maxLink + maxPersist + 2 * p.replicationTickMs
        c.standbyWaitMs = 2 * roundTripMs + rng.int64(100...800)
        c.leaseMs = rng.int64(150...600)
        c.leaseDriftMarginMs = max(20, c.leaseMs * rng.int64(10...35) / 100)
        c.reconnectDelayMs = rng.int64(10...200)
        c.inFlightRecordsMax = rng.int(1...16)
        c.pendingCommitsMax = rng.int(1...8)
        c.tenantsMax = 100
        p.replication = c

        var m = MonitorConfig()
        m.primaryTimeoutMs = rng.int64(250...700)
        m.standbyTimeoutMs = rng.int64(250...700)
        m.startupGraceMs = rng.int64(300...1_500)
        m.catchUpLagMax = LSN(rng.int(0...8))
        m.switchoverTimeoutMs = rng.int64(1_000...4_000)
        m.lsnPersistIntervalMs = rng.int64(0...1_000)
        p.monitor = m
        p.keeperIntervalMs = rng.pick([50, 100, 100, 150])
        p.monitorTickMs = rng.pick([50, 100])
        let maxHeartbeat = rng.int64(1...20)
        p.heartbeatDelayMs = rng.int64(0...maxHeartbeat)...maxHeartbeat
        let fastestWrite = rng.int64(5...40)
        p.writeIntervalMs = fastestWrite...(fastestWrite + rng.int64(0...80))
        p.primaryLogRetention = rng.chance(0.5)
        p.clockRateDeviation = rng.chance(0.8) ? p.clockRateDeviationBound * rng.pick([0.3, 0.6, 0.9]) : 0

        p.faultPhaseMs = rng.int64(1_500...3_500)
        p.healPhaseMs = rng.int64(200...800)
        var f = FormationFaultPlan()
        func maybe(_ chance: Double, _ mean: ClosedRange<Int64>) -> Int64? { rng.chance(chance) ? rng.int64(mean) : nil }
        f.nodeCrashMs = maybe(0.6, 500...2_500)
        f.loseUnsyncedChance = rng.pick([0, 0.5, 1])
        f.monitorCrashMs = maybe(0.4, 800...3_000)
        f.monitorDiesAfterPersistChance = rng.pick([0, 0, 0.05, 0.2])
        f.pauseMs = maybe(0.4, 500...2_500)
        f.partitionMs = maybe(0.6, 400...2_000)
        f.resetMs = maybe(0.3, 300...1_500)
        f.heartbeatDropChance = rng.pick([0, 0, 0.05, 0.3])
        f.heartbeatDuplicateChance = rng.pick([0, 0, 0.05, 0.2])
        f.heartbeatLateChance = rng.pick([0, 0, 0.05, 0.2])
        f.operatorMs = maybe(0.5, 300...1_500)
        f.forcedPromotionChance = rng.pick([0, 0.1, 0.3])
        f.snapshotFailChance = rng.pick([0, 0, 0.2])
        p.faults = f
        return p
    }

    var description: String {
        let c = replication, m = monitor
        return """
            tenants=\(tenantCount) pages=\(dbPagesMax)x\(pageSizeBytes)B keeper=\(keeperIntervalMs) tick=\(replicationTickMs)/\(monitorTickMs) \
            link=\(linkDelayMs) heartbeat=\(heartbeatDelayMs) persist=\(persistMs) writes=\(writeIntervalMs) \
            drift=±\(String(format: "%.4f", clockRateDeviation)) (bound \(String(format: "%.4f", clockRateDeviationBound))) \
            retention=\(primaryLogRetention) recordBeforeLocalFsync=\(recordBeforeLocalFsync) phases=\(faultPhaseMs)/\(healPhaseMs)/\(convergeMs) \
            replication(hb=\(c.heartbeatIntervalMs) timeout=\(c.peerTimeoutMs) wait=\(c.standbyWaitMs) lease=\(c.leaseMs)+\(c.leaseDriftMarginMs) \
            reconnect=\(c.reconnectDelayMs) inFlight=\(c.inFlightRecordsMax) pending=\(c.pendingCommitsMax)) \
            monitor(primaryTimeout=\(m.primaryTimeoutMs) standbyTimeout=\(m.standbyTimeoutMs) grace=\(m.startupGraceMs) \
            catchUpLag=\(m.catchUpLagMax) switchoverTimeout=\(m.switchoverTimeoutMs)) faults(\(faults))
            """
    }
}

/// A broken invariant or a run that did not converge: the run stops at the first one.
struct FormationViolation: Error, CustomStringConvertible {
    let time: Int64
    let step: UInt64
    let message: String
    /// Set when the violation has the exact signature of a bug already found in a core or
    /// shell (``KnownBug``): still a failure, reported as such, but not a new one.
    var knownBug: KnownBug? = nil
    var description: String { "t=\(time)ms step \(step): \(message)" + (knownBug.map { " [known bug \($0.rawValue)]" } ?? "") }
}

/// Bugs this simulation found in Sources/ (not fixed here: the simulator only reports them).
enum KnownBug: String, CaseIterable {
    /// FIXED (the shell reports the fsync: `PrimaryReplication.onLocalSynced`; the record counts
    /// committed only after it). `PrimaryNode.commit` hands a record to the core before the local log's fsync; the core
    /// (in `waitPrimary`/`single` at once, in sync mode on the standby's ack) declares it
    /// committed and tells the standby, which applies it. The primary's machine dies before
    /// its fsync: the record is gone there, the lsn is reused in the same epoch with other
    /// content, and the standby's database showed a state the cluster never keeps
    /// (invariants 4 and 6).
    case recordBeforeLocalFsync = "A"
    /// FIXED (reads are gated on the monitor's confirmation, `PrimaryReplication.servesReads`).
    /// A primary that restarts counts every record of its log as committed and publishes it
    /// (`PrimaryTenantLog`: "every record in the log counts as committed"). A stale primary
    /// (a newer epoch exists) thus publishes a commit that was pending when it stopped and that
    /// no standby acknowledged, at an (lsn, epoch) the new primary holds with other content
    /// (invariants 4 and 6: weak reads on it show a state that never existed).
    case staleRestartPublishesPending = "B"
    /// FIXED (the monitor refuses it). The monitor accepted `promote NODE --force --accept-data-loss` for a demoted former primary
    /// that has not rejoined; the keeper never promotes a demoted node. The formation is left
    /// without a writer, and every further forced promotion is refused because the "writer"
    /// keeps heartbeating (liveness).
    case forcedPromotionOfDemotedNode = "C"
}

// MARK: - Event queue

/// Events ordered by (time, insertion order): the same seed always runs the same schedule.
struct FormationEventQueue {
    private var heap: [(time: Int64, seq: UInt64, run: () -> Void)] = []
    private var seq: UInt64 = 0

    var nextTime: Int64? { heap.first?.time }

    mutating func schedule(at time: Int64, _ run: @escaping () -> Void) {
        seq += 1
        heap.append((time, seq, run))
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(i, parent) else { break }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    mutating func pop() -> (time: Int64, run: () -> Void)? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < heap.count, less(l, m) { m = l }
            if r < heap.count, less(r, m) { m = r }
            if m == i { break }
            heap.swapAt(i, m)
            i = m
        }
        return (top.time, top.run)
    }

    private func less(_ a: Int, _ b: Int) -> Bool {
        heap[a].time != heap[b].time ? heap[a].time < heap[b].time : heap[a].seq < heap[b].seq
    }
}

// MARK: - Clocks

/// A machine's monotonic clock (CLOCK_BOOTTIME): it keeps running while its process is
/// stopped or restarting, at a rate slightly off real time.
struct DriftingClock {
    let offset: Int64
    let rate: Double

    func local(_ real: Int64) -> Int64 { offset + Int64((Double(real) * rate).rounded(.down)) }

    /// Real time that `ms` of this clock take (rounded up: a timer never fires early).
    func realDelay(_ ms: Int64) -> Int64 { Int64((Double(max(0, ms)) / rate).rounded(.up)) }
}

// MARK: - Databases and disks

/// A tenant database: page images by number, and their rolling checksum.
struct SimDatabase: Equatable {
    var pages: [UInt32: [UInt8]] = [:]
    var hashes = PageHashes()
    var sizePages: UInt32 = 0

    mutating func apply(_ record: Record) {
        hashes.apply(pages: record.pages, dbSizePages: record.dbSizePages)
        for page in record.pages where page.number <= record.dbSizePages { pages[page.number] = page.bytes }
        if record.dbSizePages < sizePages { pages = pages.filter { $0.key <= record.dbSizePages } }
        sizePages = record.dbSizePages
    }

    var checksum: UInt64 { hashes.checksum }
}

enum DiskOp {
    case persist(Record)
    case truncate(after: LSN)
    case apply(through: LSN, checksum: UInt64)
    case beginSnapshot(lsn: LSN, sizePages: UInt32)
    case writeSnapshotPages([Page])
    case installSnapshot(lsn: LSN, sizePages: UInt32, checksum: UInt64, epoch: Epoch)
    case abandonSnapshot
}

/// One tenant's files on a node, in either role: a log whose fsynced part survives a machine's
/// death, and a database whose applied records are durable. A primary's database holds what
/// it published (committed where its mode requires and fsynced locally); a standby's what it
/// applied.
final class TenantDisk {
    /// The log holds records after `base` (what compaction or a snapshot left behind).
    var base = RecordSummary.empty
    var current: [Record] = []
    /// What survives a machine's death: `current[..<syncedPrefix]` equals `durable[..<syncedPrefix]`,
    /// and `durable` may still hold records a truncation without fsync removed from `current`.
    var durable: [Record] = []
    var syncedPrefix = 0
    var db = SimDatabase()
    var appliedLSN: LSN = 0
    /// Which record each lsn of the database came from (checker's ghost state, not the node's):
    /// a snapshot carries its sender's.
    var history: [LSN: RecordSummary] = [:]
    var queue: [DiskOp] = []
    var busy = false
    var scratch: (lsn: LSN, sizePages: UInt32, pages: [Page], history: [LSN: RecordSummary])?

    var lastLSN: LSN { base.lsn + LSN(current.count) }
    var lastSummary: RecordSummary { current.last.map(RecordSummary.init) ?? base }
    var syncedLSN: LSN { base.lsn + LSN(syncedPrefix) }

    func record(_ lsn: LSN) -> Record? {
        guard lsn > base.lsn, lsn <= lastLSN else { return nil }
        return current[Int(lsn - base.lsn - 1)]
    }

    func durableRecord(_ lsn: LSN) -> Record? {
        guard lsn > base.lsn, lsn <= base.lsn + LSN(durable.count) else { return nil }
        return durable[Int(lsn - base.lsn - 1)]
    }

    func isSynced(_ lsn: LSN) -> Bool { lsn > base.lsn && lsn <= syncedLSN }

    func fsync() {
        durable.removeSubrange(syncedPrefix...)
        durable.append(contentsOf: current[syncedPrefix...])
        syncedPrefix = current.count
    }

    /// Discards the log after `lsn`; durably when asked (a primary's rollback MUST be).
    func truncate(after lsn: LSN, durably: Bool) {
        guard lsn < lastLSN else { return }
        precondition(lsn >= base.lsn, "truncating below the log's base")
        current.removeSubrange(Int(lsn - base.lsn)...)
        syncedPrefix = min(syncedPrefix, current.count)
        if durably { fsync() }
    }

    /// Applies the log's records through `lsn` to the database.
    func applyLog(through lsn: LSN) {
        while appliedLSN < lsn, let record = record(appliedLSN + 1) {
            db.apply(record)
            appliedLSN = record.lsn
            history[record.lsn] = RecordSummary(record)
        }
    }

    /// Drops applied records from the log, keeping those after `lsn` (they live in the database).
    func compact(through lsn: LSN) {
        guard lsn > base.lsn, let record = record(lsn) else { return }
        precondition(lsn <= appliedLSN && isSynced(lsn), "compacting a record not applied or not fsynced")
        let count = Int(lsn - base.lsn)
        current.removeFirst(count)
        durable.removeFirst(min(count, durable.count))
        syncedPrefix -= count
        base = RecordSummary(record)
    }

    /// The database as it would be after the log's last record (a primary writes on top of it).
    func databaseAtLogEnd() -> SimDatabase {
        var copy = db
        var lsn = appliedLSN + 1
        while let record = record(lsn) {
            copy.apply(record)
            lsn += 1
        }
        return copy
    }

    /// A process dies: the queue of storage work is gone. A machine's death also loses what
    /// was not fsynced; a process's does not (the page cache survives).
    func crash(loseUnsynced: Bool) {
        if loseUnsynced {
            current = durable
        } else {
            fsync()
        }
        syncedPrefix = current.count
        queue = []
        busy = false
        scratch = nil
        precondition(appliedLSN <= lastLSN, "the database (lsn \(appliedLSN)) is ahead of the durable log (last \(lastLSN))")
    }
}

// MARK: - Network

enum LinkPayload {
    case message(Message)
    case fin
}

/// One replication connection (TCP: in order; loss means it breaks). The standby dials, the
/// primary accepts; each side belongs to one process incarnation.
final class ReplicationLink {
    let id: UInt64
    let dialer: NodeID
    let listener: NodeID
    let dialerIncarnation: Int
    let listenerIncarnation: Int
    var dialerOpen = true
    var listenerOpen = true
    var toListener: [(readyAt: Int64, payload: LinkPayload)] = []
    var toDialer: [(readyAt: Int64, payload: LinkPayload)] = []
    var lastReadyToListener: Int64 = 0
    var lastReadyToDialer: Int64 = 0

    init(id: UInt64, dialer: NodeID, listener: NodeID, dialerIncarnation: Int, listenerIncarnation: Int) {
        self.id = id
        self.dialer = dialer
        self.listener = listener
        self.dialerIncarnation = dialerIncarnation
        self.listenerIncarnation = listenerIncarnation
    }
}

/// A partition: nothing goes from `from` to `to` until `until`.
struct Cut {
    var from: String
    var to: String
    var until: Int64
}

// MARK: - Processes

/// A client write in flight: one per tenant at a time (each tenant has one writer thread).
struct PendingWrite {
    var tenant: TenantID
    var lsn: LSN
    var summary: RecordSummary
    var issuedAt: Int64
    /// The core said durable (and in which mode); the local fsync is done.
    var durableMode: ReplicationMode?
    var synced = false
    /// The primary's mode when the record was handed to its core: a record committed alone
    /// (wait_primary) needs no standby, also if its local fsync completes after a switch to sync.
    var handedOverIn: ReplicationMode = .sync
    /// The primary left sync mode while it waited: it was completed alone then.
    var completedAlone = false
}

/// A database node: what its disk holds (survives), and what its process holds (does not).
final class SimNode {
    let id: NodeID
    let peer: NodeID
    let clock: DriftingClock

    // The machine and its process.
    var up = true
    var pausedUntil: Int64 = 0
    var incarnation = 0

    // Durable.
    var state: NodeState
    var disks: [TenantID: TenantDisk] = [:]

    // The process.
    var keeper: KeeperCore?
    var primary: PrimaryReplication?
    var standby: StandbyReplication?
    /// The standby stopped for a promotion: its core is inert.
    var promoting = false
    /// The newest epoch a primary claimed that this standby refused to follow.
    var refusedEpoch: Epoch?
    /// Per tenant: the highest lsn the primary core declared durable.
    var coreCommitted: [TenantID: LSN] = [:]
    /// Published by a primary that does not serve reads yet (not confirmed by the monitor).
    var hidden: [TenantID: [RecordSummary]] = [:]
    var writes: [TenantID: PendingWrite] = [:]
    /// The step the shell is carrying out (for the trace).
    var step: KeeperStep?

    init(id: NodeID, peer: NodeID, clock: DriftingClock, state: NodeState) {
        self.id = id
        self.peer = peer
        self.clock = clock
        self.state = state
    }

    func disk(_ tenant: TenantID) -> TenantDisk {
        if let d = disks[tenant] { return d }
        let d = TenantDisk()
        disks[tenant] = d
        return d
    }

    var roleDescription: String {
        if !up { return "down" }
        var text = state.description
        if let p = primary { text += p.steppedDownTo == nil ? " [primary core \(p.mode.name)\(p.draining ? ", draining" : "")]" : " [stepped down]" }
        if let s = standby { text += promoting ? " [promoting]" : " [standby core e\(s.epoch)\(s.streamingConnection != nil ? ", streaming" : "")]" }
        return text
    }
}

/// The monitor: its store survives; its core is rebuilt from it at a restart.
final class SimMonitor {
    let clock: DriftingClock
    let store: InMemoryMonitorStore
    var core: MonitorCore?
    var up = true
    var pausedUntil: Int64 = 0
    var incarnation = 0

    init(clock: DriftingClock, store: InMemoryMonitorStore) {
        self.clock = clock
        self.store = store
    }
}
