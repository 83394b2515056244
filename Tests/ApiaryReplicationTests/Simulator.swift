import ApiaryCore
import ApiaryReplication
import SimulationSupport

// A deterministic simulator for the replication cores (CONVENTIONS "Deterministic simulation").
//
// It runs the REAL `PrimaryReplication` and `StandbyReplication` with a simulated clock, a
// simulated network (TCP-like: in order within a connection; loss means the connection is
// reset; a partition stalls every byte until it heals; a closed side drops what arrives),
// simulated disks (what is fsynced survives a crash, the rest may not) and databases (page
// maps with `PageHashes`), and a tiny "monitor" that owns the epoch and the mode. Everything
// comes from one seed. The shell code here is also a reference for the real shells: every
// action is interpreted in an exhaustive switch.

// MARK: - Parameters ("swarm": each run draws its own)

struct FaultPlan: CustomStringConvertible {
    /// Mean interval between faults of each kind in the fault phase; nil = kind disabled.
    var resetMs: Int64?
    var partitionMs: Int64?
    var crashStandbyMs: Int64?
    var crashPrimaryMs: Int64?
    var epochBumpMs: Int64?
    var modeSwitchMs: Int64?
    var compactionMs: Int64?
    var staleEpochMessageMs: Int64?
    var corruptFrameMs: Int64?
    var lateMessageMs: Int64?
    /// The standby's disk is replaced by another history (an old primary rejoining).
    var foreignStandbyMs: Int64?
    /// A tenant is dropped: its writes stop, and once settled both cores forget it.
    var dropTenantMs: Int64?
    var snapshotFailChance: Double

    static let none = FaultPlan(snapshotFailChance: 0)

    var description: String {
        let kinds: [(String, Int64?)] = [
            ("reset", resetMs), ("partition", partitionMs), ("crashStandby", crashStandbyMs),
            ("crashPrimary", crashPrimaryMs), ("epochBump", epochBumpMs), ("modeSwitch", modeSwitchMs),
            ("compaction", compactionMs), ("staleEpoch", staleEpochMessageMs), ("corrupt", corruptFrameMs),
            ("late", lateMessageMs), ("foreignStandby", foreignStandbyMs), ("dropTenant", dropTenantMs),
        ]
        let on = kinds.compactMap { name, ms in ms.map { "\(name)~\($0)ms" } }
        return (on.isEmpty ? "no faults" : on.joined(separator: " ")) + " snapshotFail=\(snapshotFailChance)"
    }
}

struct SimParameters: CustomStringConvertible {
    var tenantCount = 2
    var pageSizeBytes = 32
    var dbPagesMax: UInt32 = 16
    var mode: ReplicationMode = .sync
    var config = ReplicationConfig()
    var networkDelayMs: ClosedRange<Int64> = 1...5
    var persistMs: ClosedRange<Int64> = 1...5
    var readMs: ClosedRange<Int64> = 0...3
    var tickMs: Int64 = 10
    var writeIntervalMs: ClosedRange<Int64> = 5...40
    var outstandingWritesPerTenantMax = 2
    var coalesceFsyncChance = 0.3
    var faultPhaseMs: Int64 = 2_000
    var healPhaseMs: Int64 = 1_500
    var faults = FaultPlan.none

    /// Long enough after the last write for every commit to resolve and the standby to catch up.
    var settleMs: Int64 {
        2 * config.peerTimeoutMs + config.standbyWaitMs + 2 * config.reconnectDelayMs + 1_000
    }

    static func random(_ rng: inout SimRandom) -> SimParameters {
        var p = SimParameters()
        p.tenantCount = rng.int(1...4)
        p.pageSizeBytes = rng.pick([16, 32, 64])
        p.dbPagesMax = UInt32(rng.int(2...24))
        let modeRoll = rng.int(0...9)
        p.mode = modeRoll < 7 ? .sync : (modeRoll < 9 ? .waitPrimary : .single)
        p.tickMs = rng.int64(2...20)
        let maxDelay = rng.int64(0...25)
        p.networkDelayMs = rng.int64(0...maxDelay)...maxDelay
        let maxPersist = rng.int64(0...25)
        p.persistMs = 0...maxPersist
        p.readMs = 0...rng.int64(0...10)
        let fastestWrite = rng.int64(1...30)
        p.writeIntervalMs = fastestWrite...(fastestWrite + rng.int64(0...60))
        p.outstandingWritesPerTenantMax = rng.int(1...4)
        p.coalesceFsyncChance = rng.pick([0, 0.3, 0.9])

        var c = ReplicationConfig()
        c.heartbeatIntervalMs = max(2 * p.tickMs, rng.int64(10...100))
        c.peerTimeoutMs = 3 * c.heartbeatIntervalMs + 2 * maxDelay + rng.int64(20...400)
        // A commit needs a round trip and an fsync; a wait shorter than that can never succeed.
        let roundTripMs = 2 * maxDelay + maxPersist + 2 * p.tickMs
        c.standbyWaitMs = 2 * roundTripMs + rng.int64(10...600)
        c.leaseMs = rng.int64(100...2_000)
        c.reconnectDelayMs = rng.int64(0...200)
        c.inFlightRecordsMax = rng.int(1...16)
        c.pendingCommitsMax = rng.int(1...8)
        let recordBytes = 32 + 3 * (p.pageSizeBytes + 4)
        c.inFlightBytesMax = rng.int(recordBytes / 2...recordBytes * 8)
        // Now and then a record limit that some 3-page records exceed.
        c.recordBytesMax = rng.chance(0.1) ? 32 + 2 * (p.pageSizeBytes + 4) : 64 << 20
        c.tenantsMax = 100
        p.config = c

        p.faultPhaseMs = rng.int64(500...2_500)
        p.healPhaseMs = rng.int64(300...1_200)
        var f = FaultPlan.none
        func maybe(_ mean: ClosedRange<Int64>) -> Int64? { rng.chance(0.5) ? rng.int64(mean) : nil }
        f.resetMs = maybe(100...800)
        f.partitionMs = maybe(200...1_500)
        f.crashStandbyMs = maybe(200...1_500)
        f.crashPrimaryMs = maybe(300...2_000)
        f.epochBumpMs = maybe(300...2_000)
        f.modeSwitchMs = p.mode == .sync ? maybe(200...1_000) : nil
        f.compactionMs = maybe(50...500)
        f.staleEpochMessageMs = maybe(100...1_000)
        f.corruptFrameMs = maybe(300...2_000)
        f.lateMessageMs = maybe(100...800)
        f.foreignStandbyMs = rng.chance(0.3) ? rng.int64(500...3_000) : nil
        f.snapshotFailChance = rng.pick([0, 0, 0.2])
        f.dropTenantMs = p.tenantCount >= 2 && rng.chance(0.3) ? rng.int64(200...1_500) : nil
        p.faults = f
        return p
    }

    var description: String {
        """
        tenants=\(tenantCount) pageSize=\(pageSizeBytes) dbPagesMax=\(dbPagesMax) mode=\(mode) tick=\(tickMs) \
        net=\(networkDelayMs) persist=\(persistMs) read=\(readMs) writes=\(writeIntervalMs)x\(outstandingWritesPerTenantMax) \
        coalesce=\(coalesceFsyncChance) phases=\(faultPhaseMs)/\(healPhaseMs)/\(settleMs) \
        config(hb=\(config.heartbeatIntervalMs) timeout=\(config.peerTimeoutMs) wait=\(config.standbyWaitMs) \
        lease=\(config.leaseMs) reconnect=\(config.reconnectDelayMs) inFlight=\(config.inFlightRecordsMax)/\(config.inFlightBytesMax)B \
        pending=\(config.pendingCommitsMax) recordMax=\(config.recordBytesMax)B) faults(\(faults))
        """
    }
}

/// A broken invariant or a stuck run: the simulation stops at the first one.
struct SimViolation: Error, CustomStringConvertible {
    let time: Int64
    let message: String
    var description: String { "t=\(time)ms: \(message)" }
}

// MARK: - Event queue

/// Events ordered by (time, insertion order): the same seed always runs the same schedule.
struct EventQueue {
    private var heap: [(time: Int64, seq: UInt64, run: () -> Void)] = []
    private var seq: UInt64 = 0

    var isEmpty: Bool { heap.isEmpty }
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

/// The primary's durable state for one tenant. Its log is fsynced before a record reaches the
/// core, and a rollback is made durable before the lsn is reused (the shell MUST do both).
struct PrimaryDisk {
    var log: [Record] = []
    var firstLSN: LSN = 1
    var baseChecksum: UInt64 = 0
    /// The database after the last record, including records whose commit is pending.
    var db = SimDatabase()
    /// The database before each pending record, to roll back to.
    var undo: [LSN: SimDatabase] = [:]

