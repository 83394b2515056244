import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

/// The gateway's plain-HTTP port: every request is answered with a permanent redirect to the
/// same path over HTTPS (308: the method and body are kept), and the connection closed. Nothing
/// is ever served, read or forwarded in the clear. Bounded like the HTTPS side: a request head
/// of at most 16 KiB, read within 10 s, at most 256 connections at once.
final class RedirectServer: Sendable {
    let channel: any Channel
    var port: Int { channel.localAddress?.port ?? 0 }

    private init(channel: any Channel) { self.channel = channel }

    static func start(host: String, port: Int, httpsPort: Int, group: any EventLoopGroup, logger: Logger) async throws -> RedirectServer {
        let connections = OpenConnections(max: 256)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                guard connections.add(channel) else { return channel.close() }
                return channel.eventLoop.makeCompletedFuture {
                    let timeout = channel.eventLoop.scheduleTask(in: .seconds(10)) { channel.close(promise: nil) }
                    channel.closeFuture.whenComplete { _ in timeout.cancel() }
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes),
                                                                                         maximumBufferSize: 16 << 10))
                    try channel.pipeline.syncOperations.addHandler(HTTPResponseEncoder())
                    try channel.pipeline.syncOperations.addHandler(RedirectHandler(httpsPort: httpsPort, fallbackHost: host))
                }
            }
            .bind(host: host, port: port).get()
        return RedirectServer(channel: channel)
    }

    func close() async { try? await channel.close() }
}

private final class RedirectHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let httpsPort: Int
    let fallbackHost: String
    private var head: HTTPRequestHead?

    init(httpsPort: Int, fallbackHost: String) {
        self.httpsPort = httpsPort
        self.fallbackHost = fallbackHost
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break // never read: nothing is accepted in the clear
        case .end:
            guard let head else { return }
            self.head = nil
            var headers = HTTPHeaders()
            headers.add(name: "Location", value: "https://\(Self.host(of: head, fallback: fallbackHost)):\(httpsPort)\(Self.path(of: head.uri))")
            headers.add(name: "Content-Length", value: "0")
            headers.add(name: "Connection", value: "close")
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .permanentRedirect, headers: headers))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil) // malformed HTTP: nothing to redirect
    }

    /// The host the client asked for, without its port; only a plain host name or address (a
    /// header cannot turn the redirect into one to anywhere else).
    static func host(of head: HTTPRequestHead, fallback: String) -> String {
        guard let value = head.headers.first(name: "host") else { return fallback }
        let host = value.hasPrefix("[") ? String(value.prefix { $0 != "]" }) + "]" : String(value.split(separator: ":").first ?? "")
        let allowed = CharacterSet.alphanumerics.union(CharacterSet(charactersIn: ".-[]:"))
        guard !host.isEmpty, host.count <= 253, host.unicodeScalars.allSatisfy({ allowed.contains($0) }) else { return fallback }
        return host
    }

    /// The path and query of an origin-form target; "/" for anything else.
    static func path(of uri: String) -> String { uri.hasPrefix("/") && !uri.hasPrefix("//") ? uri : "/" }
}
