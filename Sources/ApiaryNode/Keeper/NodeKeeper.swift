import ApiaryCore
import ApiaryKeeper
import ApiaryMonitor
import ApiaryReplication
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL

/// The keeper's shell: heartbeats to the monitor, hands its answers to ``KeeperCore`` and
/// carries out the steps the core decides, one at a time (docs/monitor.md, "What the keeper
/// needs"). It decides nothing itself.
///
/// A heartbeat goes out every `intervalMs`, and at once after a step is done (so that the
/// monitor learns of a promotion without waiting for the next round). A monitor that cannot be
/// reached changes nothing: the node keeps its role (sync mode keeps serving without it).
final class NodeKeeper: @unchecked Sendable {
    private let roles: NodeRoles
    private let monitorHost: String
    private let monitorPort: Int
    private let tls: TLSConfiguration
    private let group: any EventLoopGroup
    private let intervalMs: Int64
    /// A heartbeat not answered within this long is given up (its connection closed).
    private let requestTimeoutMs: Int64 = 1_000
    private let logger: Logger

    private let lock = NSLock()
    private var core: KeeperCore
    private var connection: HTTPSConnection?
    private var lastProblem: String?
    private var task: Task<Void, Never>?
    private let wakeup: Wakeup

    init(roles: NodeRoles, state: NodeState, monitorHost: String, monitorPort: Int, tls: TLSConfiguration,
         group: any EventLoopGroup, intervalMs: Int64, logger: Logger) {
        self.roles = roles
        self.monitorHost = monitorHost
        self.monitorPort = monitorPort
        self.tls = tls
        self.group = group
        self.intervalMs = intervalMs
        self.logger = logger
        self.wakeup = Wakeup(loop: group.next())
        // A primary is not set up until the monitor's first writer goal (which also lets it use
        // leases again: it may have been handing over when it stopped).
        core = KeeperCore(state: state, primarySetup: nil)
    }

    func start() {
        logger.notice("keeper: following the monitor", metadata: ["monitor": "\(monitorHost):\(monitorPort)"])
        task = Task { [self] in
            while !Task.isCancelled {
                await beat()
                await wakeup.wait(ms: intervalMs)
            }
        }
    }

    func stop() {
        task?.cancel()
        wakeup.fire()
    }

    /// One heartbeat and the handling of its answer.
    private func beat() async {
        // The goal reached is read before the figures: a step that ends in between must not pair
        // "reached primary" with figures from before it (from wait_primary).
        let before = lock.withLock { core }
        let figures = await roles.keeperFigures()
        var report = before.report(tenants: figures.tenants, streaming: figures.streaming, holdsLease: figures.holdsLease)
        report.divergences = figures.divergences
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        guard let body = try? encoder.encode(HeartbeatBody(report)) else { return }
        let response: HTTPSConnection.Response
        do {
            response = try await send(Array(body))
        } catch {
            await dropConnection()
            return problem("cannot reach the monitor at \(monitorHost):\(monitorPort) (\(error)); keeping the current role")
        }
        guard response.status == 200 else {
            let message = (try? JSONDecoder().decode(ErrorBody.self, from: Data(response.body)))?.error ?? response.text
            switch response.status {
            case 409: return problem("the monitor refused this node's report: \(message)")
            case 403: return problem("the monitor does not accept this node (its certificate or name): \(message)")
            default: return problem("the monitor answered \(response.status): \(message)")
            }
        }
        roles.divergencesDelivered(report.divergences)
        guard let wire = try? JSONDecoder().decode(AssignmentBody.self, from: Data(response.body)) else {
            return problem("the monitor's answer is not an assignment: \(response.text.prefix(200))")
        }
        switch wire.assignment() {
        case .failure(let error): problem("the monitor's assignment is malformed: \(error)")
        case .success(let assignment):
            if lastProblem != nil {
                lastProblem = nil
                logger.notice("keeper: the monitor answers again")
            }
            handle(lock.withLock { core.onAssignment(assignment) })
        }
    }

    private func handle(_ actions: [KeeperAction]) {
        for action in actions {
            switch action {
            case .note(let text):
                logger.warning("keeper: \(text)")
            case .run(let step):
                logger.notice("keeper: \(step)")
                Task { [self] in
                    let next: [KeeperAction]
                    do {
                        try await roles.carryOut(step)
                        next = lock.withLock { core.onStepDone() }
                        logger.notice("keeper: done: \(step)", metadata: ["reached": "\(lock.withLock { core.reached.map(\.description) ?? "-" })"])
                    } catch {
                        next = lock.withLock { core.onStepFailed("\(error)") }
                    }
                    handle(next)
                    wakeup.fire() // tell the monitor now
                }
            }
        }
    }

    /// Says a problem once, until the monitor answers again or another problem comes.
    private func problem(_ text: String) {
        guard lock.withLock({ () -> Bool in
            defer { lastProblem = text }
            return lastProblem != text
        }) else { return }
        logger.warning("keeper: \(text)")
    }

    private func send(_ body: [UInt8]) async throws -> HTTPSConnection.Response {
        let connection: HTTPSConnection
        if let open = lock.withLock({ self.connection }), open.isOpen {
            connection = open
        } else {
            connection = try await HTTPSConnection.connect(host: monitorHost, port: monitorPort, tls: tls, group: group, timeoutMs: requestTimeoutMs)
            lock.withLock { self.connection = connection }
        }
        // A monitor that accepts and never answers must not stop the heartbeats.
        let channel = connection.channel
        let timeout = channel.eventLoop.scheduleTask(in: .milliseconds(requestTimeoutMs)) { channel.close(promise: nil) }
        defer { timeout.cancel() }
        return try await connection.request(.POST, "/heartbeat", body: body)
    }

    private func dropConnection() async {
        let dropped = lock.withLock { () -> HTTPSConnection? in
            defer { connection = nil }
            return connection
        }
        await dropped?.close()
    }
}

/// A timed wait that can be cut short, without blocking a thread (the node's event loops run
/// Swift concurrency's jobs).
private final class Wakeup: @unchecked Sendable {
    private let loop: any EventLoop
    private let lock = NSLock()
    private var promise: EventLoopPromise<Void>?
    private var firedEarly = false

    init(loop: any EventLoop) { self.loop = loop }

    func wait(ms: Int64) async {
        let promise = loop.makePromise(of: Void.self)
        let early = lock.withLock { () -> Bool in
            defer { firedEarly = false }
            if !firedEarly { self.promise = promise }
            return firedEarly
        }
        guard !early else { return promise.succeed() }
        let timer = loop.scheduleTask(in: .milliseconds(ms)) { [weak self] in self?.fire() }
        try? await promise.futureResult.get()
        timer.cancel()
    }

    /// Ends the current wait now; a fire between waits ends the next one at once.
    func fire() {
        let waiting = lock.withLock { () -> EventLoopPromise<Void>? in
            defer { promise = nil }
            if promise == nil { firedEarly = true }
            return promise
        }
        waiting?.succeed()
    }
}

/// What a node tells the monitor beside its role and goal (``NodeRoles/keeperFigures()``).
struct KeeperFigures {
    var tenants: [TenantID: TenantReport]
    var streaming: Bool
    var holdsLease: Bool?
    /// A primary's rejoin reports not yet delivered.
    var divergences: [Divergence] = []
}