    var lastLSN: LSN { firstLSN + LSN(log.count) - 1 }

    func record(_ lsn: LSN) -> Record? {
        guard lsn >= firstLSN, lsn <= lastLSN else { return nil }
        return log[Int(lsn - firstLSN)]
    }
}

enum StandbyDiskOp {
    case persist(Record)
    case truncate(after: LSN)
    case apply(through: LSN, checksum: UInt64)
    case beginSnapshot(lsn: LSN, sizePages: UInt32)
    case writeSnapshotPages([Page])
    case installSnapshot(lsn: LSN, sizePages: UInt32, checksum: UInt64)
    case abandonSnapshot
}

/// The standby's state for one tenant: a log whose fsynced part survives crashes, a
/// database (applies are atomic and durable), and one serial queue of storage operations.
final class StandbyDisk {
    /// The log holds records `base + 1 ...` (`base` is the last snapshot's lsn).
    var base: LSN = 0
    var current: [Record] = []
    var durable: [Record] = []
    /// `current[..<syncedPrefix]` equals `durable[..<syncedPrefix]`.
    var syncedPrefix = 0
    var db = SimDatabase()
    var appliedLSN: LSN = 0
    var queue: [StandbyDiskOp] = []
    var busy = false
    var scratch: (lsn: LSN, sizePages: UInt32, pages: [Page])?

    var lastLSN: LSN { base + LSN(current.count) }

    func currentRecord(_ lsn: LSN) -> Record? {
        guard lsn > base, lsn <= lastLSN else { return nil }
        return current[Int(lsn - base - 1)]
    }

    func durableRecord(_ lsn: LSN) -> Record? {
        guard lsn > base, lsn <= base + LSN(durable.count) else { return nil }
        return durable[Int(lsn - base - 1)]
    }

    func isDurable(_ lsn: LSN) -> Bool { lsn > base && Int(lsn - base) <= syncedPrefix }

    func fsync() {
        durable.removeSubrange(syncedPrefix...)
        durable.append(contentsOf: current[syncedPrefix...])
        syncedPrefix = current.count
    }

    func crash() {
        current = durable
        syncedPrefix = durable.count
        queue = []
        busy = false
        scratch = nil
    }
}

// MARK: - Network

enum SimPayload {
    case frame([UInt8])
    case fin
}

final class SimConnection {
    let id: UInt64
    var primaryOpen = true
    var standbyOpen = true
    var toStandby: [(readyAt: Int64, payload: SimPayload)] = []
    var toPrimary: [(readyAt: Int64, payload: SimPayload)] = []
    var lastReadyToStandby: Int64 = 0
    var lastReadyToPrimary: Int64 = 0

    init(id: UInt64) { self.id = id }
}

// MARK: - Nodes

final class SimPrimary {
    var core: PrimaryReplication?
    var up = true
    /// Bumped at every crash and re-promotion, so that I/O of an old core is dropped.
    var incarnation = 0
    var disks: [PrimaryDisk]
    init(tenantCount: Int) { disks = Array(repeating: PrimaryDisk(), count: tenantCount) }
}

final class SimStandby {
    var core: StandbyReplication?
    var up = true
    var incarnation = 0
    /// The epoch the standby's shell persisted when the monitor confirmed it.
    var durableEpoch: Epoch
    var disks: [TenantID: StandbyDisk] = [:]
    init(epoch: Epoch) { durableEpoch = epoch }

    func disk(_ tenant: TenantID) -> StandbyDisk {
        if let d = disks[tenant] { return d }
        let d = StandbyDisk()
        disks[tenant] = d
        return d
    }
}

struct ClientWrite {
    var tenantIndex: Int
    var lsn: LSN
    var summary: RecordSummary
    var issuedAt: Int64
}

// MARK: - The simulation

final class Simulation {
    let seed: UInt64
    var rng: SimRandom
    let params: SimParameters
    let tracing: Bool
    var streamingTrace = false
    private(set) var trace: [String] = []
    private(set) var stats: [String: Int] = [:]

    /// Real (simulated) time. Each node reads its own monotonic clock, offset from it.
    private(set) var now: Int64 = 0
    private let primaryClockOffset: Int64
    private let standbyClockOffset: Int64
    private var primaryNow: Int64 { now + primaryClockOffset }
    private var standbyNow: Int64 { now + standbyClockOffset }
    /// The latest real time until which any standby core promised not to be promoted.
    private var standbyPromiseRealUntil: Int64 = .min
    private var queue = EventQueue()
    private var failure: SimViolation?

    let tenantIDs: [TenantID]
    private var tenantIndex: [TenantID: Int] = [:]
    static let primaryID: NodeID = "node-a"
    static let standbyID: NodeID = "node-b"

    /// The monitor's view: the current epoch and the primary's goal mode.
    private(set) var monitorEpoch = Epoch(3)
    private(set) var mode: ReplicationMode
    private var partitionUntil: Int64 = 0
    private(set) var faultsActive = false
    private(set) var writesActive = true

    private var connections: [UInt64: SimConnection] = [:]
    private var nextConnectionID: UInt64 = 1
    /// Recently delivered messages, to replay after their connection closed ("late" faults).
    private var recentDeliveries: [(connection: UInt64, toStandby: Bool, message: Message)] = []

    let primary: SimPrimary
    let standby: SimStandby
    /// What the primary committed, per tenant: once there, an entry never changes.
    private var committed: [[LSN: RecordSummary]]
    /// Commits acknowledged in sync mode (the standby held them fsynced).
    private var syncAcked: [Set<LSN>]
    private var writes: [Int: [LSN: ClientWrite]]
    /// Tenants dropped (both cores told, the standby's later, as it learns from its system
    /// database), and those whose writes stopped for a drop that waits for them to settle.
    private var droppedTenants: Set<Int> = []
    private var droppingTenants: Set<Int> = []
    private func isGone(_ i: Int) -> Bool { droppedTenants.contains(i) || droppingTenants.contains(i) }
    /// The kind of message the primary core is handling, for statistics.
    private var primaryEvent = ""

    init(seed: UInt64, params: SimParameters? = nil, rng: SimRandom? = nil, tracing: Bool = false) {
        self.seed = seed
        var r = rng ?? SimRandom(seed: seed)
        self.params = params ?? SimParameters.random(&r)
        primaryClockOffset = r.int64(-1_000_000...1_000_000)
        standbyClockOffset = r.int64(-1_000_000...1_000_000)
        self.rng = r
        self.tracing = tracing
        self.mode = self.params.mode
        tenantIDs = (0..<self.params.tenantCount).map { try! TenantID("tenant-\($0)") }
        for (i, t) in tenantIDs.enumerated() { tenantIndex[t] = i }
        primary = SimPrimary(tenantCount: self.params.tenantCount)
        standby = SimStandby(epoch: Epoch(3))
        committed = Array(repeating: [:], count: self.params.tenantCount)
        syncAcked = Array(repeating: [], count: self.params.tenantCount)
        writes = [:]
        primary.core = makePrimaryCore()
        standby.core = makeStandbyCore()
        schedulePrimaryTick()
        scheduleStandbyTick()
    }

    // MARK: Running

    /// The whole swarm run: fault phase, heal, settle, final checks.
    func runSwarm() throws {
        faultsActive = true
        for i in tenantIDs.indices { scheduleClientWrite(i) }
        scheduleFaults()
        try run(until: params.faultPhaseMs)
        heal()
        try run(until: now + params.healPhaseMs)
        writesActive = false
        // Settle: wait for convergence, within a budget that grows with the backlog (a window
        // smaller than a record makes catch-up stop-and-wait, one round trip per record).
        let roundTripMs = 2 * params.networkDelayMs.upperBound + params.persistMs.upperBound + params.readMs.upperBound + 2 * params.tickMs + 5
        let deadline = now + roundTripMs * Int64(backlog()) + params.settleMs
        while convergenceProblem() != nil, now < deadline { try run(until: now + 20) }
        if let problem = convergenceProblem() { throw SimViolation(time: now, message: problem) }
        try probeWrites()
    }

    /// Liveness once healed and caught up: a fresh one-page write to every tenant commits
    /// within `standbyWaitMs`, and the standby applies it.
    private func probeWrites() throws {
        var probes: [(tenant: Int, lsn: LSN)] = []
        for i in tenantIDs.indices where !isGone(i) {
            let lsn = primary.disks[i].lastLSN + 1
            guard write(tenant: i, pagesMax: 1) else { throw SimViolation(time: now, message: "liveness: the primary refused a probe write") }
            probes.append((i, lsn))
        }
        let started = now
        try run(until: now + params.config.standbyWaitMs + 2 * params.tickMs + 1)
        for probe in probes where committed[probe.tenant][probe.lsn] == nil {
            throw SimViolation(time: now, message: "liveness: probe write \(tenantIDs[probe.tenant]) lsn \(probe.lsn) issued at \(started)ms did not commit")
        }
        let deadline = now + params.settleMs
        while convergenceProblem() != nil, now < deadline { try run(until: now + 20) }
        if let problem = convergenceProblem() { throw SimViolation(time: now, message: "after the probe writes: \(problem)") }
    }

