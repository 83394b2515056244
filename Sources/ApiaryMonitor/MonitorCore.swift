import ApiaryCore
import ApiaryReplication

// MARK: - Actions

/// What the monitor's shell must do. Carry out the actions of one returned array in order.
public enum MonitorAction: Hashable, Sendable {
    /// Make the change durable (``MonitorStore/save(_:)``) and only then carry out the actions
    /// after it: they depend on it. The standby is marked not promotable in the same change
    /// that tells its primary `wait_primary`, and the answer comes after: a monitor that
    /// answered first and crashed before persisting would wake up believing the standby
    /// promotable while the primary commits alone, and could promote it over acknowledged
    /// writes (invariant 2). Likewise a raised epoch is durable before the standby is told to
    /// promote in it: otherwise a restarted monitor could hand the same epoch to another
    /// writer (invariant 3). A failed save MUST stop the monitor (see ``MonitorStore``).
    case persist(StateChange)
    /// Tell the node its goal. In answer to its heartbeat this is the reply; after a tick or a
    /// command the shell MAY push it to the node (an open watch), else the node learns it from
    /// its next heartbeat's reply.
    case answer(NodeID, Assignment)
    /// Reply to the node's heartbeat with this refusal; the node keeps its state and says so.
    case refuse(NodeID, String)
    /// A history entry, already in the `persist` before it: log it, publish it to watchers.
    case event(MonitorEvent)
}

/// What a forced promotion loses (DESIGN §6: "it reports exactly what is lost"): per tenant,
/// the lsns the former primary last reported committed beyond what the promoted node holds.
public struct DataLossReport: Hashable, Sendable, CustomStringConvertible {
    public struct TenantLoss: Hashable, Sendable, CustomStringConvertible {
        public var tenant: TenantID
        /// The last lsn the promoted node reported durable.
        public var promotedLSN: LSN
        /// The last lsn the former primary reported committed.
        public var primaryLSN: LSN
        /// Lost: `promotedLSN + 1 ... primaryLSN`.
        public var lostCount: LSN { primaryLSN - promotedLSN }

        public var description: String {
            lostCount == 1 ? "\(tenant) lsn \(primaryLSN)" : "\(tenant) lsns \(promotedLSN + 1)...\(primaryLSN) (\(lostCount) commits)"
        }
    }

    public var promoted: NodeID
    public var formerPrimary: NodeID
    /// Tenants with a loss, by name.
    public var tenants: [TenantLoss]
    /// How old the former primary's report is; nil when its lsns come from the persisted state
    /// because the monitor has not heard from it since it started.
    public var primaryReportAgeMs: Milliseconds?

    public var description: String {
        let source = primaryReportAgeMs.map { "\(formerPrimary) reported committed \($0) ms ago" }
            ?? "\(formerPrimary) reported committed (as persisted before the monitor started)"
        let lost = tenants.isEmpty ? "\(promoted) holds all of it" : "\(promoted) lacks " + tenants.map(\.description).joined(separator: ", ")
        return "of what \(source), \(lost); \(formerPrimary) may have committed more after that report"
    }
}

/// The outcome of an operator command.
public struct CommandResult: Hashable, Sendable {
    public var accepted: Bool
    /// For the operator: what happens next, or why the command was refused.
    public var message: String
    /// A forced promotion's loss, also when refused for want of `acceptDataLoss`.
    public var dataLoss: DataLossReport?
    /// Carry them out (persist first) before telling the operator the command was accepted.
    public var actions: [MonitorAction]
}

// MARK: - The core

/// The health monitor of one formation (DESIGN §6): a pure state machine (CONVENTIONS).
///
/// Start it from the store's state (``MonitorState/bootstrap(formation:primary:standby:epoch:)``
/// for a new formation), feed it every node heartbeat, a tick several times a second
/// (``onTick(now:)``) and the operators' commands, and carry out the actions it returns.
/// `now` is the monitor's monotonic clock in milliseconds; it MUST never go back.
public struct MonitorCore: Sendable {
    public let config: MonitorConfig
    /// The durable state as of the last returned `persist`.
    public private(set) var state: MonitorState

    private let startedAt: Milliseconds
    /// Whether the startup grace is over (every node heard, or `startupGraceMs` passed).
    private var graceOver = false
    /// What was heard from each node since this core started; volatile.
    private var seen: [NodeID: Seen]
    /// Counts accepted heartbeats: orders them when several arrive in the same millisecond.
    private var arrivals: UInt64 = 0
    /// When the current switchover began (on this core's clock).
    private var drainingSince: Milliseconds?
    /// The standby promoted by a switchover's hand-over (its former writer drained): it is told
    /// so, and skips the lease wait. Volatile: after a restart it waits, which is always safe.
    private var handoverTo: NodeID?
    /// Why the last "no automatic promotion" event said so, so that it is not repeated.
    private var blockedNote: String?
    /// The last refusal recorded per node, so that a node repeating itself does not flood the
    /// history (bounded: cleared when it grows past `refusalNotesMax`).
    private var refusalNotes: [NodeID: String] = [:]
    private static let refusalNotesMax = 64

