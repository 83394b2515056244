import ApiaryCore
import ApiaryKeeper
import ApiaryMonitor
import ApiaryReplication
import SimulationSupport

// A deterministic simulation of a whole formation (issue 8, DESIGN §10): the REAL `MonitorCore`,
// two nodes each running the REAL `KeeperCore` and the REAL replication core of its current
// role, over a simulated network (heartbeats and answers dropped, delayed, duplicated and
// reordered; replication connections in order, lost only by breaking; partitions of every
// shape), simulated disks (what is not fsynced is lost when a machine dies), clocks that drift
// within the bound the lease margin covers, crashes, restarts and pauses. Everything comes from
// one seed.
//
// The node's shell here does what the real one does (Sources/ApiaryNode: `NodeRoles.carryOut`,
// `promote(toEpoch:setup:)`, `PrimaryNode`, `StandbyNode`, `StandbyPreparation`, `NodeKeeper`),
// in the same order and with the state file written at the same points:
// - a primary starts in sync mode whatever its durable mode (the keeper's first answer sets it);
// - a commit's record goes to the core while the local log's fsync runs; the client hears "ok"
//   only after both, and a failed commit is rolled back durably before its client hears;
// - a core's step-down records `demoted` and restarts the process in place;
// - a promotion stops the stream, waits out the lease plus the margin, applies everything the
//   log holds, records the new role, then starts the primary;
// - a rejoin prepares each tenant as applied through its log's last record, records `standby`,
//   then streams;
// - the monitor's `persist` is applied to a store that survives its crash before any answer;
//   answers not in reply to a heartbeat are not pushed (nodes learn at their next heartbeat).
//
// After every event it checks DESIGN §9's invariants 1–6 as they apply to the cores:
// 1. an ack in sync mode finds the record fsynced on the other node;
// 2. a promotion (unless forced by an operator accepting the loss) finds every acknowledged
//    write on the promoted node, and no acknowledged lsn is ever acknowledged again differently;
// 3. at most one node commits per epoch; epochs never go back (node state files, the monitor);
// 4./5. no two nodes can commit or serve strong reads at the same instant (`holdsLease`, read
//    on each node's own drifting clock), unless a forced promotion made the newer one;
// 6. a database state at (lsn, epoch) has one checksum on every node, and each applied record
//    yields its checksum;
// and after healing, that the formation converges to a primary and a promotable secondary with
// equal databases.

enum Who {
    case a, b
    /// The node the monitor's store holds as the writer now.
    case primary
    /// The other one.
    case standby
}

/// What the monitor answers a heartbeat with.
enum MonitorAnswer {
    case assignment(Assignment)
    case refusal(String)
}

final class FormationSimulator {
    let seed: UInt64
    var rng: SimRandom
    let params: FormationParameters
    let tracing: Bool
    var streamingTrace = false
    private(set) var trace: [String] = []
    private(set) var stats: [String: Int] = [:]

    /// Real (simulated) time in ms; every machine reads its own drifting clock.
    private(set) var now: Int64 = 0
    private(set) var steps: UInt64 = 0
    private var queue = FormationEventQueue()
    private var failure: FormationViolation?

    static let a: NodeID = "node-a"
    static let b: NodeID = "node-b"
    static let monitorName = "monitor"
    let tenants: [TenantID]
    let nodeIDs: [NodeID] = [FormationSimulator.a, FormationSimulator.b]
    private(set) var nodes: [NodeID: SimNode] = [:]
    let monitor: SimMonitor

    private(set) var cuts: [Cut] = []
    private var links: [UInt64: ReplicationLink] = [:]
    private var nextLinkID: UInt64 = 1
    /// The history a snapshot carries (checker's ghost state), by receiver, tenant, lsn, checksum.
    private var snapshotHistories: [String: [LSN: RecordSummary]] = [:]
    private var writeSerial: UInt64 = 0
    private var clientGeneration = 0
    private var writeSerials: [String: UInt64] = [:]

    private(set) var faultsActive = false
    var writesActive = true
    /// After healing: an operator takes nodes out of maintenance.
    private var healing = false

    // What the checks keep.
    /// Acknowledged writes of the current lineage (a forced promotion starts a new one).
    private(set) var acked: [TenantID: [LSN: RecordSummary]] = [:]
    private var lineageFloor = Epoch(1)
    private(set) var forcedEpochs: Set<Epoch> = []
    /// Database states made visible (published by a primary, applied by a standby).
    private var visible: [TenantID: [VisibleKey: (checksum: UInt64, byStaleRestart: Bool)]] = [:]
    private var committerOfEpoch: [Epoch: NodeID] = [:]
    private var writerGoalOfEpoch: [Epoch: NodeID] = [:]
    private(set) var lastDataLoss: DataLossReport?

    private struct VisibleKey: Hashable {
        var lsn: LSN
        var epoch: Epoch
    }

    init(seed: UInt64, params: FormationParameters? = nil, tracing: Bool = false, realCommitOrder: Bool = false) {
        self.seed = seed
        var r = SimRandom(seed: seed)
        var p = params ?? FormationParameters.random(&r)
        if realCommitOrder { p.recordBeforeLocalFsync = true }
        self.params = p
        self.tracing = tracing
        func clock() -> DriftingClock {
            let deviation = p.clockRateDeviation * Double(r.int(-1_000...1_000)) / 1_000
            return DriftingClock(offset: r.int64(-1_000_000...1_000_000), rate: 1 + deviation)
        }
        tenants = (0..<p.tenantCount).map { try! TenantID("t\($0)") }
        let state = try! MonitorState.bootstrap(formation: "f1", primary: FormationNode(id: Self.a, zone: "zone-a"),
                                                standby: FormationNode(id: Self.b, zone: "zone-b"), epoch: Epoch(1))
        let store = InMemoryMonitorStore()
        try! store.create(state)
        monitor = SimMonitor(clock: clock(), store: store)
        nodes[Self.a] = SimNode(id: Self.a, peer: Self.b, clock: clock(), state: NodeState(role: .primary, epoch: Epoch(1), mode: .sync))
        nodes[Self.b] = SimNode(id: Self.b, peer: Self.a, clock: clock(), state: NodeState(role: .standby, epoch: Epoch(1), mode: .sync))
        rng = r
        writerGoalOfEpoch[Epoch(1)] = Self.a
        monitor.core = MonitorCore(state: state, config: p.monitor, now: monitor.clock.local(0))
        scheduleMonitorTick()
        for id in nodeIDs { startNode(nodes[id]!) }
        for tenant in tenants { scheduleClientWrite(tenant) }
    }

    // MARK: Running

    /// The whole seeded run: faults, heal, convergence, final checks.
    func runSwarm() throws {
        faultsActive = true
        scheduleFaults()
        try run(until: params.faultPhaseMs)
        heal()
        try run(until: now + params.healPhaseMs)
        writesActive = false
        try converge(withinMs: params.convergeMs)
    }

    /// Runs until the formation has converged (or fails naming what is missing), then checks
    /// that every acknowledged write is on both nodes.
    func converge(withinMs budget: Int64) throws {
        let deadline = now + budget
        while convergenceProblem() != nil, now < deadline { try run(until: now + 50) }
        if let problem = convergenceProblem() {
            var failure = violation("liveness: not converged \(budget) ms after healing: \(problem)")
            // Known bug C: the monitor made a demoted node the writer by force; its keeper
            // never promotes a demoted node.
            if let w = monitorState.writer, nodes[w.id]!.state.role == .demoted, forcedEpochs.contains(monitorState.epoch) {
                failure.knownBug = .forcedPromotionOfDemotedNode
            }
            throw failure
        }
        count("converged")
        let writer = nodes[monitor.store.state!.writer!.id]!
        for tenant in tenants {
            for (lsn, summary) in acked[tenant] ?? [:] {
                for node in nodes.values where !holds(node, tenant, lsn, summary) {
                    throw violation("invariant 2: acknowledged \(tenant) \(summary) is not on \(node.id) after convergence (writer \(writer.id))")
                }
            }
        }
    }

    /// Runs events up to `time`; throws the first violation.
    func run(until time: Int64) throws {
        while let next = queue.nextTime, next <= time {
            let event = queue.pop()!
            now = event.time
            steps += 1
            event.run()
            if failure == nil { checkInstant() }
            if let failure { throw failure }
        }
        now = max(now, time)
    }

    func run(ms: Int64) throws { try run(until: now + ms) }

    private func violation(_ message: String) -> FormationViolation {
        FormationViolation(time: now, step: steps, message: message)
    }

    private func fail(_ message: String, knownBug: KnownBug? = nil) {
        guard failure == nil else { return }
        failure = violation(message)
        failure!.knownBug = knownBug
        log("VIOLATION: \(message)" + (knownBug.map { " [known bug \($0.rawValue)]" } ?? ""))
    }

    /// Trace lines are kept (and printed as they happen when `streamingTrace` is set, so that a
    /// precondition failing inside a core still shows what led to it).
    func log(_ line: @autoclosure () -> String) {
        guard tracing else { return }
        let text = "t=\(now) #\(steps) \(line())"
        if streamingTrace { print(text) }
        trace.append(text)
        if trace.count > 6_000 { trace.removeFirst(2_000) }
    }

    func count(_ key: String, by n: Int = 1) { stats[key, default: 0] += n }

    private func after(_ delay: Int64, _ run: @escaping () -> Void) {
        queue.schedule(at: now + max(0, delay), run)
    }

