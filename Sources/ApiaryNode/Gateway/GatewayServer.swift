import ApiaryCore
import ApiaryGateway
import ApiaryLifecycle
import ApiaryMonitor
import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// Everything `apiary gateway` needs to run.
public struct GatewayConfiguration: Sendable {
    public var name: String
    public var certificatesDirectory: String
    public var host = "127.0.0.1"
    public var port = 4000
    public var monitorHost = "127.0.0.1"
    public var monitorPort = 4100
    /// Each node's API address, by the name in its certificate (the monitor names the writer).
    public var nodes: [NodeID: (host: String, port: Int)] = [:]
    /// What applications see; the gateway's cluster certificate when nil.
    /// The plain-HTTP port, which only redirects to HTTPS; none when nil.
    public var redirectHost: String?
    public var redirectPort = 0
    public var apiCertificatePath: String?
    public var apiKeyPath: String?
    public var core = GatewayConfig()
    public var limits = APIServer.Limits()
    /// Requests per second (and the burst) per client address.
    public var perAddressRate = RateLimiter.Config(perSecond: 50_000, burst: 100_000)

    public init(name: String, certificatesDirectory: String) {
        self.name = name
        self.certificatesDirectory = certificatesDirectory
    }
}

/// Runs a gateway until SIGTERM/SIGINT: the client-facing HTTPS endpoint, the topology watch
/// and the forwarding (docs/gateway.md).
public enum GatewayServer {
    public static func run(_ config: GatewayConfiguration, logger: Logger) async throws {
        NodeServer.exitWithParentIfAsked()
        let credentials = try ClusterCredentials(directory: config.certificatesDirectory, name: config.name)
        guard credentials.identity.role == .gateway else {
            throw NodeError("\(config.name)'s certificate is for role \(credentials.identity.role.rawValue); a gateway needs a gateway certificate")
        }
        let group = MultiThreadedEventLoopGroup.singleton
        let state = GatewayState(core: GatewayCore(config: config.core))
        let tls = credentials.clusterClient()
        let pools = Dictionary(uniqueKeysWithValues: try config.nodes.map { ($0.key, try NodePool(node: $0.key, host: $0.value.host, port: $0.value.port, tls: tls, group: group)) })
        let watch = TopologyWatch(host: config.monitorHost, port: config.monitorPort, tls: tls, group: group, state: state, logger: logger)
        watch.start()
        defer { watch.stop() }
        let warming = Task {
            while !Task.isCancelled {
                await withTaskGroup(of: Void.self) { group in
                    for pool in pools.values { group.addTask { await pool.keepWarm(logger: logger) } }
                }
                try? await Task.sleep(for: .milliseconds(NodePool.warmCheckMs)) // upkeep, not ordering
            }
        }
        defer { warming.cancel() }
        let forwarder = GatewayForwarder(name: config.name, state: state, pools: pools, bodyBytesMax: config.limits.bodyBytesMax,
                                         limits: RequestLimits(perAddress: config.perAddressRate), logger: logger)
        let apiCertificate = try config.apiCertificatePath.map { try ServerCertificate(certificatePath: $0, keyPath: config.apiKeyPath ?? "") }
        let server = try await APIServer.start(responder: forwarder, credentials: credentials, certificate: apiCertificate,
                                               host: config.host, port: config.port, group: group, logger: logger, limits: config.limits,
                                               answerHeaders: GatewayForwarder.answerHeaders(name: config.name))
        var redirect: RedirectServer?
        if let host = config.redirectHost {
            redirect = try await RedirectServer.start(host: host, port: config.redirectPort, httpsPort: server.port, group: group, logger: logger)
        }
        let redirectNote = redirect.map { " redirect=http://\(config.redirectHost!):\($0.port)" } ?? ""
        print("apiary gateway \(config.name) ready: monitor=\(config.monitorHost):\(config.monitorPort)\(redirectNote) listen=https://\(config.host):\(server.port)")
        fflush(stdout)
        ServiceManager.ready(status: "gateway \(config.name) on \(config.host):\(server.port)")
        let signal = await NodeServer.terminationSignal()
        logger.notice("shutting down", metadata: ["signal": "\(signal)"])
        ServiceManager.stopping()
        await redirect?.close()
        await server.close()
        for pool in pools.values { await pool.closeAll() }
    }
}

