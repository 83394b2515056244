import ApiaryCore
import ApiaryGateway
import ApiaryTLS
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// The node's HTTPS API: TLS, SwiftNIO's HTTP/1.1 request decoder and one handler of ours
/// (keep-alive, pipelined requests answered in order, 400 on malformed HTTP, timeouts) in
/// front of ``APIRoutes``.
///
/// Why not Hummingbird (CONVENTIONS): measured on the insert benchmark, its async request
/// path (an async sequence per connection, a streamed body, a response writer hopping back to
/// the loop) cost about as much CPU per request as SQLite, the capture and the replication
/// together, on a machine whose 2 cores also run the standby and the clients. Here a request
/// is read whole on its event loop, runs as one task, and its answer is written from the same
/// loop as one buffer. NIO's own response encoder, pipelining and idle handlers are left out
/// for the same reason (each response crossed three more handlers as three parts, and every
/// request scheduled and cancelled timers): ``APIChannelHandler`` does their work in one place.
/// See docs/benchmarks.md.
public final class APIServer: Sendable {
    public struct Limits: Sendable {
        /// Request bodies larger than this are refused unread (400).
        public var bodyBytesMax = 8 << 20
        public var statementsMax = 10_000
        /// Connections open at once; more are answered 503 and closed (invariant 8).
        public var connectionsMax = 4096
        /// Open connections from one client address at most (the rest of `connectionsMax` stays
        /// for the others).
        public var connectionsPerAddressMax = 1024
        /// A connection that sends nothing for this long is closed (it holds a slot).
        public var idleTimeoutMs: Int64 = 120_000
        /// A request must arrive whole within this time once it has started (a client that
        /// trickles its headers or body must not hold a slot forever).
        public var requestReadTimeoutMs: Int64 = 30_000
        /// Whole requests one connection may have waiting behind the one being answered (each
        /// holds its headers and body). Past it the waiting ones are refused (503, not executed)
        /// and the connection closes after the answer in progress.
        public var pipelinedRequestsMax = 128
        /// How long `close()` lets requests in flight finish.
        public var drainTimeoutMs: Int64 = 5_000
        /// Memory the node's clients may make it hold at once: open connections, request
        /// bodies until answered, answers until the socket took them (``MemoryBudget``).
        public var memoryBudgetBytes = 1 << 30
        /// What one open connection is charged (TLS records, the decoder's buffer).
        public var connectionMemoryBytes = 64 << 10
        /// Requests per second per tenant at this node (SQL endpoints; 429 past it); nil: no limit.
        public var tenantRate: RateLimiter.Config?
        /// Connections past `connectionsMax` (or their address's share) being told so at once:
        /// each costs a handshake, so past this many they are closed at accept, unanswered.
        public var refusalsMax = 64
        /// How long a refused connection may take to send its first request.
        public var refusalTimeoutMs: Int64 = 10_000
        /// Whether the operator a gateway names in `X-Apiary-Operator` is believed
        /// (``APIRoutes/peer(connection:headers:)``). Off by default: it lets whoever holds a
        /// gateway's key, an internet-facing process's, act as any operator.
        public var operatorsViaGateways = false
        public init() {}
    }

    /// Bytes the HTTP decoder may hold undecoded: a request line and headers of up to
    /// ``headBytesMax`` (bodies stream through).
    static let decoderBufferBytesMax = 1 << 21
    /// The request line and headers of one request, at most: rqlite's (Go's) limit, so that a
    /// long query in a URL that rqlite takes is taken here too. Past it: 431. What a head holds
    /// past the connection's own charge counts against the memory budget (``RequestHeadCharge``).
    static let headBytesMax = 1 << 20
    static let decoderLimits: NIOHTTPDecoderLimitConfiguration = {
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderFieldSize = headBytesMax
        limits.maxHeaderListSize = headBytesMax
        return limits
    }()

    let channel: any Channel
    /// The port it listens on (useful when asked for port 0).
    public let port: Int
    private let connections: OpenConnections
    private let drainTimeoutMs: Int64
    /// How often a connection stopped answering because its client did not read what it was
    /// sent (backpressure at work; for tests and metrics).
    public var answersHeldForSlowReaders: Int { heldForSlowReaders.withLock { $0 } }
    private let heldForSlowReaders: LockedValue<Int>
    /// Connections open now, each counted until its close completes (for tests and metrics).
    public var openConnectionCount: Int { connections.count }
    /// Bytes of the memory budget in use now (for tests and metrics).
    public var memoryInUseBytes: Int { memory.usedBytes }
    private let memory: MemoryBudget