    private func random(_ range: ClosedRange<Int64>) -> Int64 { rng.int64(range) }

    private func local(_ node: SimNode) -> Int64 { node.clock.local(now) }
    private var monitorNow: Int64 { monitor.clock.local(now) }

    /// Runs `body` on the node's process after `delay` of real time: dropped if the process
    /// died meanwhile, held while it is paused.
    private func onNode(_ node: SimNode, after delay: Int64, _ body: @escaping () -> Void) {
        let incarnation = node.incarnation
        after(delay) { [unowned self] in runOnNode(node, incarnation, body) }
    }

    private func runOnNode(_ node: SimNode, _ incarnation: Int, _ body: @escaping () -> Void) {
        guard node.up, node.incarnation == incarnation else { return }
        if node.pausedUntil > now {
            queue.schedule(at: node.pausedUntil) { [unowned self] in runOnNode(node, incarnation, body) }
            return
        }
        body()
    }

    /// After `ms` of the node's own clock.
    private func onNode(_ node: SimNode, afterLocal ms: Int64, _ body: @escaping () -> Void) {
        onNode(node, after: node.clock.realDelay(ms), body)
    }

    private func onMonitor(after delay: Int64, _ body: @escaping () -> Void) {
        let incarnation = monitor.incarnation
        after(delay) { [unowned self] in runOnMonitor(incarnation, body) }
    }

    private func runOnMonitor(_ incarnation: Int, _ body: @escaping () -> Void) {
        guard monitor.up, monitor.incarnation == incarnation, monitor.core != nil else { return }
        if monitor.pausedUntil > now {
            queue.schedule(at: monitor.pausedUntil) { [unowned self] in runOnMonitor(incarnation, body) }
            return
        }
        body()
    }

    // MARK: Looking

    func id(_ who: Who) -> NodeID {
        switch who {
        case .a: return Self.a
        case .b: return Self.b
        case .primary: return monitor.store.state!.writer!.id
        case .standby: return monitor.store.state!.other(than: monitor.store.state!.writer!.id)!.id
        }
    }

    func node(_ who: Who) -> SimNode { nodes[id(who)]! }
    var monitorState: MonitorState { monitor.store.state! }
    func record(_ who: Who) -> NodeRecord { monitorState.node(id(who))! }
    var ackedCount: Int { acked.values.reduce(0) { $0 + $1.count } }

    /// Whether a node's database or log holds `summary` at its lsn.
    private func holds(_ node: SimNode, _ tenant: TenantID, _ lsn: LSN, _ summary: RecordSummary) -> Bool {
        guard let disk = node.disks[tenant] else { return false }
        if let record = disk.record(lsn), RecordSummary(record) == summary { return true }
        return disk.appliedLSN >= lsn && disk.history[lsn] == summary
    }

    // MARK: Node processes

    /// A node's process starts from what its disk holds (`NodeServer.run`).
    private func startNode(_ node: SimNode) {
        node.up = true
        node.incarnation += 1
        node.keeper = nil
        node.primary = nil
        node.standby = nil
        node.promoting = false
        node.refusedEpoch = nil
        node.coreCommitted = [:]
        node.writes = [:]
        node.step = nil
        var state = node.state
        if state.role == .primary, state.mode != .sync {
            // Under a monitor a primary starts in sync mode: its standby may have been promoted
            // by force meanwhile, and committing alone before it hears so would take writes the
            // new epoch lacks.
            state.mode = .sync
        }
        writeState(node, state)
        log("\(node.id) starts as \(state)")
        switch state.role {
        // Under a monitor a primary uses no lease until the monitor confirmed a writer goal
        // that is not draining: it may have been handing over when it stopped.
        case .primary: startPrimary(node, epoch: state.epoch, mode: state.mode, standby: node.peer, leaseConfirmed: false)
        case .standby: startStandby(node)
        case .demoted: break
        }
        // A primary is not set up until the monitor's first writer goal.
        node.keeper = KeeperCore(state: state, primarySetup: nil)
        scheduleTick(node)
        onNode(node, after: random(0...params.keeperIntervalMs)) { [unowned self] in heartbeatLoop(node) }
    }

    private func writeState(_ node: SimNode, _ state: NodeState) {
        if state.epoch < node.state.epoch {
            fail("invariant 3: \(node.id)'s durable epoch would go back from \(node.state.epoch) to \(state.epoch)")
        }
        node.state = state
    }

    /// Every record in the log counts as committed: the database is brought up to the log (redo).
    private func startPrimary(_ node: SimNode, epoch: Epoch, mode: ReplicationMode, standby: NodeID?, leaseConfirmed: Bool = true) {
        var logs: [TenantID: PrimaryTenantLog] = [:]
        for tenant in node.disks.keys.sorted() {
            let disk = node.disks[tenant]!
            disk.fsync()
            node.coreCommitted[tenant] = disk.lastLSN
            publish(node, tenant, through: disk.lastLSN, staleRestart: !leaseConfirmed && epoch < monitorState.epoch, hide: !leaseConfirmed)
            guard disk.lastLSN > 0 else { continue }
            logs[tenant] = PrimaryTenantLog(last: disk.lastSummary, firstLSN: disk.base.lsn + 1, baseChecksum: disk.base.checksum)
        }
        node.primary = PrimaryReplication(nodeID: node.id, epoch: epoch, mode: mode, config: params.replication, standbyNodeID: standby,
                                          tenants: logs, leaseConfirmed: leaseConfirmed,
                                          reportsLocalSync: params.recordBeforeLocalFsync && params.reportLocalSync)
        log("\(node.id) primary core: epoch \(epoch) \(mode.name) standby \(standby ?? "-")")
    }

    private func startStandby(_ node: SimNode) {
        var logs: [TenantID: StandbyTenantLog] = [:]
        for tenant in node.disks.keys.sorted() {
            let disk = node.disks[tenant]!
            var tail: [RecordSummary] = []
            var lsn = disk.appliedLSN + 1
            while let record = disk.record(lsn) {
                tail.append(RecordSummary(record))
                lsn += 1
            }
            // `StandbyNode.init`: the applied records the log still holds, newest last.
            let oldest = max(disk.base.lsn + 1, disk.appliedLSN + 1 - min(disk.appliedLSN, LSN(TenantPosition.historyMax)))
            let history = disk.appliedLSN < oldest ? [] : (oldest...disk.appliedLSN).compactMap { disk.record($0).map(RecordSummary.init) }
            logs[tenant] = StandbyTenantLog(appliedLSN: disk.appliedLSN, appliedChecksum: disk.db.checksum, tail: tail,
                                            history: history.count == Int(disk.appliedLSN + 1 - oldest) ? history : [])
        }
        node.standby = StandbyReplication(nodeID: node.id, epoch: node.state.epoch, config: params.replication, tenants: logs, now: local(node))
        log("\(node.id) standby core: epoch \(node.state.epoch)")
    }

    private func scheduleTick(_ node: SimNode) {
        onNode(node, afterLocal: params.replicationTickMs) { [unowned self] in
            if node.primary != nil { handlePrimary(node, node.primary!.onTick(now: local(node))) }
            if node.standby != nil, !node.promoting { handleStandby(node, node.standby!.onTick(now: local(node))) }
            scheduleTick(node)
        }
    }

    /// The process dies. A machine's death loses what was not fsynced and sends no FIN (the
    /// peer times out); a process's death keeps the page cache and its sockets close.
    func kill(_ node: SimNode, loseUnsynced: Bool) {
        guard node.up else { return }
        log("\(node.id) dies" + (loseUnsynced ? " with its machine (unsynced data lost)" : " (process)"))
        node.up = false
        node.incarnation += 1
        node.keeper = nil
        node.primary = nil
        node.standby = nil
        node.step = nil
        count("write.outcomeUnknown", by: node.writes.count)
        node.writes = [:]
        for disk in node.disks.values { disk.crash(loseUnsynced: loseUnsynced) }
        for id in links.keys.sorted() {
            let link = links[id]!
            if link.dialer == node.id {
                link.toDialer = []
                if link.dialerOpen {
                    link.dialerOpen = false
                    if !loseUnsynced { enqueue(.fin, on: link, toListener: true) }
                }
            } else if link.listener == node.id {
                link.toListener = []
                if link.listenerOpen {
                    link.listenerOpen = false
                    if !loseUnsynced { enqueue(.fin, on: link, toListener: false) }
                }
            }
        }
    }

    func restart(_ node: SimNode) {
        guard !node.up else { return }
        startNode(node)
    }

    /// `NodeServer.restartInPlace`: the process replaces itself; its disk keeps everything.
    private func restartInPlace(_ node: SimNode) {
        count("restartInPlace")
        kill(node, loseUnsynced: false)
        let incarnation = node.incarnation
        after(random(1...20)) { [unowned self] in
            guard !node.up, node.incarnation == incarnation else { return }
            startNode(node)
        }
    }

    // MARK: The keeper (NodeKeeper)

    private func heartbeatLoop(_ node: SimNode) {
        sendHeartbeat(node)
        onNode(node, afterLocal: params.keeperIntervalMs) { [unowned self] in heartbeatLoop(node) }
    }

