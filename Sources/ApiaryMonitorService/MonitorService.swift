import ApiaryCore
import ApiaryMonitor
import ApiaryReplication
import ApiaryTLS
import Foundation
import Logging
import NIOCore

/// The shell around ``MonitorCore``: owns the store and the clock, feeds the core heartbeats and
/// ticks, and carries out its actions strictly in order: a `persist` is durable before anything
/// after it happens, so an answer never tells a node something a restarted monitor would not
/// know. It decides nothing itself.
///
/// Every call takes one lock and may fsync (the store): callers MUST NOT call it from an event
/// loop (``MonitorHTTPServer`` runs it on a thread pool).
public final class MonitorService: @unchecked Sendable {
    /// An HTTP answer: status and JSON body.
    public struct Reply: Sendable {
        public var status: Int
        public var body: [UInt8]
        init<T: Encodable>(_ status: Int, _ value: T) {
            self.status = status
            body = JSON.encode(value)
        }
        static func error(_ status: Int, _ code: String, _ text: String) -> Reply { Reply(status, ErrorBody(code: code, error: text)) }
    }

    private let lock = NSLock()
    private var core: MonitorCore
    /// The topology watch: the current version, what it describes, and who waits for a newer one.
    private var topologyVersion: UInt64 = 1
    /// This process's run: a gateway that sees another one takes its topology whatever its version.
    private let topologyRun = UInt64.random(in: 1...UInt64.max)
    private var topologyState: TopologyBody
    private var watchers: [UInt64: @Sendable () -> Void] = [:]
    private var nextWatcher: UInt64 = 0
    /// Watches waiting at once; past it a watch is answered at once (the caller polls).
    public static let watchersMax = 1_024
    private let store: SQLiteMonitorStore
    private let logger: Logger
    private let clock: @Sendable () -> Milliseconds
    /// What stops the process when the store fails; a seam for tests.
    private let stop: @Sendable (String) -> Never

    /// - Parameters:
    ///   - store: open, holding the formation's state.
    ///   - clock: monotonic milliseconds; MUST never go back.
    ///   - stop: called when a save fails: it MUST NOT return (the core's memory is ahead of
    ///     its store; no answer may go out).
    public init(store: SQLiteMonitorStore, state: MonitorState, config: MonitorConfig, logger: Logger,
                clock: @escaping @Sendable () -> Milliseconds = MonitorService.monotonicMs,
                stop: @escaping @Sendable (String) -> Never = MonitorService.exitProcess) {
        self.store = store
        self.logger = logger
        self.clock = clock
        self.stop = stop
        core = MonitorCore(state: state, config: config, now: clock())
        topologyState = TopologyBody(version: 0, state: state)
    }

    public static let monotonicMs: @Sendable () -> Milliseconds = { Int64(NIODeadline.now().uptimeNanoseconds / 1_000_000) }

    public static let exitProcess: @Sendable (String) -> Never = { message in
        FileHandle.standardError.write(Data("apiary monitor: \(message)\n".utf8))
        // Not exit(): no atexit handler or other thread may run on; systemd restarts us and the
        // restarted monitor loads what the store holds.
        _exit(70)
    }

    public var formation: String { lock.withLock { core.state.formation } }
    public var epoch: Epoch { lock.withLock { core.state.epoch } }

    // MARK: Events

    /// A heartbeat from `peer` (as its certificate says).
    public func heartbeat(from peer: ApiaryTLS.PeerIdentity, body: [UInt8]) -> Reply {
        let decoded: HeartbeatBody
        do { decoded = try JSONDecoder().decode(HeartbeatBody.self, from: Data(body)) } catch {
            return .error(400, "bad_request", "the heartbeat is not the expected JSON: \(error)")
        }
        let report: NodeReport
        switch decoded.report() {
        case .success(let r): report = r
        case .failure(let e): return .error(400, "bad_request", e.description)
        }
        let role: PeerRole = peer.role == .node ? .node : .other(peer.role.rawValue)
        return lock.withLock {
            let actions = core.onHeartbeat(node: ApiaryReplication.PeerIdentity(nodeID: peer.name, role: role), report: report, now: clock())
            var reply: Reply?
            for action in actions {
                switch action {
                case .persist(let change):
                    persist(change)
                case .answer(let node, let assignment):
                    if node == peer.name { reply = Reply(200, AssignmentBody(assignment)) }
                case .refuse(let node, let reason):
                    if node == peer.name {
                        // A certificate of another role or a node outside the formation may not
                        // heartbeat at all; anything else is a report the core refused.
                        let forbidden = peer.role != .node || core.state.node(peer.name) == nil
                        reply = forbidden ? .error(403, "forbidden", reason) : .error(409, "refused", reason)
                    }
                case .event(let event):
                    log(event)
                }
            }
            guard let reply else { preconditionFailure("the monitor core gave \(peer.name)'s heartbeat no answer: \(actions)") }
            return reply
        }.also { notifyWatchersIfChanged() }
    }

    /// Time passed: call several times a second.
    public func tick() {
        lock.withLock {
            for action in core.onTick(now: clock()) {
                switch action {
                case .persist(let change): persist(change)
                case .answer: break // nodes learn it from their next heartbeat's answer (no push yet)
                case .refuse: break // a tick refuses no one
                case .event(let event): log(event)
                }
            }
        }
        notifyWatchersIfChanged()
    }

