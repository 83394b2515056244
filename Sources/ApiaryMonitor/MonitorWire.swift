import ApiaryCore
import ApiaryReplication

// The monitor's HTTP API as JSON (docs/monitor.md, "The endpoint"). Field names are snake_case
// and stable: the node's keeper, `apiary ctl` and gateways read them. Plain Codable structs, so
// that every side shares one definition; the JSON coder is the caller's.

/// `POST /heartbeat`'s body: what a node says about itself. Who it is comes from its certificate.
public struct HeartbeatBody: Codable, Sendable, Equatable {
    public struct Reached: Codable, Sendable, Equatable {
        public var state: String
        public var sequence: UInt64
        public init(state: String, sequence: UInt64) { self.state = state; self.sequence = sequence }
    }
    public struct Tenant: Codable, Sendable, Equatable {
        public var lsn: UInt64
        public var standbyLSN: UInt64?
        enum CodingKeys: String, CodingKey { case lsn, standbyLSN = "standby_lsn" }
        public init(lsn: UInt64, standbyLSN: UInt64? = nil) { self.lsn = lsn; self.standbyLSN = standbyLSN }
    }
    /// `primary`, `standby` or `demoted`: the node's durable role.
    public var role: String
    public var epoch: UInt64
    public var reached: Reached?
    public var tenants: [String: Tenant]
    public var streaming: Bool
    /// A primary: it holds its standby's lease now.
    public var lease: Bool?
    /// A primary: what its standby discarded at a rejoin (``Divergence``).
    public var divergences: [DivergenceBody]?

    /// ``Divergence`` on the wire.
    public struct DivergenceBody: Codable, Sendable, Equatable {
        public var tenant: String
        public var standby: String
        public var sharedThroughLSN: UInt64?
        public var discardedFromLSN: UInt64
        public var discardedThroughLSN: UInt64
        public var discardedEpochs: [UInt64]
        public var bySnapshot: Bool
        enum CodingKeys: String, CodingKey {
            case tenant, standby, sharedThroughLSN = "shared_through_lsn", discardedFromLSN = "discarded_from_lsn"
            case discardedThroughLSN = "discarded_through_lsn", discardedEpochs = "discarded_epochs", bySnapshot = "by_snapshot"
        }
        public init(tenant: String, standby: String, sharedThroughLSN: UInt64?, discardedFromLSN: UInt64, discardedThroughLSN: UInt64,
                    discardedEpochs: [UInt64], bySnapshot: Bool) {
            self.tenant = tenant
            self.standby = standby
            self.sharedThroughLSN = sharedThroughLSN
            self.discardedFromLSN = discardedFromLSN
            self.discardedThroughLSN = discardedThroughLSN
            self.discardedEpochs = discardedEpochs
            self.bySnapshot = bySnapshot
        }
    }

    public init(role: String, epoch: UInt64, reached: Reached?, tenants: [String: Tenant] = [:], streaming: Bool, lease: Bool? = nil,
                divergences: [DivergenceBody]? = nil) {
        self.role = role
        self.epoch = epoch
        self.reached = reached
        self.tenants = tenants
        self.streaming = streaming
        self.lease = lease
        self.divergences = divergences
    }

    /// The wire form of a node's report.
    public init(_ r: NodeReport) {
        self.init(role: r.role.rawValue, epoch: r.epoch.rawValue,
                  reached: r.reached.map { Reached(state: $0.state.rawValue, sequence: $0.sequence) },
                  tenants: Dictionary(uniqueKeysWithValues: r.tenants.map { ($0.key.rawValue, Tenant(lsn: $0.value.lsn, standbyLSN: $0.value.standbyLSN)) }),
                  streaming: r.streaming, lease: r.holdsLease,
                  divergences: r.divergences.isEmpty ? nil : r.divergences.map {
                      DivergenceBody(tenant: $0.tenant.rawValue, standby: $0.standby, sharedThroughLSN: $0.sharedThroughLSN,
                                     discardedFromLSN: $0.discardedFromLSN, discardedThroughLSN: $0.discardedThroughLSN,
                                     discardedEpochs: $0.discardedEpochs.map(\.rawValue), bySnapshot: $0.bySnapshot)
                  })
    }