    /// What the replication shell of the current role tells the keeper (`keeperFigures`).
    private func keeperFigures(_ node: SimNode) -> (tenants: [TenantID: TenantReport], streaming: Bool) {
        var tenants: [TenantID: TenantReport] = [:]
        if let p = node.primary {
            for tenant in p.tenantIDs {
                guard let s = p.status(of: tenant) else { continue }
                tenants[tenant] = TenantReport(lsn: s.committedLSN, standbyLSN: s.standbyAckedLSN)
            }
            return (tenants, p.standbyConnection != nil)
        }
        if let s = node.standby {
            for tenant in s.tenantIDs {
                guard let status = s.status(of: tenant) else { continue }
                tenants[tenant] = TenantReport(lsn: status.persistedLSN)
            }
            return (tenants, !node.promoting && s.streamingConnection != nil)
        }
        return ([:], false)
    }

    private func sendHeartbeat(_ node: SimNode) {
        guard let keeper = node.keeper else { return }
        let figures = keeperFigures(node)
        let report = keeper.report(tenants: figures.tenants, streaming: figures.streaming)
        count("heartbeat.sent")
        let incarnation = node.incarnation
        guard !cut(node.id, Self.monitorName) else { return count("heartbeat.cut") }
        if faultsActive, rng.chance(params.faults.heartbeatDropChance) { return count("heartbeat.dropped") }
        let copies = faultsActive && rng.chance(params.faults.heartbeatDuplicateChance) ? 2 : 1
        if copies == 2 { count("heartbeat.duplicated") }
        for _ in 0..<copies {
            after(messageDelay()) { [unowned self] in
                runOnMonitor(monitor.incarnation) { [unowned self] in
                    guard !cut(node.id, Self.monitorName) else { return count("heartbeat.cut") }
                    let actions = monitor.core!.onHeartbeat(node: PeerIdentity(nodeID: node.id, role: .node), report: report, now: monitorNow)
                    carryOutMonitor(actions, label: "heartbeat \(node.id): \(report.role.rawValue) e\(report.epoch) reached \(report.reached.map(\.description) ?? "-") streaming=\(report.streaming) \(report.tenants.keys.sorted().map { "\($0)=\(report.tenants[$0]!.lsn)/\(report.tenants[$0]!.standbyLSN.map(String.init) ?? "-")" })",
                                    replyTo: (node.id, incarnation))
                }
            }
        }
    }

    private func messageDelay() -> Int64 {
        if faultsActive, rng.chance(params.faults.heartbeatLateChance) {
            count("heartbeat.late")
            // Held up, but within the keeper's 1 s request timeout (a later answer finds the
            // connection closed).
            return random(params.heartbeatDelayMs.upperBound...900)
        }
        return random(params.heartbeatDelayMs)
    }

    private func sendAnswer(_ answer: MonitorAnswer, to id: NodeID, incarnation: Int) {
        guard !cut(Self.monitorName, id) else { return count("answer.cut") }
        if faultsActive, rng.chance(params.faults.heartbeatDropChance) { return count("answer.dropped") }
        let copies = faultsActive && rng.chance(params.faults.heartbeatDuplicateChance) ? 2 : 1
        if copies == 2 { count("answer.duplicated") }
        let node = nodes[id]!
        for _ in 0..<copies {
            after(messageDelay()) { [unowned self] in
                runOnNode(node, incarnation) { [unowned self] in
                    guard !cut(Self.monitorName, id), node.keeper != nil else { return }
                    switch answer {
                    case .assignment(let a):
                        log("\(id) told \(a)")
                        handleKeeper(node, node.keeper!.onAssignment(a))
                    case .refusal(let reason):
                        count("heartbeat.refused")
                        log("\(id) refused: \(reason)")
                    }
                }
            }
        }
    }

    private func handleKeeper(_ node: SimNode, _ actions: [KeeperAction]) {
        for action in actions {
            switch action {
            case .note(let text):
                count("keeper.note")
                log("\(node.id) keeper: \(text)")
            case .run(let step):
                count("step.\(stepKey(step))")
                log("\(node.id) keeper step: \(step) (from \(node.roleDescription))")
                node.step = step
                carryOut(node, step)
            }
        }
    }

    private func stepKey(_ step: KeeperStep) -> String {
        switch step {
        case .stepDown: return "stepDown"
        case .adoptEpoch: return "adoptEpoch"
        case .promote: return "promote"
        case .configurePrimary: return "configurePrimary"
        case .follow: return "follow"
        }
    }

    private func stepDone(_ node: SimNode) {
        guard node.keeper != nil else { return }
        node.step = nil
        handleKeeper(node, node.keeper!.onStepDone())
        log("\(node.id) step done: reached \(node.keeper?.reached.map(\.description) ?? "-"), \(node.roleDescription)")
        sendHeartbeat(node) // tell the monitor now
    }

    private func stepFailed(_ node: SimNode, _ reason: String) {
        guard node.keeper != nil else { return }
        count("step.failed")
        node.step = nil
        handleKeeper(node, node.keeper!.onStepFailed(reason))
    }

    /// `NodeRoles.carryOut`.
    private func carryOut(_ node: SimNode, _ step: KeeperStep) {
        switch step {
        case .stepDown:
            guard let p = node.primary else { return stepFailed(node, "not a primary") }
            // Its own step-down (a peer showed a newer epoch) is under way: the restart follows.
            guard p.steppedDownTo == nil else { return }
            // The core stops committing at once; its `.stepDown` records `demoted` and restarts.
            handlePrimary(node, node.primary!.onStepDownOrdered(now: local(node)))
        case .adoptEpoch(let epoch):
            onNode(node, after: random(params.persistMs)) { [unowned self] in
                if let adopted = node.state.adopting(epoch, from: .monitor) {
                    writeState(node, adopted)
                    if node.standby != nil, !node.promoting {
                        if let refused = node.refusedEpoch, refused <= epoch { node.refusedEpoch = nil }
                        handleStandby(node, node.standby!.onEpochChanged(epoch, now: local(node)))
                    }
                }
                stepDone(node)
            }
        case .promote(let epoch, let setup, let handover):
            promote(node, into: epoch, setup: setup, handover: handover)
        case .configurePrimary(let setup):
            onNode(node, after: random(params.persistMs)) { [unowned self] in
                guard node.primary != nil else { return stepFailed(node, "not a primary") }
                if node.state.mode != setup.mode {
                    // Durable first: a restart must come back in the mode the monitor knows of.
                    var next = node.state
                    next.mode = setup.mode
                    writeState(node, next)
                }
                let t = local(node)
                handlePrimary(node, node.primary!.onStandbyAssigned(setup.standby, now: t))
                if node.primary != nil {
                    if !setup.mode.waitsForStandby { for tenant in node.writes.keys { node.writes[tenant]!.completedAlone = true } }
                    handlePrimary(node, node.primary!.onModeChanged(setup.mode, now: t))
                }
                if node.primary != nil { handlePrimary(node, node.primary!.onDrainingChanged(setup.draining, now: t)) }
                // Set up by the monitor for a writer goal: it may use leases (unless handing over).
                if node.primary != nil, !setup.draining {
                    node.primary!.onLeaseConfirmed()
                    revealHidden(node)
                }
                stepDone(node)
            }
        case .follow(let primary):
            onNode(node, after: random(params.persistMs)) { [unowned self] in
                guard node.state.role == .demoted, node.primary == nil, node.standby == nil else {
                    return stepFailed(node, "only a demoted node that holds no tenant open rejoins as a standby")
                }
                // StandbyPreparation: the database agrees with the log, then counts as applied
                // through the log's last record (the new primary compares that with its history).
                // The log keeps its records: they tell where the histories part.
                var held: [String] = []
                for tenant in node.disks.keys.sorted() {
                    let disk = node.disks[tenant]!
                    disk.fsync()
                    disk.applyLog(through: disk.lastLSN)
                    held.append("\(tenant) \(disk.lastSummary)")
                }
                log("\(node.id) rejoins as the standby of \(primary), holding \(held)")
                count("rejoin")
                writeState(node, NodeState(role: .standby, epoch: node.state.epoch, mode: node.state.mode))
                startStandby(node)
                stepDone(node)
            }
        }
    }

    /// `NodeRoles.promote(toEpoch:setup:)` with `StandbyNode.stopForPromotion`.
    private func promote(_ node: SimNode, into epoch: Epoch, setup: PrimarySetup, handover: Bool) {
        guard node.standby != nil, node.state.role == .standby else { return stepFailed(node, "this node is not a standby") }
        if let refused = node.refusedEpoch, refused >= epoch {
            return stepFailed(node, "its primary is in epoch \(refused), newer than this standby's")
        }
        node.promoting = true
        for id in links.keys.sorted() where links[id]!.dialer == node.id && links[id]!.dialerIncarnation == node.incarnation {
            closeSide(id, of: node)
        }
        let waitMs = node.standby!.promotionWaitMs(now: local(node))
        if handover {
            // A switchover's hand-over: the former writer drained and uses no lease.
            count("promotion.handover")
            log("\(node.id) promotion into epoch \(epoch) (hand-over): stream stopped, no lease to wait out (\(waitMs) ms left)")
            return onNode(node, after: 0) { [unowned self] in finishPromotion(node, into: epoch, setup: setup) }
        }
        log("\(node.id) promotion into epoch \(epoch): stream stopped, waiting \(waitMs) ms of its clock for the lease")
        awaitLease(node) { [unowned self] in finishPromotion(node, into: epoch, setup: setup) }
    }

    private func awaitLease(_ node: SimNode, then: @escaping () -> Void) {
        let waitMs = node.standby!.promotionWaitMs(now: local(node))
        guard waitMs > 0 else { return then() }
        onNode(node, afterLocal: waitMs) { [unowned self] in awaitLease(node, then: then) }
    }

