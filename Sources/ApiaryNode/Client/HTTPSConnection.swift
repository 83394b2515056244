import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS

/// A minimal HTTPS/1.1 client connection with keep-alive, for `apiary ctl`, `apiary bench`
/// and tests. Requests on one connection go one at a time. Hand-written on NIOHTTP1 rather
/// than adding AsyncHTTPClient: three call sites do not justify its build cost on 2 cores.
public final class HTTPSConnection: @unchecked Sendable {
    public struct Response: Sendable {
        public var status: Int
        /// As the server sent them; looked up without regard to case.
        public var fields: HTTPHeaders
        public var body: [UInt8]
        public var headers: [(String, String)] { fields.map { ($0.name, $0.value) } }
        public func header(_ name: String) -> String? { fields.first(name: name) }
        public var text: String { String(decoding: body, as: UTF8.self) }
    }

    let channel: any Channel
    let host: String
    private let handler: ResponseCollector

    private init(channel: any Channel, host: String, handler: ResponseCollector) {
        self.channel = channel
        self.host = host
        self.handler = handler
    }

    /// Connects and completes the TLS handshake. `tls` decides trust and client certificates.
    /// - Parameter localAddress: the source address to connect from (tests use other loopback
    ///   addresses to be other clients).
    public static func connect(host: String, port: Int, tls: TLSConfiguration, group: any EventLoopGroup, timeoutMs: Int64 = 5000,
                               localAddress: String? = nil) async throws -> HTTPSConnection {
        try await connect(host: host, port: port, context: NIOSSLContext(configuration: tls), group: group, timeoutMs: timeoutMs,
                          localAddress: localAddress).get()
    }

    /// Connects on a loop of `group` (on that loop itself when `group` is one), with a TLS
    /// context made once by the caller: making one loads certificates and keys from disk.
    ///
    /// Completes once the TLS handshake has: a server that fails it (a certificate of another
    /// CA, an impostor) fails the connect, so that no request is ever counted as sent to it.
    /// (Before, the connection came back after TCP's connect; a request written then waited
    /// in the TLS handler and failed with the handshake, and the gateway took that for "sent,
    /// no answer": a false "outcome unknown" for a request no server ever saw.) `timeoutMs`
    /// bounds the handshake too.
    static func connect(host: String, port: Int, context: NIOSSLContext, group: any EventLoopGroup, timeoutMs: Int64,
                        localAddress: String? = nil) -> EventLoopFuture<HTTPSConnection> {
        let collector = ResponseCollector()
        var bootstrap = ClientBootstrap(group: group)
        if let localAddress {
            do { bootstrap = bootstrap.bind(to: try SocketAddress(ipAddress: localAddress, port: 0)) } catch {
                return group.next().makeFailedFuture(error)
            }
        }
        return bootstrap
            .connectTimeout(.milliseconds(timeoutMs))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sni = ClusterTransport.hostnameForSNI(host)
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: sni))
                    try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(promise: channel.eventLoop.makePromise()))
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(collector)
                }
            }
            .connect(host: host, port: port)
            .flatMap { channel in
                guard let waiter = try? channel.pipeline.syncOperations.handler(type: HandshakeWaiter.self) else {
                    // The waiter left: the handshake is done, or the connection is (its handlers gone).
                    return channel.isActive ? channel.eventLoop.makeSucceededFuture(channel) : channel.eventLoop.makeFailedFuture(HTTPSConnectionClosed())
                }
                let timeout = channel.eventLoop.scheduleTask(in: .milliseconds(timeoutMs)) {
                    waiter.end(.failure(HTTPSHandshakeTimedOut()))
                    channel.close(promise: nil)
                }
                return waiter.promise.futureResult.map { channel }.always { _ in timeout.cancel() }
                    .flatMapErrorWithEventLoop { error, loop in
                        channel.close(promise: nil)
                        return loop.makeFailedFuture(error)
                    }
            }
            .map { HTTPSConnection(channel: $0, host: host, handler: collector) }
    }

    /// - Parameter timeoutMs: give up after this long (the connection is closed: the request
    ///   fails as if the server had closed it); nil waits as long as the server takes.
    public func request(_ method: HTTPMethod, _ path: String, headers: [(String, String)] = [], body: [UInt8]? = nil,
                        timeoutMs: Int64? = nil) async throws -> Response {
        guard let timeoutMs else { return try await request(method, path, headers: headers, body: body) }
        let timer = channel.eventLoop.scheduleTask(in: .milliseconds(timeoutMs)) { [self] in abandon() }
        defer { timer.cancel() }
        return try await request(method, path, headers: headers, body: body)
    }

    public func request(_ method: HTTPMethod, _ path: String, headers: [(String, String)] = [], body: [UInt8]? = nil) async throws -> Response {
        var fields = HTTPHeaders()
        for (name, value) in headers { fields.add(name: name, value: value) }
        return try await send(method, path, fields: fields, body: body).get()
    }

    /// Sends one request; the future completes on the connection's loop. Called on that loop,
    /// it writes at once (the gateway's path: no hop, no task).
    func send(_ method: HTTPMethod, _ path: String, fields: HTTPHeaders, body: [UInt8]?) -> EventLoopFuture<Response> {
        var head = HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: fields)
        head.headers.add(name: "Host", value: host)
        if let body {
            head.headers.add(name: "Content-Length", value: String(body.count))
            if !fields.contains(name: "content-type") { head.headers.add(name: "Content-Type", value: "application/json") }
        }
        let promise = channel.eventLoop.makePromise(of: Response.self)
        let channel = self.channel, handler = self.handler
        let write = { [head] in
            // A closed connection has already failed its waiters; nothing would fail this one.
            // Nothing of this request was sent: a caller may send it elsewhere safely.
            guard channel.isActive else { return promise.fail(HTTPSRequestNotSent()) }
            handler.waiting.append(promise)
            channel.write(HTTPClientRequestPart.head(head), promise: nil)
            if let body { channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(bytes: body))), promise: nil) }
            channel.writeAndFlush(HTTPClientRequestPart.end(nil)).whenFailure { error in
                if let i = handler.waiting.firstIndex(where: { $0.futureResult === promise.futureResult }) {
                    handler.waiting.remove(at: i).fail(error)
                }
            }
        }
        if channel.eventLoop.inEventLoop { write() } else { channel.eventLoop.execute(write) }
        return promise.futureResult
    }

    /// Whether the connection is still up (the server may close it: shutdown, idle timeout).
    public var isOpen: Bool { channel.isActive }

    public func close() async {
        try? await channel.close()
    }

    /// Gives up the request under way now: it fails at once with ``HTTPSConnectionClosed``,
    /// and the connection is closed. (A plain close of a TLS connection waits for the peer's
    /// close_notify, up to seconds, before the request fails: a peer that is paused or cut off
    /// never sends it.)
    public func abandon() {
        let handler = self.handler, channel = self.channel
        channel.eventLoop.execute {
            handler.failAll(HTTPSConnectionClosed())
            channel.close(promise: nil)
        }
    }
}

