import ApiaryCore

/// A node's role in the cluster and the epoch it holds it in (DESIGN §6, invariant 3).
///
/// The state is durable (the shell keeps it in `<data>/node-state`, written before it acts on
/// a change) and belongs to the cluster: it changes only by the monitor's word or a forced
/// operator action, never because of a command-line flag at a restart or because a peer claims
/// a newer epoch. A flag only bootstraps a node whose data directory holds no state yet.
public struct NodeState: Hashable, Sendable, CustomStringConvertible {
    public enum Role: String, Hashable, Sendable, CaseIterable {
        /// Commits, in `mode`.
        case primary
        /// Follows a primary.
        case standby
        /// Was primary and saw a newer epoch: commits nothing and serves no reads until the
        /// monitor (or an operator) makes it a standby of the new primary.
        case demoted
    }

    public var role: Role
    public var epoch: Epoch
    /// A primary's replication mode (meaningless in other roles).
    public var mode: ReplicationMode

    public init(role: Role, epoch: Epoch, mode: ReplicationMode) {
        self.role = role
        self.epoch = epoch
        self.mode = mode
    }

    public var description: String { role == .primary ? "primary of epoch \(epoch) (\(mode.name))" : "\(role.rawValue) in epoch \(epoch)" }

    // MARK: Transitions

    /// The state a node starts in: the one it holds durably. The configured role, mode and
    /// epoch only bootstrap a node that holds none (or only an epoch, as nodes before roles
    /// were kept did: then the configured role and mode apply in that epoch).
    public static func atStartup(durable: DurableNodeState?, configured: NodeState) -> NodeState {
        switch durable {
        case nil: return configured
        case .epochOnly(let epoch)?: return NodeState(role: configured.role, epoch: epoch, mode: configured.mode)
        case .full(let state)?: return state
        }
    }

    /// A primary whose core stepped down (it saw a newer epoch): demoted in its own epoch.
    /// It does not adopt the newer epoch: it learns the new topology from the monitor.
    public func steppedDown() -> NodeState {
        precondition(role == .primary, "only a primary steps down; this node is \(self)")
        return NodeState(role: .demoted, epoch: epoch, mode: mode)
    }

    /// A standby promoted by a forced operator action: primary of the next epoch, committing
    /// alone until a standby is assigned again.
    public func promoted() -> NodeState {
        precondition(role == .standby, "only a standby is promoted; this node is \(self)")
        return NodeState(role: .primary, epoch: epoch.next, mode: .single)
    }

    /// Who says that a newer epoch exists.
    public enum EpochSource: Sendable { case peer, monitor, operatorAction }

    /// The state after hearing of `newer` from `source`, or nil when it is not adopted: a peer's
    /// word never moves a node's epoch (a partitioned or confused peer must not be able to
    /// make a node skip epochs or follow a primary the cluster did not choose).
    public func adopting(_ newer: Epoch, from source: EpochSource) -> NodeState? {
        guard newer > epoch else { return nil }
        switch source {
        case .peer: return nil
        case .monitor, .operatorAction: return NodeState(role: role, epoch: newer, mode: mode)
        }
    }

    // MARK: Durable form

    /// The file's text: one `key=value` per line.
    public var text: String { "role=\(role.rawValue)\nepoch=\(epoch.rawValue)\nmode=\(mode.name)\n" }
}

/// What a node's state file holds.
public enum DurableNodeState: Hashable, Sendable {
    /// Written by nodes before roles were kept: only `epoch=N`.
    case epochOnly(Epoch)
    case full(NodeState)

    /// Parses the file's text.
    /// - Throws: `NodeStateError` naming what is wrong; a damaged state file MUST stop the
    ///   node rather than let it guess its role.
    public init(text: String) throws {
        var values: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) where !line.allSatisfy(\.isWhitespace) {
            let parts = line.split(separator: "=", maxSplits: 1).map { part in
                String(part.drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
            }
            guard parts.count == 2, values[parts[0]] == nil else { throw NodeStateError("malformed line '\(line.prefix(60))'") }
            values[parts[0]] = parts[1]
        }
        guard let epochText = values["epoch"], let epoch = UInt64(epochText) else { throw NodeStateError("no valid 'epoch=N' line") }
        guard let roleText = values["role"] else {
            guard values.count == 1 else { throw NodeStateError("'role' is missing") }
            self = .epochOnly(Epoch(epoch))
            return
        }
        guard let role = NodeState.Role(rawValue: roleText) else { throw NodeStateError("unknown role '\(roleText.prefix(20))'") }
        guard let modeText = values["mode"], let mode = ReplicationMode(name: modeText) else { throw NodeStateError("no valid 'mode' line") }
        guard values.count == 3 else { throw NodeStateError("unknown keys") }
        self = .full(NodeState(role: role, epoch: Epoch(epoch), mode: mode))
    }
}

public struct NodeStateError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

extension ReplicationMode {
    /// The mode's name in files and on the command line.
    public var name: String {
        switch self {
        case .sync: return "sync"
        case .single: return "single"
        case .waitPrimary: return "wait-primary"
        }
    }

    public init?(name: String) {
        switch name {
        case "sync": self = .sync
        case "single": self = .single
        case "wait-primary": self = .waitPrimary
        default: return nil
        }
    }
}