    private func finishPromotion(_ node: SimNode, into epoch: Epoch, setup: PrimarySetup) {
        // Appends in flight finish, the log is fsynced, and everything it holds is applied:
        // records the old primary had not yet said were committed may have been acknowledged.
        for tenant in node.disks.keys.sorted() {
            let disk = node.disks[tenant]!
            while !disk.queue.isEmpty { performOp(node, tenant, disk.queue.removeFirst(), notify: false) }
            disk.busy = false
            disk.scratch = nil
            disk.fsync()
            publish(node, tenant, through: disk.lastLSN)
            disk.compact(through: disk.lastLSN)
        }
        writeState(node, NodeState(role: .primary, epoch: epoch, mode: setup.mode))
        checkNoLostAcks(promoted: node, epoch: epoch)
        node.standby = nil
        node.promoting = false
        count("promotion")
        startPrimary(node, epoch: epoch, mode: setup.mode, standby: setup.standby)
        if setup.draining {
            let t = local(node)
            handlePrimary(node, node.primary!.onStandbyAssigned(setup.standby, now: t))
            handlePrimary(node, node.primary!.onModeChanged(setup.mode, now: t))
            handlePrimary(node, node.primary!.onDrainingChanged(true, now: t))
        }
        log("\(node.id) promoted: \(node.roleDescription)")
        stepDone(node)
    }

    /// Invariant 2 at a promotion; a forced one starts a new lineage (its loss was accepted).
    private func checkNoLostAcks(promoted node: SimNode, epoch: Epoch) {
        if forcedEpochs.contains(epoch) {
            var lost = 0
            for tenant in tenants {
                for (lsn, summary) in acked[tenant] ?? [:] where !holds(node, tenant, lsn, summary) {
                    acked[tenant]![lsn] = nil
                    lost += 1
                }
            }
            lineageFloor = max(lineageFloor, epoch)
            count("forcedPromotion.applied")
            count("forcedPromotion.lostAcks", by: lost)
            log("\(node.id) promoted by force in epoch \(epoch): \(lost) acknowledged writes lost; the monitor reported \(lastDataLoss.map(\.description) ?? "-")")
            return
        }
        for tenant in tenants {
            for (lsn, summary) in (acked[tenant] ?? [:]).sorted(by: { $0.key < $1.key }) where !holds(node, tenant, lsn, summary) {
                let disk = node.disks[tenant]
                return fail("invariant 2 (no lost acks): \(node.id) promoted into epoch \(epoch) lacks acknowledged \(tenant) \(summary); it holds \(disk.map { "applied \($0.appliedLSN), log \($0.base.lsn + 1)...\($0.lastLSN), history \(String(describing: $0.history[lsn]))" } ?? "nothing of the tenant")")
            }
        }
    }

    /// The primary core stepped down: `demoted` is recorded, then the process restarts in place.
    private func demote(_ node: SimNode) {
        onNode(node, after: random(params.persistMs)) { [unowned self] in
            guard node.state.role == .primary else { return }
            writeState(node, node.state.steppedDown())
            log("\(node.id) demoted in epoch \(node.state.epoch); restarting in place")
            restartInPlace(node)
        }
    }

    // MARK: Clients

    /// Clients write again (after `writesActive` was turned off).
    func resumeWrites() {
        guard !writesActive else { return }
        writesActive = true
        clientGeneration += 1
        for tenant in tenants { scheduleClientWrite(tenant) }
    }

    private func scheduleClientWrite(_ tenant: TenantID) {
        let generation = clientGeneration
        after(random(params.writeIntervalMs)) { [unowned self] in
            guard writesActive, generation == clientGeneration else { return }
            write(tenant)
            scheduleClientWrite(tenant)
        }
    }

    /// A client writes to a node that believes it is primary (both, in a split brain).
    func write(_ tenant: TenantID) {
        let candidates = nodeIDs.filter { id in
            let n = nodes[id]!
            return n.up && n.pausedUntil <= now && n.primary?.steppedDownTo == nil && n.primary != nil && n.writes[tenant] == nil
        }
        guard !candidates.isEmpty else { return }
        let node = nodes[rng.pick(candidates)]!
        let disk = node.disk(tenant)
        var db = disk.databaseAtLogEnd()
        var size = db.sizePages
        if size == 0 || (size < params.dbPagesMax && rng.chance(0.3)) { size += 1 }
        if size > 2 && rng.chance(0.05) { size -= 1 }
        var pages: [Page] = []
        if size > db.sizePages { pages.append(Page(number: size, bytes: rng.bytes(params.pageSizeBytes))) }
        for _ in 0..<rng.int(1...2) { pages.append(Page(number: UInt32(rng.int(1...Int(size))), bytes: rng.bytes(params.pageSizeBytes))) }
        let lsn = disk.lastLSN + 1
        let epoch = node.primary!.epoch
        db.apply(Record(epoch: epoch, lsn: lsn, dbSizePages: size, checksum: 0, pages: pages))
        let record = Record(epoch: epoch, lsn: lsn, dbSizePages: size, checksum: db.checksum, pages: pages)
        disk.current.append(record)
        writeSerial += 1
        let serial = writeSerial
        writeSerials["\(node.id)/\(tenant)"] = serial
        node.writes[tenant] = PendingWrite(tenant: tenant, lsn: lsn, summary: RecordSummary(record), issuedAt: now, handedOverIn: node.primary!.mode)
        count("writes")
        log("client → \(node.id): \(tenant) \(RecordSummary(record))")
        guard params.recordBeforeLocalFsync else {
            // The core's contract: the record is handed over once fsynced in the local log.
            return onNode(node, after: random(params.persistMs)) { [unowned self] in
                disk.fsync()
                guard writeSerials["\(node.id)/\(tenant)"] == serial, node.writes[tenant]?.lsn == lsn, node.primary != nil else { return }
                node.writes[tenant]!.synced = true
                handlePrimary(node, node.primary!.onLocalRecord(tenant, record, now: local(node)))
            }
        }
        // PrimaryNode.commit: the record goes to the standby while the local fsync runs; the
        // fsync is reported to the core, which counts the record committed only after it.
        handlePrimary(node, node.primary!.onLocalRecord(tenant, record, now: local(node)))
        onNode(node, after: random(params.persistMs)) { [unowned self] in
            disk.fsync()
            guard writeSerials["\(node.id)/\(tenant)"] == serial, var w = node.writes[tenant], w.lsn == lsn else { return }
            w.synced = true
            node.writes[tenant] = w
            if params.reportLocalSync, node.primary != nil {
                handlePrimary(node, node.primary!.onLocalSynced(tenant, throughLSN: lsn, now: local(node)))
            }
            guard node.writes[tenant] != nil else { return }
            publish(node, tenant, through: min(node.coreCommitted[tenant] ?? 0, disk.syncedLSN))
            resolveWrite(node, tenant)
        }
    }

    /// The client hears "ok" once the core said durable and the local log is fsynced.
    private func resolveWrite(_ node: SimNode, _ tenant: TenantID) {
        guard let w = node.writes[tenant], let mode = w.durableMode, w.synced else { return }
        node.writes[tenant] = nil
        count("acked")
        count("acked.\(mode.name)")
        log("ack to client: \(tenant) \(w.summary) by \(node.id) (\(mode.name))")
        if w.summary.epoch >= lineageFloor {
            if let earlier = acked[tenant]?[w.lsn], earlier != w.summary {
                fail("invariant 2 (no lost acks): \(tenant) lsn \(w.lsn) acknowledged as \(earlier), now acknowledged again as \(w.summary) by \(node.id): the first is lost")
            }
            acked[tenant, default: [:]][w.lsn] = w.summary
        }
        if params.primaryLogRetention, node.primary != nil, w.lsn > 1 {
            // PrimaryNode.compactLog: the log keeps its last committed record onwards.
            let disk = node.disk(tenant)
            if w.lsn - 1 > disk.base.lsn, w.lsn - 1 <= disk.appliedLSN, disk.isSynced(w.lsn - 1) {
                disk.compact(through: w.lsn - 1)
                handlePrimary(node, node.primary!.onLogCompacted(tenant, firstLSN: w.lsn, baseChecksum: disk.base.checksum, now: local(node)))
            }
        }
    }

    /// A primary's database publishes committed, locally fsynced records (SQLite's commit).
    /// Readable only once the primary serves reads (`PrimaryReplication.servesReads`: a primary
    /// started under the monitor not before the monitor confirmed it); until then they are
    /// kept aside and shown at the confirmation (`revealHidden`).
    private func publish(_ node: SimNode, _ tenant: TenantID, through lsn: LSN, staleRestart: Bool = false, hide: Bool? = nil) {
        let disk = node.disk(tenant)
        while disk.appliedLSN < lsn, let record = disk.record(disk.appliedLSN + 1) {
            if hide ?? (node.primary?.servesReads == false) {
                node.hidden[tenant, default: []].append(RecordSummary(record))
            } else {
                noteVisible(node, tenant, record, byStaleRestart: staleRestart)
            }
            disk.db.apply(record)
            disk.appliedLSN = record.lsn
            disk.history[record.lsn] = RecordSummary(record)
            if disk.db.checksum != record.checksum {
                fail("invariant 6: \(node.id)'s \(tenant) checksum \(disk.db.checksum) after \(RecordSummary(record))")
            }
        }
    }