    /// The core's report, or a message saying what is malformed.
    public func report() -> Result<NodeReport, WireError> {
        guard let role = NodeState.Role(rawValue: role) else { return .failure(WireError("unknown role '\(self.role)'")) }
        var reachedGoal: ReachedGoal?
        if let reached {
            guard let state = KeeperState(rawValue: reached.state) else { return .failure(WireError("unknown state '\(reached.state)'")) }
            reachedGoal = ReachedGoal(state, sequence: reached.sequence)
        }
        var out: [TenantID: TenantReport] = [:]
        for (name, t) in tenants {
            guard let id = try? TenantID(stored: name) else { return .failure(WireError("invalid tenant id '\(name.prefix(80))'")) }
            out[id] = TenantReport(lsn: t.lsn, standbyLSN: t.standbyLSN)
        }
        var divergences: [Divergence] = []
        for d in self.divergences ?? [] {
            guard let id = try? TenantID(stored: d.tenant) else { return .failure(WireError("invalid tenant id '\(d.tenant.prefix(80))'")) }
            guard d.discardedFromLSN >= 1, d.discardedFromLSN <= d.discardedThroughLSN, d.standby.utf8.count <= 256,
                  d.sharedThroughLSN.map({ $0 < d.discardedFromLSN }) ?? true, d.discardedEpochs.count <= 1_000 else {
                return .failure(WireError("malformed divergence report for tenant '\(d.tenant.prefix(80))'"))
            }
            divergences.append(Divergence(tenant: id, standby: d.standby, sharedThroughLSN: d.sharedThroughLSN, discardedFromLSN: d.discardedFromLSN,
                                          discardedThroughLSN: d.discardedThroughLSN, discardedEpochs: d.discardedEpochs.map { Epoch($0) }, bySnapshot: d.bySnapshot))
        }
        guard divergences.count <= 1_000 else { return .failure(WireError("\(divergences.count) divergence reports (at most 1,000)")) }
        return .success(NodeReport(role: role, epoch: Epoch(epoch), reached: reachedGoal, tenants: out, streaming: streaming, holdsLease: lease,
                                   divergences: divergences))
    }
}

/// `POST /heartbeat`'s answer (200): the goal the node must reach.
public struct AssignmentBody: Codable, Sendable, Equatable {
    public var goal: String
    public var epoch: UInt64
    public var sequence: UInt64
    public var peer: String?
    /// Present (true) only for a switchover's hand-over.
    public var handover: Bool?
    public init(_ a: Assignment) {
        goal = a.goal.rawValue
        epoch = a.epoch.rawValue
        sequence = a.sequence
        peer = a.peer
        handover = a.handover ? true : nil
    }

    /// The core's assignment, or what is malformed.
    public func assignment() -> Result<Assignment, WireError> {
        guard let state = KeeperState(rawValue: goal) else { return .failure(WireError("unknown goal '\(goal.prefix(40))'")) }
        return .success(Assignment(goal: state, epoch: Epoch(epoch), sequence: sequence, peer: peer, handover: handover ?? false))
    }
}

/// Every non-200 answer.
public struct ErrorBody: Codable, Sendable, Equatable {
    /// What the caller can act on: `refused` (the core refused the heartbeat), `forbidden`
    /// (the certificate's role may not call this), `bad_request`, `not_found`, `too_large`.
    public var code: String
    public var error: String
    public init(code: String, error: String) { self.code = code; self.error = error }
}

/// `GET /status`.
public struct StatusBody: Codable, Sendable, Equatable {
    public struct Node: Codable, Sendable, Equatable {
        public var id: String
        public var zone: String
        public var goal: String
        public var goalSequence: UInt64
        public var reported: String?
        public var promotable: Bool
        public var maintenance: Bool
        /// Since this monitor process started; nil when not heard since.
        public var heardMsAgo: Int64?
        public var lsns: [String: UInt64]
        /// A standby: per tenant, how many records it is behind the writer (latest reports).
        public var lag: [String: UInt64]?
        /// The writer: whether it holds its standby's lease (serves strong reads), as last reported.
        public var lease: Bool?
        enum CodingKeys: String, CodingKey {
            case id, zone, goal, goalSequence = "goal_sequence", reported, promotable, maintenance, heardMsAgo = "heard_ms_ago", lsns, lag, lease
        }
        public init(id: String, zone: String, goal: String, goalSequence: UInt64, reported: String?, promotable: Bool,
                    maintenance: Bool, heardMsAgo: Int64?, lsns: [String: UInt64], lag: [String: UInt64]? = nil, lease: Bool? = nil) {
            self.lag = lag
            self.lease = lease
            self.id = id
            self.zone = zone
            self.goal = goal
            self.goalSequence = goalSequence
            self.reported = reported
            self.promotable = promotable
            self.maintenance = maintenance
            self.heardMsAgo = heardMsAgo
            self.lsns = lsns
        }
    }
    public var formation: String
    public var epoch: UInt64
    /// False during the startup grace: the monitor decides nothing yet.
    public var deciding: Bool
    public var nodes: [Node]
    public var lastEvent: UInt64
    enum CodingKeys: String, CodingKey { case formation, epoch, deciding, nodes, lastEvent = "last_event" }
    public init(formation: String, epoch: UInt64, deciding: Bool, nodes: [Node], lastEvent: UInt64) {
        self.formation = formation
        self.epoch = epoch
        self.deciding = deciding
        self.nodes = nodes
        self.lastEvent = lastEvent
    }
}

/// `GET /events?after=N&limit=M`.
public struct EventsBody: Codable, Sendable, Equatable {
    public struct Event: Codable, Sendable, Equatable {
        public var sequence: UInt64
        /// ISO 8601, UTC, milliseconds: when the store persisted it.
        public var at: String
        public var epoch: UInt64
        public var kind: String
        public var node: String?
        public var text: String
        public init(sequence: UInt64, at: String, epoch: UInt64, kind: String, node: String?, text: String) {
            self.sequence = sequence
            self.at = at
            self.epoch = epoch
            self.kind = kind
            self.node = node
            self.text = text
        }
    }
    public var events: [Event]
    public init(events: [Event]) { self.events = events }
}

