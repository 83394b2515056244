import ApiaryCore
import ApiaryMonitor
import ApiaryReplication

// A monitor core with two modelled nodes around it, for the scenario DSL and the randomized
// test. The nodes follow the keeper's contract (docs/monitor.md): a node applies assignments in
// sequence order, steps down before it adopts a newer epoch, commits in sync mode only with its
// standby's ack and alone only in wait_primary, and a demoted node that rejoins discards what
// lies past the new primary's position. Every core call is checked as it is made:
//
// - every `persist` is applied to an in-memory store, and the core's state equals the store's;
// - every answer agrees with what the store already holds (persist before answer), and an answer
//   of wait_primary finds the other node durably not promotable;
// - the epoch never goes back, one node per epoch holds a writer goal (and, among the modelled
//   nodes, the primary role), and a raised epoch's writer was promotable unless an operator
//   forced it;
// - no lost acks: a node promoted without force holds every write acknowledged before.

let acme = try! TenantID("acme")
let globex = try! TenantID("globex")

/// One modelled node: what its data directory and keeper hold.
struct SimNode: CustomStringConvertible {
    let id: NodeID
    var alive = true
    /// Whether its heartbeats reach the monitor and answers come back.
    var monitorLink = true
    var role: NodeState.Role
    var epoch: Epoch
    var reached: ReachedGoal?
    var appliedSequence: UInt64 = 0
    /// An answer received and not yet acted on.
    var pending: Assignment?
    /// Primary: committed lsn per tenant; standby: durable lsn per tenant.
    var lsns: [TenantID: LSN]

    var description: String {
        "\(id)[\(alive ? "up" : "down")\(monitorLink ? "" : ",cut-from-monitor") \(role.rawValue) e\(epoch) reached \(reached.map(\.description) ?? "-") lsns \(lsns.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ","))]"
    }
}

enum Who {
    case a, b
    /// The node the monitor holds as the writer now.
    case primary
    /// The other one.
    case standby
}

final class SimCluster {
    let config: MonitorConfig
    private(set) var core: MonitorCore
    let store: InMemoryMonitorStore
    var now: Milliseconds = 0
    var nodes: [NodeID: SimNode]
    let ids: [NodeID] = ["a", "b"]
    /// The replication link between the two nodes.
    var streamUp = true
    /// Answers are acted on at once (scenarios) or only at `keeperStep` (randomized runs).
    var applyAnswersAtOnce = true

    // What the checks keep.
    private(set) var violations: [String] = []
    private(set) var trace: [String] = []
    var traceEnabled = true
    /// Per tenant, the highest lsn acknowledged to a client by a primary of an epoch at or
    /// after `lineageFloor` (a forced promotion starts a new lineage: its loss was accepted).
    private(set) var acked: [TenantID: LSN] = [:]
    private var lineageFloor = Epoch(1)
    private var forcedEpochs: Set<Epoch> = []
    private var writerOfEpoch: [Epoch: NodeID] = [:]
    private var primaryRoleOfEpoch: [Epoch: NodeID] = [:]
    private(set) var stats: [String: Int] = [:]

    // What the last calls returned.
    private(set) var lastActions: [MonitorAction] = []
    private(set) var lastRefusal: [NodeID: String] = [:]
    private(set) var lastAnswer: [NodeID: Assignment] = [:]
    private(set) var events: [MonitorEvent] = []

    init(config: MonitorConfig = SimCluster.defaultConfig, lsns: LSN = 0, singleNode: Bool = false) {
        self.config = config
        let state = try! MonitorState.bootstrap(
            formation: "f1", primary: FormationNode(id: "a", zone: "zone-a"),
            standby: singleNode ? nil : FormationNode(id: "b", zone: "zone-b"), epoch: Epoch(1))
        store = InMemoryMonitorStore()
        try! store.create(state)
        core = MonitorCore(state: state, config: config, now: 0)
        let start: [TenantID: LSN] = [acme: lsns, globex: lsns]
        nodes = ["a": SimNode(id: "a", role: .primary, epoch: Epoch(1), lsns: start)]
        if !singleNode { nodes["b"] = SimNode(id: "b", role: .standby, epoch: Epoch(1), lsns: start) }
        writerOfEpoch[Epoch(1)] = "a"
        primaryRoleOfEpoch[Epoch(1)] = "a"
        acked = start
    }