    /// The primary now serves reads: what it published meanwhile becomes readable.
    private func revealHidden(_ node: SimNode) {
        for (tenant, records) in node.hidden.sorted(by: { $0.key < $1.key }) {
            for record in records { noteVisible(node, tenant, record) }
        }
        node.hidden = [:]
    }

    /// Invariant 6: one database state per (lsn, epoch), whichever node shows it.
    private func noteVisible(_ node: SimNode, _ tenant: TenantID, _ record: Record, byStaleRestart: Bool = false) {
        noteVisible(node, tenant, RecordSummary(record), byStaleRestart: byStaleRestart)
    }

    private func noteVisible(_ node: SimNode, _ tenant: TenantID, _ record: RecordSummary, byStaleRestart: Bool = false) {
        let key = VisibleKey(lsn: record.lsn, epoch: record.epoch)
        if let seen = visible[tenant]?[key], seen.checksum != record.checksum {
            // Known bug B: one of the two states was published by a stale primary's restart.
            // Known bug A: only the shell's real commit order lets a primary lose a record it
            // already declared committed.
            let knownBug: KnownBug? = seen.byStaleRestart || byStaleRestart ? .staleRestartPublishesPending
                : params.recordBeforeLocalFsync ? .recordBeforeLocalFsync : nil
            fail("invariant 6: \(node.id) shows \(tenant) \(record), but a database already showed lsn \(record.lsn) of epoch \(record.epoch) with checksum \(String(seen.checksum, radix: 16))",
                 knownBug: knownBug)
        }
        visible[tenant, default: [:]][key] = (record.checksum, byStaleRestart || (visible[tenant]?[key]?.byStaleRestart ?? false))
    }

    // MARK: The primary's shell (PrimaryNode)

    private func handlePrimary(_ node: SimNode, _ actions: [PrimaryAction]) {
        var steppedDown = false
        for action in actions {
            log("\(node.id) P> \(describe(action))")
            switch action {
            case .send(let c, let message):
                send(message, on: c.rawValue, from: node)
            case .closeConnection(let c, let reason):
                count("close.primary.\(reasonKey(reason))")
                closeSide(c.rawValue, of: node)
            case .readLog(let c, let request):
                onNode(node, after: random(params.readMs)) { [unowned self] in
                    guard node.primary != nil else { return }
                    let disk = node.disk(request.tenant)
                    var records: [Record] = []
                    var bytes = 0
                    var lsn = request.fromLSN
                    while lsn <= request.throughLSN, let record = disk.record(lsn), bytes + record.byteCount <= request.bytesMax {
                        records.append(record)
                        bytes += record.byteCount
                        lsn += 1
                    }
                    if records.isEmpty, request.firstRecordMayExceed, let first = disk.record(request.fromLSN) { records = [first] }
                    handlePrimary(node, node.primary!.onLogRead(c, request: request, records: records, now: local(node)))
                }
            case .readLogSummaries(let c, let request):
                onNode(node, after: random(params.readMs)) { [unowned self] in
                    guard node.primary != nil else { return }
                    let disk = node.disk(request.tenant)
                    // Only what the log still holds (a compacted record is left out).
                    let summaries = (request.fromLSN...max(request.fromLSN, request.throughLSN)).compactMap { lsn -> RecordSummary? in
                        lsn <= request.throughLSN ? disk.record(lsn).map(RecordSummary.init) : nil
                    }
                    handlePrimary(node, node.primary!.onLogSummaries(c, request: request, summaries: summaries, now: local(node)))
                }
            case .sendSnapshot(let c, let request):
                count("snapshot.sent")
                onNode(node, after: random(params.readMs)) { [unowned self] in
                    guard node.primary != nil else { return }
                    if faultsActive, rng.chance(params.faults.snapshotFailChance) {
                        count("snapshot.failedToRead")
                        return handlePrimary(node, node.primary!.onSnapshotFailed(c, request: request, now: local(node)))
                    }
                    sendSnapshot(node, request, on: c)
                }
            case .commitDurable(let tenant, let lsn):
                commitDurable(node, tenant, lsn)
            case .commitFailed(let tenant, let lsn, let failure):
                commitFailed(node, tenant, lsn, failure)
            case .standbyDiverged(let divergence):
                count("primary.standbyDiverged.\(divergence.bySnapshot ? "snapshot" : "rewind").\(divergence.sharedThroughLSN == nil ? "pointNotFound" : "exact")")
                checkDivergence(node, divergence)
            case .stepDown(let newer):
                count("primary.stepDown")
                if newer > monitorState.epoch.next { fail("\(node.id) stepped down to epoch \(newer), which the monitor never made") }
                steppedDown = true
            }
        }
        if steppedDown { demote(node) }
    }

    /// A rejoin's report names what the standby discards: never an acknowledged write
    /// (invariant 2), and the shared record it names is the same on both nodes. (That the next
    /// one differs is not checked here: a rolled-back record may be written again identically
    /// before this check reads the primary's log.)
    private func checkDivergence(_ node: SimNode, _ d: Divergence) {
        log("\(node.id) reports: \(d)")
        guard let standby = nodes[d.standby], let theirs = standby.disks[d.tenant], let ours = node.disks[d.tenant] else {
            return fail("\(node.id) reports a divergence of \(d.standby)'s \(d.tenant), which it does not hold")
        }
        func summary(_ disk: TenantDisk, _ lsn: LSN) -> RecordSummary? {
            disk.record(lsn).map(RecordSummary.init) ?? (lsn <= disk.appliedLSN ? disk.history[lsn] : nil)
        }
        for lsn in d.discardedFromLSN...d.discardedThroughLSN {
            if let discarded = summary(theirs, lsn), acked[d.tenant]?[lsn] == discarded {
                return fail("invariant 2: \(d.standby) discards acknowledged \(d.tenant) \(discarded) (\(d))")
            }
        }
        if let shared = d.sharedThroughLSN, shared > 0 {
            guard let a = summary(ours, shared), let b = summary(theirs, shared), a == b else {
                return fail("\(d): lsn \(shared) is not the same record on both nodes")
            }
        }
    }

    /// The snapshot is the database as published (SQLite shows only durable commits).
    private func sendSnapshot(_ node: SimNode, _ request: SnapshotRequest, on c: ConnectionID) {
        let disk = node.disk(request.tenant)
        let lsn = disk.appliedLSN
        let db = disk.db
        if let link = links[c.rawValue] {
            snapshotHistories["\(link.dialer)/\(request.tenant)/\(lsn)/\(db.checksum)"] = disk.history.filter { $0.key <= lsn }
        }
        send(.snapshotBegin(SnapshotBegin(epoch: request.epoch, tenant: request.tenant, lsn: lsn, dbSizePages: db.sizePages)), on: c.rawValue, from: node)
        let pages = db.pages.keys.sorted().map { Page(number: $0, bytes: db.pages[$0]!) }
        var start = 0
        while start < pages.count {
            let end = min(pages.count, start + 4)
            send(.snapshotPages(SnapshotPages(epoch: request.epoch, tenant: request.tenant, pages: Array(pages[start..<end]))), on: c.rawValue, from: node)
            start = end
        }
        send(.snapshotEnd(SnapshotEnd(epoch: request.epoch, tenant: request.tenant, lsn: lsn, checksum: db.checksum)), on: c.rawValue, from: node)
        handlePrimary(node, node.primary!.onSnapshotSent(c, request: request, lsn: lsn, now: local(node)))
    }

    private func commitDurable(_ node: SimNode, _ tenant: TenantID, _ lsn: LSN) {
        guard let core = node.primary, let record = node.disks[tenant]?.record(lsn) else {
            return fail("\(node.id): commitDurable \(tenant) \(lsn) but its log has no such record")
        }
        if record.epoch != core.epoch { fail("\(node.id) commits \(RecordSummary(record)) in epoch \(core.epoch)") }
        // Invariant 3: one writer per epoch.
        if let other = committerOfEpoch[core.epoch], other != node.id {
            fail("invariant 3: \(node.id) commits \(tenant) lsn \(lsn) in epoch \(core.epoch), in which \(other) committed")
        }
        committerOfEpoch[core.epoch] = node.id
        node.coreCommitted[tenant] = max(node.coreCommitted[tenant] ?? 0, lsn)
        if var w = node.writes[tenant], w.lsn == lsn {
            // Sync durability only for a record handed over in sync mode and still in it (a
            // switch away completes waiting commits; one committed alone before a switch to
            // sync is reported committed once its local fsync is done).
            let needsPeer = core.mode.waitsForStandby && w.handedOverIn.waitsForStandby && !w.completedAlone
            w.durableMode = needsPeer ? core.mode : (w.handedOverIn.waitsForStandby ? core.mode : w.handedOverIn)
            node.writes[tenant] = w
            if needsPeer {
                // Invariant 1: acknowledged in sync mode only once fsynced on the other node too.
                let peer = nodes[node.peer]!
                let summary = RecordSummary(record)
                let onPeer = peer.disks[tenant].map { disk in
                    disk.durableRecord(lsn).map(RecordSummary.init) == summary || (disk.appliedLSN >= lsn && disk.history[lsn] == summary)
                } ?? false
                if !onPeer { fail("invariant 1: \(tenant) \(summary) durable in sync mode on \(node.id), but \(peer.id) has not fsynced it") }
            }
        }
        let disk = node.disk(tenant)
        publish(node, tenant, through: min(node.coreCommitted[tenant]!, disk.syncedLSN))
        resolveWrite(node, tenant)
    }

