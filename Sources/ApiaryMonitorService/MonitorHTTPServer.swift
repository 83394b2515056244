import ApiaryMonitor
import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// The monitor's HTTPS endpoint: mTLS only (the cluster CA is the only trust root and a client
/// certificate is required), SwiftNIO's HTTP/1.1 server pipeline, and one small handler.
///
/// Why not the node's `APIServer` (ApiaryNode): it is built around the node's SQL routes and
/// accounts (its handler calls `APIRoutes` directly) and lets clients connect without a
/// certificate; reusing it would mean changing the node. This server keeps the same kinds of
/// limits (``Limits``: body size, connections, idle and request-read timeouts) for a far
/// smaller load: two nodes' heartbeats and a few operators. Moving both onto one shared HTTP
/// target is noted in docs/monitor.md.
public final class MonitorHTTPServer: Sendable {
    public struct Limits: Sendable {
        /// A heartbeat of `tenantsMax` tenants fits well within this.
        public var bodyBytesMax = 4 << 20
        public var connectionsMax = 256
        /// A connection that sends nothing for this long is closed.
        public var idleTimeoutMs: Int64 = 60_000
        /// A request must arrive whole within this time once it has started.
        public var requestReadTimeoutMs: Int64 = 10_000
        /// The longest a topology watch is held.
        public var topologyWaitMsMax: Int64 = 30_000
        /// `GET /events` returns at most this many events per call.
        public var eventsPerRequestMax = 1_000
        public init() {}
    }

    let channel: any Channel
    public let port: Int
    private let threadPool: NIOThreadPool

    private init(channel: any Channel, threadPool: NIOThreadPool) {
        self.channel = channel
        self.threadPool = threadPool
        port = channel.localAddress?.port ?? 0
    }

    public static func start(service: MonitorService, credentials: ClusterCredentials, host: String, port: Int,
                             group: any EventLoopGroup, logger: Logger, limits: Limits = Limits()) async throws -> MonitorHTTPServer {
        let context = try NIOSSLContext(configuration: credentials.clusterServer())
        // One thread: the service serializes every call on its lock anyway, and each may fsync.
        let threadPool = NIOThreadPool(numberOfThreads: 1)
        threadPool.start()
        let open = OpenConnectionCount()
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                guard open.increment(max: limits.connectionsMax) else {
                    logger.warning("monitor connection refused: too many open", metadata: ["max": "\(limits.connectionsMax)"])
                    return channel.close()
                }
                channel.closeFuture.whenComplete { _ in open.decrement() }
                return channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(NIOSSLServerHandler(context: context))
                    try sync.addHandler(IdleStateHandler(allTimeout: .milliseconds(limits.idleTimeoutMs)))
                    try sync.configureHTTPServerPipeline(withPipeliningAssistance: true, withErrorHandling: true)
                    try sync.addHandler(MonitorHTTPHandler(service: service, threadPool: threadPool, limits: limits, logger: logger))
                }
            }
            .bind(host: host, port: port).get()
        return MonitorHTTPServer(channel: channel, threadPool: threadPool)
    }

    /// Stops accepting; requests in flight finish on their connections.
    public func close() async {
        try? await channel.close()
        try? await threadPool.shutdownGracefully()
    }
}

/// Open connections, bounded.
final class OpenConnectionCount: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func increment(max: Int) -> Bool {
        lock.withLock {
            guard value < max else { return false }
            value += 1
            return true
        }
    }
    func decrement() { lock.withLock { value -= 1 } }
}