/// The gateway's core behind a lock, and the requests waiting for the topology to change.
final class GatewayState: @unchecked Sendable {
    private let lock = NSLock()
    private var core: GatewayCore
    private var waiters: [UInt64: @Sendable () -> Void] = [:]
    private var nextWaiter: UInt64 = 0
    /// Attempts under way: a change of writer may abandon them (``GatewayCore/abandons(_:sentTo:)``).
    private var inFlight: [UInt64: (request: RequestProgress, node: NodeID, connection: HTTPSConnection)] = [:]
    private var nextAttempt: UInt64 = 0

    init(core: GatewayCore) { self.core = core }

    func with<T>(_ body: (inout GatewayCore) -> T) -> T { lock.withLock { body(&core) } }

    /// - Returns: how many attempts under way it gave up (their writer is no longer the writer).
    @discardableResult
    func onTopology(_ topology: GatewayTopology) -> Int {
        changed { $0.onTopology(topology) }
    }

    /// A node served a request as the writer in `epoch` (``GatewayCore/onWriterAnswer(from:epoch:)``).
    func onWriterAnswer(from node: NodeID, epoch: Epoch) {
        changed { $0.onWriterAnswer(from: node, epoch: epoch) }
    }

    /// Applies `change` to the core; if the topology changed, wakes the waiting requests and
    /// gives up the attempts on a former writer that the core says to.
    @discardableResult
    private func changed(_ change: (inout GatewayCore) -> Bool) -> Int {
        let (woken, abandoned): ([@Sendable () -> Void], [HTTPSConnection]) = lock.withLock {
            guard change(&core) else { return ([], []) }
            defer { waiters.removeAll() }
            let abandoned = inFlight.values.filter { core.abandons($0.request, sentTo: $0.node) }.map(\.connection)
            return (Array(waiters.values), abandoned)
        }
        // Their attempts end as "no answer"; the core sends them again to the new writer.
        for connection in abandoned { connection.abandon() }
        for wake in woken { wake() }
        return abandoned.count
    }

    /// An attempt of `request` on `node` begins on `connection`; returns its token for ``attemptEnded(_:)``.
    func attemptBegins(_ request: RequestProgress, on node: NodeID, connection: HTTPSConnection) -> UInt64 {
        let (token, abandon) = lock.withLock { () -> (UInt64, Bool) in
            nextAttempt += 1
            inFlight[nextAttempt] = (request, node, connection)
            // The writer may have changed since the decision to send here.
            return (nextAttempt, core.abandons(request, sentTo: node))
        }
        if abandon { connection.abandon() }
        return token
    }

    func attemptEnded(_ token: UInt64) {
        lock.withLock { _ = inFlight.removeValue(forKey: token) }
    }

    /// Calls `then` on `loop` once, when the topology is no longer `seen` (it may have changed
    /// between the decision to wait and this call), or at `untilMs` (monotonic), whichever is first.
    func whenChanged(from seen: GatewayTopology, untilMs: Int64, on loop: any EventLoop, then: @escaping @Sendable () -> Void) {
        let wake: @Sendable () -> Void = { loop.execute(then) }
        let id: UInt64? = lock.withLock {
            guard core.topology == seen else { return nil }
            nextWaiter += 1
            waiters[nextWaiter] = wake
            return nextWaiter
        }
        guard let id else { return wake() }
        loop.scheduleTask(in: .milliseconds(max(0, untilMs - monotonicNowMs()))) { [self] in
            // Whichever of the change and the timer removes the waiter wakes it.
            lock.withLock { waiters.removeValue(forKey: id) }?()
        }
    }
}

