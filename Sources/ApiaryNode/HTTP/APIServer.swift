import ApiaryTLS
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// The node's HTTPS API: SwiftNIO's HTTP/1.1 server pipeline (keep-alive, pipelined requests
/// answered in order, 400 on malformed HTTP) in front of ``APIRoutes``.
///
/// Why not Hummingbird (CONVENTIONS): measured on the insert benchmark, its async request
/// path (an async sequence per connection, a streamed body, a response writer hopping back to
/// the loop) cost about as much CPU per request as SQLite, the capture and the replication
/// together, on a machine whose 2 cores also run the standby and the clients. Here a request
/// is read whole on its event loop, runs as one task, and its answer is written from the same
/// loop. See docs/benchmarks.md.
public final class APIServer: Sendable {
    public struct Limits: Sendable {
        /// Request bodies larger than this are refused unread (400).
        public var bodyBytesMax = 8 << 20
        public var statementsMax = 10_000
        /// Connections open at once; more are closed on accept (invariant 8).
        public var connectionsMax = 4096
        /// A connection that sends nothing for this long is closed (it holds a slot).
        public var idleTimeoutMs: Int64 = 120_000
        /// A request must arrive whole within this time once it has started (a client that
        /// trickles its headers or body must not hold a slot forever).
        public var requestReadTimeoutMs: Int64 = 30_000
        /// How long `close()` lets requests in flight finish.
        public var drainTimeoutMs: Int64 = 5_000
        public init() {}
    }

    let channel: any Channel
    /// The port it listens on (useful when asked for port 0).
    public let port: Int
    private let connections: OpenConnections
    private let drainTimeoutMs: Int64

    private init(channel: any Channel, connections: OpenConnections, drainTimeoutMs: Int64) {
        self.channel = channel
        self.connections = connections
        self.drainTimeoutMs = drainTimeoutMs
        port = channel.localAddress?.port ?? 0
    }

    /// Listens on `host:port`. Client certificates are optional (applications use none); when
    /// one is presented it must chain to the cluster CA, and its role unlocks `/status` and
    /// `/admin/promote`.
    public static func start(service: any SQLService, credentials: ClusterCredentials, host: String, port: Int,
                             group: any EventLoopGroup, logger: Logger, limits: Limits = Limits()) async throws -> APIServer {
        var tls = credentials.clientFacingServer()
        tls.certificateVerification = .optionalVerification
        tls.trustRoots = .certificates([credentials.clusterCA])
        let context = try NIOSSLContext(configuration: tls)
        let routes = APIRoutes(service: service, limits: .init(bodyBytesMax: limits.bodyBytesMax, statementsMax: limits.statementsMax), logger: logger)
        let connections = OpenConnections(max: limits.connectionsMax)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                guard connections.add(channel) else {
                    logger.warning("API connection refused: too many open", metadata: ["max": "\(limits.connectionsMax)"])
                    return channel.close()
                }
                return channel.eventLoop.makeCompletedFuture {
                    let deadline = RequestDeadline(timeoutMs: limits.requestReadTimeoutMs)
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: .milliseconds(limits.idleTimeoutMs)))
                    try channel.pipeline.syncOperations.addHandler(RequestStartWatcher(deadline))
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withPipeliningAssistance: true, withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(APIChannelHandler(routes: routes, logger: logger, deadline: deadline))
                }
            }
            .bind(host: host, port: port).get()
        return APIServer(channel: channel, connections: connections, drainTimeoutMs: limits.drainTimeoutMs)
    }

    /// Stops accepting, lets requests in flight finish (answered with `Connection: close`;
    /// idle connections close at once), and after the drain timeout closes what is left.
    public func close() async {
        try? await channel.close()
        let open = connections.closeAll()
        for c in open { c.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent()) }
        let deadline = NIODeadline.now() + .milliseconds(drainTimeoutMs)
        for c in open {
            let closed = c.eventLoop.makePromise(of: Void.self)
            c.closeFuture.cascade(to: closed)
            let timer = c.eventLoop.scheduleTask(deadline: deadline) { c.close(promise: nil) }
            try? await closed.futureResult.get()
            timer.cancel()
        }
    }
}

/// The open API connections, bounded.
final class OpenConnections: Sendable {
    private let open = LockedValue<(channels: [ObjectIdentifier: any Channel], closing: Bool)>(([:], false))
    let max: Int
    init(max: Int) { self.max = max }

    /// Registers a new connection (forgotten when it closes), or refuses it past `max` or
    /// once the server is closing (one accepted just as the listener closed).
    func add(_ channel: any Channel) -> Bool {
        let id = ObjectIdentifier(channel)
        let added = open.withLock { state -> Bool in
            guard !state.closing, state.channels.count < max else { return false }
            state.channels[id] = channel
            return true
        }
        if added { channel.closeFuture.whenComplete { _ in self.open.withLock { _ = $0.channels.removeValue(forKey: id) } } }
        return added
    }

    /// Refuses new connections from now on and returns the open ones.
    func closeAll() -> [any Channel] {
        open.withLock { state in
            state.closing = true
            return Array(state.channels.values)
        }
    }
}