    private struct Seen: Sendable {
        var lastHeardAt: Milliseconds
        var lastHeardArrival: UInt64 = 0
        var heardSinceStart = false
        /// The last report accepted in the epoch that was current when it came.
        var report: NodeReport?
        var reportAt: Milliseconds = 0
        var reportArrival: UInt64 = 0
        var lsnsPersistedAt: Milliseconds
        var silenceNoted = false
        /// Divergence reports already in the history (bounded).
        var divergencesNoted: [Divergence] = []
    }

    /// - Parameters:
    ///   - state: the durable state, as loaded from the store; MUST be valid.
    ///   - now: the monitor's clock. Nodes not heard since count as last heard now.
    public init(state: MonitorState, config: MonitorConfig = MonitorConfig(), now: Milliseconds) {
        do { try state.validate() } catch { preconditionFailure("the monitor cannot start from an invalid state: \(error)") }
        precondition(config.primaryTimeoutMs > 0 && config.standbyTimeoutMs > 0 && config.startupGraceMs >= 0
                     && config.switchoverTimeoutMs > 0 && config.lsnPersistIntervalMs >= 0 && config.tenantsMax > 0,
                     "invalid monitor configuration \(config)")
        self.config = config
        self.state = state
        self.startedAt = now
        self.seen = Dictionary(uniqueKeysWithValues: state.nodes.map { ($0.id, Seen(lastHeardAt: now, lsnsPersistedAt: now)) })
        if state.writer?.goal == .draining { drainingSince = now }
    }

    // MARK: Queries

    /// What the node must do now, nil for a node outside the formation.
    public func assignment(for node: NodeID) -> Assignment? {
        guard let record = state.node(node) else { return nil }
        return Assignment(goal: record.goal, epoch: state.epoch, sequence: record.goalSequence, peer: state.other(than: node)?.id,
                          handover: handoverTo == node && record.goal == .waitPrimary)
    }

    /// The node's latest report in the current epoch (since this core started), if any.
    public func latestReport(_ node: NodeID) -> NodeReport? {
        guard let r = seen[node]?.report, r.epoch == state.epoch else { return nil }
        return r
    }

    /// False during the startup grace, while the core decides nothing.
    public var isDeciding: Bool { graceOver }

    /// How long ago the node was last heard (since this core started), nil when never.
    public func msSinceHeard(_ node: NodeID, now: Milliseconds) -> Milliseconds? {
        guard let s = seen[node], s.heardSinceStart else { return nil }
        return now - s.lastHeardAt
    }

    /// What promoting `node` over the writer would lose, for status pages; nil when `node` is
    /// the writer or not in the formation.
    public func lossIfPromoted(_ node: NodeID, now: Milliseconds) -> DataLossReport? {
        guard let writer = state.writer, writer.id != node, state.node(node) != nil else { return nil }
        return lossReport(promoting: node, over: writer.id, now: now)
    }

    // MARK: Events: heartbeats and time

    /// A node's heartbeat.
    /// - Parameters:
    ///   - node: the peer as its certificate says (the shell verified it), never as it says.
    ///   - report: what the node says about itself.
    /// - Returns: actions ending with the node's `.answer` (or `.refuse`).
    public mutating func onHeartbeat(node peer: PeerIdentity, report: NodeReport, now: Milliseconds) -> [MonitorAction] {
        let id = peer.nodeID
        guard case .node = peer.role else {
            return refuseHeartbeat(id, "a heartbeat needs a node certificate; this one's role is \(peer.role)", now: now)
        }
        guard let record = state.node(id) else {
            return refuseHeartbeat(id, "'\(id)' is not a node of formation \(state.formation) (its nodes: \(state.nodes.map(\.id).joined(separator: ", ")))", now: now)
        }
        if let problem = problem(in: report, from: record) { return refuseHeartbeat(id, problem, now: now) }

        noteHeard(id, now: now)
        var t = Txn(state)
        if report.epoch < state.epoch {
            // A node that has not yet adopted the epoch (a promoted standby, a former primary):
            // it is alive, but what it says belongs to an older epoch and is not recorded.
            noteRefusal(&t, id, "\(id) reports epoch \(report.epoch), older than the formation's \(state.epoch): its report is not recorded; it is told its goal in epoch \(state.epoch)")
        } else {
            refusalNotes[id] = nil
            seen[id]!.report = report
            seen[id]!.reportAt = now
            seen[id]!.reportArrival = seen[id]!.lastHeardArrival
            let reached = report.reached?.state
            if record.reported != reached {
                t.update(id) { $0.reported = reached }
                t.note(.observation, id, report.reached.map { "\(id) reached \($0)" } ?? "\(id) reports no goal reached (it restarted)")
            }
            let lsns = report.tenants.mapValues(\.lsn)
            if lsns != record.lsns, now - seen[id]!.lsnsPersistedAt >= config.lsnPersistIntervalMs {
                t.update(id) { $0.lsns = lsns }
            }
            // A rejoin's report (the keeper repeats it until a heartbeat carrying it is answered).
            for divergence in report.divergences where !seen[id]!.divergencesNoted.contains(divergence) {
                seen[id]!.divergencesNoted.append(divergence)
                if seen[id]!.divergencesNoted.count > 64 { seen[id]!.divergencesNoted.removeFirst() }
                t.note(.observation, divergence.standby,
                       "rejoin: \(divergence) (reported by \(id)). A standby never confirmed these records, so no client was told they committed while the formation was in sync")
            }
        }
        updateGrace(&t, now: now)
        if graceOver { reconcile(&t, now: now) }
        return finish(t, now: now, reply: id)
    }