/// Follows the monitor's topology watch (a long poll) and hands each answer to the core.
final class TopologyWatch: @unchecked Sendable {
    let host: String
    let port: Int
    let tls: TLSConfiguration
    let group: any EventLoopGroup
    let state: GatewayState
    let logger: Logger
    private var task: Task<Void, Never>?

    init(host: String, port: Int, tls: TLSConfiguration, group: any EventLoopGroup, state: GatewayState, logger: Logger) {
        self.host = host
        self.port = port
        self.tls = tls
        self.group = group
        self.state = state
        self.logger = logger
    }

    func start() {
        task = Task { [self] in
            var version: UInt64 = 0
            var run: UInt64 = 0
            var connection: HTTPSConnection?
            var complained = false
            while !Task.isCancelled {
                do {
                    if connection?.isOpen != true {
                        connection = try await HTTPSConnection.connect(host: host, port: port, tls: tls, group: group, timeoutMs: 2_000)
                    }
                    let r = try await connection!.request(.GET, "/topology?after=\(version)&wait_ms=25000")
                    guard r.status == 200 else { throw NodeError("the monitor answered \(r.status): \(r.text.prefix(200))") }
                    let body = try JSONDecoder().decode(TopologyBody.self, from: Data(r.body))
                    version = body.version
                    if body.run != run { version = 0 } // a restarted monitor: its versions start over
                    run = body.run
                    let abandoned = state.onTopology(GatewayTopology(version: body.version, run: body.run, epoch: Epoch(body.epoch), writer: body.writer, writerReady: body.writerReady))
                    if abandoned > 0 {
                        logger.notice("the writer changed: attempts still waiting on the former writer are sent to the new one",
                                      metadata: ["writer": "\(body.writer ?? "-")", "epoch": "\(body.epoch)", "attempts": "\(abandoned)"])
                    }
                    if complained { logger.notice("the monitor's topology watch answers again") }
                    complained = false
                } catch {
                    if !complained { logger.warning("cannot follow the monitor's topology watch; keeping what is known", metadata: ["error": "\(error)"]) }
                    complained = true
                    await connection?.close()
                    connection = nil
                    try? await Task.sleep(for: .milliseconds(200)) // a monitor that is down is asked again, not hammered
                }
            }
            await connection?.close()
        }
    }

    func stop() { task?.cancel() }
}

/// Keep-alive connections to one node, with the gateway's certificate; bounded. A request
/// takes a connection on its own event loop when one is idle there: it then crosses no thread.
final class NodePool: @unchecked Sendable {
    let node: NodeID
    let host: String
    let port: Int
    let group: any EventLoopGroup
    /// Made once: making a context loads the certificates and keys from disk.
    private let context: NIOSSLContext
    private let lock = NSLock()
    /// Most recently given back last.
    private var idle: [(connection: HTTPSConnection, since: Int64)] = []
    private var open = 0
    /// Connections to one node at most; past it a request counts as not sent (and is held).
    static let connectionsMax = 256
    /// Idle connections older than this are closed rather than reused: the node closes idle
    /// connections after 120 s, and a request written into one it is closing would be lost in
    /// an unknown state.
    static let idleReuseMs: Int64 = 20_000
    /// Idle connections kept open to every node, the standby too, ahead of need: after a
    /// failover the first requests to the new writer find connections ready, instead of each
    /// waiting for a TLS handshake of its own (dozens at once, on the cores the nodes need).
    /// Opened on the group's loops in turn, so each loop has some.
    static let warmCount = 8
    /// How often the warm connections are checked: replaced before they are too old to reuse,
    /// opened again to a node that was down.
    static let warmCheckMs: Int64 = 5_000
    private var warmedOnce = false

    init(node: NodeID, host: String, port: Int, tls: TLSConfiguration, group: any EventLoopGroup) throws {
        self.node = node
        self.host = host
        self.port = port
        self.group = group
        self.context = try NIOSSLContext(configuration: tls)
    }