    /// The writer finishes its fsync, rolls the log back durably, then answers its client.
    private func commitFailed(_ node: SimNode, _ tenant: TenantID, _ lsn: LSN, _ failure: CommitFailure) {
        count("failed.\(failure)")
        guard node.writes[tenant]?.lsn == lsn else {
            return fail("\(node.id): commitFailed \(tenant) \(lsn) for no outstanding write")
        }
        node.writes[tenant]!.durableMode = nil
        writeSerials["\(node.id)/\(tenant)"] = nil
        onNode(node, after: random(params.persistMs)) { [unowned self] in
            node.disk(tenant).truncate(after: lsn - 1, durably: true)
            if node.writes[tenant]?.lsn == lsn { node.writes[tenant] = nil }
        }
    }

    // MARK: The standby's shell (StandbyNode)

    private func handleStandby(_ node: SimNode, _ actions: [StandbyAction]) {
        guard !node.promoting else { return }
        for action in actions {
            log("\(node.id) S> \(describe(action))")
            switch action {
            case .connect:
                connect(node)
            case .send(let c, let message):
                send(message, on: c.rawValue, from: node)
            case .closeConnection(let c, let reason):
                count("close.standby.\(reasonKey(reason))")
                closeSide(c.rawValue, of: node)
            case .persist(let tenant, let record):
                enqueue(node, tenant, .persist(record))
            case .truncateLog(let tenant, let lsn):
                enqueue(node, tenant, .truncate(after: lsn))
            case .apply(let tenant, let lsn, let checksum):
                enqueue(node, tenant, .apply(through: lsn, checksum: checksum))
            case .beginSnapshot(let tenant, let lsn, let size):
                enqueue(node, tenant, .beginSnapshot(lsn: lsn, sizePages: size))
            case .writeSnapshotPages(let tenant, let pages):
                enqueue(node, tenant, .writeSnapshotPages(pages))
            case .installSnapshot(let tenant, let lsn, let size, let checksum):
                enqueue(node, tenant, .installSnapshot(lsn: lsn, sizePages: size, checksum: checksum, epoch: node.standby!.epoch))
            case .abandonSnapshot(let tenant):
                enqueue(node, tenant, .abandonSnapshot)
            case .epochStale(let newer):
                // A peer's word never moves the epoch; only the monitor's does.
                count("standby.epochStale")
                if newer > monitorState.epoch { fail("\(node.id) saw epoch \(newer), which the monitor never made") }
                node.refusedEpoch = max(node.refusedEpoch ?? newer, newer)
            }
            if node.promoting || node.standby == nil { return }
        }
    }

    private func enqueue(_ node: SimNode, _ tenant: TenantID, _ op: DiskOp) {
        let disk = node.disk(tenant)
        disk.queue.append(op)
        if !disk.busy { startNextOp(node, tenant) }
    }

    private func startNextOp(_ node: SimNode, _ tenant: TenantID) {
        let disk = node.disk(tenant)
        guard !disk.queue.isEmpty else {
            disk.busy = false
            return
        }
        disk.busy = true
        let duration: Int64
        switch disk.queue[0] {
        case .persist, .installSnapshot: duration = random(params.persistMs)
        case .truncate, .abandonSnapshot, .beginSnapshot, .writeSnapshotPages, .apply: duration = random(0...2)
        }
        onNode(node, after: duration) { [unowned self] in
            guard disk.busy, !disk.queue.isEmpty, !node.promoting, node.standby != nil else { return }
            var op = disk.queue.removeFirst()
            if case .persist(let first) = op {
                // A real shell groups several appends under one fsync: acks are cumulative.
                var records = [first]
                while rng.chance(0.3), case .persist(let next)? = disk.queue.first {
                    disk.queue.removeFirst()
                    records.append(next)
                }
                for record in records.dropLast() { performOp(node, tenant, .persist(record), notify: false, sync: false) }
                op = .persist(records.last!)
            }
            performOp(node, tenant, op, notify: true)
            if failure == nil, !node.promoting, node.standby != nil { startNextOp(node, tenant) }
        }
    }

    /// One storage operation of a standby; `notify` tells the core (not while promoting).
    private func performOp(_ node: SimNode, _ tenant: TenantID, _ op: DiskOp, notify: Bool, sync: Bool = true) {
        let disk = node.disk(tenant)
        switch op {
        case .persist(let record):
            guard record.lsn == disk.lastLSN + 1 else {
                return fail("\(node.id) persists \(tenant) lsn \(record.lsn) after its log's end \(disk.lastLSN)")
            }
            disk.current.append(record)
            guard sync else { return }
            disk.fsync()
            if notify { handleStandby(node, node.standby!.onPersisted(tenant, throughLSN: record.lsn, now: local(node))) }
        case .truncate(let lsn):
            if lsn < disk.appliedLSN { return fail("\(node.id) truncates \(tenant) after \(lsn), below its applied \(disk.appliedLSN)") }
            disk.truncate(after: lsn, durably: false)
        case .apply(let through, let checksum):
            while disk.appliedLSN < through {
                guard let record = disk.record(disk.appliedLSN + 1), disk.isSynced(record.lsn) else {
                    return fail("\(node.id) applies \(tenant) lsn \(disk.appliedLSN + 1), which its log has not fsynced")
                }
                noteVisible(node, tenant, record)
                disk.db.apply(record)
                disk.appliedLSN = record.lsn
                disk.history[record.lsn] = RecordSummary(record)
                if disk.db.checksum != record.checksum {
                    return fail("invariant 6: \(node.id)'s \(tenant) checksum \(disk.db.checksum) after applying \(RecordSummary(record))")
                }
            }
            if disk.appliedLSN == through, disk.db.checksum != checksum {
                fail("invariant 6: \(node.id) applied \(tenant) through \(through): checksum \(disk.db.checksum), the core expected \(checksum)")
            }
            // Applied records live on in the database: the log keeps what follows.
            disk.compact(through: disk.appliedLSN)
        case .beginSnapshot(let lsn, let size):
            disk.scratch = (lsn, size, [], [:])
        case .writeSnapshotPages(let pages):
            disk.scratch?.pages += pages
        case .installSnapshot(let lsn, let size, let checksum, let epoch):
            guard let scratch = disk.scratch else { return }
            disk.scratch = nil
            var db = SimDatabase()
            db.apply(Record(epoch: .zero, lsn: lsn, dbSizePages: size, checksum: 0, pages: scratch.pages))
            if db.checksum != checksum || (notify && faultsActive && rng.chance(params.faults.snapshotFailChance)) {
                count("snapshot.installFailed")
                if notify { handleStandby(node, node.standby!.onSnapshotFailed(tenant, now: local(node))) }
                return
            }
            disk.db = db
            disk.appliedLSN = lsn
            disk.base = RecordSummary(lsn: lsn, epoch: epoch, checksum: checksum)
            disk.current = []
            disk.durable = []
            disk.syncedPrefix = 0
            disk.history = snapshotHistories.removeValue(forKey: "\(node.id)/\(tenant)/\(lsn)/\(checksum)") ?? [:]
            count("snapshot.installed")
            log("\(node.id) installed a snapshot of \(tenant) at \(lsn)")
            if notify { handleStandby(node, node.standby!.onSnapshotInstalled(tenant, lsn: lsn, now: local(node))) }
        case .abandonSnapshot:
            disk.scratch = nil
        }
    }

    // MARK: Replication connections

    private func connect(_ node: SimNode) {
        onNode(node, after: random(params.linkDelayMs)) { [unowned self] in
            guard node.standby != nil, !node.promoting else { return }
            let peer = nodes[node.peer]!
            if cut(node.id, peer.id) || cut(peer.id, node.id) {
                // The attempt times out.
                return onNode(node, after: random(50...300)) { [unowned self] in connectFailed(node) }
            }
            guard peer.up, peer.primary != nil else {
                // Refused at once: nothing listens there.
                return onNode(node, after: random(0...3)) { [unowned self] in connectFailed(node) }
            }
            let link = ReplicationLink(id: nextLinkID, dialer: node.id, listener: peer.id,
                                       dialerIncarnation: node.incarnation, listenerIncarnation: peer.incarnation)
            nextLinkID += 1
            links[link.id] = link
            count("connections")
            let c = ConnectionID(link.id)
            log("\(node.id) connected to \(peer.id) on \(c)")
            // The listener hears of it before the hello arrives.
            onNode(peer, after: 0) { [unowned self] in
                guard link.listenerOpen, peer.primary != nil else { return }
                handlePrimary(peer, peer.primary!.onConnected(c, peer: PeerIdentity(nodeID: node.id, role: .node), now: local(peer)))
            }
            handleStandby(node, node.standby!.onConnected(c, peer: PeerIdentity(nodeID: peer.id, role: .node), now: local(node)))
        }
    }

    private func connectFailed(_ node: SimNode) {
        guard node.standby != nil, !node.promoting else { return }
        handleStandby(node, node.standby!.onConnectFailed(now: local(node)))
    }

    private func send(_ message: Message, on id: UInt64, from node: SimNode) {
        guard let link = links[id] else { return }
        if link.dialer == node.id, link.dialerIncarnation == node.incarnation {
            guard link.dialerOpen else { return }
            enqueue(.message(message), on: link, toListener: true)
        } else if link.listener == node.id, link.listenerIncarnation == node.incarnation {
            guard link.listenerOpen else { return }
            enqueue(.message(message), on: link, toListener: false)
        }
    }

