import ApiaryCore
import ApiaryReplication

// MARK: - The durable state

/// One node of the formation as the monitor keeps it durably.
public struct NodeRecord: Hashable, Sendable {
    /// As named in the node's certificate.
    public var id: NodeID
    /// The availability zone the node runs in (from the formation's configuration).
    public var zone: String
    /// The state the node must reach.
    public var goal: KeeperState
    /// The sequence of the assignment that set `goal` (``Assignment/sequence``).
    public var goalSequence: UInt64
    /// The state the node last said it reached (in the current epoch), nil when it reached none.
    public var reported: KeeperState?
    /// Whether this standby may be promoted without losing an acknowledged write: set only once
    /// the monitor saw it in sync with a primary committing in sync mode, and cleared (durably)
    /// before the primary is allowed to commit alone.
    public var promotable: Bool
    /// An operator asked for maintenance on this node.
    public var maintenanceRequested: Bool
    /// The last lsns the node reported, as persisted (see ``MonitorConfig/lsnPersistIntervalMs``).
    public var lsns: [TenantID: LSN]

    public init(id: NodeID, zone: String, goal: KeeperState, goalSequence: UInt64, reported: KeeperState? = nil,
                promotable: Bool = false, maintenanceRequested: Bool = false, lsns: [TenantID: LSN] = [:]) {
        self.id = id
        self.zone = zone
        self.goal = goal
        self.goalSequence = goalSequence
        self.reported = reported
        self.promotable = promotable
        self.maintenanceRequested = maintenanceRequested
        self.lsns = lsns
    }
}

/// One entry of the formation's history: every decision, refusal and notable observation, with
/// its reason. The store stamps the wall-clock time when it persists it (the core has no clock
/// that means anything after a restart).
public struct MonitorEvent: Hashable, Sendable, CustomStringConvertible {
    public enum Kind: String, Hashable, Sendable {
        /// The monitor changed a goal, the epoch or promotability.
        case decision
        /// Something the nodes reported or failed to report, and what the monitor did not do.
        case observation
        /// Bad input refused: an unknown node, a report that breaks an invariant, an unsafe command.
        case refusal
        /// An operator command that was accepted.
        case command
    }

    /// Increases by one per event, across restarts.
    public var sequence: UInt64
    /// The formation's epoch once the event's decision is made.
    public var epoch: Epoch
    public var kind: Kind
    /// The node the event is about, if one.
    public var node: NodeID?
    public var text: String

    public init(sequence: UInt64, epoch: Epoch, kind: Kind, node: NodeID?, text: String) {
        self.sequence = sequence
        self.epoch = epoch
        self.kind = kind
        self.node = node
        self.text = text
    }

    public var description: String { "#\(sequence) [epoch \(epoch)] \(kind.rawValue)\(node.map { " \($0)" } ?? ""): \(text)" }
}

/// One node in a formation's configuration.
public struct FormationNode: Hashable, Sendable {
    public var id: NodeID
    public var zone: String
    public init(id: NodeID, zone: String) {
        self.id = id
        self.zone = zone
    }
}

/// Everything the monitor keeps durably (DESIGN §6): the formation's nodes with their goals,
/// reported states and promotability, the current epoch, and the recent history.
public struct MonitorState: Hashable, Sendable {
    /// How many events the state holds; a store MAY keep more history than this.
    public static let recentEventsMax = 1_000

    public var formation: String
    /// The formation's current epoch: only grows.
    public var epoch: Epoch
    /// One or two nodes, in the order of the formation's configuration.
    public var nodes: [NodeRecord]
    /// The most recent events, oldest first, at most ``recentEventsMax``.
    public var events: [MonitorEvent]

    public init(formation: String, epoch: Epoch, nodes: [NodeRecord], events: [MonitorEvent]) {
        self.formation = formation
        self.epoch = epoch
        self.nodes = nodes
        self.events = events
    }

    /// A new formation: `primary` is its writer in `epoch` (`wait_primary` until its standby has
    /// caught up, `single` without a standby) and `standby` catches up, not promotable.
    /// - Throws: ``MonitorStateError`` for an empty or repeated node id or an empty formation name.
    public static func bootstrap(formation: String, primary: FormationNode, standby: FormationNode?, epoch: Epoch) throws -> MonitorState {
        guard !formation.isEmpty else { throw MonitorStateError("the formation needs a name") }
        guard !primary.id.isEmpty, standby.map({ !$0.id.isEmpty }) ?? true else { throw MonitorStateError("a node id is empty") }
        guard primary.id != standby?.id else { throw MonitorStateError("the primary and the standby are both '\(primary.id)'") }
        var nodes = [NodeRecord(id: primary.id, zone: primary.zone, goal: standby == nil ? .single : .waitPrimary, goalSequence: 1)]
        var text = "formation \(formation) created in epoch \(epoch): \(primary.id) (zone \(primary.zone)) is the writer, goal \(nodes[0].goal)"
        if let standby {
            nodes.append(NodeRecord(id: standby.id, zone: standby.zone, goal: .catchingUp, goalSequence: 2))
            text += "; \(standby.id) (zone \(standby.zone)) catches up, not promotable until seen in sync"
            if standby.zone == primary.zone { text += "; both nodes are in zone \(primary.zone): losing it loses both" }
        }
        let state = MonitorState(formation: formation, epoch: epoch, nodes: nodes, events: [
            MonitorEvent(sequence: 1, epoch: epoch, kind: .decision, node: nil, text: text),
        ])
        try state.validate()
        return state
    }

