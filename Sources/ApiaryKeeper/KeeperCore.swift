// ApiaryKeeper: the node's half of the monitor protocol (DESIGN §6), as a pure state machine.
//
// The monitor tells each node a goal (`Assignment`); the keeper works out the steps that take
// the node there from where it is (its durable role, epoch and mode, and how its primary is set
// up), one step at a time, and what the node reports back (`NodeReport`). The node's shell
// carries out each step (stop committing, wait out a lease, start streaming …), records the
// result durably, and says when it is done. The rules of docs/monitor.md ("What the keeper
// needs") live here, not in the shell, so that the simulator can drive them:
//
// - Assignments apply in sequence order; an older one is ignored.
// - A primary steps down (durably `demoted`, in its own epoch) before it adopts a newer epoch,
//   and never adopts one while it is primary.
// - Epochs move only by the monitor's word (`NodeState.adopting(_:from: .monitor)`).
// - A goal is reported reached only once the step that reaches it is done, with the sequence
//   of the assignment that asked for it; a role change forgets a reached goal the new role
//   contradicts (the monitor refuses such a report).
// - A standby is promoted only into a newer epoch; a demoted node is never promoted (it may
//   lack acknowledged writes) and rejoins only as the standby of the node the monitor names.
import ApiaryCore
import ApiaryMonitor
import ApiaryReplication

/// How a primary is set up: what the monitor's writer goals differ in.
public struct PrimarySetup: Hashable, Sendable, CustomStringConvertible {
    public var mode: ReplicationMode
    /// The only node that may replicate from it; nil: none.
    public var standby: NodeID?
    /// A switchover hands over: no new commit is taken.
    public var draining: Bool

    public init(mode: ReplicationMode, standby: NodeID?, draining: Bool = false) {
        self.mode = mode
        self.standby = standby
        self.draining = draining
    }

    /// What a writer goal asks for, with `peer` as the standby.
    public init?(goal: KeeperState, peer: NodeID?) {
        switch goal {
        case .single: self.init(mode: .single, standby: nil)
        case .primary: self.init(mode: .sync, standby: peer)
        case .waitPrimary: self.init(mode: .waitPrimary, standby: peer)
        case .draining: self.init(mode: .sync, standby: peer, draining: true)
        case .secondary, .catchingUp, .demoted, .maintenance: return nil
        }
    }

    public var description: String { "\(mode.name), standby \(standby ?? "none")" + (draining ? ", draining" : "") }
}

/// One step the node's shell carries out for its keeper. Steps run one at a time.
public enum KeeperStep: Hashable, Sendable, CustomStringConvertible {
    /// A primary that must not stay one (a newer epoch exists, or its goal is not a writer's):
    /// stop committing and serving strong reads at once; durably `demoted`, in its own epoch.
    case stepDown
    /// A standby or demoted node records the monitor's newer epoch durably (its role unchanged).
    /// A standby's stream in the older epoch ends: its primary is stale.
    case adoptEpoch(Epoch)
    /// A standby becomes the primary of `epoch`, a newer one: stop taking the stream, wait out
    /// the last lease it granted (plus the drift margin) so that the old primary has stopped,
    /// apply every record it holds, record the new state durably, then commit as `setup` says.
    /// With `handover` (a switchover: the former writer drained and uses no lease) there is no
    /// lease to wait out.
    case promote(epoch: Epoch, setup: PrimarySetup, handover: Bool)
    /// A primary changes its setup. A mode is recorded durably before it is used: a restart
    /// must not come back committing alone when the monitor believes it commits in sync.
    case configurePrimary(PrimarySetup)
    /// A demoted node (a former primary) becomes the standby of `primary` in its epoch: its
    /// database and log are prepared as a standby's, the role recorded durably, and it streams
    /// from `primary`; the primary compares histories and has it discard what lies past the
    /// point where they diverge (a snapshot when its database itself is past it).
    case follow(primary: NodeID)

    public var description: String {
        switch self {
        case .stepDown: return "step down"
        case .adoptEpoch(let epoch): return "adopt epoch \(epoch)"
        case .promote(let epoch, let setup, let handover): return "promote to primary of epoch \(epoch) (\(setup)\(handover ? ", hand-over: no lease to wait out" : ""))"
        case .configurePrimary(let setup): return "set up the primary: \(setup)"
        case .follow(let primary): return "follow \(primary) as its standby"
        }
    }
}

/// What the keeper wants the shell to do after an event.
public enum KeeperAction: Hashable, Sendable {
    /// Start this step now (no other is running); report back with ``KeeperCore/onStepDone(now:)``
    /// or ``KeeperCore/onStepFailed(_:)``.
    case run(KeeperStep)
    /// Something the operator should read in the node's log (an assignment it cannot follow).
    case note(String)
}

/// The keeper of one node.
public struct KeeperCore: Sendable {
    /// The node's durable state, as of the last completed step.
    public private(set) var state: NodeState
    /// How the primary is set up now; nil unless the node is primary.
    public private(set) var primarySetup: PrimarySetup?
    /// The newest assignment taken (the highest sequence).
    public private(set) var target: Assignment?
    /// The last goal reached, nil since the start until one is.
    public private(set) var reached: ReachedGoal?
    /// The step the shell is carrying out.
    public private(set) var running: KeeperStep?
    /// The last note given, so that one that holds is said once.
    private var lastNote: String?