    /// Time passed: the startup grace, silent nodes, a switchover that takes too long.
    public mutating func onTick(now: Milliseconds) -> [MonitorAction] {
        var t = Txn(state)
        updateGrace(&t, now: now)
        if graceOver {
            noteSilences(&t, now: now)
            reconcile(&t, now: now)
        }
        return finish(t, now: now)
    }

    // MARK: Events: operator commands

    /// A planned switchover: the primary drains (takes no new commit), and once the standby
    /// holds everything it committed the standby is promoted in a new epoch and the former
    /// primary rejoins as its standby. Refused unless the standby is in sync and both are heard.
    public mutating func onSwitchover(now: Milliseconds) -> CommandResult {
        var t = Txn(state)
        updateGrace(&t, now: now)
        if let refusal = commandBlocked(now: now) { return refuseCommand(&t, "switchover", refusal, now: now) }
        guard let w = state.writer, let s = state.other(than: w.id) else {
            return refuseCommand(&t, "switchover", "formation \(state.formation) has a single node: there is nothing to switch over to", now: now)
        }
        if w.goal == .draining { return refuseCommand(&t, "switchover", "a switchover is already in progress (\(w.id) drains)", now: now) }
        if let why = silence(of: w.id, now: now) { return refuseCommand(&t, "switchover", "\(w.id) \(why): use failover, or promote", now: now) }
        if let why = silence(of: s.id, now: now) { return refuseCommand(&t, "switchover", "\(s.id) \(why): it could not take over", now: now) }
        guard s.promotable, w.goal == .primary else {
            return refuseCommand(&t, "switchover", "\(s.id) is not in sync with \(w.id) (\(notPromotableWhy(s, writer: w))): a switchover now could lose acknowledged writes; wait until it is in sync", now: now)
        }
        guard reachedCurrentGoal(t, w.id) else {
            return refuseCommand(&t, "switchover", "\(w.id) has not confirmed that it commits in sync mode (goal \(w.goal), reported \(w.reported.map(\.rawValue) ?? "nothing")): try again shortly", now: now)
        }
        t.setGoal(w.id, .draining)
        t.note(.command, w.id, "switchover asked: \(w.id) drains (takes no new commit); \(s.id) is promoted once it holds everything \(w.id) committed")
        reconcile(&t, now: now)
        return CommandResult(accepted: true, message: "switchover started: \(w.id) drains, then \(s.id) takes over in epoch \(state.epoch.next)", dataLoss: nil, actions: finish(t, now: now))
    }

    /// A failover drill: the unplanned path at the operator's word. The primary is abandoned
    /// as if it were lost: the epoch is raised and the standby promoted at once (it waits out
    /// its lease before it commits, so the former primary has stopped by then). Refused unless
    /// the standby is promotable and heard.
    public mutating func onFailoverDrill(now: Milliseconds) -> CommandResult {
        var t = Txn(state)
        updateGrace(&t, now: now)
        if let refusal = commandBlocked(now: now) { return refuseCommand(&t, "failover", refusal, now: now) }
        guard let w = state.writer, let s = state.other(than: w.id) else {
            return refuseCommand(&t, "failover", "formation \(state.formation) has a single node: there is nothing to fail over to", now: now)
        }
        if w.goal == .draining { return refuseCommand(&t, "failover", "a switchover is in progress (\(w.id) drains)", now: now) }
        if s.maintenanceRequested || s.goal == .maintenance { return refuseCommand(&t, "failover", "\(s.id) is in maintenance", now: now) }
        guard s.promotable else {
            return refuseCommand(&t, "failover", "\(s.id) is not promotable (\(notPromotableWhy(s, writer: w))): a failover now would lose acknowledged writes. If \(w.id) is lost for good: promote \(s.id) --force --accept-data-loss", now: now)
        }
        if let why = silence(of: s.id, now: now) { return refuseCommand(&t, "failover", "\(s.id) \(why): it could not take over", now: now) }
        promote(&t, s.id, over: w.id, forced: false, reason: "failover drill: \(w.id) abandoned as if it were lost, \(s.id) was promotable")
        return CommandResult(accepted: true, message: "\(s.id) promoted in epoch \(t.next.epoch); \(w.id) demoted, it rejoins as the standby once it steps down", dataLoss: nil, actions: finish(t, now: now))
    }