    /// Records the standby has yet to apply, over all tenants.
    private func backlog() -> Int {
        tenantIDs.enumerated().filter { !isGone($0.offset) }.reduce(0) { sum, entry in
            // A foreign standby may be ahead: it then needs a snapshot, counted as one record.
            sum + max(1, Int(primary.disks[entry.offset].lastLSN) - Int(standby.disks[entry.element]?.appliedLSN ?? 0))
        }
    }

    /// Runs events up to `time`; throws the first violation.
    func run(until time: Int64) throws {
        while let next = queue.nextTime, next <= time {
            let event = queue.pop()!
            now = event.time
            event.run()
            if let failure { throw failure }
        }
        now = max(now, time)
    }

    private func fail(_ message: String) {
        if failure == nil {
            failure = SimViolation(time: now, message: message)
            log("VIOLATION: \(message)")
        }
    }

    /// Trace lines are kept (and printed as they happen when `streamingTrace` is set, so
    /// that a precondition failure inside a core still shows the history leading to it).
    func log(_ line: @autoclosure () -> String) {
        guard tracing else { return }
        let text = "t=\(now) \(line())"
        if streamingTrace { print(text) }
        trace.append(text)
        if trace.count > 4_000 { trace.removeFirst(1_000) }
    }

    private func count(_ key: String) { stats[key, default: 0] += 1 }

    private func after(_ delay: Int64, _ run: @escaping () -> Void) {
        queue.schedule(at: now + max(0, delay), run)
    }

    private func random(_ range: ClosedRange<Int64>) -> Int64 { rng.int64(range) }

    // MARK: Cores

    private func makePrimaryCore() -> PrimaryReplication {
        var logs: [TenantID: PrimaryTenantLog] = [:]
        for (i, tenant) in tenantIDs.enumerated() {
            let disk = primary.disks[i]
            guard let last = disk.record(disk.lastLSN) else { continue }
            logs[tenant] = PrimaryTenantLog(last: RecordSummary(last), firstLSN: disk.firstLSN, baseChecksum: disk.baseChecksum)
        }
        return PrimaryReplication(nodeID: Self.primaryID, epoch: monitorEpoch, mode: mode, config: params.config,
                                  standbyNodeID: Self.standbyID, tenants: logs)
    }

    private func makeStandbyCore() -> StandbyReplication {
        var logs: [TenantID: StandbyTenantLog] = [:]
        for tenant in standby.disks.keys.sorted() {
            let disk = standby.disks[tenant]!
            let tail = (disk.appliedLSN + 1...max(disk.appliedLSN + 1, disk.lastLSN)).compactMap { disk.currentRecord($0).map(RecordSummary.init) }
            logs[tenant] = StandbyTenantLog(appliedLSN: disk.appliedLSN, appliedChecksum: disk.db.checksum, tail: tail)
        }
        return StandbyReplication(nodeID: Self.standbyID, epoch: standby.durableEpoch, config: params.config, tenants: logs, now: standbyNow)
    }

    private func schedulePrimaryTick() {
        after(params.tickMs) { [unowned self] in
            if primary.up, primary.core != nil {
                // Invariant 5: in sync mode the primary would serve a strong read only while the
                // standby still promises, in real time, not to be promoted.
                if let core = primary.core, core.mode == .sync, core.holdsLease(now: primaryNow),
                   primaryNow - primaryClockOffset >= standbyPromiseRealUntil {
                    fail("invariant 5: the primary would serve a strong read at real \(primaryNow - primaryClockOffset)ms, the standby promised only until \(standbyPromiseRealUntil)ms")
                }
                handlePrimary(primary.core!.onTick(now: primaryNow))
            }
            schedulePrimaryTick()
        }
    }

    private func scheduleStandbyTick() {
        after(params.tickMs) { [unowned self] in
            if standby.up, standby.core != nil { handleStandby(standby.core!.onTick(now: standbyNow)) }
            scheduleStandbyTick()
        }
    }

    // MARK: Client writes

    private func scheduleClientWrite(_ i: Int) {
        after(random(params.writeIntervalMs)) { [unowned self] in
            guard writesActive, !isGone(i) else { return }
            _ = write(tenant: i)
            scheduleClientWrite(i)
        }
    }

    /// One client write: a record of random pages, appended (fsynced) to the primary's log
    /// and handed to the core. Returns false when the primary cannot take it now.
    @discardableResult
    func write(tenant i: Int, pagesMax: Int = 3) -> Bool {
        guard !isGone(i), primary.up, let core = primary.core, (writes[i]?.count ?? 0) < params.outstandingWritesPerTenantMax else { return false }
        var disk = primary.disks[i]
        var size = disk.db.sizePages
        if size == 0 || (size < params.dbPagesMax && rng.chance(0.3)) { size += 1 }
        if size > 2 && rng.chance(0.05) { size -= UInt32(rng.int(1...2)) }
        var pages: [Page] = []
        if size > disk.db.sizePages { pages.append(Page(number: size, bytes: rng.bytes(params.pageSizeBytes))) }
        for _ in 0..<rng.int(1...pagesMax) where pages.count < pagesMax {
            pages.append(Page(number: UInt32(rng.int(1...Int(size))), bytes: rng.bytes(params.pageSizeBytes)))
        }
        var db = disk.db
        let lsn = disk.lastLSN + 1
        let partial = Record(epoch: core.epoch, lsn: lsn, dbSizePages: size, checksum: 0, pages: pages)
        db.apply(partial)
        let record = Record(epoch: core.epoch, lsn: lsn, dbSizePages: size, checksum: db.checksum, pages: pages)
        disk.undo[lsn] = disk.db
        disk.db = db
        disk.log.append(record)
        primary.disks[i] = disk
        writes[i, default: [:]][lsn] = ClientWrite(tenantIndex: i, lsn: lsn, summary: RecordSummary(record), issuedAt: now)
        count("writes")
        log("write \(tenantIDs[i]) lsn \(lsn) \(RecordSummary(record))")
        handlePrimary(primary.core!.onLocalRecord(tenantIDs[i], record, now: primaryNow))
        return true
    }

    // MARK: Primary actions

    private func handlePrimary(_ actions: [PrimaryAction]) {
        var steppedDown = false
        for action in actions {
            log("P> \(describe(action))")
            switch action {
            case .send(let c, let message):
                if case .rewind = message { count(primaryEvent == "hello" ? "rewind.handshake" : "rewind.drained") }
                send(message, on: c.rawValue, toStandby: true)
            case .closeConnection(let c, let reason):
                count("close.primary.\(reasonKey(reason))")
                closeSide(c.rawValue, standbySide: false)
            case .readLog(let c, let request):
                count("readLog")
                let incarnation = primary.incarnation
                after(random(params.readMs)) { [unowned self] in
                    guard primary.up, primary.incarnation == incarnation, primary.core != nil else { return }
                    let disk = primary.disks[tenantIndex[request.tenant]!]
                    var records: [Record] = []
                    var bytes = 0
                    var lsn = request.fromLSN
                    while lsn <= request.throughLSN, let record = disk.record(lsn), bytes + record.byteCount <= request.bytesMax {
                        records.append(record)
                        bytes += record.byteCount
                        lsn += 1
                    }
                    if records.isEmpty, request.firstRecordMayExceed, let first = disk.record(request.fromLSN) {
                        records = [first]
                    }
                    handlePrimary(primary.core!.onLogRead(c, request: request, records: records, now: primaryNow))
                }
            case .readLogSummaries(let c, let request):
                count("readLogSummaries")
                let incarnation = primary.incarnation
                after(random(params.readMs)) { [unowned self] in
                    guard primary.up, primary.incarnation == incarnation, primary.core != nil else { return }
                    let disk = primary.disks[tenantIndex[request.tenant]!]
                    let summaries = (request.fromLSN...request.throughLSN).compactMap { disk.record($0).map(RecordSummary.init) }
                    handlePrimary(primary.core!.onLogSummaries(c, request: request, summaries: summaries, now: primaryNow))
                }
            case .sendSnapshot(let c, let request):
                count("snapshot")
                let incarnation = primary.incarnation
                after(random(params.readMs)) { [unowned self] in
                    guard primary.up, primary.incarnation == incarnation, primary.core != nil else { return }
                    if rng.chance(params.faults.snapshotFailChance) && faultsActive {
                        count("snapshot.failedToRead")
                        handlePrimary(primary.core!.onSnapshotFailed(c, request: request, now: primaryNow))
                        return
                    }
                    sendSnapshot(request, on: c)
                }
            case .commitDurable(let tenant, let lsn):
                commitDurable(tenantIndex[tenant]!, lsn)
            case .commitFailed(let tenant, let lsn, let failure):
                commitFailed(tenantIndex[tenant]!, lsn, failure)
            case .standbyDiverged:
                count("standbyDiverged")
            case .stepDown(let newer):
                count("stepDown")
                if newer > monitorEpoch { fail("primary stepped down to epoch \(newer), which the monitor never made") }
                steppedDown = true
            }
        }
        if steppedDown {
            primary.core = nil
            primary.incarnation += 1
            after(random(20...200)) { [unowned self] in repromotePrimary() }
        }
        if !actions.isEmpty { checkBounds() }
    }