    /// An operator command, carried out like a heartbeat: the change is durable before the
    /// operator hears it was accepted (and before any node is told). Nodes learn their new goals
    /// from their next heartbeat's answer.
    public enum Command: Sendable {
        case switchover, failover
        case maintenance(NodeID, enabled: Bool)
        case promote(NodeID, force: Bool, acceptDataLoss: Bool)
    }

    public func command(_ command: Command, by peer: ApiaryTLS.PeerIdentity) -> Reply {
        lock.withLock {
            let now = clock()
            let result: CommandResult
            switch command {
            case .switchover: result = core.onSwitchover(now: now)
            case .failover: result = core.onFailoverDrill(now: now)
            case .maintenance(let node, let enabled): result = core.onMaintenance(node, enabled: enabled, now: now)
            case .promote(let node, let force, let accept): result = core.onPromote(node, force: force, acceptDataLoss: accept, now: now)
            }
            for action in result.actions {
                switch action {
                case .persist(let change): persist(change)
                case .answer, .refuse: break // nodes learn their goals from their next heartbeat's answer
                case .event(let event): log(event)
                }
            }
            logger.notice("operator command", metadata: ["operator": "\(peer.name)", "command": "\(command)", "accepted": "\(result.accepted)"])
            return Reply(result.accepted ? 200 : 409, CommandAnswerBody(result))
        }.also { notifyWatchersIfChanged() }
    }

    // MARK: The topology watch

    /// The topology now.
    public func topology() -> Reply { lock.withLock { Reply(200, currentTopology()) } }

    /// The topology now if it is newer than `after`; else nil, and `notify` is called once when it
    /// changes (from whichever thread made the change), unless ``cancelWatch(_:)`` comes first.
    /// - Returns: the answer, or the watch's token.
    public func topology(after: UInt64, notify: @escaping @Sendable () -> Void) -> Result<Reply, WatchToken> {
        lock.withLock {
            let current = currentTopology()
            guard current.version <= after, watchers.count < Self.watchersMax else { return .success(Reply(200, current)) }
            nextWatcher += 1
            watchers[nextWatcher] = notify
            return .failure(WatchToken(id: nextWatcher))
        }
    }

    public struct WatchToken: Error, Sendable { let id: UInt64 }

    public func cancelWatch(_ token: WatchToken) { _ = lock.withLock { watchers.removeValue(forKey: token.id) } }

    /// Under the lock. Whoever notices a change first (an event, or a watch asking) wakes the
    /// waiting watches: the callbacks only schedule their answers.
    private func currentTopology() -> TopologyBody {
        var t = TopologyBody(version: 0, state: core.state)
        if t != topologyState {
            topologyVersion += 1
            topologyState = t
            let fire = Array(watchers.values)
            watchers.removeAll()
            for notify in fire { notify() }
        }
        t.version = topologyVersion
        t.run = topologyRun
        return t
    }

    private func notifyWatchersIfChanged() {
        lock.withLock { _ = currentTopology() }
    }

    // MARK: Queries

    public func status() -> Reply {
        lock.withLock {
            let now = clock()
            let s = core.state
            let writerReport = s.writer.flatMap { core.latestReport($0.id) }
            let nodes = s.nodes.map { n in
                let report = core.latestReport(n.id)
                var lag: [String: UInt64]?
                if n.id != s.writer?.id, let report, let writerReport {
                    lag = Dictionary(uniqueKeysWithValues: writerReport.tenants.map { tenant, w in
                        (tenant.rawValue, w.lsn > (report.tenants[tenant]?.lsn ?? 0) ? w.lsn - (report.tenants[tenant]?.lsn ?? 0) : 0)
                    })
                }
                return StatusBody.Node(id: n.id, zone: n.zone, goal: n.goal.rawValue, goalSequence: n.goalSequence, reported: n.reported?.rawValue,
                                       promotable: n.promotable, maintenance: n.maintenanceRequested, heardMsAgo: core.msSinceHeard(n.id, now: now),
                                       lsns: Dictionary(uniqueKeysWithValues: n.lsns.map { ($0.key.rawValue, $0.value) }),
                                       lag: lag, lease: n.id == s.writer?.id ? report?.holdsLease : nil)
            }
            return Reply(200, StatusBody(formation: s.formation, epoch: s.epoch.rawValue, deciding: core.isDeciding, nodes: nodes,
                                         lastEvent: s.lastEventSequence))
        }
    }

    /// Events after `after`, oldest first, at most `limit` (the store keeps the whole history).
    public func events(after: UInt64, limit: Int) -> Reply {
        lock.withLock {
            do {
                let formatter = ISO8601DateFormatter()
                formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
                let events = try store.events(after: after, limit: limit).map { e in
                    EventsBody.Event(sequence: e.event.sequence, at: formatter.string(from: e.at), epoch: e.event.epoch.rawValue,
                                     kind: e.event.kind.rawValue, node: e.event.node, text: e.event.text)
                }
                return Reply(200, EventsBody(events: events))
            } catch {
                logger.error("cannot read the history", metadata: ["error": "\(error)"])
                return .error(500, "store", "cannot read the history: \(error)")
            }
        }
    }

    // MARK: Carrying out

    private func persist(_ change: StateChange) {
        do {
            try store.save(change)
        } catch {
            logger.critical("the monitor store failed; stopping", metadata: ["error": "\(error)"])
            stop("saving a change failed, stopping (its memory is ahead of its store): \(error)")
        }
    }

    private func log(_ event: MonitorEvent) {
        logger.notice("\(event)")
    }
}

extension MonitorService.Reply {
    /// `self`, after `body` ran (for work that must follow the lock's release).
    func also(_ body: () -> Void) -> Self {
        body()
        return self
    }
}