    /// Appends to one direction of the stream, never before what was sent earlier (TCP order).
    private func enqueue(_ payload: LinkPayload, on link: ReplicationLink, toListener: Bool) {
        var readyAt = now + random(params.linkDelayMs)
        if toListener {
            readyAt = max(readyAt, link.lastReadyToListener)
            link.lastReadyToListener = readyAt
            link.toListener.append((readyAt, payload))
        } else {
            readyAt = max(readyAt, link.lastReadyToDialer)
            link.lastReadyToDialer = readyAt
            link.toDialer.append((readyAt, payload))
        }
        let id = link.id
        queue.schedule(at: readyAt) { [unowned self] in deliver(id, toListener: toListener) }
    }

    private func deliver(_ id: UInt64, toListener: Bool) {
        guard let link = links[id] else { return }
        let from = toListener ? link.dialer : link.listener
        let to = toListener ? link.listener : link.dialer
        let receiver = nodes[to]!
        let receiverIncarnation = toListener ? link.listenerIncarnation : link.dialerIncarnation
        while true {
            guard let head = toListener ? link.toListener.first : link.toDialer.first, head.readyAt <= now else { return }
            if let until = cutUntil(from, to) {
                // Held up: TCP retransmits once the partition heals.
                queue.schedule(at: until) { [unowned self] in deliver(id, toListener: toListener) }
                return
            }
            if receiver.up, receiver.incarnation == receiverIncarnation, receiver.pausedUntil > now {
                queue.schedule(at: receiver.pausedUntil) { [unowned self] in deliver(id, toListener: toListener) }
                return
            }
            if toListener { link.toListener.removeFirst() } else { link.toDialer.removeFirst() }
            let open = toListener ? link.listenerOpen : link.dialerOpen
            let alive = receiver.up && receiver.incarnation == receiverIncarnation
            switch head.payload {
            case .message(let message):
                guard open, alive else { continue }
                log("\(to) ← \(describe(message)) on conn#\(id)")
                if toListener {
                    guard receiver.primary != nil else { continue }
                    handlePrimary(receiver, receiver.primary!.onMessage(message, from: ConnectionID(id), now: local(receiver)))
                } else {
                    guard receiver.standby != nil, !receiver.promoting else { continue }
                    handleStandby(receiver, receiver.standby!.onMessage(message, from: ConnectionID(id), now: local(receiver)))
                }
            case .fin:
                guard open else { continue }
                if toListener { link.listenerOpen = false } else { link.dialerOpen = false }
                guard alive else { continue }
                if toListener, receiver.primary != nil {
                    handlePrimary(receiver, receiver.primary!.onDisconnected(ConnectionID(id), now: local(receiver)))
                } else if !toListener, receiver.standby != nil, !receiver.promoting {
                    handleStandby(receiver, receiver.standby!.onDisconnected(ConnectionID(id), now: local(receiver)))
                }
            }
            forgetIfClosed(link)
            if failure != nil { return }
        }
    }

    /// A side closes: it drops what arrives from now on, and its FIN follows its data.
    private func closeSide(_ id: UInt64, of node: SimNode) {
        guard let link = links[id] else { return }
        if link.dialer == node.id {
            guard link.dialerOpen else { return }
            link.dialerOpen = false
            enqueue(.fin, on: link, toListener: true)
        } else {
            guard link.listenerOpen else { return }
            link.listenerOpen = false
            enqueue(.fin, on: link, toListener: false)
        }
        forgetIfClosed(link)
    }

    private func forgetIfClosed(_ link: ReplicationLink) {
        if !link.dialerOpen, !link.listenerOpen, link.toListener.isEmpty, link.toDialer.isEmpty { links[link.id] = nil }
    }

    // MARK: The monitor's shell (MonitorService)

    private func scheduleMonitorTick() {
        onMonitor(after: monitor.clock.realDelay(params.monitorTickMs)) { [unowned self] in
            carryOutMonitor(monitor.core!.onTick(now: monitorNow), label: "monitor tick", replyTo: nil)
            if monitor.core != nil { scheduleMonitorTick() }
        }
    }