    static var defaultConfig: MonitorConfig {
        var c = MonitorConfig()
        c.primaryTimeoutMs = 500
        c.standbyTimeoutMs = 500
        c.startupGraceMs = 2_000
        c.switchoverTimeoutMs = 5_000
        return c
    }

    // MARK: Looking

    var state: MonitorState { store.state! }
    var epoch: Epoch { state.epoch }

    func id(_ who: Who) -> NodeID {
        switch who {
        case .a: return "a"
        case .b: return "b"
        case .primary: return state.writer!.id
        case .standby: return state.other(than: state.writer!.id)!.id
        }
    }

    func record(_ who: Who) -> NodeRecord { state.node(id(who))! }
    func goal(_ who: Who) -> KeeperState { record(who).goal }
    func promotable(_ who: Who) -> Bool { record(who).promotable }
    func node(_ who: Who) -> SimNode { nodes[id(who)]! }

    func events(containing text: String) -> [MonitorEvent] { events.filter { $0.text.contains(text) } }

    // MARK: Faults

    func kill(_ who: Who) { let i = id(who); nodes[i]!.alive = false; log("kill \(i)") }

    /// Starts a killed node again: its role, epoch and lsns are durable; the goal it reached
    /// and unapplied answers are not.
    func revive(_ who: Who) {
        let i = id(who)
        nodes[i]!.alive = true
        nodes[i]!.reached = nil
        nodes[i]!.pending = nil
        log("revive \(i)")
    }

    func cutStream() { streamUp = false; log("stream cut") }
    func healStream() { streamUp = true; log("stream healed") }
    func cutFromMonitor(_ who: Who) { let i = id(who); nodes[i]!.monitorLink = false; log("\(i) cut from the monitor") }
    func healMonitorLink(_ who: Who) { let i = id(who); nodes[i]!.monitorLink = true; log("\(i) reaches the monitor again") }

    /// The monitor process restarts from its store.
    func restartMonitor() {
        let loaded = try! store.load()!
        core = MonitorCore(state: loaded, config: config, now: now)
        log("monitor restarted at \(now) in epoch \(loaded.epoch)")
        check(core.state == store.state, "a restarted core's state differs from its store's")
    }

    // MARK: Time and heartbeats

    /// Advances time by `ms` in steps of `step`: at each step every live node that reaches the
    /// monitor sends its heartbeat, the stream catches up, and the monitor ticks.
    func run(ms: Milliseconds, step: Milliseconds = 50, commitsPerStep: Int = 0) {
        var elapsed: Milliseconds = 0
        while elapsed < ms {
            now += step
            elapsed += step
            for i in ids where nodes[i] != nil { heartbeat(i) }
            for _ in 0..<commitsPerStep { commit() }
            replicate()
            tick()
        }
    }

    /// Advances time without heartbeats, then ticks.
    func advance(ms: Milliseconds) {
        now += ms
        tick()
    }

    func tick() { process(core.onTick(now: now), label: "tick") }

    /// A heartbeat from the modelled node, built from what it holds (nothing when it is down or
    /// cut off from the monitor).
    @discardableResult
    func heartbeat(_ who: Who) -> [MonitorAction] { heartbeat(id(who)) }

    @discardableResult
    func heartbeat(_ i: NodeID) -> [MonitorAction] {
        guard let n = nodes[i], n.alive, n.monitorLink else { return [] }
        return heartbeat(i, report: report(of: i))
    }