    // MARK: Queries

    public func node(_ id: NodeID) -> NodeRecord? { nodes.first { $0.id == id } }

    /// The node whose goal is a writer state.
    public var writer: NodeRecord? { nodes.first { $0.goal.isWriter } }

    /// The node of a two-node formation that is not `id`.
    public func other(than id: NodeID) -> NodeRecord? { nodes.first { $0.id != id } }

    public var lastEventSequence: UInt64 { events.last?.sequence ?? 0 }
    public var lastGoalSequence: UInt64 { nodes.map(\.goalSequence).max() ?? 0 }

    // MARK: Changes

    /// Applies `change`; a store and the core apply the same changes the same way.
    public mutating func apply(_ change: StateChange) {
        if let epoch = change.epoch {
            precondition(epoch >= self.epoch, "the epoch would go back from \(self.epoch) to \(epoch)")
            self.epoch = epoch
        }
        for record in change.nodes {
            guard let i = nodes.firstIndex(where: { $0.id == record.id }) else {
                preconditionFailure("a change names node '\(record.id)', which formation \(formation) does not hold")
            }
            nodes[i] = record
        }
        events.append(contentsOf: change.events)
        if events.count > Self.recentEventsMax { events.removeFirst(events.count - Self.recentEventsMax) }
    }

    /// Checks what every durable state MUST satisfy; a store SHOULD call it after loading.
    /// - Throws: ``MonitorStateError`` saying what is wrong. A damaged state MUST stop the
    ///   monitor rather than let it decide from it.
    public func validate() throws {
        try validateNodes()
        for (a, b) in zip(events, events.dropFirst()) where b.sequence != a.sequence + 1 {
            throw MonitorStateError("event #\(b.sequence) follows #\(a.sequence)")
        }
    }

    /// ``validate()`` without the history: what every decision MUST keep.
    func validateNodes() throws {
        guard (1...2).contains(nodes.count) else { throw MonitorStateError("a formation holds 1 or 2 nodes, not \(nodes.count)") }
        guard Set(nodes.map(\.id)).count == nodes.count else { throw MonitorStateError("a node id appears twice") }
        let writers = nodes.filter { $0.goal.isWriter }
        guard writers.count == 1, let writer = writers.first else {
            throw MonitorStateError("exactly one node must have a writer goal; \(writers.map(\.id)) have one")
        }
        if nodes.count == 1 {
            guard writer.goal == .single else { throw MonitorStateError("a lone node's goal is single, not \(writer.goal)") }
        } else {
            guard writer.goal != .single else { throw MonitorStateError("the writer of a two-node formation is not single") }
        }
        for node in nodes where node.id != writer.id {
            if node.promotable {
                guard node.goal == .secondary, writer.goal == .primary || writer.goal == .draining else {
                    throw MonitorStateError("\(node.id) is promotable but its goal is \(node.goal) and the writer's \(writer.goal)")
                }
            }
            if node.goal == .secondary {
                guard writer.goal == .primary || writer.goal == .draining else {
                    throw MonitorStateError("\(node.id)'s goal is secondary while the writer's is \(writer.goal)")
                }
            }
        }
        guard !writer.promotable else { throw MonitorStateError("the writer \(writer.id) is marked promotable") }
        guard nodes.allSatisfy({ $0.goalSequence > 0 }), Set(nodes.map(\.goalSequence)).count == nodes.count else {
            throw MonitorStateError("goal sequences must be positive and distinct")
        }
    }
}

/// What one decision changes in the durable state. A store MUST make all of it durable, or none
/// of it, before the actions that follow its `persist` are carried out.
public struct StateChange: Hashable, Sendable {
    /// The new epoch, when it was raised.
    public var epoch: Epoch?
    /// Node records that changed, whole.
    public var nodes: [NodeRecord]
    /// New history entries, in order.
    public var events: [MonitorEvent]

    public init(epoch: Epoch? = nil, nodes: [NodeRecord] = [], events: [MonitorEvent] = []) {
        self.epoch = epoch
        self.nodes = nodes
        self.events = events
    }

    public var isEmpty: Bool { epoch == nil && nodes.isEmpty && events.isEmpty }
}

public struct MonitorStateError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