    /// The primary's shell answer to `.sendSnapshot`: the database at the committed lsn.
    private func sendSnapshot(_ request: SnapshotRequest, on c: ConnectionID) {
        let i = tenantIndex[request.tenant]!
        let disk = primary.disks[i]
        // Dropped since it was asked for: the real shell's copy fails as the files go.
        guard let status = primary.core!.status(of: request.tenant) else {
            count("snapshot.ofDroppedTenant")
            return handlePrimary(primary.core!.onSnapshotFailed(c, request: request, now: primaryNow))
        }
        let lsn = status.committedLSN
        let db = disk.undo[lsn + 1] ?? disk.db
        if lsn > 0, committed[i][lsn]?.checksum != db.checksum {
            fail("snapshot of \(request.tenant) at \(lsn) has checksum \(db.checksum), committed record says \(String(describing: committed[i][lsn]))")
        }
        send(.snapshotBegin(SnapshotBegin(epoch: request.epoch, tenant: request.tenant, lsn: lsn, dbSizePages: db.sizePages)), on: c.rawValue, toStandby: true)
        let pages = db.pages.keys.sorted().map { Page(number: $0, bytes: db.pages[$0]!) }
        var start = 0
        while start < pages.count {
            let end = min(pages.count, start + 4)
            send(.snapshotPages(SnapshotPages(epoch: request.epoch, tenant: request.tenant, pages: Array(pages[start..<end]))), on: c.rawValue, toStandby: true)
            start = end
        }
        send(.snapshotEnd(SnapshotEnd(epoch: request.epoch, tenant: request.tenant, lsn: lsn, checksum: db.checksum)), on: c.rawValue, toStandby: true)
        handlePrimary(primary.core!.onSnapshotSent(c, request: request, lsn: lsn, now: primaryNow))
    }

    private func commitDurable(_ i: Int, _ lsn: LSN) {
        guard let record = primary.disks[i].record(lsn) else {
            return fail("commitDurable \(tenantIDs[i]) \(lsn) but the primary's log has no such record")
        }
        let summary = RecordSummary(record)
        recordCommitted(i, summary)
        primary.disks[i].undo[lsn] = nil
        if primary.core!.mode.waitsForStandby {
            // Invariant 1: acknowledged only once fsynced on both nodes.
            syncAcked[i].insert(lsn)
            let held = standby.disks[tenantIDs[i]]?.durableRecord(lsn).map(RecordSummary.init)
            if held != summary {
                fail("invariant 1: \(tenantIDs[i]) lsn \(lsn) acked in sync mode but the standby's fsynced log holds \(String(describing: held))")
            }
        }
        guard let write = writes[i]?.removeValue(forKey: lsn) else { return } // a record taken over at restart
        count("acked")
        checkResolvedInTime(write, "acked")
    }

    private func commitFailed(_ i: Int, _ lsn: LSN, _ failure: CommitFailure) {
        count("failed.\(failure)")
        var disk = primary.disks[i]
        if disk.lastLSN >= lsn {
            // Roll back (durably) to lsn - 1; later failures of this batch are covered.
            guard let before = disk.undo[lsn] else { return fail("commitFailed \(tenantIDs[i]) \(lsn) without an undo image") }
            disk.db = before
            disk.log.removeLast(Int(disk.lastLSN - lsn + 1))
            disk.undo = disk.undo.filter { $0.key < lsn }
            primary.disks[i] = disk
        }
        guard let write = writes[i]?.removeValue(forKey: lsn) else {
            return fail("commitFailed \(tenantIDs[i]) \(lsn) for no outstanding write")
        }
        checkResolvedInTime(write, "failed")
        switch failure {
        case .outcomeUnknown:
            break
        case .standbyUnavailable, .overloaded, .recordTooLarge, .steppedDown, .draining:
            // Invariant 9: "not committed" must be true: the standby must not hold the record
            // nor be about to receive it.
            if let holder = whereStandbyMayHold(tenantIDs[i], write.summary) {
                fail("invariant 9: \(tenantIDs[i]) lsn \(lsn) failed as \(failure) but the standby may hold it (\(holder))")
            }
        }
    }

    private func checkResolvedInTime(_ write: ClientWrite, _ outcome: String) {
        let bound = params.config.standbyWaitMs + 2 * params.tickMs + 1
        if now - write.issuedAt > bound {
            fail("invariant 8: write \(tenantIDs[write.tenantIndex]) lsn \(write.lsn) \(outcome) after \(now - write.issuedAt)ms (bound \(bound)ms)")
        }
    }

    private func recordCommitted(_ i: Int, _ summary: RecordSummary) {
        if let existing = committed[i][summary.lsn], existing != summary {
            fail("\(tenantIDs[i]) committed lsn \(summary.lsn) changed from \(existing) to \(summary)")
        }
        committed[i][summary.lsn] = summary
    }

    /// Where the standby holds or may still receive a record equal to `summary`, if anywhere.
    private func whereStandbyMayHold(_ tenant: TenantID, _ summary: RecordSummary) -> String? {
        if let disk = standby.disks[tenant] {
            if disk.currentRecord(summary.lsn).map(RecordSummary.init) == summary { return "its log" }
            if disk.durableRecord(summary.lsn).map(RecordSummary.init) == summary { return "its fsynced log" }
            for op in disk.queue {
                if case .persist(let r) = op, RecordSummary(r) == summary { return "its persist queue" }
            }
        }
        for id in connections.keys.sorted() {
            for (_, payload) in connections[id]!.toStandby {
                guard case .frame(let bytes) = payload, case .record(let m)? = try? WireCodec.decode(frame: bytes) else { continue }
                if m.tenant == tenant, RecordSummary(m.record) == summary { return "in flight on conn#\(id)" }
            }
        }
        return nil
    }

    // MARK: Standby actions

    private func handleStandby(_ actions: [StandbyAction]) {
        if let promised = standby.core?.leasePromisedUntil {
            standbyPromiseRealUntil = max(standbyPromiseRealUntil, promised - standbyClockOffset)
        }
        for action in actions {
            log("S> \(describe(action))")
            switch action {
            case .connect:
                connect()
            case .send(let c, let message):
                send(message, on: c.rawValue, toStandby: false)
            case .closeConnection(let c, let reason):
                count("close.standby.\(reasonKey(reason))")
                closeSide(c.rawValue, standbySide: true)
            case .persist(let tenant, let record):
                enqueue(tenant, .persist(record))
            case .truncateLog(let tenant, let lsn):
                enqueue(tenant, .truncate(after: lsn))
            case .apply(let tenant, let lsn, let checksum):
                enqueue(tenant, .apply(through: lsn, checksum: checksum))
            case .beginSnapshot(let tenant, let lsn, let size):
                enqueue(tenant, .beginSnapshot(lsn: lsn, sizePages: size))
            case .writeSnapshotPages(let tenant, let pages):
                enqueue(tenant, .writeSnapshotPages(pages))
            case .installSnapshot(let tenant, let lsn, let size, let checksum):
                enqueue(tenant, .installSnapshot(lsn: lsn, sizePages: size, checksum: checksum))
            case .abandonSnapshot(let tenant):
                enqueue(tenant, .abandonSnapshot)
            case .epochStale(let newer):
                count("epochStale")
                guard newer <= monitorEpoch else {
                    fail("standby saw epoch \(newer), which the monitor never made")
                    continue
                }
                // The shell asks the monitor, which confirms its own (maybe newer) epoch.
                let incarnation = standby.incarnation
                after(random(1...50)) { [unowned self] in
                    guard standby.up, standby.incarnation == incarnation, standby.core != nil else { return }
                    tellStandbyEpoch()
                }
            }
        }
        if !actions.isEmpty { checkBounds() }
    }

    private func tellStandbyEpoch() {
        standby.durableEpoch = monitorEpoch
        handleStandby(standby.core!.onEpochChanged(monitorEpoch, now: standbyNow))
    }

    // MARK: Standby storage