    private init(channel: any Channel, connections: OpenConnections, drainTimeoutMs: Int64, heldForSlowReaders: LockedValue<Int>,
                 memory: MemoryBudget) {
        self.channel = channel
        self.memory = memory
        self.connections = connections
        self.drainTimeoutMs = drainTimeoutMs
        self.heldForSlowReaders = heldForSlowReaders
        port = channel.localAddress?.port ?? 0
    }

    /// Listens on `host:port`. Client certificates are optional (applications use none); when
    /// one is presented it must chain to the cluster CA, and its role unlocks `/status` and
    /// `/admin/promote`.
    /// - Parameter accounts: who may do what (a node's accounts); nil only for tests of the
    ///   HTTP layer itself, where every request acts as an operator.
    /// - Parameter certificate: what applications see (the operator's choice); the node's
    ///   cluster certificate when nil. Client certificates are checked against the cluster CA
    ///   either way.
    /// - Parameter identity: the node's name and current epoch, sent with every answer
    ///   (`X-Apiary-Node`, `X-Apiary-Epoch`) so that clients and gateways see who served it.
    public static func start(service: any SQLService, accounts: (any AccountService)?, credentials: ClusterCredentials,
                             certificate: ServerCertificate? = nil, host: String, port: Int,
                             group: any EventLoopGroup, logger: Logger, limits: Limits = Limits(),
                             identity: (@Sendable () -> (node: String, epoch: UInt64))? = nil) async throws -> APIServer {
        let routes = APIRoutes(service: service, accounts: accounts, limits: .init(bodyBytesMax: limits.bodyBytesMax, statementsMax: limits.statementsMax, tenantRate: limits.tenantRate),
                               logger: logger)
        let responder: any HTTPResponder = identity.map { IdentifiedResponder(inner: routes, identity: $0) } ?? routes
        return try await start(responder: responder, credentials: credentials, certificate: certificate, host: host, port: port,
                               group: group, logger: logger, limits: limits,
                               answerHeaders: [(ApiaryVersion.rqliteHeader, ApiaryVersion.rqliteHeaderValue)])
    }