    /// Every `persist` is made durable before the actions after it; answers go only in reply to
    /// a heartbeat (pushed ones are not sent: a node learns its goal at its next heartbeat).
    private func carryOutMonitor(_ actions: [MonitorAction], label: @autoclosure () -> String, replyTo: (NodeID, Int)?) {
        if actions.contains(where: { if case .persist = $0 { return true } else { return false } }) || replyTo == nil && !actions.isEmpty {
            log(label())
        }
        for action in actions {
            switch action {
            case .persist(let change):
                let before = monitorState
                do { try monitor.store.save(change) } catch { return fail("the monitor's store refused a change: \(error)") }
                let after = monitorState
                if after.epoch < before.epoch { fail("invariant 3: the monitor's epoch went back from \(before.epoch) to \(after.epoch)") }
                let writer = after.writer!.id
                if let holder = writerGoalOfEpoch[after.epoch], holder != writer {
                    fail("invariant 3: two writer goals in epoch \(after.epoch): \(holder) and \(writer)")
                }
                writerGoalOfEpoch[after.epoch] = writer
                if after.epoch > before.epoch { count(forcedEpochs.contains(after.epoch) ? "monitor.epochRaised.forced" : "monitor.epochRaised") }
                for record in change.nodes where before.node(record.id)?.goal != record.goal { count("goal.\(record.goal)") }
                for record in change.nodes where record.promotable && before.node(record.id)?.promotable == false { count("monitor.promotable") }
                log("  persist: epoch \(change.epoch.map(\.description) ?? "=") \(change.nodes.map { "\($0.id):\($0.goal)#\($0.goalSequence)\($0.promotable ? "+P" : "")" })")
                if faultsActive, rng.chance(params.faults.monitorDiesAfterPersistChance) {
                    count("fault.monitorDiesAfterPersist")
                    crashMonitor()
                    return
                }
            case .answer(let id, let assignment):
                guard let held = monitorState.node(id), held.goal == assignment.goal, held.goalSequence == assignment.sequence,
                      monitorState.epoch == assignment.epoch else {
                    return fail("answer before persist: \(id) told \(assignment), the store holds \(String(describing: monitorState.node(id)))")
                }
                if let (to, incarnation) = replyTo, to == id {
                    log("  answer \(id): \(assignment)")
                    sendAnswer(.assignment(assignment), to: id, incarnation: incarnation)
                }
            case .refuse(let id, let reason):
                if let (to, incarnation) = replyTo, to == id {
                    log("  refuse \(id): \(reason)")
                    sendAnswer(.refusal(reason), to: id, incarnation: incarnation)
                }
            case .event(let event):
                count("event.\(event.kind.rawValue)")
                log("  event \(event)")
            }
        }
        if let core = monitor.core {
            let stored = monitorState
            if core.state.epoch != stored.epoch || core.state.nodes != stored.nodes {
                fail("the monitor core's state differs from its store's after \(label())")
            }
        }
    }

    func crashMonitor() {
        guard monitor.up else { return }
        log("monitor dies")
        count("fault.monitorCrash")
        monitor.up = false
        monitor.core = nil
        monitor.incarnation += 1
    }

    func restartMonitor() {
        guard !monitor.up else { return }
        monitor.up = true
        monitor.incarnation += 1
        let loaded = try! monitor.store.load()!
        monitor.core = MonitorCore(state: loaded, config: params.monitor, now: monitorNow)
        log("monitor restarts from its store in epoch \(loaded.epoch)")
        scheduleMonitorTick()
    }

    // MARK: Operators

    enum Command: CustomStringConvertible {
        case switchover, failover
        case maintenance(NodeID, Bool)
        case promote(NodeID, force: Bool)

        var description: String {
            switch self {
            case .switchover: return "switchover"
            case .failover: return "failover"
            case .maintenance(let n, let on): return "maintenance \(on ? "on" : "off") \(n)"
            case .promote(let n, let force): return "promote \(n)\(force ? " --force --accept-data-loss" : "")"
            }
        }

        var key: String {
            switch self {
            case .switchover: return "switchover"
            case .failover: return "failover"
            case .maintenance(_, let on): return on ? "maintenanceOn" : "maintenanceOff"
            case .promote(_, let force): return force ? "forcedPromote" : "promote"
            }
        }
    }

    /// An operator's command; nil when the monitor cannot be reached.
    @discardableResult
    func command(_ command: Command) -> CommandResult? {
        guard monitor.up, monitor.pausedUntil <= now, monitor.core != nil else {
            count("command.unreachable")
            return nil
        }
        let before = monitorState.epoch
        let t = monitorNow
        let result: CommandResult
        switch command {
        case .switchover: result = monitor.core!.onSwitchover(now: t)
        case .failover: result = monitor.core!.onFailoverDrill(now: t)
        case .maintenance(let n, let on): result = monitor.core!.onMaintenance(n, enabled: on, now: t)
        case .promote(let n, let force): result = monitor.core!.onPromote(n, force: force, acceptDataLoss: force, now: t)
        }
        count("command.\(command.key).\(result.accepted ? "accepted" : "refused")")
        if result.accepted, result.dataLoss != nil {
            // The persist below raises the epoch: the promotion into it accepts a loss.
            forcedEpochs.insert(before.next)
            lastDataLoss = result.dataLoss
        }
        carryOutMonitor(result.actions, label: "operator: \(command): \(result.accepted ? "accepted" : "refused"): \(result.message)", replyTo: nil)
        return result
    }

    private func randomCommand() {
        let n = rng.pick(nodeIDs)
        switch rng.int(0...9) {
        case 0...2: command(.switchover)
        case 3: command(.failover)
        case 4: command(.maintenance(n, true))
        case 5...6: command(.maintenance(n, false))
        default: command(.promote(n, force: rng.chance(params.faults.forcedPromotionChance)))
        }
    }

    // MARK: Partitions

    private func cut(_ from: String, _ to: String) -> Bool { cutUntil(from, to) != nil }

    private func cutUntil(_ from: String, _ to: String) -> Int64? {
        cuts.filter { $0.from == from && $0.to == to && $0.until > now }.map(\.until).max()
    }

    /// Nothing goes from `from` to `to` for `ms` (both ways with `symmetric`).
    func partition(_ from: String, _ to: String, forMs ms: Int64, symmetric: Bool = true) {
        cuts.removeAll { $0.until <= now }
        cuts.append(Cut(from: from, to: to, until: now + ms))
        if symmetric { cuts.append(Cut(from: to, to: from, until: now + ms)) }
        log("partition \(from) \(symmetric ? "↔" : "→") \(to) for \(ms) ms")
    }

    func healPartitions() {
        cuts = []
        log("partitions healed")
        for id in links.keys.sorted() {
            deliver(id, toListener: true)
            deliver(id, toListener: false)
        }
    }

    // MARK: Faults

    private func scheduleFaults() {
        let f = params.faults
        let kinds: [(Int64?, () -> Void)] = [
            (f.nodeCrashMs, { [unowned self] in crashRandomNode() }),
            (f.monitorCrashMs, { [unowned self] in
                crashMonitor()
                after(random(20...1_500)) { [unowned self] in if faultsActive { restartMonitor() } }
            }),
            (f.pauseMs, { [unowned self] in pauseSomething() }),
            (f.partitionMs, { [unowned self] in randomPartition() }),
            (f.resetMs, { [unowned self] in resetLinks() }),
            (f.operatorMs, { [unowned self] in randomCommand() }),
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

    private func crashRandomNode() {
        let node = nodes[rng.pick(nodeIDs)]!
        guard node.up else { return }
        let loseUnsynced = rng.chance(params.faults.loseUnsyncedChance)
        count(loseUnsynced ? "fault.machineCrash" : "fault.processCrash")
        kill(node, loseUnsynced: loseUnsynced)
        let incarnation = node.incarnation
        after(random(20...1_500)) { [unowned self] in
            guard faultsActive, !node.up, node.incarnation == incarnation else { return }
            restart(node)
        }
    }

    private func pauseSomething() {
        let duration = random(20...(2 * params.replication.leaseMs + 400))
        if rng.chance(0.25) {
            count("fault.pauseMonitor")
            monitor.pausedUntil = max(monitor.pausedUntil, now + duration)
            log("monitor paused for \(duration) ms")
        } else {
            let node = nodes[rng.pick(nodeIDs)]!
            count("fault.pauseNode")
            node.pausedUntil = max(node.pausedUntil, now + duration)
            log("\(node.id) paused for \(duration) ms")
        }
    }

    private func randomPartition() {
        let ms = random(50...2_000)
        let writer = monitorState.writer!.id
        let m = Self.monitorName
        switch rng.int(0...5) {
        case 0:
            count("fault.partition.primaryStandby")
            partition(Self.a, Self.b, forMs: ms)
        case 1:
            count("fault.partition.oneWay")
            let ends = [Self.a, Self.b, m]
            let from = rng.pick(ends)
            partition(from, rng.pick(ends.filter { $0 != from }), forMs: ms, symmetric: false)
        case 2:
            count("fault.partition.monitorIsolated")
            partition(m, Self.a, forMs: ms)
            partition(m, Self.b, forMs: ms)
        case 3:
            count("fault.partition.primaryFromMonitor")
            partition(writer, m, forMs: ms)
        case 4:
            count("fault.partition.nodeIsolated")
            let isolated = rng.pick(nodeIDs)
            partition(isolated, m, forMs: ms)
            partition(isolated, nodes[isolated]!.peer, forMs: ms)
        default:
            count("fault.partition.standbyFromMonitor")
            partition(nodes[writer]!.peer, m, forMs: ms)
        }
    }

    /// Every replication connection breaks; each side learns it a little later.
    func resetLinks() {
        count("fault.reset")
        log("connections reset")
        for id in links.keys.sorted() {
            let link = links[id]!
            link.toListener = []
            link.toDialer = []
            for (nodeID, incarnation, listenerSide) in [(link.dialer, link.dialerIncarnation, false), (link.listener, link.listenerIncarnation, true)] {
                let node = nodes[nodeID]!
                guard node.up, node.incarnation == incarnation else { continue }
                onNode(node, after: random(0...20)) { [unowned self] in
                    if listenerSide, link.listenerOpen {
                        link.listenerOpen = false
                        if node.primary != nil { handlePrimary(node, node.primary!.onDisconnected(ConnectionID(id), now: local(node))) }
                    } else if !listenerSide, link.dialerOpen {
                        link.dialerOpen = false
                        if node.standby != nil, !node.promoting { handleStandby(node, node.standby!.onDisconnected(ConnectionID(id), now: local(node))) }
                    }
                    forgetIfClosed(link)
                }
            }
        }
    }

    /// Ends the fault phase: every process up and running, the network whole; an operator
    /// takes nodes out of maintenance.
    func heal() {
        faultsActive = false
        log("HEAL")
        healPartitions()
        monitor.pausedUntil = min(monitor.pausedUntil, now)
        for node in nodes.values { node.pausedUntil = min(node.pausedUntil, now) }
        restartMonitor()
        for id in nodeIDs { restart(nodes[id]!) }
        healing = true
        maintenanceOffLoop()
    }

    private func maintenanceOffLoop() {
        after(300) { [unowned self] in
            guard healing else { return }
            for record in monitorState.nodes where record.maintenanceRequested || record.goal == .maintenance {
                command(.maintenance(record.id, false))
            }
            maintenanceOffLoop()
        }
    }

    // MARK: Checks

    /// Invariants 4 and 5 at this instant: two nodes that could both commit or serve strong
    /// reads (a primary core that has not stepped down and holds its lease, on its own clock).
    private func checkInstant() {
        let capable = nodeIDs.compactMap { id -> (NodeID, Epoch, ReplicationMode)? in
            let n = nodes[id]!
            guard n.up, let p = n.primary, p.steppedDownTo == nil, p.holdsLease(now: local(n)) else { return nil }
            return (id, p.epoch, p.mode)
        }
        guard capable.count == 2 else { return }
        let older = min(capable[0].1, capable[1].1)
        if capable[0].1 != capable[1].1, forcedEpochs.contains(where: { $0 > older }) { return count("dualWriter.afterForcedPromotion") }
        fail("invariants 4/5: \(capable[0].0) (epoch \(capable[0].1), \(capable[0].2.name)) and \(capable[1].0) (epoch \(capable[1].1), \(capable[1].2.name)) can both commit and serve strong reads")
    }

    /// Nil once the formation is a primary in sync mode and a promotable secondary streaming
    /// from it with the same databases and no write outstanding; else what is missing.
    func convergenceProblem() -> String? {
        guard monitor.up, monitor.core != nil else { return "the monitor is down" }
        let state = monitorState
        guard let w = state.writer, let s = state.other(than: w.id) else { return "no writer" }
        guard w.goal == .primary, w.reported == .primary else { return "writer \(w.id) has goal \(w.goal), reported \(w.reported.map(\.rawValue) ?? "-")" }
        guard s.goal == .secondary, s.reported == .secondary, s.promotable else {
            return "\(s.id) has goal \(s.goal), reported \(s.reported.map(\.rawValue) ?? "-"), promotable \(s.promotable)"
        }
        let pn = nodes[w.id]!, sn = nodes[s.id]!
        guard pn.up, let p = pn.primary, p.steppedDownTo == nil, p.epoch == state.epoch, p.mode == .sync, !p.draining,
              let c = p.standbyConnection else { return "\(w.id) is not a streaming sync primary of epoch \(state.epoch): \(pn.roleDescription)" }
        guard sn.up, let sc = sn.standby, !sn.promoting, sc.streamingConnection == c, sc.epoch == state.epoch else {
            return "\(s.id) is not streaming from \(w.id) in epoch \(state.epoch): \(sn.roleDescription)"
        }
        guard pn.writes.isEmpty, sn.writes.isEmpty else { return "writes outstanding" }
        for tenant in Set(pn.disks.keys).union(sn.disks.keys).sorted() {
            let pd = pn.disk(tenant), sd = sn.disk(tenant)
            let last = pd.lastLSN
            guard pd.appliedLSN == last, (p.status(of: tenant)?.committedLSN ?? 0) == last, (p.status(of: tenant)?.pendingCommits ?? 0) == 0 else {
                return "\(tenant): \(w.id) published \(pd.appliedLSN) of \(last)"
            }
            guard sd.appliedLSN == last, sd.queue.isEmpty, !sd.busy else { return "\(tenant): \(s.id) applied \(sd.appliedLSN) of \(last)" }
            guard sd.db == pd.db else { return "invariant 6: \(tenant) databases differ at lsn \(last)" }
        }
        return nil
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
        case .hello(let m): return "hello(e\(m.epoch) \(m.tenants.map { "\($0.tenant) applied \($0.appliedLSN) last \($0.lastLSN)" }))"
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
        case .readLog(_, let r): return "readLog \(r.tenant) \(r.fromLSN)...\(r.throughLSN)"
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