    private func enqueue(_ tenant: TenantID, _ op: StandbyDiskOp) {
        let disk = standby.disk(tenant)
        disk.queue.append(op)
        if !disk.busy { startNextOp(tenant) }
    }

    private func startNextOp(_ tenant: TenantID) {
        let disk = standby.disk(tenant)
        guard !disk.queue.isEmpty else {
            disk.busy = false
            return
        }
        disk.busy = true
        let duration: Int64
        switch disk.queue[0] {
        case .persist: duration = random(params.persistMs)
        case .truncate, .abandonSnapshot, .beginSnapshot, .writeSnapshotPages: duration = random(0...1)
        case .apply: duration = random(0...3)
        case .installSnapshot: duration = random(params.persistMs)
        }
        let incarnation = standby.incarnation
        after(duration) { [unowned self] in
            guard standby.up, standby.incarnation == incarnation else { return }
            finishOp(tenant)
        }
    }

    private func finishOp(_ tenant: TenantID) {
        let disk = standby.disk(tenant)
        let op = disk.queue.removeFirst()
        let i = tenantIndex[tenant]!
        switch op {
        case .persist(let first):
            // A real shell may group several appends under one fsync: acks are cumulative.
            var records = [first]
            while rng.chance(params.coalesceFsyncChance), case .persist(let next)? = disk.queue.first {
                disk.queue.removeFirst()
                records.append(next)
            }
            for record in records {
                guard record.lsn == disk.lastLSN + 1 else {
                    return fail("standby persisted \(tenant) lsn \(record.lsn) after log end \(disk.lastLSN)")
                }
                disk.current.append(record)
            }
            disk.fsync()
            count("persist")
            handleStandby(standby.core!.onPersisted(tenant, throughLSN: records.last!.lsn, now: standbyNow))
        case .truncate(let lsn):
            for discarded in (lsn + 1)...max(lsn + 1, disk.lastLSN) {
                guard let record = disk.currentRecord(discarded) else { continue }
                // No lost acks: a record committed with the standby's ack stays there.
                if syncAcked[i].contains(discarded), committed[i][discarded] == RecordSummary(record) {
                    fail("standby discarded \(tenant) lsn \(discarded), which was acked to a client in sync mode")
                }
            }
            if lsn < disk.appliedLSN { fail("standby truncated \(tenant) to \(lsn) below applied \(disk.appliedLSN)") }
            if lsn < disk.lastLSN {
                disk.current.removeSubrange(Int(lsn - disk.base)...)
                disk.syncedPrefix = min(disk.syncedPrefix, disk.current.count)
            }
        case .apply(let through, let checksum):
            for lsn in (disk.appliedLSN + 1)...max(disk.appliedLSN + 1, through) where lsn <= through {
                guard let record = disk.currentRecord(lsn), disk.isDurable(lsn) else {
                    return fail("standby applies \(tenant) lsn \(lsn) that is not fsynced in its log")
                }
                // Invariant 6: the standby applies only what the primary committed, and its
                // database then has the record's (= the primary's) checksum.
                guard committed[i][lsn] == RecordSummary(record) else {
                    return fail("invariant 6: standby applied \(tenant) \(RecordSummary(record)); the primary committed \(String(describing: committed[i][lsn]))")
                }
                disk.db.apply(record)
                disk.appliedLSN = lsn
                guard disk.db.checksum == record.checksum else {
                    return fail("invariant 6: standby database checksum \(disk.db.checksum) after \(tenant) lsn \(lsn), record says \(record.checksum)")
                }
            }
            if disk.db.checksum != checksum { fail("apply of \(tenant) through \(through): checksum \(disk.db.checksum), core expected \(checksum)") }
            count("apply")
        case .beginSnapshot(let lsn, let size):
            disk.scratch = (lsn, size, [])
        case .writeSnapshotPages(let pages):
            disk.scratch!.pages += pages
        case .installSnapshot(let lsn, let size, let checksum):
            let scratch = disk.scratch!
            disk.scratch = nil
            var db = SimDatabase()
            db.apply(Record(epoch: .zero, lsn: lsn, dbSizePages: size, checksum: 0, pages: scratch.pages))
            if db.checksum != checksum || (faultsActive && rng.chance(params.faults.snapshotFailChance)) {
                count("snapshot.installFailed")
                handleStandby(standby.core!.onSnapshotFailed(tenant, now: standbyNow))
            } else {
                if lsn > 0, committed[i][lsn]?.checksum != checksum {
                    fail("snapshot of \(tenant) at \(lsn) does not match the committed record \(String(describing: committed[i][lsn]))")
                }
                if let lost = syncAcked[i].first(where: { $0 > lsn && disk.durableRecord($0).map(RecordSummary.init) == committed[i][$0] }) {
                    fail("snapshot at \(lsn) replaced \(tenant) lsn \(lost), acked in sync mode")
                }
                disk.db = db
                disk.appliedLSN = lsn
                disk.base = lsn
                disk.current = []
                disk.durable = []
                disk.syncedPrefix = 0
                count("snapshot.installed")
                handleStandby(standby.core!.onSnapshotInstalled(tenant, lsn: lsn, now: standbyNow))
            }
        case .abandonSnapshot:
            disk.scratch = nil
        }
        startNextOp(tenant)
    }

    // MARK: Network

    private var partitioned: Bool { now < partitionUntil }

    private func connect() {
        let incarnation = standby.incarnation
        after(random(params.networkDelayMs)) { [unowned self] in
            guard standby.up, standby.incarnation == incarnation, standby.core != nil else { return }
            guard primary.up, primary.core != nil, !partitioned else {
                // Refused at once by a live host; a partition lets the attempt time out.
                after(partitioned ? random(20...200) : random(0...3)) { [unowned self] in
                    guard standby.up, standby.incarnation == incarnation, standby.core != nil else { return }
                    handleStandby(standby.core!.onConnectFailed(now: standbyNow))
                }
                return
            }
            let connection = SimConnection(id: nextConnectionID)
            nextConnectionID += 1
            connections[connection.id] = connection
            count("connections")
            log("connected conn#\(connection.id)")
            let c = ConnectionID(connection.id)
            handlePrimary(primary.core!.onConnected(c, peer: PeerIdentity(nodeID: Self.standbyID, role: .node), now: primaryNow))
            if standby.core != nil {
                handleStandby(standby.core!.onConnected(c, peer: PeerIdentity(nodeID: Self.primaryID, role: .node), now: standbyNow))
            }
        }
    }

    private func send(_ message: Message, on id: UInt64, toStandby: Bool) {
        guard let connection = connections[id], toStandby ? connection.primaryOpen : connection.standbyOpen else { return }
        enqueue(.frame(WireCodec.encodeFrame(message)), on: connection, toStandby: toStandby)
    }

    /// Appends to one direction of the stream: never before what was sent earlier (TCP order).
    private func enqueue(_ payload: SimPayload, on connection: SimConnection, toStandby: Bool) {
        var readyAt = now + random(params.networkDelayMs)
        if toStandby {
            readyAt = max(readyAt, connection.lastReadyToStandby)
            connection.lastReadyToStandby = readyAt
            connection.toStandby.append((readyAt, payload))
        } else {
            readyAt = max(readyAt, connection.lastReadyToPrimary)
            connection.lastReadyToPrimary = readyAt
            connection.toPrimary.append((readyAt, payload))
        }
        let id = connection.id
        queue.schedule(at: readyAt) { [unowned self] in deliver(id, toStandby: toStandby) }
    }

    private func deliver(_ id: UInt64, toStandby: Bool) {
        guard let connection = connections[id] else { return }
        while true {
            guard let head = toStandby ? connection.toStandby.first : connection.toPrimary.first, head.readyAt <= now else { return }
            if partitioned {
                queue.schedule(at: partitionUntil) { [unowned self] in deliver(id, toStandby: toStandby) }
                return
            }
            if toStandby { connection.toStandby.removeFirst() } else { connection.toPrimary.removeFirst() }
            switch head.payload {
            case .frame(let bytes):
                let message: Message
                do { message = try WireCodec.decode(frame: bytes) } catch {
                    return fail("a frame the codec encoded did not decode: \(error)")
                }
                if toStandby {
                    guard connection.standbyOpen, standby.up, standby.core != nil else { continue }
                    deliverToStandby(message, on: id)
                } else {
                    guard connection.primaryOpen, primary.up, primary.core != nil else { continue }
                    deliverToPrimary(message, on: id)
                }
                recentDeliveries.append((id, toStandby, message))
                if recentDeliveries.count > 16 { recentDeliveries.removeFirst() }
            case .fin:
                if toStandby, connection.standbyOpen {
                    connection.standbyOpen = false
                    if standby.up, standby.core != nil { handleStandby(standby.core!.onDisconnected(ConnectionID(id), now: standbyNow)) }
                } else if !toStandby, connection.primaryOpen {
                    connection.primaryOpen = false
                    if primary.up, primary.core != nil { handlePrimary(primary.core!.onDisconnected(ConnectionID(id), now: primaryNow)) }
                }
            }
            if failure != nil { return }
        }
    }