    /// Maintenance on or off for `node`. On the standby: it is marked not promotable, the
    /// primary commits alone, then the standby is let go. On the primary: a switchover first,
    /// then the former primary goes into maintenance instead of rejoining. Refused when it
    /// would leave no healthy node.
    public mutating func onMaintenance(_ node: NodeID, enabled: Bool, now: Milliseconds) -> CommandResult {
        var t = Txn(state)
        updateGrace(&t, now: now)
        let what = "maintenance \(enabled ? "on" : "off") \(node)"
        if let refusal = commandBlocked(now: now) { return refuseCommand(&t, what, refusal, now: now, node: node) }
        guard let record = state.node(node) else {
            return refuseCommand(&t, what, "'\(node)' is not a node of formation \(state.formation)", now: now, node: node)
        }
        guard enabled else {
            guard record.maintenanceRequested || record.goal == .maintenance else {
                return CommandResult(accepted: true, message: "\(node) is not in maintenance", dataLoss: nil, actions: finish(t, now: now))
            }
            t.update(node) { $0.maintenanceRequested = false }
            t.note(.command, node, "maintenance off \(node)" + (record.goal == .draining ? ": the switchover goes on, and \(node) rejoins as the standby" : ": it catches up and becomes promotable once seen in sync"))
            reconcile(&t, now: now)
            return CommandResult(accepted: true, message: "\(node) leaves maintenance", dataLoss: nil, actions: finish(t, now: now))
        }
        if record.maintenanceRequested || record.goal == .maintenance {
            return CommandResult(accepted: true, message: "\(node) is already in maintenance (or on its way)", dataLoss: nil, actions: finish(t, now: now))
        }
        guard let w = state.writer, let other = state.other(than: node) else {
            return refuseCommand(&t, what, "\(node) is the formation's only node", now: now, node: node)
        }
        if node == w.id {
            if other.maintenanceRequested || other.goal == .maintenance {
                return refuseCommand(&t, what, "\(other.id) is in maintenance: \(node) is the only healthy node", now: now, node: node)
            }
            if let why = silence(of: other.id, now: now) {
                return refuseCommand(&t, what, "\(other.id) \(why): \(node) is the only healthy node", now: now, node: node)
            }
            if w.goal == .draining { return refuseCommand(&t, what, "a switchover is already in progress", now: now, node: node) }
            guard other.promotable, w.goal == .primary, reachedCurrentGoal(t, node) else {
                return refuseCommand(&t, what, "\(node) is the primary: it hands over to \(other.id) first, and \(other.id) is not in sync (\(notPromotableWhy(other, writer: w))); \(node) is the only node holding every write", now: now, node: node)
            }
            t.update(node) { $0.maintenanceRequested = true }
            t.setGoal(node, .draining)
            t.note(.command, node, "maintenance on \(node), the primary: a switchover to \(other.id) first (\(node) drains), then \(node) goes into maintenance")
            reconcile(&t, now: now)
            return CommandResult(accepted: true, message: "\(node) hands over to \(other.id), then goes into maintenance", dataLoss: nil, actions: finish(t, now: now))
        }
        if let why = silence(of: w.id, now: now) {
            return refuseCommand(&t, what, "\(w.id), the writer, \(why): \(node) is the only healthy node", now: now, node: node)
        }
        if w.goal == .draining { return refuseCommand(&t, what, "a switchover is in progress", now: now, node: node) }
        t.update(node) { $0.maintenanceRequested = true }
        t.note(.command, node, "maintenance on \(node): not promotable, \(w.id) commits alone, then \(node) is let go")
        reconcile(&t, now: now)
        return CommandResult(accepted: true, message: "\(node) goes into maintenance once \(w.id) commits alone", dataLoss: nil, actions: finish(t, now: now))
    }

    /// Promote `node` now. A promotable node is promoted at once (as in a drill). A node that
    /// is not promotable needs `force` and `acceptDataLoss`, and a writer silent for
    /// `primaryTimeoutMs` (forced promotion is for a lost primary); the result reports what is
    /// lost (``DataLossReport``).
    public mutating func onPromote(_ node: NodeID, force: Bool, acceptDataLoss: Bool, now: Milliseconds) -> CommandResult {
        var t = Txn(state)
        updateGrace(&t, now: now)
        let what = "promote \(node)"
        if let refusal = commandBlocked(now: now) { return refuseCommand(&t, what, refusal, now: now, node: node) }
        guard let s = state.node(node) else {
            return refuseCommand(&t, what, "'\(node)' is not a node of formation \(state.formation)", now: now, node: node)
        }
        guard let w = state.writer, w.id != node else {
            return refuseCommand(&t, what, "\(node) is already the writer (\(s.goal)) in epoch \(state.epoch)", now: now, node: node)
        }
        if s.goal == .demoted || s.reported == .demoted || seen[node]?.report?.role == .demoted {
            // Its keeper never promotes a demoted node (it may lack acknowledged writes): the
            // promotion would leave the formation without a writer for good.
            return refuseCommand(&t, what, "\(node) is a former primary that has not rejoined as the standby: it cannot take over, even by force; bring \(w.id) back, or wait until \(node) has rejoined", now: now, node: node)
        }
        if s.promotable {
            if w.goal == .draining { return refuseCommand(&t, what, "a switchover is in progress", now: now, node: node) }
            if let why = silence(of: node, now: now), !force {
                return refuseCommand(&t, what, "\(node) \(why): it could not take over (--force to promote it anyway)", now: now, node: node)
            }
            promote(&t, node, over: w.id, forced: false, reason: "operator promoted \(node), which was promotable (in sync with \(w.id))")
            return CommandResult(accepted: true, message: "\(node) promoted in epoch \(t.next.epoch); nothing acknowledged is lost", dataLoss: nil, actions: finish(t, now: now))
        }
        let loss = lossReport(promoting: node, over: w.id, now: now)
        let why = notPromotableWhy(s, writer: w)
        guard force else {
            return refuseCommand(&t, what, "\(node) is not promotable (\(why)); promoting it may lose writes: \(loss). If \(w.id) is lost for good: --force --accept-data-loss", now: now, node: node, loss: loss)
        }
        guard acceptDataLoss else {
            return refuseCommand(&t, what, "--force needs --accept-data-loss: \(loss)", now: now, node: node, loss: loss)
        }
        if let heard = msSinceHeard(w.id, now: now), heard < config.primaryTimeoutMs {
            return refuseCommand(&t, what, "\(w.id), the writer, was heard \(heard) ms ago: it is not lost. A forced promotion is for a lost primary; stop \(w.id) first, or wait until \(node) is in sync", now: now, node: node, loss: loss)
        }
        promote(&t, node, over: w.id, forced: true, reason: "operator forced the promotion of \(node), not promotable (\(why)), accepting data loss: \(loss)")
        return CommandResult(accepted: true, message: "\(node) promoted in epoch \(t.next.epoch), accepting data loss: \(loss)", dataLoss: loss, actions: finish(t, now: now))
    }