    /// The same server in front of any responder (the gateway's forwarding).
    /// - Parameter answerHeaders: added to every answer written, the server's own too (a 400
    ///   for malformed HTTP, a 431, a refused connection's 503): the gateway's name and HSTS.
    static func start(responder routes: any HTTPResponder, credentials: ClusterCredentials, certificate: ServerCertificate?,
                      host: String, port: Int, group: any EventLoopGroup, logger: Logger, limits: Limits,
                      answerHeaders: [(String, String)] = []) async throws -> APIServer {
        var tls = credentials.clientFacingServer(presenting: certificate)
        tls.certificateVerification = .optionalVerification
        tls.trustRoots = .certificates([credentials.clusterCA])
        let context = try NIOSSLContext(configuration: tls)
        let connections = OpenConnections(max: limits.connectionsMax, perAddressMax: limits.connectionsPerAddressMax)
        let heldForSlowReaders = LockedValue(0)
        let memory = MemoryBudget(bytesMax: limits.memoryBudgetBytes)
        let refusing = LockedValue(0)
        let refusal = RefusingHandler.answer(limits, answerHeaders: answerHeaders)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                guard memory.tryReserve(limits.connectionMemoryBytes) else {
                    logger.warning("API connection refused: the node's memory budget is spent", metadata: ["budget": "\(limits.memoryBudgetBytes)"])
                    return channel.close()
                }
                channel.closeFuture.whenComplete { _ in memory.release(limits.connectionMemoryBytes) }
                guard connections.add(channel) else {
                    logger.warning("API connection refused: too many open", metadata: [
                        "max": "\(limits.connectionsMax)", "perAddressMax": "\(limits.connectionsPerAddressMax)",
                        "client": "\(channel.remoteAddress?.ipAddress ?? "?")",
                    ])
                    let toldWhy = refusing.withLock { count -> Bool in
                        guard count < limits.refusalsMax else { return false }
                        count += 1
                        return true
                    }
                    guard toldWhy else { return channel.close() }
                    channel.closeFuture.whenComplete { _ in refusing.withLock { $0 -= 1 } }
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandlers([
                            NIOSSLServerHandler(context: context),
                            RefusingHandler(answer: refusal, timeout: .milliseconds(limits.refusalTimeoutMs)),
                        ])
                    }
                }
                return channel.eventLoop.makeCompletedFuture {
                    let timeouts = ConnectionTimeouts(idleMs: limits.idleTimeoutMs, requestReadMs: limits.requestReadTimeoutMs)
                    let headCharge = RequestHeadCharge(memory: memory, freeBytes: limits.connectionMemoryBytes)
                    let handlers: [any ChannelHandler] = [
                        NIOSSLServerHandler(context: context),
                        RequestStartWatcher(timeouts, headCharge: headCharge, logger: logger),
                        // Bounded: the decoder stops parsing after an Upgrade or CONNECT request and
                        // would otherwise keep every byte that follows.
                        ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, limitConfiguration: APIServer.decoderLimits),
                                             maximumBufferSize: APIServer.decoderBufferBytesMax),
                        APIChannelHandler(routes: routes, logger: logger, timeouts: timeouts, pipelinedMax: limits.pipelinedRequestsMax,
                                          heldForSlowReaders: heldForSlowReaders, memory: memory, headCharge: headCharge, answerHeaders: answerHeaders,
                                          operatorsViaGateways: limits.operatorsViaGateways),
                    ]
                    try channel.pipeline.syncOperations.addHandlers(handlers)
                }
            }
            .bind(host: host, port: port).get()
        return APIServer(channel: channel, connections: connections, drainTimeoutMs: limits.drainTimeoutMs, heldForSlowReaders: heldForSlowReaders,
                         memory: memory)
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
    private let open = LockedValue<(channels: [ObjectIdentifier: any Channel], perAddress: [String: Int], closing: Bool)>(([:], [:], false))
    let max: Int
    let perAddressMax: Int
    init(max: Int, perAddressMax: Int = .max) {
        self.max = max
        self.perAddressMax = perAddressMax
    }

    /// Registers a new connection (forgotten when it closes), or refuses it past `max`, past
    /// `perAddressMax` from its address, or once the server is closing (one accepted just as
    /// the listener closed).
    func add(_ channel: any Channel) -> Bool {
        let id = ObjectIdentifier(channel)
        let address = channel.remoteAddress?.ipAddress ?? ""
        let added = open.withLock { state -> Bool in
            guard !state.closing, state.channels.count < max, state.perAddress[address, default: 0] < perAddressMax else { return false }
            state.channels[id] = channel
            state.perAddress[address, default: 0] += 1
            return true
        }
        if added {
            channel.closeFuture.whenComplete { _ in
                self.open.withLock { state in
                    _ = state.channels.removeValue(forKey: id)
                    state.perAddress[address, default: 1] -= 1
                    if state.perAddress[address] == 0 { state.perAddress[address] = nil }
                }
            }
        }
        return added
    }

    var count: Int { open.withLock { $0.channels.count } }

    /// Refuses new connections from now on and returns the open ones.
    func closeAll() -> [any Channel] {
        open.withLock { state in
            state.closing = true
            return Array(state.channels.values)
        }
    }
}

