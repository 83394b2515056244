// ApiaryMonitor: the health monitor's decisions (DESIGN §6) as a pure state machine.
//
// `MonitorCore` watches one formation: a primary and its standby (or a lone primary). Nodes
// report what they are (role, epoch, the goal they reached, per-tenant lsns, whether their
// replication stream is up); the core answers each with the goal it must reach, raises the
// epoch when it promotes, and records every decision with its reason. It performs no I/O,
// reads no clock and draws no random number: the shell passes `now` in, persists what the core
// asks for (`MonitorStore`), then sends the answers. docs/monitor.md tells the rules and why.
//
// What the core never does, and why:
// - It never tells a node to act on something not yet durable: a decision's `persist` comes
//   first in its actions, and the shell MUST complete it before the actions after it. A monitor
//   that crashes after answering but before persisting would forget, say, that the standby is
//   not promotable while the primary already commits alone; after its restart it could promote
//   a standby that lacks acknowledged writes (invariant 2).
// - It never promotes a standby that was not seen in sync, nor one that still receives the
//   primary's stream (a monitor cut off from a live primary must not start a second writer),
//   nor anything while it has not heard from the nodes since it started.
// - It never gives two nodes a primary goal in one epoch, and raises the epoch before anything
//   else in a promotion (invariant 3).
import ApiaryCore
import ApiaryReplication

// MARK: - States

/// A node's state in the formation, as the monitor assigns it (the goal) and as the node reports
/// it has reached it. The names are those of the well-known primary/standby keeper design
/// (DESIGN §6).
public enum KeeperState: String, Hashable, Sendable, CaseIterable, CustomStringConvertible {
    /// The formation's only node: commits alone; there is no failover.
    case single
    /// Commits in sync mode: every commit waits for the standby's ack, so the standby holds
    /// every acknowledged write.
    case primary
    /// Commits alone (the standby is lost, catching up or in maintenance, and not promotable);
    /// still streams to a standby that attaches, so that it can catch up.
    case waitPrimary = "wait_primary"
    /// Follows the primary, in sync mode: a failover candidate once the monitor saw it in sync.
    case secondary
    /// Follows the primary and catches up; not promotable.
    case catchingUp = "catching_up"
    /// A primary handing over (switchover): it takes no new commit, finishes those in progress
    /// and keeps streaming until its standby holds everything.
    case draining
    /// A former primary of an older epoch: commits nothing and serves nothing until the monitor
    /// makes it a standby of the new primary (rejoin).
    case demoted
    /// Out of the formation on an operator's request: not promotable, not streamed to.
    case maintenance

    /// States in which the node is the formation's writer (role `primary`). At most one node
    /// holds one of them as its goal in an epoch (invariant 3).
    public var isWriter: Bool {
        switch self {
        case .single, .primary, .waitPrimary, .draining: return true
        case .secondary, .catchingUp, .demoted, .maintenance: return false
        }
    }

    /// Whether a node in `role` can be in this state: a report that says otherwise is refused.
    public func allows(_ role: NodeState.Role) -> Bool {
        switch self {
        case .single, .primary, .waitPrimary, .draining: return role == .primary
        case .secondary, .catchingUp: return role == .standby
        case .demoted: return role == .demoted
        case .maintenance: return role == .standby || role == .demoted
        }
    }

    public var description: String { rawValue }
}

// MARK: - What nodes report

/// One tenant in a node's heartbeat.
public struct TenantReport: Hashable, Sendable {
    /// A primary's committed lsn (durable where its mode requires, answered to clients); a
    /// standby's last lsn durable in its log.
    public var lsn: LSN
    /// A primary only: the last lsn its standby acknowledged on the current stream, nil when no
    /// standby streams this tenant. `standbyLSN >= lsn` means the standby holds every commit.
    public var standbyLSN: LSN?

    public init(lsn: LSN, standbyLSN: LSN? = nil) {
        self.lsn = lsn
        self.standbyLSN = standbyLSN
    }
}

/// A goal a node has reached: the state and the sequence of the assignment that asked for it.
///
/// The sequence tells "still primary, never went wait_primary" from "went wait_primary,
/// committed alone, and is primary again": a report that a node is in sync counts only for the
/// goal the monitor assigned last.
public struct ReachedGoal: Hashable, Sendable, CustomStringConvertible {
    public var state: KeeperState
    public var sequence: UInt64

    public init(_ state: KeeperState, sequence: UInt64) {
        self.state = state
        self.sequence = sequence
    }

    public var description: String { "\(state) (#\(sequence))" }
}