/// One connection: collects each request (bounded), answers it through ``APIRoutes`` and
/// writes the response from this channel's event loop. NIO's pipelining handler hands it one
/// request at a time, so responses keep the requests' order.
final class APIChannelHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let routes: APIRoutes
    private let logger: Logger
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    private var bodyTooLarge = false
    /// A whole request is being answered (the idle timeout must not cut it off).
    private var busy = false
    private let deadline: RequestDeadline
    /// Runs this connection's request tasks on its loop (made once, not per request).
    private var executor: EventLoopTaskExecutor?

    func handlerAdded(context: ChannelHandlerContext) {
        executor = EventLoopTaskExecutor(context.eventLoop)
    }

    init(routes: APIRoutes, logger: Logger, deadline: RequestDeadline) {
        self.routes = routes
        self.logger = logger
        self.deadline = deadline
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            body = nil
            bodyTooLarge = false
            // Clients that ask first (curl for larger bodies) would otherwise wait ~1 s.
            if h.headers[canonicalForm: "expect"].contains(where: { $0.lowercased() == "100-continue" }),
               (h.headers.first(name: "content-length").flatMap(Int.init) ?? 0) <= routes.limits.bodyBytesMax {
                context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: .continue))), promise: nil)
            }
        case .body(var chunk):
            guard !bodyTooLarge else { return }
            if (body?.readableBytes ?? 0) + chunk.readableBytes > routes.limits.bodyBytesMax {
                // Dropped unread to the end (within the read timeout), then answered 400.
                bodyTooLarge = true
                body = nil
            } else if body == nil {
                body = chunk
            } else {
                body!.writeBuffer(&chunk)
            }
        case .end:
            deadline.stop()
            guard let head else { return }
            self.head = nil
            busy = true
            var request = APIRequest(method: head.method, uri: head.uri, headers: head.headers,
                                     body: body.map { Array($0.readableBytesView) } ?? [], bodyTooLarge: bodyTooLarge)
            body = nil
            if request.path == "/status" || request.path == "/admin/promote" {
                // Verified against the cluster CA during the handshake (optionalVerification).
                if let certificate = try? context.pipeline.syncOperations.nioSSL_peerCertificate() {
                    request.peer = ClusterCredentials.identity(of: certificate)
                }
            }
            let keepAlive = head.isKeepAlive
            let version = head.version
            let loop = context.eventLoop
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            let routes = self.routes
            // The task runs on this connection's loop, also after the storage thread resumes
            // it: the answer is then written without another thread hand-off.
            Task(executorPreference: executor ?? EventLoopTaskExecutor(loop)) {
                let response = await routes.respond(to: request)
                let write = {
                    let (handler, context) = bound.value
                    handler.write(response, version: version, keepAlive: keepAlive, context: context)
                }
                if loop.inEventLoop { write() } else { loop.execute(write) }
            }
        }
    }

    private func write(_ response: APIResponse, version: HTTPVersion, keepAlive: Bool, context: ChannelHandlerContext) {
        guard context.channel.isActive else { return }
        busy = false
        var headers = HTTPHeaders()
        headers.reserveCapacity(4)
        headers.add(name: "Content-Type", value: response.contentType)
        headers.add(name: "Content-Length", value: String(response.body.count))
        if response.outcomeUnknown { headers.add(name: "X-Apiary-Outcome", value: "unknown") }
        if let allow = response.allow { headers.add(name: "Allow", value: allow) }
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: response.status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: response.body)))), promise: nil)
        let written = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive { written.whenComplete { _ in context.close(promise: nil) } }
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline.stop()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            if !busy { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // TLS failures (a client with a bad certificate) and resets: the connection is done.
        logger.debug("API connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}

/// The time limit on reading one request: it starts with the request's first bytes (so a
/// client trickling its headers is caught too) and stops when the request is whole. Used by
/// two handlers of one channel, on its loop only.
final class RequestDeadline: @unchecked Sendable {
    private let timeoutMs: Int64
    private var scheduled: Scheduled<Void>?
    init(timeoutMs: Int64) { self.timeoutMs = timeoutMs }

    func startIfStopped(_ context: ChannelHandlerContext) {
        guard scheduled == nil else { return }
        let channel = context.channel
        scheduled = context.eventLoop.scheduleTask(in: .milliseconds(timeoutMs)) { channel.close(promise: nil) }
    }

    func stop() {
        scheduled?.cancel()
        scheduled = nil
    }
}

/// Sits before the HTTP decoder and starts the request deadline on the first bytes it sees.
final class RequestStartWatcher: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private let deadline: RequestDeadline
    init(_ deadline: RequestDeadline) { self.deadline = deadline }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        deadline.startIfStopped(context)
        context.fireChannelRead(data)
    }
}

/// Runs a task's jobs on one event loop (NIO's loops are not yet task executors themselves).
final class EventLoopTaskExecutor: TaskExecutor, @unchecked Sendable {
    let loop: any EventLoop
    init(_ loop: any EventLoop) { self.loop = loop }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}