    /// A heartbeat with a report made up by the test (bad input).
    @discardableResult
    func heartbeat(_ i: NodeID, report: NodeReport, role: PeerRole = .node) -> [MonitorAction] {
        let before = state
        let actions = core.onHeartbeat(node: PeerIdentity(nodeID: i, role: role), report: report, now: now)
        process(actions, label: "heartbeat \(i) \(report.role.rawValue) e\(report.epoch) reached \(report.reached.map(\.description) ?? "-") streaming=\(report.streaming)")
        if actions.contains(where: { if case .refuse = $0 { return true } else { return false } }) {
            check(state.nodes == before.nodes && state.epoch == before.epoch, "a refused heartbeat changed the state")
        }
        return actions
    }

    /// Reports sent and held up in the network (a stalled connection), per node, oldest first.
    private(set) var delayed: [NodeID: [NodeReport]] = [:]

    /// Node `i` sends a heartbeat that the network holds up: it arrives later, out of order.
    func delayHeartbeat(_ i: NodeID) {
        guard let n = nodes[i], n.alive, n.monitorLink else { return }
        delayed[i, default: []].append(report(of: i))
        if delayed[i]!.count > 4 { delayed[i]!.removeFirst() }
        log("\(i)'s heartbeat held up in the network")
    }

    /// A held-up heartbeat of node `i` arrives now (after newer ones).
    func deliverDelayedHeartbeat(_ i: NodeID, index: Int) {
        guard var held = delayed[i], !held.isEmpty else { return }
        let report = held.remove(at: index % held.count)
        delayed[i] = held
        bump("stale heartbeat delivered")
        heartbeat(i, report: report)
    }

    /// What node `i` would report now.
    func report(of i: NodeID) -> NodeReport {
        let n = nodes[i]!
        var tenants: [TenantID: TenantReport] = [:]
        let streaming: Bool
        if n.role == .primary {
            let s = other(i)
            streaming = s.map { streams(from: i, to: $0) } ?? false
            for (t, lsn) in n.lsns { tenants[t] = TenantReport(lsn: lsn, standbyLSN: streaming ? nodes[s!]!.lsns[t] ?? 0 : nil) }
        } else {
            streaming = other(i).map { streams(from: $0, to: i) } ?? false
            for (t, lsn) in n.lsns { tenants[t] = TenantReport(lsn: lsn) }
        }
        return NodeReport(role: n.role, epoch: n.epoch, reached: n.reached, tenants: tenants, streaming: streaming)
    }

    // MARK: Operators

    @discardableResult
    func switchover() -> CommandResult { command("switchover") { $0.onSwitchover(now: now) } }
    @discardableResult
    func failover() -> CommandResult { command("failover drill") { $0.onFailoverDrill(now: now) } }
    @discardableResult
    func maintenance(_ who: Who, _ enabled: Bool) -> CommandResult {
        let i = id(who)
        return command("maintenance \(enabled ? "on" : "off") \(i)") { $0.onMaintenance(i, enabled: enabled, now: now) }
    }
    @discardableResult
    func promote(_ i: NodeID, force: Bool = false, acceptDataLoss: Bool = false) -> CommandResult {
        command("promote \(i) force=\(force) accept=\(acceptDataLoss)") { $0.onPromote(i, force: force, acceptDataLoss: acceptDataLoss, now: now) }
    }

    private func command(_ label: @autoclosure () -> String, _ body: (inout MonitorCore) -> CommandResult) -> CommandResult {
        let before = state
        let result = body(&core)
        if result.accepted, result.dataLoss != nil {
            // A forced promotion raises the epoch in the persist that `process` applies below.
            forcedEpochs.insert(before.epoch.next)
        }
        process(result.actions, label: "\(label()): \(result.accepted ? "accepted" : "refused"): \(result.message)")
        if !result.accepted {
            check(state.nodes == before.nodes && state.epoch == before.epoch, "a refused command changed the state")
            bump("refused \(label().split(separator: " ").first!)")
        } else {
            bump("accepted \(label().split(separator: " ").first!)")
        }
        return result
    }

    // MARK: The modelled data path