/// One connection: collects each request (bounded), answers it through ``APIRoutes`` and
/// writes the response from this channel's event loop, as one buffer.
///
/// Requests are answered one at a time, in order (HTTP/1.1 pipelining): whole requests that
/// arrive meanwhile wait here, and reading stops until they are answered, so a client cannot
/// queue unbounded work. An answer is written only while the channel is writable: a client
/// that pipelines large results and does not read them stops being answered (and read) once
/// the socket's buffer and NIO's high-water mark are full, instead of growing the server's
/// memory by one result per request. Malformed HTTP is answered 400 in its turn, then the connection
/// closes; so does one asked to close (`Connection: close`, HTTP/1.0, Upgrade, CONNECT). Told
/// to quiesce (graceful shutdown), it finishes the answer in progress and tells each waiting
/// request it was not executed (503), so that its client knows a retry is safe.
final class APIChannelHandler: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Waiting {
        case request(APIRequest, Framing)
        case malformed(APIResponse)
    }

    /// How an answer is framed, from its request.
    struct Framing {
        var version: HTTPVersion
        var keepAlive: Bool
        /// HEAD: the headers of the answer (Content-Length included), not its body.
        var headersOnly: Bool
    }

    private let routes: any HTTPResponder
    /// Added to every answer (``APIServer/start(responder:credentials:certificate:host:port:group:logger:limits:answerHeaders:)``).
    private let answerHeaders: [(String, String)]
    private let logger: Logger
    private let timeouts: ConnectionTimeouts
    /// The request being read.
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    private var bodyTooLarge = false
    /// Its client waits for "100 Continue", not sent yet because an earlier answer was due.
    private var continueOwed = false
    /// A request is being answered.
    private var answering = false
    /// Whole requests (or malformed HTTP) read while another was answered.
    private var waiting = CircularBuffer<Waiting>()
    /// A read the channel asked for, held back while requests wait.
    private var readHeld = false
    /// No request is answered after the one in progress (graceful shutdown, the read deadline
    /// passed during an answer, too many pipelined): waiting ones are refused, then it closes.
    private var quiescing = false
    /// Why waiting requests are refused, for their clients.
    private var refusal = ""
    private let pipelinedMax: Int
    /// The last answer is written; whatever else arrives is ignored.
    private var closing = false
    /// The last answer is not yet taken by the client (the channel is not writable): nothing
    /// more is answered or read until it is.
    private var heldForWritability = false
    private let heldForSlowReaders: LockedValue<Int>
    private let memory: MemoryBudget
    /// Budget held by the body being read, and by the request being answered.
    private var readingReserved = 0
    private var answeringReserved = 0
    /// The node's budget had no room for the body being read: it is dropped, answered 503.
    private var memoryShort = false
    /// What the request being read holds of the budget for its head (a long URL).
    private let headCharge: RequestHeadCharge
    private var headReserved = 0
    /// The client's certificate identity (operators, monitors), read at the first request.
    private var peer: ApiaryTLS.PeerIdentity?
    private var peerRead = false
    /// ``APIServer/Limits/operatorsViaGateways``.
    private let operatorsViaGateways: Bool

    init(routes: any HTTPResponder, logger: Logger, timeouts: ConnectionTimeouts, pipelinedMax: Int, heldForSlowReaders: LockedValue<Int>,
         memory: MemoryBudget, headCharge: RequestHeadCharge, answerHeaders: [(String, String)] = [], operatorsViaGateways: Bool = false) {
        self.operatorsViaGateways = operatorsViaGateways
        self.answerHeaders = answerHeaders
        self.memory = memory
        self.headCharge = headCharge
        self.pipelinedMax = pipelinedMax
        self.heldForSlowReaders = heldForSlowReaders
        self.routes = routes
        self.logger = logger
        self.timeouts = timeouts
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timeouts.start(context.channel) { expired in
            let (handler, context) = bound.value
            handler.timedOut(expired, context: context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timeouts.stop()
        // Bodies read and never answered give their budget back.
        var held = readingReserved + answeringReserved + headReserved
        for case .request(let request, _) in waiting { held += request.reservedBytes }
        readingReserved = 0
        answeringReserved = 0
        headReserved = 0
        waiting.removeAll()
        if held > 0 { memory.release(held) }
    }

    /// Grows the reading body's reservation to `bytes`, or drops the body if the node's
    /// budget has no room (it is answered 503, not executed).
    private func reserveBody(_ bytes: Int) {
        guard bytes > readingReserved, !memoryShort else { return }
        if memory.tryReserve(bytes - readingReserved) {
            readingReserved = bytes
        } else {
            memoryShort = true
            body = nil
            memory.release(readingReserved)
            readingReserved = 0
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        switch unwrapInboundIn(data) {
        case .head(let h):
            if answering || heldForWritability { logger.trace("API request read while an earlier one is answered") }
            head = h
            body = nil
            bodyTooLarge = false
            memoryShort = false
            if headReserved > 0 { memory.release(headReserved) } // an abandoned request's head
            headReserved = headCharge.headDecoded()
            if let length = h.headers.first(name: "content-length").flatMap(Int.init), length > 0, length <= routes.bodyBytesMax {
                reserveBody(length) // before the body arrives: refused, it is never kept
            }
            // A request read with an earlier one starts its deadline now, not at its next bytes.
            timeouts.requestStarted()
            // Clients that ask first (curl for larger bodies) would otherwise wait ~1 s.
            continueOwed = h.headers[canonicalForm: "expect"].contains(where: { $0.lowercased() == "100-continue" })
                && (h.headers.first(name: "content-length").flatMap(Int.init) ?? 0) <= routes.bodyBytesMax
            sendContinueIfOwed(context)
        case .body(var chunk):
            headCharge.bodyDelivered(chunk.readableBytes)
            guard !bodyTooLarge, !memoryShort else { return }
            if (body?.readableBytes ?? 0) + chunk.readableBytes > routes.bodyBytesMax {
                // Dropped unread to the end (within the read timeout), then answered 413.
                bodyTooLarge = true
                body = nil
                memory.release(readingReserved)
                readingReserved = 0
                return
            }
            reserveBody((body?.readableBytes ?? 0) + chunk.readableBytes)
            if memoryShort {
                return
            } else if body == nil {
                body = chunk
            } else {
                body!.writeBuffer(&chunk)
            }
        case .end:
            timeouts.requestComplete()
            headCharge.requestEnded()
            guard let head else { return }
            self.head = nil
            continueOwed = false
            let request = APIRequest(method: head.method, uri: head.uri, headers: head.headers,
                                     body: body.map { Array($0.readableBytesView) } ?? [], bodyTooLarge: bodyTooLarge,
                                     memoryShort: memoryShort, reservedBytes: readingReserved + headReserved)
            body = nil
            readingReserved = 0 // the request holds it now
            headReserved = 0
            // After an Upgrade or CONNECT request NIO's decoder parses nothing more: answer and close.
            let upgrade = head.method == .CONNECT || head.headers.contains(name: "upgrade")
            let framing = Framing(version: head.version, keepAlive: head.isKeepAlive && !upgrade, headersOnly: head.method == .HEAD)
            enqueue(.request(request, framing), context: context)
        }
    }

    private func enqueue(_ next: Waiting, context: ChannelHandlerContext) {
        if answering || heldForWritability {
            if case .request(let dropped, _) = next, quiescing || waiting.count >= pipelinedMax {
                memory.release(dropped.reservedBytes) // never run, never answered
            }
            guard !quiescing else { return } // read before reading stopped; never run, never answered
            guard waiting.count < pipelinedMax else {
                stopAnswering(because: "too many pipelined requests on one connection (limit \(pipelinedMax))")
                return
            }
            waiting.append(next)
        } else {
            answer(next, context: context)
        }
    }

    private func answer(_ next: Waiting, context: ChannelHandlerContext) {
        guard case .request(var request, let framing) = next else {
            // Malformed HTTP: nothing after it can be trusted to be where it seems.
            guard case .malformed(let refusal) = next else { return }
            return write(refusal, Framing(version: .http1_1, keepAlive: false, headersOnly: false), context: context)
        }
        answering = true
        timeouts.answering = true
        answeringReserved = request.reservedBytes
        if !peerRead {
            // Verified against the cluster CA during the handshake (optionalVerification);
            // read once per connection.
            peerRead = true
            if let certificate = try? context.pipeline.syncOperations.nioSSL_peerCertificate() {
                peer = ClusterCredentials.identity(of: certificate)
            }
        }
        request.peer = operatorsViaGateways ? APIRoutes.peer(connection: peer, headers: request.headers) : peer
        request.clientAddress = context.channel.remoteAddress?.ipAddress
        request.eventLoop = context.eventLoop
        let loop = context.eventLoop
        let bound = NIOLoopBound((self, context), eventLoop: loop)
        routes.respond(to: request) { makeResponse in
            // Always a new loop task, also when the answer comes at once (a refused request):
            // answering the next waiting request from inside this one would recurse once per
            // request waiting, and re-enter whoever called back.
            loop.execute {
                let (handler, context) = bound.value
                handler.write(makeResponse(), framing, context: context)
            }
        }
    }

    private func write(_ response: APIResponse, _ framing: Framing, context: ChannelHandlerContext) {
        answering = false
        timeouts.answering = false
        memory.release(answeringReserved)
        answeringReserved = 0
        guard context.channel.isActive, !closing else { return }
        var last = !framing.keepAlive || (quiescing && waiting.isEmpty)
        var out = context.channel.allocator.buffer(capacity: 192 + response.body.count)
        Self.encode(response, framing, last: last, also: answerHeaders, into: &out)
        if quiescing && !last {
            // Each waiting request is told it was not executed, in its turn; the last answer closes.
            while let next = waiting.popFirst() {
                last = waiting.isEmpty
                switch next {
                case .request(let waitingRequest, let waitingFraming):
                    memory.release(waitingRequest.reservedBytes)
                    let refused = APIResponse(status: .serviceUnavailable, body: RqliteJSON.error("not executed: \(refusal); retry", code: .notExecuted))
                    Self.encode(refused, waitingFraming, last: last, also: answerHeaders, into: &out)
                case .malformed(let refusal):
                    Self.encode(refusal, Framing(version: .http1_1, keepAlive: false, headersOnly: false), last: true, also: answerHeaders, into: &out)
                    last = true
                    dropWaiting()
                }
            }
        }
        // The answer is counted until the socket has taken it (or the connection is gone).
        let outBytes = out.readableBytes
        memory.reserve(outBytes)
        let written = context.writeAndFlush(wrapOutboundOut(out))
        written.whenComplete { [memory] _ in memory.release(outBytes) }
        timeouts.responseWritten()
        if last {
            closing = true
            dropWaiting()
            timeouts.stop()
            written.whenComplete { _ in context.close(promise: nil) }
            return
        }
        guard context.channel.isWritable else {
            // The client has not taken what it was sent: answer nothing more until it does.
            heldForWritability = true
            heldForSlowReaders.withLock { $0 += 1 }
            return
        }
        answerNextOrRead(context)
    }

    /// Forgets the waiting requests (never to be answered), giving their budget back.
    private func dropWaiting() {
        var held = 0
        for case .request(let request, _) in waiting { held += request.reservedBytes }
        waiting.removeAll()
        if held > 0 { memory.release(held) }
    }

    /// After an answer: the next waiting request, or reading again.
    private func answerNextOrRead(_ context: ChannelHandlerContext) {
        if let next = waiting.popFirst() {
            answer(next, context: context)
        } else {
            sendContinueIfOwed(context)
            if readHeld {
                readHeld = false
                context.read()
            }
        }
    }

    /// The answer to bytes that are not HTTP/1.1 (the connection closes after it).
    static let malformed = APIResponse(status: .badRequest, body: RqliteJSON.error("malformed HTTP request", code: .badRequest))
    static let headersTooLarge = APIResponse(status: .requestHeaderFieldsTooLarge,
                                             body: RqliteJSON.error("the request line and headers are larger than 1 MiB: send a long query in a POST body (/db/query takes a JSON array of statements)", code: .tooLarge))

    /// Status line, headers (the response's, then `also`) and (unless HEAD) body; `last` adds
    /// `Connection: close`.
    static func encode(_ response: APIResponse, _ framing: Framing, last: Bool, also: [(String, String)] = [], into out: inout ByteBuffer) {
        if framing.version == .http1_1 && response.status == .ok && response.contentType == "application/json" {
            out.writeStaticString("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ")
        } else {
            out.writeString("HTTP/\(framing.version.major).\(framing.version.minor) \(response.status.code) \(response.status.reasonPhrase)\r\n")
            out.writeString("Content-Type: \(response.contentType)\r\nContent-Length: ")
        }
        out.writeString(String(response.body.count))
        out.writeStaticString("\r\n")
        if response.outcomeUnknown { out.writeStaticString("X-Apiary-Outcome: unknown\r\n") }
        if let allow = response.allow { out.writeString("Allow: \(allow)\r\n") }
        for (name, value) in response.headers { out.writeString("\(name): \(value)\r\n") }
        for (name, value) in also { out.writeString("\(name): \(value)\r\n") }
        if response.asksForCredentials { out.writeStaticString("WWW-Authenticate: Basic realm=\"apiary\", charset=\"UTF-8\"\r\n") }
        if last { out.writeStaticString("Connection: close\r\n") }
        out.writeStaticString("\r\n")
        if !framing.headersOnly { out.writeBytes(response.body) }
    }

    private func sendContinueIfOwed(_ context: ChannelHandlerContext) {
        guard continueOwed, !answering, waiting.isEmpty, let head else { return }
        continueOwed = false
        // The client sends its body only now: its read deadline starts now, not at its head.
        timeouts.requestRestarted()
        context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "HTTP/\(head.version.major).\(head.version.minor) 100 Continue\r\n\r\n")), promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if heldForWritability, context.channel.isWritable, !closing {
            heldForWritability = false
            timeouts.responseWritten() // the client is reading: not idle
            answerNextOrRead(context)
        }
        context.fireChannelWritabilityChanged()
    }

    /// Backpressure: while whole requests wait for their turn, or the client does not take
    /// its answers, read no more.
    func read(context: ChannelHandlerContext) {
        if answering && !waiting.isEmpty || heldForWritability || closing || quiescing {
            readHeld = true
        } else {
            context.read()
        }
    }

    /// Called while answering: that answer is the last; requests waiting are refused.
    private func stopAnswering(because reason: String) {
        guard !quiescing else { return }
        quiescing = true
        refusal = reason
        logger.debug("API connection closes after the answer in progress", metadata: ["reason": "\(reason)"])
    }

    private func timedOut(_ expired: ConnectionTimeouts.Expired, context: ChannelHandlerContext) {
        guard !closing else { return }
        if answering {
            // An answer in progress is not thrown away (a write's outcome would become unknown
            // to its client): nothing more is read, and the connection closes after it.
            stopAnswering(because: "the connection's \(expired)")
            head = nil
            if headReserved > 0 { memory.release(headReserved) }
            headReserved = 0
            return
        }
        logger.debug("API connection closed", metadata: ["reason": "\(expired)"])
        closing = true
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeouts.stop()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelShouldQuiesceEvent {
            // Graceful shutdown: an idle connection closes now, a busy one after its answer.
            if answering {
                stopAnswering(because: "the node is shutting down")
            } else {
                closing = true
                context.close(promise: nil)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let parserError = error as? HTTPParserError, !closing {
            head = nil
            timeouts.requestComplete()
            // Past the parser's limit on the request line and headers (1 MiB): rqlite answers
            // 431 here too; a long query belongs in a POST body.
            enqueue(.malformed(parserError == .headerOverflow ? Self.headersTooLarge : Self.malformed), context: context)
            return
        }
        // TLS failures (a client with a bad certificate), resets, an overlong undecoded request:
        // the connection is done.
        logger.debug("API connection error", metadata: ["error": "\(error)"])
        closing = true
        context.close(promise: nil)
    }
}

/// The time limits of one API connection: idle (no request for `idleMs`; not while one is
/// answered) and reading one request (it must arrive whole within `requestReadMs` of its first
/// bytes, so a client trickling headers or a body cannot hold a slot forever).
///
/// Requests only note timestamps; one scheduled check per connection fires at the earliest
/// deadline that may have passed, looks, and re-arms or reports the expiry. (A timer scheduled
/// and cancelled per request cost more than the request's routing.) Loop only.
final class ConnectionTimeouts: @unchecked Sendable {
    enum Expired: CustomStringConvertible {
        case idle, requestRead
        var description: String { self == .idle ? "idle timeout" : "request read timeout" }
    }

    private let idle: TimeAmount
    private let requestRead: TimeAmount
    /// When the unfinished request's first bytes arrived (nil between requests).
    private var requestStartedAt: NIODeadline?
    /// Bytes read or an answer written.
    private var lastActivity = NIODeadline.now()
    /// A request is being answered: not idle, however long that takes.
    var answering = false
    private var check: Scheduled<Void>?
    private var checkAt = NIODeadline.distantFuture
    private var loop: (any EventLoop)?
    private var onExpiry: ((Expired) -> Void)?

    init(idleMs: Int64, requestReadMs: Int64) {
        idle = .milliseconds(idleMs)
        requestRead = .milliseconds(requestReadMs)
    }

    func start(_ channel: any Channel, onExpiry: @escaping (Expired) -> Void) {
        loop = channel.eventLoop
        self.onExpiry = onExpiry
        arm(at: lastActivity + idle)
    }

    func bytesArrived() {
        lastActivity = .now()
        requestStarted()
    }

    /// A request began (its first bytes, or its head decoded behind an earlier request).
    func requestStarted() {
        guard requestStartedAt == nil else { return }
        requestRestarted()
    }

    /// The request's deadline counts from now (its client was just told to send its body).
    func requestRestarted() {
        let now = NIODeadline.now()
        requestStartedAt = now
        if checkAt > now + requestRead { arm(at: now + requestRead) }
    }

    func requestComplete() { requestStartedAt = nil }

    func responseWritten() { lastActivity = .now() }

    func stop() {
        check?.cancel()
        check = nil
        loop = nil
        onExpiry = nil
    }

    private func arm(at deadline: NIODeadline) {
        guard let loop else { return }
        check?.cancel()
        checkAt = deadline
        check = loop.scheduleTask(deadline: deadline) { [self] in expire() }
    }

    private func expire() {
        check = nil
        checkAt = .distantFuture
        guard let onExpiry else { return }
        let now = NIODeadline.now()
        if let started = requestStartedAt {
            if now >= started + requestRead {
                requestStartedAt = nil
                onExpiry(.requestRead)
                return arm(at: now + requestRead)
            }
            return arm(at: started + requestRead)
        }
        if answering { return arm(at: now + idle) }
        if now >= lastActivity + idle { return onExpiry(.idle) }
        arm(at: lastActivity + idle)
    }
}

/// A connection past the server's limits: its first request is answered 503 with
/// `Retry-After` (not executed: too many connections), unparsed, and the connection closes. A
/// client learns why and when to come back instead of seeing a reset. One that sends nothing
/// is closed after the timeout.
final class RefusingHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private let answer: ByteBuffer
    private let timeout: TimeAmount
    private var answered = false
    private var timer: Scheduled<Void>?

    init(answer: ByteBuffer, timeout: TimeAmount) {
        self.answer = answer
        self.timeout = timeout
    }

    static func answer(_ limits: APIServer.Limits, answerHeaders: [(String, String)] = []) -> ByteBuffer {
        var response = APIResponse(status: .serviceUnavailable, body: RqliteJSON.error(
            "not executed: too many connections open (at most \(limits.connectionsMax), \(limits.connectionsPerAddressMax) from one address); send it again after Retry-After",
            code: .notExecuted))
        response.headers.append(("Retry-After", "1"))
        var out = ByteBuffer()
        APIChannelHandler.encode(response, .init(version: .http1_1, keepAlive: false, headersOnly: false), last: true, also: answerHeaders, into: &out)
        return out
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: timeout) { bound.value.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) { timer?.cancel() }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !answered else { return }
        answered = true
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(answer)).whenComplete { _ in bound.value.close(promise: nil) }
    }
}