    // MARK: The rules (DESIGN §6; docs/monitor.md)

    /// Applies every rule that holds now, in order of urgency. Each changes goals only through
    /// `t`, so that `finish` persists everything before anyone is told.
    private mutating func reconcile(_ t: inout Txn, now: Milliseconds) {
        guard let writer = t.next.writer, let other = t.next.other(than: writer.id) else { return }
        let w = writer.id, s = other.id

        // A switchover that does not finish in time is abandoned: the primary drained without
        // committing alone, so its standby is still in sync and stays promotable.
        if t.node(w).goal == .draining, let since = drainingSince, now - since >= config.switchoverTimeoutMs {
            t.update(w) { $0.maintenanceRequested = false }
            t.setGoal(w, .primary)
            t.note(.decision, w, "switchover abandoned: \(w) did not hand over to \(s) within \(config.switchoverTimeoutMs) ms; \(w) takes commits again (primary)")
        }

        // Standby lost: the primary reports its stream down. Not promotable first (same
        // persist, before the answer), then the primary may commit alone.
        if [.primary, .draining].contains(t.node(w).goal), let wr = currentReport(w, t), !wr.streaming {
            let wasDraining = t.node(w).goal == .draining
            t.update(s) { $0.promotable = false }
            if t.node(s).goal == .secondary { t.setGoal(s, .catchingUp) }
            if wasDraining { t.update(w) { $0.maintenanceRequested = false } }
            t.setGoal(w, .waitPrimary)
            t.note(.decision, s, "standby \(s) lost: \(w) reports its stream down; \(s) is not promotable (persisted before \(w) is told), \(w) commits alone (wait_primary)"
                   + (wasDraining ? "; the switchover is abandoned" : ""))
        }

        if primaryLost(&t, w: w, s: s, now: now) { return }

        // Switchover: the primary drained and the standby holds everything it committed.
        if t.node(w).goal == .draining, reachedCurrentGoal(t, w), t.node(s).promotable,
           let wr = currentReport(w, t), let sr = currentReport(s, t), seen[s]!.reportArrival > seen[w]!.reportArrival,
           wr.tenants.allSatisfy({ (sr.tenants[$0.key]?.lsn ?? 0) >= $0.value.lsn }) {
            promote(&t, s, over: w, forced: false, reason: "switchover: \(w) drained and \(s) holds everything it committed")
            handoverTo = s
            return
        }

        // Rejoin: a demoted node that stepped down in the current epoch follows the writer.
        if t.node(s).goal == .demoted, reachedCurrentGoal(t, s) {
            let toMaintenance = t.node(s).maintenanceRequested
            t.setGoal(s, toMaintenance ? .maintenance : .catchingUp)
            t.note(.decision, s, toMaintenance
                   ? "\(s) stepped down in epoch \(t.next.epoch): it goes into maintenance, as asked"
                   : "\(s) stepped down in epoch \(t.next.epoch): it rejoins as the standby of \(w), catching up (not promotable until seen in sync)")
        }

        // Maintenance of the standby: not promotable and the primary alone first, then let go.
        let sn = t.node(s)
        if sn.maintenanceRequested, sn.goal != .maintenance, sn.goal != .demoted {
            if sn.promotable || t.node(w).goal == .primary {
                t.update(s) { $0.promotable = false }
                if sn.goal == .secondary { t.setGoal(s, .catchingUp) }
                if t.node(w).goal == .primary { t.setGoal(w, .waitPrimary) }
                t.note(.decision, s, "maintenance of \(s): not promotable (persisted before \(w) is told), \(w) commits alone (wait_primary); \(s) is let go once \(w) does")
            } else if t.node(w).goal == .waitPrimary, reachedCurrentGoal(t, w) {
                t.setGoal(s, .maintenance)
                t.note(.decision, s, "\(w) commits alone: \(s) goes into maintenance")
            }
        }
        if !t.node(s).maintenanceRequested, t.node(s).goal == .maintenance {
            t.setGoal(s, .catchingUp)
            t.note(.decision, s, "maintenance of \(s) is over: it catches up with \(w)")
        }

        // Caught up: the primary (committing alone) sees its standby close behind; it goes
        // sync. The standby is not promotable yet: the primary may still commit alone until it
        // reaches `primary`.
        if t.node(s).goal == .catchingUp, !t.node(s).maintenanceRequested, t.node(w).goal == .waitPrimary, reachedCurrentGoal(t, w),
           let wr = currentReport(w, t), wr.streaming, let lag = Self.lag(wr), lag <= config.catchUpLagMax,
           let sr = currentReport(s, t), sr.streaming, sr.role == .standby {
            t.setGoal(s, .secondary)
            t.setGoal(w, .primary)
            t.note(.decision, s, "\(s) caught up with \(w) (at most \(lag) records behind per tenant): \(w) commits in sync mode (primary), \(s) is secondary; promotable once seen in sync")
        }

        // In sync: the primary reached sync mode for the goal assigned last, and in one report
        // its standby has acknowledged every tenant up to its committed lsn. Everything it ever
        // committed alone lies below those lsns; everything after waits for the standby.
        if t.node(s).goal == .secondary, !t.node(s).promotable, t.node(w).goal == .primary, reachedCurrentGoal(t, w),
           let wr = currentReport(w, t), wr.streaming, Self.lag(wr) == 0,
           let sr = currentReport(s, t), sr.streaming, reachedCurrentGoal(t, s) {
            t.update(s) { $0.promotable = true }
            t.note(.decision, s, "\(s) seen in sync with \(w) (every tenant acknowledged up to \(w)'s committed lsn, \(w) in sync mode): \(s) is promotable")
        }
    }