    /// A client write to tenant `t` on every node that believes it is primary and can commit.
    func commit(_ t: TenantID = acme) {
        for i in ids where nodes[i]?.alive == true && nodes[i]!.role == .primary {
            guard let mode = nodes[i]!.reached?.state, mode.isWriter else { continue }
            let s = other(i)
            let streaming = s.map { streams(from: i, to: $0) } ?? false
            let caughtUp = streaming && nodes[s!]!.lsns[t, default: 0] == nodes[i]!.lsns[t, default: 0]
            switch mode {
            case .primary:
                guard caughtUp else { continue } // waits for the standby's ack; fails after standbyWaitMs
                nodes[s!]!.lsns[t, default: 0] += 1
                nodes[i]!.lsns[t, default: 0] += 1
            case .waitPrimary, .single:
                if caughtUp { nodes[s!]!.lsns[t, default: 0] += 1 }
                nodes[i]!.lsns[t, default: 0] += 1
            default:
                continue // draining takes no new commit
            }
            if nodes[i]!.epoch >= lineageFloor { acked[t] = max(acked[t, default: 0], nodes[i]!.lsns[t]!) }
            bump("commit \(mode)")
        }
    }

    /// The stream moves the standby up to `records` closer to its primary, per tenant.
    func replicate(records: LSN = .max) {
        for p in ids where nodes[p]?.role == .primary {
            guard let s = other(p), streams(from: p, to: s) else { continue }
            for (t, lsn) in nodes[p]!.lsns {
                let held = nodes[s]!.lsns[t, default: 0]
                if held < lsn { nodes[s]!.lsns[t] = held + min(records, lsn - held) }
            }
        }
    }

    /// The keeper of node `i` acts on the answer it holds (randomized runs).
    func keeperStep(_ i: NodeID) {
        guard let n = nodes[i], n.alive, let a = n.pending else { return }
        nodes[i]!.pending = nil
        apply(a, at: i)
    }

    private func streams(from p: NodeID, to s: NodeID) -> Bool {
        guard streamUp, let pn = nodes[p], let sn = nodes[s], pn.alive, sn.alive else { return false }
        return pn.role == .primary && sn.role == .standby && pn.epoch == sn.epoch && sn.reached?.state != .maintenance
    }

    private func other(_ i: NodeID) -> NodeID? { ids.first { $0 != i && nodes[$0] != nil } }

    /// The keeper's rules for an assignment.
    private func apply(_ a: Assignment, at i: NodeID) {
        var n = nodes[i]!
        guard a.sequence >= n.appliedSequence else { return }
        n.appliedSequence = a.sequence
        if !a.goal.isWriter && n.role == .primary { n.role = .demoted } // step down before adopting
        if a.epoch > n.epoch { n.epoch = a.epoch }
        switch a.goal {
        case .single, .primary, .waitPrimary, .draining:
            if n.role != .primary {
                // Promotion (after the lease wait, which the model leaves out).
                if forcedEpochs.contains(a.epoch) {
                    lineageFloor = a.epoch
                    acked = n.lsns
                    bump("forced promotion applied")
                } else {
                    for (t, lsn) in acked where n.lsns[t, default: 0] < lsn {
                        violation("no lost acks: \(i) promoted in epoch \(a.epoch) holds \(t) up to \(n.lsns[t, default: 0]), but \(lsn) was acknowledged")
                    }
                    bump("promotion applied")
                }
                n.role = .primary
            }
        case .secondary, .catchingUp:
            if n.role == .demoted, let w = other(i) {
                // Rejoin: compare histories with the new primary, discard what lies past it.
                for (t, lsn) in n.lsns { n.lsns[t] = min(lsn, nodes[w]!.lsns[t, default: 0]) }
                n.role = .standby
                bump("rejoined")
            }
        case .demoted:
            if n.role == .standby { n.role = .demoted }
        case .maintenance:
            break
        }
        n.reached = ReachedGoal(a.goal, sequence: a.sequence)
        nodes[i] = n
        if n.role == .primary {
            if let holder = primaryRoleOfEpoch[n.epoch], holder != i {
                violation("one writer per epoch: \(i) and \(holder) both primary in epoch \(n.epoch)")
            }
            primaryRoleOfEpoch[n.epoch] = i
        }
        log("\(i) applies \(a): \(nodes[i]!)")
    }