/// A node's heartbeat to the monitor (DESIGN §6), sent several times a second.
public struct NodeReport: Hashable, Sendable {
    /// The node's durable role (``NodeState``).
    public var role: NodeState.Role
    /// The node's durable epoch. A node MUST step down before it adopts a newer epoch (a
    /// primary that reports a newer epoch in which it is not the writer is refused).
    public var epoch: Epoch
    /// The last goal the node reached, nil when it reached none since it started.
    public var reached: ReachedGoal?
    /// Every tenant the node holds.
    public var tenants: [TenantID: TenantReport]
    /// A standby: it receives its primary's stream now (welcomed, and not timed out); false is
    /// its confirmation that it lost the stream. A primary: its standby is attached and streams.
    public var streaming: Bool
    /// A primary: whether it holds its standby's lease now (serves strong reads). For operators
    /// (`ctl status`); the core decides nothing on it.
    public var holdsLease: Bool?
    /// A primary: what its standby discarded because this primary's history lacks it (a
    /// rejoin), not yet delivered. The monitor records each in its history once.
    public var divergences: [Divergence]

    public init(role: NodeState.Role, epoch: Epoch, reached: ReachedGoal?, tenants: [TenantID: TenantReport] = [:], streaming: Bool,
                holdsLease: Bool? = nil, divergences: [Divergence] = []) {
        self.role = role
        self.epoch = epoch
        self.reached = reached
        self.tenants = tenants
        self.streaming = streaming
        self.holdsLease = holdsLease
        self.divergences = divergences
    }
}

// MARK: - What nodes are told

/// The monitor's answer to a node: the goal it must reach, in which epoch.
public struct Assignment: Hashable, Sendable, CustomStringConvertible {
    public var goal: KeeperState
    /// The formation's epoch. A node adopts it (``NodeState/adopting(_:from:)`` with `.monitor`)
    /// after it stepped down if the goal asks it to.
    public var epoch: Epoch
    /// Increases with every goal the monitor assigns. A node MUST ignore an assignment whose
    /// sequence is lower than one it already applied, and reports the sequence of the goal it
    /// reached (``ReachedGoal``).
    public var sequence: UInt64
    /// The other node of the formation: for a writer, the only standby it may accept; for a
    /// standby, the primary it follows. Nil in a one-node formation.
    public var peer: NodeID?
    /// A switchover's hand-over: the former writer reported that it drained (it takes no commit
    /// and uses no lease from then on), so the promoted standby need not wait out its lease.
    public var handover: Bool

    public init(goal: KeeperState, epoch: Epoch, sequence: UInt64, peer: NodeID?, handover: Bool = false) {
        self.goal = goal
        self.epoch = epoch
        self.sequence = sequence
        self.peer = peer
        self.handover = handover
    }

    public var description: String { "\(goal) in epoch \(epoch) (#\(sequence))" + (peer.map { ", peer \($0)" } ?? "") + (handover ? ", hand-over" : "") }
}

// MARK: - Configuration

/// The monitor's timers and limits. Defaults suit a LAN across zones with nodes that report
/// every 100 ms.
public struct MonitorConfig: Hashable, Sendable {
    /// The writer is lost when nothing was heard from it for this long (DESIGN §6's `D`). A
    /// promotion also needs the standby's confirmation, so a short value costs no safety.
    public var primaryTimeoutMs: Milliseconds = 500
    /// A standby silent for this long cannot confirm anything (a promotion needs a recent word
    /// from it); its silence alone changes nothing (the primary tells whether it still streams).
    public var standbyTimeoutMs: Milliseconds = 500
    /// After the core starts from a persisted state it decides nothing until it has heard from
    /// every node, or until this long has passed; nodes silent since the start count as last
    /// heard at the start. Operator commands are refused meanwhile.
    public var startupGraceMs: Milliseconds = 2_000
    /// A catching-up standby is told `secondary` (and its primary `primary`: sync mode) once it
    /// has acknowledged every tenant up to this many records behind the primary. Larger values
    /// switch to sync sooner, at the price of commits waiting while the standby closes the gap.
    public var catchUpLagMax: LSN = 16
    /// A switchover whose primary has not handed over after this long is abandoned: the
    /// primary goes back to `primary`.
    public var switchoverTimeoutMs: Milliseconds = 10_000
    /// A node's reported lsns are persisted with any change to its record, and otherwise at
    /// most this often (they tell what a forced promotion loses after a monitor restart).
    public var lsnPersistIntervalMs: Milliseconds = 1_000
    /// Tenants one heartbeat may list; a longer report is refused (invariant 8).
    public var tenantsMax: Int = 10_000

    public init() {}
}