    private func deliverToStandby(_ message: Message, on id: UInt64) {
        log("→S \(describe(message)) on conn#\(id)")
        let epochBefore = standby.core!.epoch
        let actions = standby.core!.onMessage(message, from: ConnectionID(id), now: standbyNow)
        if message.epoch < epochBefore { checkOnlyRejects(actions.map { Effect($0) }, message, "standby") }
        handleStandby(actions)
    }

    private func deliverToPrimary(_ message: Message, on id: UInt64) {
        log("→P \(describe(message)) on conn#\(id)")
        let epochBefore = primary.core!.epoch
        primaryEvent = message.kind
        defer { primaryEvent = "" }
        let actions = primary.core!.onMessage(message, from: ConnectionID(id), now: primaryNow)
        if message.epoch < epochBefore { checkOnlyRejects(actions.map { Effect($0) }, message, "primary") }
        // Lease safety (DESIGN §6): the primary never counts on a lease for longer, in real
        // time, than a standby promised; so an old primary stops before a new one may start.
        if let until = primary.core?.leaseGrantedUntil, until - primaryClockOffset > standbyPromiseRealUntil {
            fail("lease: the primary holds a lease until real \(until - primaryClockOffset)ms, the standby promised only until \(standbyPromiseRealUntil)ms")
        }
        handlePrimary(actions)
    }

    /// Invariant 3: a message from an older epoch changes nothing but the connection.
    private func checkOnlyRejects(_ effects: [Effect], _ message: Message, _ node: String) {
        for effect in effects where effect == .other {
            fail("invariant 3: the \(node) acted on \(message.kind) of stale epoch \(message.epoch)")
        }
    }

    /// What an action does, for the invariant-3 check.
    enum Effect: Equatable {
        case rejectOrClose, other
        init(_ action: StandbyAction) {
            switch action {
            case .send(_, .reject), .closeConnection, .abandonSnapshot: self = .rejectOrClose
            case .send, .connect, .persist, .truncateLog, .apply, .beginSnapshot, .writeSnapshotPages, .installSnapshot, .epochStale: self = .other
            }
        }
        init(_ action: PrimaryAction) {
            switch action {
            case .send(_, .reject), .closeConnection: self = .rejectOrClose
            case .send, .readLog, .readLogSummaries, .sendSnapshot, .commitDurable, .commitFailed, .stepDown, .standbyDiverged: self = .other
            }
        }
    }

    /// A side closes: it drops what arrives from now on, and its FIN follows its data.
    private func closeSide(_ id: UInt64, standbySide: Bool) {
        guard let connection = connections[id] else { return }
        if standbySide {
            guard connection.standbyOpen else { return }
            connection.standbyOpen = false
            enqueue(.fin, on: connection, toStandby: false)
        } else {
            guard connection.primaryOpen else { return }
            connection.primaryOpen = false
            enqueue(.fin, on: connection, toStandby: true)
        }
        if !connection.primaryOpen && !connection.standbyOpen && connection.toStandby.isEmpty && connection.toPrimary.isEmpty {
            connections[id] = nil
        }
    }

    // MARK: Faults

    private func scheduleFaults() {
        let f = params.faults
        let kinds: [(Int64?, () -> Void)] = [
            (f.resetMs, { [unowned self] in resetConnections() }),
            (f.partitionMs, { [unowned self] in partition(for: random(20...params.config.peerTimeoutMs * 3)) }),
            (f.crashStandbyMs, { [unowned self] in crashStandby(restartAfter: random(0...800)) }),
            (f.crashPrimaryMs, { [unowned self] in crashPrimary(restartAfter: random(0...800)) }),
            (f.epochBumpMs, { [unowned self] in bumpEpoch() }),
            (f.modeSwitchMs, { [unowned self] in switchMode(mode == .sync ? .waitPrimary : .sync) }),
            (f.compactionMs, { [unowned self] in compactPrimaryLog() }),
            (f.staleEpochMessageMs, { [unowned self] in injectStaleEpochMessage() }),
            (f.corruptFrameMs, { [unowned self] in injectDecodeError() }),
            (f.lateMessageMs, { [unowned self] in replayLateMessage() }),
            (f.foreignStandbyMs, { [unowned self] in replaceStandbyWithForeignHistory() }),
            (f.dropTenantMs, { [unowned self] in dropTenant() }),
        ]
        for (mean, fault) in kinds {
            guard let mean else { continue }
            func next() {
                after(random(1...2 * mean)) { [unowned self] in
                    guard faultsActive else { return }
                    fault()
                    next()
                }
            }
            next()
        }
    }

    /// Loss: every connection is reset; each side learns it a little later.
    func resetConnections() {
        count("fault.reset")
        log("FAULT reset")
        for id in connections.keys.sorted() {
            let connection = connections[id]!
            connection.toStandby = []
            connection.toPrimary = []
            for standbySide in [false, true] {
                after(random(0...20)) { [unowned self] in
                    if standbySide, connection.standbyOpen {
                        connection.standbyOpen = false
                        if standby.up, standby.core != nil { handleStandby(standby.core!.onDisconnected(ConnectionID(id), now: standbyNow)) }
                    } else if !standbySide, connection.primaryOpen {
                        connection.primaryOpen = false
                        if primary.up, primary.core != nil { handlePrimary(primary.core!.onDisconnected(ConnectionID(id), now: primaryNow)) }
                    }
                }
            }
        }
    }

    /// Nothing crosses between the zones for `durationMs`; bytes in flight wait (TCP retransmits).
    func partition(for durationMs: Int64) {
        count("fault.partition")
        log("FAULT partition for \(durationMs)ms")
        partitionUntil = max(partitionUntil, now + durationMs)
        for id in connections.keys.sorted() {
            queue.schedule(at: partitionUntil) { [unowned self] in
                deliver(id, toStandby: true)
                deliver(id, toStandby: false)
            }
        }
    }

    /// The standby dies: what it did not fsync is lost. A process death closes its sockets
    /// (the primary sees a FIN); a machine death does not (the primary times out).
    func crashStandby(restartAfter delay: Int64) {
        guard standby.up else { return }
        count("fault.crashStandby")
        log("FAULT crash standby")
        standby.up = false
        standby.core = nil
        standby.incarnation += 1
        for disk in standby.disks.values { disk.crash() }
        let processDeath = rng.chance(0.5)
        for id in connections.keys.sorted() {
            let connection = connections[id]!
            connection.toStandby = []
            if connection.standbyOpen {
                connection.standbyOpen = false
                if processDeath { enqueue(.fin, on: connection, toStandby: false) }
            }
        }
        after(delay) { [unowned self] in restartStandby() }
    }

    func restartStandby() {
        guard !standby.up else { return }
        log("restart standby")
        standby.up = true
        standby.core = makeStandbyCore()
        // It learns of the drops again at its next apply of the system database.
        for i in droppedTenants.sorted() { after(random(0...300)) { [unowned self] in tellStandbyDropped(i) } }
    }

    /// A tenant is dropped (one at a time, one always left): its writes stop; once every write
    /// it took is settled (the node's writer stopped), the primary's core forgets it, and the
    /// standby's later, when it has applied the drop.
    func dropTenant() {
        let live = tenantIDs.indices.filter { !isGone($0) }
        guard live.count >= 2, droppingTenants.isEmpty else { return }
        let i = rng.pick(live)
        count("fault.dropTenant")
        log("FAULT drop \(tenantIDs[i])")
        droppingTenants.insert(i)
        finishDrop(i)
    }

    private func finishDrop(_ i: Int) {
        guard primary.up, let core = primary.core, core.steppedDownTo == nil, writes[i]?.isEmpty ?? true else {
            return after(params.tickMs) { [unowned self] in finishDrop(i) }
        }
        droppingTenants.remove(i)
        droppedTenants.insert(i)
        count("dropped")
        handlePrimary(primary.core!.onTenantRemoved(tenantIDs[i], now: primaryNow))
        after(random(0...300)) { [unowned self] in tellStandbyDropped(i) }
    }

    private func tellStandbyDropped(_ i: Int) {
        guard standby.up, standby.core != nil else { return } // a restart tells it again
        handleStandby(standby.core!.onTenantRemoved(tenantIDs[i], now: standbyNow))
    }