    /// A connection for a request on `loop`: the one given back last on that loop, else the
    /// one given back last on any loop, else a new one on `loop`. The future completes on `loop`.
    func take(on loop: any EventLoop) -> EventLoopFuture<HTTPSConnection> {
        let now = monotonicNowMs()
        let (reused, stale, mayOpen): (HTTPSConnection?, [HTTPSConnection], Bool) = lock.withLock {
            var stale: [HTTPSConnection] = []
            idle.removeAll { entry in
                guard !entry.connection.isOpen || now - entry.since >= Self.idleReuseMs else { return false }
                stale.append(entry.connection)
                open -= 1
                return true
            }
            if let i = idle.lastIndex(where: { $0.connection.channel.eventLoop === loop }) ?? idle.indices.last {
                return (idle.remove(at: i).connection, stale, false)
            }
            guard open < Self.connectionsMax else { return (nil, stale, false) }
            open += 1
            return (nil, stale, true)
        }
        for connection in stale { connection.abandon() }
        if let reused { return loop.makeSucceededFuture(reused) }
        guard mayOpen else { return loop.makeFailedFuture(NodeError("\(Self.connectionsMax) connections to \(node) are busy")) }
        return HTTPSConnection.connect(host: host, port: port, context: context, group: loop, timeoutMs: 1_000)
            .hop(to: loop)
            .flatMapErrorThrowing { [self] error in
                lock.withLock { open -= 1 }
                throw error
            }
    }

    /// Closes idle connections that would be too old to reuse before the next check, and opens
    /// connections until ``warmCount`` are idle (within ``connectionsMax``).
    func keepWarm(logger: Logger) async {
        let now = monotonicNowMs()
        let (stale, toOpen): ([HTTPSConnection], Int) = lock.withLock {
            var stale: [HTTPSConnection] = []
            idle.removeAll { entry in
                guard !entry.connection.isOpen || now - entry.since >= Self.idleReuseMs - Self.warmCheckMs else { return false }
                stale.append(entry.connection)
                open -= 1
                return true
            }
            let toOpen = max(0, min(Self.warmCount - idle.count, Self.connectionsMax - open))
            open += toOpen
            return (stale, toOpen)
        }
        for connection in stale { connection.abandon() }
        guard toOpen > 0 else { return }
        let (host, port, context, group) = (host, port, context, group)
        let opened = await withTaskGroup(of: HTTPSConnection?.self) { tasks in
            for _ in 0..<toOpen {
                tasks.addTask { try? await HTTPSConnection.connect(host: host, port: port, context: context, group: group, timeoutMs: 1_000).get() }
            }
            return await tasks.reduce(into: [HTTPSConnection]()) { if let c = $1 { $0.append(c) } }
        }
        let first = lock.withLock { () -> Bool in
            open -= toOpen - opened.count
            let since = monotonicNowMs()
            idle.insert(contentsOf: opened.map { ($0, since) }, at: 0) // behind the connections in use lately
            defer { if opened.count == toOpen { warmedOnce = true } }
            return opened.count == toOpen && !warmedOnce
        }
        if first { logger.info("keeping connections open to \(node) ahead of need", metadata: ["connections": "\(Self.warmCount)"]) }
    }

    func give(back connection: HTTPSConnection) {
        lock.withLock { idle.append((connection, monotonicNowMs())) }
    }

    /// Forgets a connection and closes it without waiting: a TLS close waits for the peer's
    /// close_notify, which a paused or cut-off node never sends, and the request that gave the
    /// connection up goes on at once.
    func discard(_ connection: HTTPSConnection) {
        lock.withLock { open -= 1 }
        connection.abandon()
    }

    func closeAll() async {
        let all = lock.withLock { () -> [HTTPSConnection] in
            defer { idle.removeAll() }
            return idle.map(\.connection)
        }
        for c in all { await c.close() }
    }
}