/// Completes its promise when the TLS handshake completes (then leaves the pipeline), or fails
/// it with whatever ended the connection first. On the channel's event loop only.
final class HandshakeWaiter: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = NIOAny
    let promise: EventLoopPromise<Void>
    private var ended = false

    init(promise: EventLoopPromise<Void>) { self.promise = promise }

    func end(_ result: Result<Void, any Error>) {
        guard !ended else { return }
        ended = true
        promise.completeWith(result)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            end(.success(()))
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        end(.failure(error))
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        end(.failure(HTTPSConnectionClosed()))
        context.fireChannelInactive()
    }

    /// Also when the connection never came up (refused, timed out): the promise is kept.
    func handlerRemoved(context: ChannelHandlerContext) {
        end(.failure(HTTPSConnectionClosed()))
    }
}

/// The server did not complete the TLS handshake in time.
public struct HTTPSHandshakeTimedOut: Error, CustomStringConvertible {
    public var description: String { "the TLS handshake did not complete in time" }
}

/// Matches responses to requests in order; fails every waiting request when the connection dies.
final class ResponseCollector: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    var waiting: [EventLoopPromise<HTTPSConnection.Response>] = []
    private var current: HTTPSConnection.Response?
    /// Responses larger than this fail the request (bounded buffers, invariant 8).
    let bodyBytesMax = 64 << 20

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            current = .init(status: Int(head.status.code), fields: head.headers, body: [])
        case .body(var buffer):
            if (current?.body.count ?? 0) + buffer.readableBytes > bodyBytesMax {
                context.close(promise: nil)
                return
            }
            current?.body.append(contentsOf: buffer.readBytes(length: buffer.readableBytes) ?? [])
        case .end:
            if let response = current, !waiting.isEmpty { waiting.removeFirst().succeed(response) }
            current = nil
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll(HTTPSConnectionClosed())
        context.fireChannelInactive()
    }

    /// On the channel's event loop.
    func failAll(_ error: any Error) {
        let failed = waiting
        waiting.removeAll()
        for promise in failed { promise.fail(error) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        for promise in waiting { promise.fail(error) }
        waiting.removeAll()
        context.close(promise: nil)
    }
}

public struct HTTPSConnectionClosed: Error, CustomStringConvertible {
    public var description: String { "connection closed before the response arrived" }
}

/// The connection was closed before any byte of the request was written.
public struct HTTPSRequestNotSent: Error, CustomStringConvertible {
    public var description: String { "connection closed before the request was sent" }
}

extension HTTPSConnection.Response {
    /// The integer columns of the first result's rows in an rqlite answer (a query's), nil when
    /// the body is not such an answer or a statement failed. For tools and tests that count rows.
    public var integerRows: [[Int]]? {
        guard let json = try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any],
              let results = json["results"] as? [[String: Any]], !results.contains(where: { $0["error"] != nil }) else { return nil }
        return (results.first?["values"] as? [[Any]] ?? []).map { $0.compactMap { ($0 as? NSNumber)?.intValue } }
    }

    /// The machine-readable `code` of an error answer, if any.
    public var errorCode: String? {
        (try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any])?["code"] as? String
    }
}