/// Sits before the HTTP decoder and notes a request's first bytes (the decoder says nothing
/// until the headers are whole), and charges a long head to the memory budget as it arrives.
final class RequestStartWatcher: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private let timeouts: ConnectionTimeouts
    private let headCharge: RequestHeadCharge
    private let logger: Logger
    private var closed = false

    init(_ timeouts: ConnectionTimeouts, headCharge: RequestHeadCharge, logger: Logger) {
        self.timeouts = timeouts
        self.headCharge = headCharge
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closed else { return }
        timeouts.bytesArrived()
        guard headCharge.arrived(unwrapInboundIn(data).readableBytes) else {
            // The decoder would hold what the budget has no room for: nothing of the request is
            // kept, and the client learns by the closed connection (as when accepting it).
            logger.warning("API connection closed: the node's memory budget has no room for its request's headers",
                           metadata: ["budget": "\(headCharge.memory.bytesMax)"])
            closed = true
            context.close(promise: nil)
            return
        }
        context.fireChannelRead(data)
    }

    func handlerRemoved(context: ChannelHandlerContext) { headCharge.release() }
}

/// What the HTTP decoder holds of one connection's bytes, charged to the node's memory budget:
/// a request's head (up to 1 MiB) while it arrives, and a chunked body's trailers (as long).
/// The connection's own charge covers `freeBytes`; past that, every byte is reserved (4,096
/// connections each holding 1 MiB would be 4 GiB). Bytes are counted as they arrive and
/// uncounted as the decoder passes them on as body (which is charged as a body). The decoded
/// head takes its reservation with it (``headDecoded()``), released when its request is
/// answered; trailers' go at the request's end. Loop only.
final class RequestHeadCharge: @unchecked Sendable {
    let memory: MemoryBudget
    private let freeBytes: Int
    /// Bytes arrived and not passed on as body since the last head (or request end).
    private var pending = 0
    private var reserved = 0