    /// Primary lost: silent for `primaryTimeoutMs`, AND its standby confirms (in a report that
    /// came after the primary's last heartbeat) that it lost the stream, AND the standby is
    /// promotable. Otherwise an event says why not (once per reason). Returns whether it promoted.
    private mutating func primaryLost(_ t: inout Txn, w: NodeID, s: NodeID, now: Milliseconds) -> Bool {
        let silentMs = now - seen[w]!.lastHeardAt
        guard silentMs >= config.primaryTimeoutMs else { return false }
        let sn = t.node(s)
        let standbySilentMs = now - seen[s]!.lastHeardAt
        var why: String?
        if sn.maintenanceRequested || sn.goal == .maintenance {
            why = "\(s) is in maintenance"
        } else if !sn.promotable {
            why = "\(s) is not promotable (\(notPromotableWhy(sn, writer: t.node(w)))): promoting it could lose acknowledged writes; an operator may force it (promote \(s) --force --accept-data-loss)"
        } else if standbySilentMs >= config.standbyTimeoutMs {
            why = "\(s) is silent too: both are lost"
        } else if let sr = currentReport(s, t), seen[s]!.reportArrival > seen[w]!.lastHeardArrival {
            if sr.streaming { why = "\(s) still receives \(w)'s stream: the monitor may be cut off from a live primary" }
        } else {
            why = "waiting for \(s) to confirm that it lost \(w)'s stream"
        }
        if let why {
            if blockedNote != why {
                blockedNote = why
                t.note(.observation, w, "\(w) silent for \(silentMs) ms; no automatic promotion: \(why)")
            }
            return false
        }
        promote(&t, s, over: w, forced: false, reason: "\(w) silent for \(silentMs) ms and \(s) confirms it lost the stream; \(s) was promotable")
        return true
    }

    /// Raises the epoch and makes `s` the writer (`wait_primary`: it commits alone once it has
    /// waited out its last lease) and `w` demoted, all in one change persisted before anyone
    /// is told.
    private mutating func promote(_ t: inout Txn, _ s: NodeID, over w: NodeID, forced: Bool, reason: String) {
        handoverTo = nil
        t.next.epoch = t.next.epoch.next
        t.forcedPromotion = forced
        t.update(s) {
            $0.promotable = false
            $0.maintenanceRequested = false
        }
        t.setGoal(s, .waitPrimary)
        t.update(w) { $0.promotable = false }
        t.setGoal(w, .demoted)
        blockedNote = nil
        t.note(.decision, s, "\(reason): epoch \(t.next.epoch) (persisted first); \(s) promoted (wait_primary, once it has waited out its last lease), \(w) demoted")
    }

    // MARK: Helpers

    /// A durable-state transaction: the next state and the events that explain it.
    private struct Txn {
        var next: MonitorState
        var notes: [(MonitorEvent.Kind, NodeID?, String)] = []
        var forcedPromotion = false

        init(_ state: MonitorState) { next = state }

        func node(_ id: NodeID) -> NodeRecord { next.node(id)! }

        mutating func update(_ id: NodeID, _ body: (inout NodeRecord) -> Void) {
            let i = next.nodes.firstIndex { $0.id == id }!
            body(&next.nodes[i])
        }

        /// A new goal gets a new sequence; the same goal keeps its own.
        mutating func setGoal(_ id: NodeID, _ goal: KeeperState) {
            guard node(id).goal != goal else { return }
            let sequence = next.lastGoalSequence + 1
            update(id) {
                $0.goal = goal
                $0.goalSequence = sequence
            }
        }

        mutating func note(_ kind: MonitorEvent.Kind, _ node: NodeID?, _ text: String) { notes.append((kind, node, text)) }
    }