    /// The primary dies. Its log was fsynced record by record, so it restarts with every
    /// record it handed to the core; those whose commit was pending become committed (their
    /// clients lost the connection: outcome unknown).
    func crashPrimary(restartAfter delay: Int64) {
        guard primary.up else { return }
        count("fault.crashPrimary")
        log("FAULT crash primary")
        primary.up = false
        primary.core = nil
        primary.incarnation += 1
        let processDeath = rng.chance(0.5)
        for id in connections.keys.sorted() {
            let connection = connections[id]!
            connection.toPrimary = []
            if connection.primaryOpen {
                connection.primaryOpen = false
                if processDeath { enqueue(.fin, on: connection, toStandby: true) }
            }
        }
        dropOutstandingWrites()
        if rng.chance(0.3) { monitorEpoch = monitorEpoch.next }
        after(delay) { [unowned self] in restartPrimary() }
    }

    /// Clients whose writes were pending lose their connection: outcome unknown to them.
    private func dropOutstandingWrites() {
        for i in tenantIDs.indices {
            count("lost", by: writes[i]?.count ?? 0)
            writes[i] = [:]
            primary.disks[i].undo = [:]
        }
    }

    private func count(_ key: String, by n: Int) { stats[key, default: 0] += n }

    func restartPrimary() {
        guard !primary.up else { return }
        log("restart primary at epoch \(monitorEpoch)")
        primary.up = true
        startPrimaryCore()
    }

    /// The monitor (re)makes this node primary at its current epoch: the log is all committed.
    private func startPrimaryCore() {
        for i in tenantIDs.indices {
            let disk = primary.disks[i]
            for record in disk.log { recordCommitted(i, RecordSummary(record)) }
        }
        primary.incarnation += 1
        primary.core = makePrimaryCore()
        // A node that becomes primary deletes dropped tenants before a standby can connect.
        for i in droppedTenants.sorted() { handlePrimary(primary.core!.onTenantRemoved(tenantIDs[i], now: primaryNow)) }
    }

    private func repromotePrimary() {
        guard primary.up, primary.core == nil else { return }
        log("re-promote primary at epoch \(monitorEpoch)")
        startPrimaryCore()
    }

    /// The monitor raises the epoch and tells the nodes in either order.
    func bumpEpoch() {
        count("fault.epochBump")
        monitorEpoch = monitorEpoch.next
        log("FAULT epoch -> \(monitorEpoch)")
        let standbyFirst = rng.chance(0.5)
        after(standbyFirst ? 0 : random(0...300)) { [unowned self] in
            guard standby.up, standby.core != nil else { return }
            tellStandbyEpoch()
        }
        after(standbyFirst ? random(0...300) : 0) { [unowned self] in tellPrimaryEpoch() }
    }

    /// The primary is re-promoted in the new epoch: a new core; clients of pending writes
    /// lose their answers; the log is kept.
    private func tellPrimaryEpoch() {
        guard primary.up, let core = primary.core, core.epoch < monitorEpoch else { return }
        for id in connections.keys.sorted() where connections[id]!.primaryOpen { closeSide(id, standbySide: false) }
        dropOutstandingWrites()
        startPrimaryCore()
    }

    func switchMode(_ newMode: ReplicationMode) {
        count("fault.modeSwitch")
        log("mode -> \(newMode)")
        mode = newMode
        guard primary.up, primary.core != nil else { return }
        handlePrimary(primary.core!.onModeChanged(newMode, now: primaryNow))
    }

    /// The primary drops old log records (kept in its database), at most up to its committed lsn.
    func compactPrimaryLog() {
        guard primary.up, let core = primary.core else { return }
        let i = rng.int(0...(tenantIDs.count - 1))
        var disk = primary.disks[i]
        let committedLSN = core.status(of: tenantIDs[i])?.committedLSN ?? 0
        // Keep the last committed record (pending ones may be rolled back).
        let limit = min(committedLSN, disk.lastLSN)
        guard limit > disk.firstLSN else { return }
        let first = LSN(rng.int(Int(disk.firstLSN + 1)...Int(limit)))
        disk.baseChecksum = disk.record(first - 1)!.checksum
        disk.log.removeFirst(Int(first - disk.firstLSN))
        disk.firstLSN = first
        primary.disks[i] = disk
        count("fault.compaction")
        log("compact \(tenantIDs[i]) log to start at \(first)")
        handlePrimary(primary.core!.onLogCompacted(tenantIDs[i], firstLSN: first, baseChecksum: disk.baseChecksum, now: primaryNow))
    }

    /// A message from an older epoch arrives (an old primary or standby that missed the bump).
    func injectStaleEpochMessage() {
        let stale = Epoch(monitorEpoch.rawValue - 1)
        let tenant = rng.pick(tenantIDs)
        if rng.chance(0.5), standby.up, let core = standby.core, let c = core.streamingConnection {
            guard stale < core.epoch else { return }
            count("fault.staleToStandby")
            let next = (core.status(of: tenant)?.lastLSN ?? 0) + 1
            let record = Record(epoch: stale, lsn: next, dbSizePages: 1, checksum: 7, pages: [Page(number: 1, bytes: [1, 2, 3])])
            let message = rng.pick([
                Message.record(RecordMessage(epoch: stale, tenant: tenant, committedLSN: next, record: record)),
                .primaryHeartbeat(PrimaryHeartbeat(epoch: stale, sentAtMs: primaryNow, committed: [TenantCommitted(tenant: tenant, committedLSN: next)])),
                .rewind(Rewind(epoch: stale, tenant: tenant, toLSN: 0)),
                .snapshotBegin(SnapshotBegin(epoch: stale, tenant: tenant, lsn: 1, dbSizePages: 1)),
            ])
            deliverToStandby(message, on: c.rawValue)
        } else if primary.up, let core = primary.core, let c = core.standbyConnection {
            guard stale < core.epoch else { return }
            count("fault.staleToPrimary")
            let acked = core.status(of: tenant)?.standbyAckedLSN ?? 0
            let message = rng.pick([
                Message.ack(Ack(epoch: stale, tenant: tenant, lsn: acked + 1, leaseMs: 10_000)),
                .standbyHeartbeat(StandbyHeartbeat(epoch: stale, echoSentAtMs: primaryNow, leaseMs: 10_000)),
            ])
            let leaseBefore = core.leaseGrantedUntil
            deliverToPrimary(message, on: c.rawValue)
            if let after = primary.core?.leaseGrantedUntil, after != leaseBefore {
                fail("invariant 3: a stale-epoch \(message.kind) extended the primary's lease")
            }
        }
    }

    /// The standby comes back with another history in its database and log, as an old
    /// primary does after a forced failover: its applied state is not on the primary's history
    /// (so its checksum differs), and the primary must resend everything from a snapshot.
    func replaceStandbyWithForeignHistory() {
        guard standby.up else { return }
        count("fault.foreignStandby")
        // Another machine's state: what this standby acked is gone, acks under way included.
        for id in connections.keys.sorted() { connections[id]!.toPrimary = [] }
        crashStandby(restartAfter: random(0...300))
        for tenant in tenantIDs where rng.chance(0.7) {
            let disk = StandbyDisk()
            let applied = rng.int(0...8)
            let length = applied + rng.int(0...min(4, params.config.unappliedRecordsMax))
            guard length > 0 else { continue }
            var db = SimDatabase()
            for lsn in 1...LSN(length) {
                var next = db
                let page = Page(number: 1, bytes: rng.bytes(params.pageSizeBytes))
                next.apply(Record(epoch: Epoch(2), lsn: lsn, dbSizePages: 1, checksum: 0, pages: [page]))
                let record = Record(epoch: Epoch(2), lsn: lsn, dbSizePages: 1, checksum: next.checksum, pages: [page])
                disk.current.append(record)
                if lsn <= LSN(applied) { db = next }
            }
            disk.fsync()
            disk.db = db
            disk.appliedLSN = LSN(applied)
            standby.disks[tenant] = disk
        }
    }

    /// Undecodable bytes on a connection.
    func injectDecodeError() {
        count("fault.decodeError")
        if rng.chance(0.5), standby.up, let c = standby.core?.streamingConnection {
            handleStandby(standby.core!.onDecodeError(c, DecodeError("injected"), now: standbyNow))
        } else if primary.up, let c = primary.core?.standbyConnection {
            handlePrimary(primary.core!.onDecodeError(c, DecodeError("injected"), now: primaryNow))
        }
    }

    /// A message of an already closed connection reaches a core (a late event): ignored.
    func replayLateMessage() {
        guard let late = recentDeliveries.first(where: { d in
            connections[d.connection].map { d.toStandby ? !$0.standbyOpen : !$0.primaryOpen } ?? true
        }) else { return }
        count("fault.late")
        let c = ConnectionID(late.connection)
        if late.toStandby, standby.up, standby.core != nil, standby.core!.streamingConnection != c {
            let actions = standby.core!.onMessage(late.message, from: c, now: standbyNow)
            if !actions.isEmpty { fail("standby acted on a message of closed \(c): \(actions.map(describe))") }
        } else if !late.toStandby, primary.up, primary.core != nil, primary.core!.standbyConnection != c {
            let actions = primary.core!.onMessage(late.message, from: c, now: primaryNow)
            if !actions.isEmpty { fail("primary acted on a message of closed \(c): \(actions.map(describe))") }
        }
    }