    // MARK: Checks

    private func process(_ actions: [MonitorAction], label: @autoclosure () -> String) {
        lastActions = actions
        log(label())
        var sawRefuse = false
        for action in actions {
            switch action {
            case .persist(let change):
                let before = state
                do { try store.save(change) } catch { violation("save failed: \(error)") }

                let after = state
                if after.epoch < before.epoch { violation("epoch went back from \(before.epoch) to \(after.epoch)") }
                let writer = after.writer!.id
                if let holder = writerOfEpoch[after.epoch], holder != writer {
                    violation("two writer goals in epoch \(after.epoch): \(holder) and \(writer)")
                }
                writerOfEpoch[after.epoch] = writer
                if after.epoch > before.epoch {
                    let wasPromotable = before.node(writer)!.promotable
                    if !wasPromotable && !forcedEpochs.contains(after.epoch) {
                        violation("\(writer) promoted in epoch \(after.epoch) without being promotable and without force")
                    }
                    bump(forcedEpochs.contains(after.epoch) ? "epoch raised (forced)" : "epoch raised")
                }
                for node in change.nodes where before.node(node.id)?.goal != node.goal { bump("goal \(node.goal)") }
                for node in change.nodes where node.promotable && before.node(node.id)?.promotable == false { bump("became promotable") }
                log("  persist: epoch \(change.epoch.map(\.description) ?? "=") nodes \(change.nodes.map { "\($0.id):\($0.goal)#\($0.goalSequence)\($0.promotable ? "+P" : "")" })")
            case .answer(let i, let a):
                guard let held = state.node(i) else { violation("answer to unknown \(i)"); continue }
                if held.goal != a.goal || held.goalSequence != a.sequence || state.epoch != a.epoch {
                    violation("answer before persist: \(i) told \(a) while the store holds \(held.goal) #\(held.goalSequence) in epoch \(state.epoch)")
                }
                if a.goal == .waitPrimary, let o = state.other(than: i), o.promotable {
                    violation("\(i) told wait_primary while \(o.id) is durably promotable")
                }
                lastAnswer[i] = a
                log("  answer \(i): \(a)")
                if var n = nodes[i], n.alive, n.monitorLink {
                    if applyAnswersAtOnce { apply(a, at: i) } else {
                        n.pending = a
                        nodes[i] = n
                    }
                }
            case .refuse(let i, let reason):
                sawRefuse = true
                lastRefusal[i] = reason
                log("  refuse \(i): \(reason)")
            case .event(let e):
                events.append(e)
                if events.count > 2_000 { events.removeFirst(1_000) }
                log("  event \(e)")
            }
        }
        if sawRefuse { bump("heartbeat refused") }
        check(sameState(core.state, store.state!), "the core's state differs from its store's after \(label())")
    }

    /// Equal states (the history compared by its length and last entry: both sides append the
    /// same entries through the same `apply`).
    private func sameState(_ x: MonitorState, _ y: MonitorState) -> Bool {
        x.epoch == y.epoch && x.nodes == y.nodes && x.formation == y.formation
            && x.events.count == y.events.count && x.events.last == y.events.last
    }

    func check(_ condition: Bool, _ message: @autoclosure () -> String) {
        if !condition { violation(message()) }
    }

    private func violation(_ message: String) {
        violations.append("at \(now) ms: \(message)")
        log("VIOLATION: \(message)")
    }

    func bump(_ key: String) { stats[key, default: 0] += 1 }

    func log(_ line: @autoclosure () -> String) {
        guard traceEnabled else { return }
        trace.append("[\(now)] \(line())")
        if trace.count > 4_000 { trace.removeFirst(2_000) }
    }
}