    /// Persists what `t` changed (one atomic change), then the answers: pushed to every node
    /// whose goal or epoch changed, and the reply to `reply`.
    private mutating func finish(_ t: Txn, now: Milliseconds, reply: NodeID? = nil) -> [MonitorAction] {
        let before = state
        var next = t.next
        // A record that is written anyway carries the node's latest lsns.
        for i in next.nodes.indices where next.nodes[i] != before.nodes[i] {
            let id = next.nodes[i].id
            if let report = seen[id]?.report { next.nodes[i].lsns = report.tenants.mapValues(\.lsn) }
            seen[id]!.lsnsPersistedAt = now
        }
        var change = StateChange()
        if next.epoch != before.epoch { change.epoch = next.epoch }
        change.nodes = next.nodes.filter { $0 != before.node($0.id) }
        var sequence = before.lastEventSequence
        change.events = t.notes.map { kind, node, text in
            sequence += 1
            return MonitorEvent(sequence: sequence, epoch: next.epoch, kind: kind, node: node, text: text)
        }
        var actions: [MonitorAction] = []
        if !change.isEmpty {
            state.apply(change)
            checkInvariants(before: before, forcedPromotion: t.forcedPromotion)
            actions.append(.persist(change))
            actions += change.events.map { .event($0) }
        }
        drainingSince = state.writer?.goal == .draining ? (drainingSince ?? now) : nil
        for node in state.nodes where node.id != reply {
            if before.node(node.id)!.goalSequence != node.goalSequence || before.epoch != state.epoch {
                actions.append(.answer(node.id, assignment(for: node.id)!))
            }
        }
        if let reply { actions.append(.answer(reply, assignment(for: reply)!)) }
        return actions
    }

    /// A broken invariant is a bug in this core: crash rather than persist it (CONVENTIONS).
    private func checkInvariants(before: MonitorState, forcedPromotion: Bool) {
        do { try state.validateNodes() } catch { preconditionFailure("monitor core would persist an invalid state: \(error); before: \(before.nodes); after: \(state.nodes)") }
        precondition(state.epoch >= before.epoch, "epoch went back from \(before.epoch) to \(state.epoch)")
        let oldWriter = before.writer!.id, newWriter = state.writer!.id
        if state.epoch != before.epoch {
            precondition(state.epoch == before.epoch.next, "epoch jumped from \(before.epoch) to \(state.epoch)")
            precondition(newWriter != oldWriter, "epoch \(state.epoch) raised without a new writer")
            precondition(before.node(newWriter)!.promotable || forcedPromotion, "\(newWriter) promoted in epoch \(state.epoch) without being promotable")
        } else {
            precondition(newWriter == oldWriter, "the writer changed from \(oldWriter) to \(newWriter) within epoch \(state.epoch)")
        }
    }

    private mutating func refuseHeartbeat(_ id: NodeID, _ reason: String, now: Milliseconds) -> [MonitorAction] {
        var t = Txn(state)
        noteRefusal(&t, id, reason)
        return finish(t, now: now) + [.refuse(id, reason)]
    }

    /// Records a refusal in the history unless it is the node's previous one again.
    private mutating func noteRefusal(_ t: inout Txn, _ id: NodeID, _ reason: String) {
        guard refusalNotes[id] != reason else { return }
        if refusalNotes.count >= Self.refusalNotesMax { refusalNotes.removeAll() }
        refusalNotes[id] = reason
        t.note(.refusal, id, reason)
    }

    private mutating func refuseCommand(_ t: inout Txn, _ what: String, _ reason: String, now: Milliseconds, node: NodeID? = nil, loss: DataLossReport? = nil) -> CommandResult {
        t.note(.refusal, node, "\(what) refused: \(reason)")
        return CommandResult(accepted: false, message: "\(what) refused: \(reason)", dataLoss: loss, actions: finish(t, now: now))
    }

    /// Why a command cannot run now at all.
    private func commandBlocked(now: Milliseconds) -> String? {
        guard !graceOver else { return nil }
        let unheard = state.nodes.filter { !seen[$0.id]!.heardSinceStart }.map(\.id)
        return "the monitor started \(now - startedAt) ms ago and has not heard from \(unheard.joined(separator: ", ")) yet; it decides nothing for up to \(config.startupGraceMs - (now - startedAt)) ms more"
    }

    /// What is wrong with a report, judged against the node's record; nil when nothing.
    private func problem(in report: NodeReport, from record: NodeRecord) -> String? {
        let id = record.id
        if report.tenants.count > config.tenantsMax {
            return "\(id) reports \(report.tenants.count) tenants, more than the \(config.tenantsMax) a heartbeat may carry"
        }
        if let reached = report.reached, !reached.state.allows(report.role) {
            return "\(id) reports role \(report.role.rawValue) but says it reached \(reached.state)"
        }
        if report.epoch > state.epoch {
            return "\(id) reports epoch \(report.epoch), newer than the formation's \(state.epoch): epochs come only from the monitor"
        }
        guard report.epoch == state.epoch else { return nil }
        if report.role == .primary, !record.goal.isWriter {
            return "\(id) claims to be primary in epoch \(state.epoch), whose writer is \(state.writer?.id ?? "nobody"): it MUST step down (goal \(record.goal))"
        }
        if let reached = report.reached {
            if reached.sequence > record.goalSequence {
                return "\(id) says it reached goal #\(reached.sequence), which the monitor never assigned (its latest is #\(record.goalSequence))"
            }
            if reached.sequence == record.goalSequence, reached.state != record.goal {
                return "\(id) says it reached \(reached.state) for goal #\(reached.sequence), which asked for \(record.goal)"
            }
        }
        return nil
    }