    // MARK: Heal and final checks

    /// Ends the fault phase: both nodes up, the network whole, the monitor's epoch and the
    /// run's mode told to everyone.
    func heal() {
        faultsActive = false
        partitionUntil = min(partitionUntil, now)
        log("HEAL")
        restartStandby()
        restartPrimary()
        for id in connections.keys.sorted() {
            deliver(id, toStandby: true)
            deliver(id, toStandby: false)
        }
        if let core = primary.core, core.epoch < monitorEpoch { tellPrimaryEpoch() }
        if standby.core!.epoch < monitorEpoch { tellStandbyEpoch() }
        if mode != params.mode { switchMode(params.mode) }
    }

    /// Liveness: with faults gone, every write resolved and both nodes hold the same
    /// databases. Nil when converged, else what is still missing.
    func convergenceProblem() -> String? {
        for i in tenantIDs.indices where !(writes[i]?.isEmpty ?? true) {
            return "liveness: \(tenantIDs[i]) has \(writes[i]!.count) unresolved writes"
        }
        guard primary.up, let p = primary.core else { return "liveness: no primary core (stepped down and not re-promoted)" }
        guard standby.up, let s = standby.core, let c = s.streamingConnection, p.standbyConnection == c else {
            return "liveness: standby not streaming (primary has \(String(describing: p.standbyConnection)), standby \(String(describing: standby.core?.streamingConnection)))"
        }
        for (i, tenant) in tenantIDs.enumerated() where !droppedTenants.contains(i) {
            let pDisk = primary.disks[i]
            guard pDisk.lastLSN > 0 else { continue }
            guard let ps = p.status(of: tenant), ps.committedLSN == pDisk.lastLSN, ps.pendingCommits == 0 else {
                return "liveness: \(tenant): primary committed \(String(describing: p.status(of: tenant)?.committedLSN)) of \(pDisk.lastLSN)"
            }
            guard let sDisk = standby.disks[tenant], let ss = s.status(of: tenant) else { return "liveness: \(tenant) missing on the standby" }
            guard ss.appliedLSN == pDisk.lastLSN, sDisk.appliedLSN == pDisk.lastLSN, sDisk.queue.isEmpty else {
                return "liveness: \(tenant): standby applied \(ss.appliedLSN) (disk \(sDisk.appliedLSN)), primary at \(pDisk.lastLSN)"
            }
            guard sDisk.db == pDisk.db else {
                return "invariant 6: \(tenant) databases differ at lsn \(pDisk.lastLSN): \(sDisk.db.checksum) vs \(pDisk.db.checksum)"
            }
        }
        return nil
    }

    // MARK: Invariant 8

    /// Every bounded queue stays within its bound.
    private func checkBounds() {
        let c = params.config
        if let core = primary.core {
            for tenant in tenantIDs {
                guard let s = core.status(of: tenant) else { continue }
                if s.inFlightRecords > c.inFlightRecordsMax || (s.inFlightRecords > 1 && s.inFlightBytes > c.inFlightBytesMax) {
                    fail("invariant 8: \(tenant) has \(s.inFlightRecords) records / \(s.inFlightBytes) bytes in flight")
                }
                if s.pendingCommits > c.pendingCommitsMax { fail("invariant 8: \(tenant) has \(s.pendingCommits) pending commits") }
            }
        }
        if let core = standby.core {
            for tenant in tenantIDs {
                guard let s = core.status(of: tenant) else { continue }
                if s.lastLSN - s.appliedLSN > LSN(c.unappliedRecordsMax) {
                    fail("invariant 8: standby holds \(s.lastLSN - s.appliedLSN) unapplied records of \(tenant)")
                }
                // At most one persist per record in flight, one apply after each persist and a
                // truncation (a snapshot's operations are bounded by its size).
                let streamOps = standby.disks[tenant]?.queue.filter { op in
                    switch op {
                    case .persist, .apply, .truncate: return true
                    case .beginSnapshot, .writeSnapshotPages, .installSnapshot, .abandonSnapshot: return false
                    }
                }.count ?? 0
                if let disk = standby.disks[tenant], streamOps > 2 * c.inFlightRecordsMax + 2 {
                    let kinds = disk.queue.map { op -> String in
                        switch op {
                        case .persist(let r): return "persist \(r.lsn)"
                        case .truncate(let lsn): return "truncate \(lsn)"
                        case .apply(let lsn, _): return "apply \(lsn)"
                        case .beginSnapshot: return "beginSnapshot"
                        case .writeSnapshotPages: return "pages"
                        case .installSnapshot: return "install"
                        case .abandonSnapshot: return "abandon"
                        }
                    }
                    fail("invariant 8: standby storage queue of \(tenant) holds \(disk.queue.count) operations: \(kinds)")
                }
            }
        }
    }

    // MARK: Describing

    private func reasonKey(_ reason: CloseReason) -> String {
        switch reason {
        case .peerTimeout: return "peerTimeout"
        case .protocolViolation: return "protocolViolation"
        case .rejectedPeer(let code): return "rejectedPeer.\(code)"
        case .rejectedByPeer(let code, _): return "rejectedByPeer.\(code)"
        case .newerEpoch: return "newerEpoch"
        case .replacedByNewerConnection: return "replaced"
        case .steppedDown: return "steppedDown"
        case .localReadFailed: return "localReadFailed"
        case .snapshotInstallFailed: return "snapshotInstallFailed"
        }
    }

    func describe(_ message: Message) -> String {
        switch message {
        case .record(let m): return "record(\(m.tenant) \(RecordSummary(m.record)) committed \(m.committedLSN) e\(m.epoch))"
        case .ack(let m): return "ack(\(m.tenant) \(m.lsn) e\(m.epoch))"
        case .hello(let m): return "hello(e\(m.epoch) \(m.tenants.map { "\($0.tenant) applied \($0.appliedLSN) last \($0.lastLSN) tail \($0.tail.count)" }))"
        case .rewind(let m): return "rewind(\(m.tenant) to \(m.toLSN))"
        case .primaryHeartbeat(let m): return "pHeartbeat(e\(m.epoch) \(m.committed.map { "\($0.tenant)=\($0.committedLSN)" }))"
        case .reject(let m): return "reject(\(m.code) e\(m.epoch): \(m.reason))"
        case .snapshotBegin(let m): return "snapshotBegin(\(m.tenant) at \(m.lsn))"
        case .snapshotEnd(let m): return "snapshotEnd(\(m.tenant) at \(m.lsn))"
        case .welcome, .standbyHeartbeat, .snapshotPages: return "\(message.kind)(e\(message.epoch))"
        }
    }

    func describe(_ action: PrimaryAction) -> String {
        switch action {
        case .send(let c, let m): return "send \(describe(m)) on \(c)"
        case .closeConnection(let c, let r): return "close \(c): \(r)"
        case .readLog(_, let r): return "readLog \(r.tenant) \(r.fromLSN)...\(r.throughLSN) ≤\(r.bytesMax)B"
        case .readLogSummaries(_, let r): return "readSummaries \(r.tenant) \(r.fromLSN)...\(r.throughLSN)"
        case .sendSnapshot(_, let r): return "sendSnapshot \(r.tenant)"
        case .commitDurable(let t, let l): return "commitDurable \(t) \(l)"
        case .commitFailed(let t, let l, let f): return "commitFailed \(t) \(l) \(f)"
        case .stepDown(let e): return "stepDown to \(e)"
        case .standbyDiverged(let d): return "standbyDiverged: \(d)"
        }
    }

    func describe(_ action: StandbyAction) -> String {
        switch action {
        case .connect: return "connect"
        case .send(let c, let m): return "send \(describe(m)) on \(c)"
        case .closeConnection(let c, let r): return "close \(c): \(r)"
        case .persist(let t, let r): return "persist \(t) \(RecordSummary(r))"
        case .truncateLog(let t, let l): return "truncate \(t) after \(l)"
        case .apply(let t, let l, _): return "apply \(t) through \(l)"
        case .beginSnapshot(let t, let l, _): return "beginSnapshot \(t) at \(l)"
        case .writeSnapshotPages(let t, let p): return "writeSnapshotPages \(t) \(p.count)"
        case .installSnapshot(let t, let l, _, _): return "installSnapshot \(t) at \(l)"
        case .abandonSnapshot(let t): return "abandonSnapshot \(t)"
        case .epochStale(let e): return "epochStale \(e)"
        }
    }
}