    init(memory: MemoryBudget, freeBytes: Int) {
        self.memory = memory
        self.freeBytes = freeBytes
    }

    /// `bytes` arrived; false if the budget had no room for them.
    func arrived(_ bytes: Int) -> Bool {
        pending += bytes
        let owed = max(0, pending - freeBytes) - reserved
        guard owed > 0 else { return true }
        guard memory.tryReserve(owed) else { return false }
        reserved += owed
        return true
    }

    /// The decoder passed `bytes` on as body: it holds them no longer.
    func bodyDelivered(_ bytes: Int) {
        pending = max(0, pending - bytes)
        let surplus = reserved - max(0, pending - freeBytes)
        if surplus > 0 {
            memory.release(surplus)
            reserved -= surplus
        }
    }

    /// The head is whole: what it holds of the budget, for its request to give back.
    func headDecoded() -> Int {
        defer { pending = 0; reserved = 0 }
        return reserved
    }

    /// The request is read whole (its trailers too, which are not kept): what arrives now is
    /// the next request's.
    func requestEnded() {
        if reserved > 0 { memory.release(reserved) }
        pending = 0
        reserved = 0
    }

    /// The connection is gone: a head not yet whole gives back what it held.
    func release() {
        if reserved > 0 { memory.release(reserved) }
        reserved = 0
    }
}