public struct WireError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}


// MARK: - Operator commands

/// `POST /commands/maintenance` and `POST /commands/promote`: which node, and the promote's
/// safety catches. Switchover and failover take an empty object.
public struct CommandBody: Codable, Sendable, Equatable {
    public var node: String?
    /// Maintenance: on (true) or off.
    public var enabled: Bool?
    /// Promote: a node that is not promotable (or silent), for a lost primary.
    public var force: Bool?
    /// Promote with `force`: the operator accepts losing what the report lists.
    public var acceptDataLoss: Bool?
    enum CodingKeys: String, CodingKey { case node, enabled, force, acceptDataLoss = "accept_data_loss" }
    public init(node: String? = nil, enabled: Bool? = nil, force: Bool? = nil, acceptDataLoss: Bool? = nil) {
        self.node = node
        self.enabled = enabled
        self.force = force
        self.acceptDataLoss = acceptDataLoss
    }
}

/// A command's answer: 200 when accepted, 409 (`code: refused`) when refused; both carry the
/// message and, for a promotion, what it loses or would lose.
public struct CommandAnswerBody: Codable, Sendable, Equatable {
    public struct Loss: Codable, Sendable, Equatable {
        public var tenant: String
        public var promotedLSN: UInt64
        public var primaryLSN: UInt64
        enum CodingKeys: String, CodingKey { case tenant, promotedLSN = "promoted_lsn", primaryLSN = "primary_lsn" }
    }
    public struct DataLoss: Codable, Sendable, Equatable {
        public var promoted: String
        public var formerPrimary: String
        /// Tenants with commits the promoted node lacks (empty: nothing is lost, as far as known).
        public var tenants: [Loss]
        /// How old the former primary's report is; nil when it comes from the persisted state.
        public var primaryReportAgeMs: Int64?
        /// The same, for people.
        public var text: String
        enum CodingKeys: String, CodingKey {
            case promoted, formerPrimary = "former_primary", tenants, primaryReportAgeMs = "primary_report_age_ms", text
        }
    }
    public var accepted: Bool
    /// Also present when refused, so that scripts read one field.
    public var code: String?
    public var message: String
    public var dataLoss: DataLoss?
    enum CodingKeys: String, CodingKey { case accepted, code, message, dataLoss = "data_loss" }

    public init(_ result: CommandResult) {
        accepted = result.accepted
        code = result.accepted ? nil : "refused"
        message = result.message
        dataLoss = result.dataLoss.map { d in
            DataLoss(promoted: d.promoted, formerPrimary: d.formerPrimary,
                     tenants: d.tenants.map { Loss(tenant: $0.tenant.rawValue, promotedLSN: $0.promotedLSN, primaryLSN: $0.primaryLSN) },
                     primaryReportAgeMs: d.primaryReportAgeMs, text: d.description)
        }
    }
}

// MARK: - Topology watch

/// `GET /topology?after=V&wait_ms=N`: who is the writer, for gateways and clients. Answered at
/// once when the topology's `version` is newer than `after`, else as soon as it changes (within
/// milliseconds) or after `wait_ms` (then with the same version).
public struct TopologyBody: Codable, Sendable, Equatable {
    public struct Node: Codable, Sendable, Equatable {
        public var id: String
        public var zone: String
        public var goal: String
        /// The state the node last reported reaching in this epoch.
        public var reported: String?
        public var promotable: Bool
        public init(id: String, zone: String, goal: String, reported: String?, promotable: Bool) {
            self.id = id
            self.zone = zone
            self.goal = goal
            self.reported = reported
            self.promotable = promotable
        }
    }
    /// Grows with every change of the epoch, a goal, a reported state or promotability, within
    /// one run of the monitor (`run`).
    public var version: UInt64
    /// Identifies the monitor process that answers: versions start over when it restarts.
    public var run: UInt64
    public var formation: String
    public var epoch: UInt64
    /// The node whose goal is a writer's: the only one that may take writes in this epoch.
    public var writer: String?
    /// Whether the writer reported reaching its goal in this epoch (it takes writes now).
    public var writerReady: Bool
    public var nodes: [Node]
    enum CodingKeys: String, CodingKey { case version, run, formation, epoch, writer, writerReady = "writer_ready", nodes }

    public init(version: UInt64, run: UInt64 = 0, state: MonitorState) {
        self.version = version
        self.run = run
        formation = state.formation
        epoch = state.epoch.rawValue
        writer = state.writer?.id
        writerReady = state.writer.map { $0.reported == $0.goal } ?? false
        nodes = state.nodes.map { Node(id: $0.id, zone: $0.zone, goal: $0.goal.rawValue, reported: $0.reported?.rawValue, promotable: $0.promotable) }
    }
}