/// One connection: collects a request (bounded), asks the service on the thread pool, writes
/// the answer. NIO's pipelining handler holds later requests until this one is answered.
final class MonitorHTTPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let service: MonitorService
    private let threadPool: NIOThreadPool
    private let limits: MonitorHTTPServer.Limits
    private let logger: Logger
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []
    private var tooLarge = false
    private var readTimer: Scheduled<Void>?
    private var peer: ApiaryTLS.PeerIdentity?
    private var peerRead = false

    init(service: MonitorService, threadPool: NIOThreadPool, limits: MonitorHTTPServer.Limits, logger: Logger) {
        self.service = service
        self.threadPool = threadPool
        self.limits = limits
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            body = []
            tooLarge = Int(h.headers.first(name: "content-length") ?? "0").map { $0 > limits.bodyBytesMax } ?? false
            let channel = context.channel
            readTimer = context.eventLoop.scheduleTask(in: .milliseconds(limits.requestReadTimeoutMs)) { channel.close(promise: nil) }
        case .body(var buffer):
            guard !tooLarge else { return }
            if body.count + buffer.readableBytes > limits.bodyBytesMax {
                tooLarge = true
                body = []
            } else {
                body += buffer.readBytes(length: buffer.readableBytes) ?? []
            }
        case .end:
            readTimer?.cancel()
            readTimer = nil
            guard let head else { return }
            self.head = nil
            if !peerRead {
                // Verified against the cluster CA during the handshake; read once per connection.
                peerRead = true
                if let certificate = try? context.pipeline.syncOperations.nioSSL_peerCertificate() {
                    peer = ClusterCredentials.identity(of: certificate)
                }
            }
            if tooLarge {
                return respond(context: context, head: head, MonitorService.Reply.error(413, "too_large", "the body exceeds \(limits.bodyBytesMax) bytes"), close: true)
            }
            if head.method == .GET, head.uri.hasPrefix("/topology"), head.uri.split(separator: "?").first == "/topology" {
                self.body = []
                return watchTopology(context: context, head: head)
            }
            let (service, peer, body, limits) = (self.service, self.peer, self.body, self.limits)
            self.body = []
            let loop = context.eventLoop
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            threadPool.runIfActive(eventLoop: loop) {
                Self.route(head: head, body: body, peer: peer, service: service, limits: limits)
            }.whenComplete { result in
                let (handler, context) = bound.value
                switch result {
                case .success(let reply): handler.respond(context: context, head: head, reply, close: false)
                case .failure: handler.respond(context: context, head: head, .error(503, "stopping", "the monitor is stopping"), close: true)
                }
            }
        }
    }

    /// `GET /topology?after=V&wait_ms=N` (gateways, operators and nodes): at once when the
    /// topology is newer than `after`, else when it changes or after `wait_ms` (at most
    /// `topologyWaitMsMax`). The wait holds no thread: the service calls back on a change.
    private func watchTopology(context: ChannelHandlerContext, head: HTTPRequestHead) {
        guard let peer, [.gateway, .operator, .node].contains(peer.role) else {
            return respond(context: context, head: head, .error(403, "forbidden", "/topology needs a gateway, operator or node certificate"), close: false)
        }
        var after: UInt64 = 0
        var waitMs: Int64 = 0
        for pair in (head.uri.split(separator: "?", maxSplits: 1).dropFirst().first ?? "").split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { continue }
            if kv[0] == "after", let n = UInt64(kv[1]) { after = n }
            if kv[0] == "wait_ms", let n = Int64(kv[1]), n >= 0 { waitMs = min(n, limits.topologyWaitMsMax) }
        }
        let service = self.service
        let loop = context.eventLoop
        let bound = NIOLoopBound((self, context), eventLoop: loop)
        // Answered once: by the change, the timer, or at once.
        let answered = NIOLoopBoundBox(false, eventLoop: loop)
        let timer = NIOLoopBoundBox<Scheduled<Void>?>(nil, eventLoop: loop)
        // Runs on the loop: by the change's callback (scheduled there) or by the timer.
        let answer: @Sendable () -> Void = { [threadPool] in
            guard !answered.value else { return }
            threadPool.runIfActive(eventLoop: loop) { service.topology() }.whenComplete { result in
                guard !answered.value else { return }
                answered.value = true
                timer.value?.cancel()
                let (handler, context) = bound.value
                switch result {
                case .success(let reply): handler.respond(context: context, head: head, reply, close: false)
                case .failure: handler.respond(context: context, head: head, .error(503, "stopping", "the monitor is stopping"), close: true)
                }
            }
        }
        threadPool.runIfActive(eventLoop: loop) {
            service.topology(after: waitMs == 0 ? 0 : after, notify: { loop.execute { answer() } })
        }.whenComplete { result in
            switch result {
            case .success(.success(let reply)):
                guard !answered.value else { return }
                answered.value = true
                let (handler, context) = bound.value
                handler.respond(context: context, head: head, reply, close: false)
            case .success(.failure(let token)):
                guard !answered.value else { return service.cancelWatch(token) }
                timer.value = loop.scheduleTask(in: .milliseconds(waitMs)) {
                    service.cancelWatch(token)
                    answer()
                }
            case .failure:
                let (handler, context) = bound.value
                handler.respond(context: context, head: head, .error(503, "stopping", "the monitor is stopping"), close: true)
            }
        }
    }

    /// Which role may call what: nodes heartbeat, operators read and command.
    static func route(head: HTTPRequestHead, body: [UInt8], peer: ApiaryTLS.PeerIdentity?, service: MonitorService,
                      limits: MonitorHTTPServer.Limits) -> MonitorService.Reply {
        guard let peer else { return .error(403, "forbidden", "the client certificate carries no apiary identity") }
        let parts = head.uri.split(separator: "?", maxSplits: 1)
        let path = parts.first.map(String.init) ?? "/"
        let query = parts.count > 1 ? String(parts[1]) : ""
        switch (head.method, path) {
        case (.POST, "/heartbeat"):
            // Refusals of other roles go through the core, so that they land in the history.
            return service.heartbeat(from: peer, body: body)
        case (.GET, "/status"), (.GET, "/events"):
            guard peer.role == .operator else {
                return .error(403, "forbidden", "\(path) needs an operator certificate; this one is for \(peer)")
            }
            if path == "/status" { return service.status() }
            var after: UInt64 = 0
            var limit = 100
            for pair in query.split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2 else { continue }
                if kv[0] == "after", let n = UInt64(kv[1]) { after = n }
                if kv[0] == "limit", let n = Int(kv[1]), n > 0 { limit = min(n, limits.eventsPerRequestMax) }
            }
            return service.events(after: after, limit: limit)
        case (.POST, _) where path.hasPrefix("/commands/"):
            guard peer.role == .operator else {
                return .error(403, "forbidden", "\(path) needs an operator certificate; this one is for \(peer)")
            }
            let command: CommandBody
            do { command = body.isEmpty ? CommandBody() : try JSONDecoder().decode(CommandBody.self, from: Data(body)) } catch {
                return .error(400, "bad_request", "the command is not the expected JSON: \(error)")
            }
            switch path.dropFirst("/commands/".count) {
            case "switchover": return service.command(.switchover, by: peer)
            case "failover": return service.command(.failover, by: peer)
            case "maintenance":
                guard let node = command.node, let enabled = command.enabled else {
                    return .error(400, "bad_request", "maintenance needs {\"node\": NAME, \"enabled\": true|false}")
                }
                return service.command(.maintenance(node, enabled: enabled), by: peer)
            case "promote":
                guard let node = command.node else { return .error(400, "bad_request", "promote needs {\"node\": NAME}") }
                return service.command(.promote(node, force: command.force ?? false, acceptDataLoss: command.acceptDataLoss ?? false), by: peer)
            default:
                return .error(404, "not_found", "no command \(path.dropFirst("/commands/".count)) (switchover, failover, maintenance, promote)")
            }
        case (_, "/heartbeat"), (_, "/status"), (_, "/events"):
            return .error(405, "method_not_allowed", "\(head.method) is not allowed on \(path)")
        case (_, _) where path.hasPrefix("/commands/"):
            return .error(405, "method_not_allowed", "\(head.method) is not allowed on \(path)")
        default:
            return .error(404, "not_found", "no \(path) on the monitor")
        }
    }

    private func respond(context: ChannelHandlerContext, head request: HTTPRequestHead, _ reply: MonitorService.Reply, close: Bool) {
        guard context.channel.isActive else { return }
        let keepAlive = request.isKeepAlive && !close
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: String(reply.body.count))
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        let head = HTTPResponseHead(version: request.version, status: HTTPResponseStatus(statusCode: reply.status), headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: reply.body)))), promise: nil)
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            done.whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("monitor connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}