    /// - Parameters:
    ///   - state: the node's durable state at startup.
    ///   - primarySetup: a primary's setup at startup, ignored unless `state` is primary. Nil:
    ///     not confirmed by the monitor yet (the first writer goal then sets it up, whatever it is,
    ///     which is also what lets the primary use leases again: `PrimaryReplication.leaseConfirmed`).
    public init(state: NodeState, primarySetup: PrimarySetup?) {
        self.state = state
        if state.role == .primary {
            precondition(primarySetup.map { $0.mode == state.mode } ?? true, "a primary's setup must have its durable mode \(state.mode)")
            self.primarySetup = primarySetup
        }
    }

    /// The heartbeat to send. `tenants` and `streaming` come from the replication shells.
    public func report(tenants: [TenantID: TenantReport], streaming: Bool, holdsLease: Bool? = nil) -> NodeReport {
        NodeReport(role: state.role, epoch: state.epoch, reached: reached, tenants: tenants, streaming: streaming,
                   holdsLease: state.role == .primary ? holdsLease : nil)
    }

    // MARK: Events

    /// The monitor's answer to a heartbeat.
    public mutating func onAssignment(_ assignment: Assignment) -> [KeeperAction] {
        // The same assignment comes with every answer: taking it again retries a failed step.
        if let target, assignment.sequence < target.sequence { return [] }
        target = assignment
        return next()
    }

    /// The running step is done, durably where the step says so.
    public mutating func onStepDone() -> [KeeperAction] {
        guard let step = running else { preconditionFailure("no keeper step is running") }
        running = nil
        let before = state.role
        switch step {
        case .stepDown:
            if state.role == .primary { state = state.steppedDown() } // else the peer's word came first
            primarySetup = nil
        case .adoptEpoch(let epoch):
            state = state.adopting(epoch, from: .monitor) ?? state
        case .promote(let epoch, let setup, _):
            state = NodeState(role: .primary, epoch: epoch, mode: setup.mode)
            primarySetup = setup
        case .configurePrimary(let setup):
            guard state.role == .primary else { break } // stepped down meanwhile
            state.mode = setup.mode
            primarySetup = setup
        case .follow:
            state = NodeState(role: .standby, epoch: state.epoch, mode: state.mode)
        }
        if state.role != before, let r = reached, !r.state.allows(state.role) { reached = nil }
        return next()
    }

    /// The running step failed; the node is as it was before it (the shell's contract). The
    /// step is tried again at the next assignment.
    public mutating func onStepFailed(_ reason: String) -> [KeeperAction] {
        guard let step = running else { preconditionFailure("no keeper step is running") }
        running = nil
        lastNote = nil
        return [.note("\(step) failed: \(reason); trying again at the monitor's next answer")]
    }

    /// The primary's replication core stepped down by itself (a peer showed a newer epoch);
    /// the shell recorded `demoted` durably.
    public mutating func onSteppedDownByPeer() -> [KeeperAction] {
        guard state.role == .primary else { return [] }
        state = state.steppedDown()
        primarySetup = nil
        if let r = reached, !r.state.allows(.demoted) { reached = nil }
        return next()
    }

    // MARK: Deciding

    /// The next step towards the target, or the goal reached.
    private mutating func next() -> [KeeperAction] {
        guard running == nil, let a = target else { return [] }
        let step: KeeperStep?
        switch decide(a) {
        case .step(let s): step = s
        case .reached:
            reached = ReachedGoal(a.goal, sequence: a.sequence)
            lastNote = nil
            return []
        case .cannot(let why):
            guard lastNote != why else { return [] }
            lastNote = why
            return [.note(why)]
        }
        running = step
        return step.map { [.run($0)] } ?? []
    }

    private enum Decision { case step(KeeperStep), reached, cannot(String) }

    private func decide(_ a: Assignment) -> Decision {
        if a.epoch < state.epoch {
            return .cannot("the monitor assigns \(a.goal) in epoch \(a.epoch), older than this node's \(state.epoch): ignored (epochs only grow)")
        }
        let goal = a.goal
        switch state.role {
        case .primary:
            // Never adopt a newer epoch as primary: step down first (invariant 3).
            if a.epoch > state.epoch || !goal.isWriter { return .step(.stepDown) }
            let wanted = PrimarySetup(goal: goal, peer: a.peer)!
            return primarySetup == wanted ? .reached : .step(.configurePrimary(wanted))
        case .standby:
            if goal.isWriter {
                guard a.epoch > state.epoch else {
                    return .cannot("told to be the writer (\(goal)) in epoch \(a.epoch), this standby's own epoch: a standby is promoted only into a newer epoch")
                }
                return .step(.promote(epoch: a.epoch, setup: PrimarySetup(goal: goal, peer: a.peer)!, handover: a.handover))
            }
            if a.epoch > state.epoch { return .step(.adoptEpoch(a.epoch)) }
            switch goal {
            case .secondary, .catchingUp, .maintenance: return .reached
            case .demoted: return .cannot("told demoted while a standby: it keeps following its primary")
            case .single, .primary, .waitPrimary, .draining: preconditionFailure("handled above")
            }
        case .demoted:
            if a.epoch > state.epoch { return .step(.adoptEpoch(a.epoch)) }
            switch goal {
            case .demoted, .maintenance: return .reached
            case .secondary, .catchingUp:
                guard let primary = a.peer else { return .cannot("told \(goal) without a primary to follow") }
                return .step(.follow(primary: primary))
            case .single, .primary, .waitPrimary, .draining:
                return .cannot("told to be the writer (\(goal)) while demoted: a former primary may lack acknowledged writes and is never promoted; it waits to rejoin as a standby")
            }
        }
    }
}