    private mutating func noteHeard(_ id: NodeID, now: Milliseconds) {
        arrivals += 1
        seen[id]!.lastHeardAt = now
        seen[id]!.lastHeardArrival = arrivals
        seen[id]!.heardSinceStart = true
        seen[id]!.silenceNoted = false
        if id == state.writer?.id { blockedNote = nil }
    }

    private mutating func updateGrace(_ t: inout Txn, now: Milliseconds) {
        guard !graceOver else { return }
        let unheard = state.nodes.filter { !seen[$0.id]!.heardSinceStart }.map(\.id)
        if unheard.isEmpty {
            graceOver = true
            t.note(.observation, nil, "heard from every node since the monitor started: deciding again")
        } else if now - startedAt >= config.startupGraceMs {
            graceOver = true
            t.note(.observation, nil, "startup grace of \(config.startupGraceMs) ms over without a word from \(unheard.joined(separator: ", ")): silent since the start")
        }
    }

    /// One event per silence of a node that is not the writer (the writer's silence is the
    /// primary-lost rule's), or of a lone node.
    private mutating func noteSilences(_ t: inout Txn, now: Milliseconds) {
        guard let w = state.writer else { return }
        for node in state.nodes where !seen[node.id]!.silenceNoted {
            let silentMs = now - seen[node.id]!.lastHeardAt
            if node.id == w.id {
                guard state.nodes.count == 1, silentMs >= config.primaryTimeoutMs else { continue }
                t.note(.observation, node.id, "\(node.id) silent for \(silentMs) ms: a lone node has no failover")
            } else {
                guard silentMs >= config.standbyTimeoutMs else { continue }
                let streams = currentReport(w.id, t)?.streaming == true
                t.note(.observation, node.id, "\(node.id) silent for \(silentMs) ms" + (streams ? "; \(w.id) still streams to it: nothing changes" : ""))
            }
            seen[node.id]!.silenceNoted = true
        }
    }

    /// "silent for N ms" when the node has not been heard within its timeout, nil when healthy.
    private func silence(of id: NodeID, now: Milliseconds) -> String? {
        let timeout = state.writer?.id == id ? config.primaryTimeoutMs : config.standbyTimeoutMs
        guard let s = seen[id], s.heardSinceStart else { return "has not been heard since the monitor started" }
        let ms = now - s.lastHeardAt
        return ms >= timeout ? "has been silent for \(ms) ms" : nil
    }

    private func notPromotableWhy(_ s: NodeRecord, writer w: NodeRecord) -> String {
        if s.goal == .maintenance || s.maintenanceRequested { return "it is in maintenance" }
        if s.goal == .demoted { return "it is a former primary that has not rejoined yet" }
        if w.goal == .waitPrimary { return "\(w.id) commits alone, \(s.id) is \(s.goal)" }
        return "not yet seen in sync since \(w.id) last committed alone; goal \(s.goal)"
    }

    /// The node's last report, if it was made in the current epoch.
    private func currentReport(_ id: NodeID, _ t: Txn) -> NodeReport? {
        guard let r = seen[id]?.report, r.epoch == t.next.epoch else { return nil }
        return r
    }

    /// Whether the node's last report in the current epoch says it reached the goal assigned last.
    private func reachedCurrentGoal(_ t: Txn, _ id: NodeID) -> Bool {
        guard let reached = currentReport(id, t)?.reached else { return false }
        let node = t.node(id)
        return reached.state == node.goal && reached.sequence == node.goalSequence
    }

    /// How far the standby is behind in a primary's report (the most, over its tenants); nil
    /// when some tenant is not streamed.
    private static func lag(_ report: NodeReport) -> LSN? {
        var lag: LSN = 0
        for tenant in report.tenants.values {
            guard let standby = tenant.standbyLSN else { return nil }
            if tenant.lsn > standby { lag = max(lag, tenant.lsn - standby) }
        }
        return lag
    }

    private func lossReport(promoting s: NodeID, over w: NodeID, now: Milliseconds) -> DataLossReport {
        func positions(_ id: NodeID) -> ([TenantID: LSN], Milliseconds?) {
            if let seen = seen[id], let report = seen.report { return (report.tenants.mapValues(\.lsn), now - seen.reportAt) }
            return (state.node(id)?.lsns ?? [:], nil)
        }
        let (primary, primaryAge) = positions(w)
        let (promoted, _) = positions(s)
        let losses = primary.compactMap { tenant, lsn -> DataLossReport.TenantLoss? in
            let held = promoted[tenant] ?? 0
            return lsn > held ? DataLossReport.TenantLoss(tenant: tenant, promotedLSN: held, primaryLSN: lsn) : nil
        }.sorted { $0.tenant < $1.tenant }
        return DataLossReport(promoted: s, formerPrimary: w, tenants: losses, primaryReportAgeMs: primaryAge)
    }
}
