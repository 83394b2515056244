import ApiaryCore
import ApiaryGateway
import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import XCTest
@testable import ApiaryNode

/// The gateway's responder on requests it must not forward.
final class GatewayForwarderTests: XCTestCase {
    func forwarder() -> GatewayForwarder {
        var config = GatewayConfig()
        config.holdMs = 1 // no writer is known here: a request that is held ends at once
        return GatewayForwarder(name: "gateway-test", state: GatewayState(core: GatewayCore(config: config)), pools: [:], bodyBytesMax: 1 << 20,
                                limits: RequestLimits(perAddress: .init(perSecond: 1_000, burst: 1_000)), logger: Logger(label: "test"))
    }

    func answer(_ request: APIRequest) async -> APIResponse {
        await withCheckedContinuation { continuation in
            forwarder().respond(to: request) { make in continuation.resume(returning: make()) }
        }
    }

    /// The gateway's memory budget had no room for the body, so it was dropped unread: the
    /// request must be refused as not executed, not forwarded without its body (a POST
    /// /db/query would then run its `q=` instead, an execute fail falsely).
    func testABodyDroppedForWantOfMemoryIsRefusedNotForwardedWithoutIt() async {
        var request = APIRequest(method: .POST, uri: "/db/query?q=SELECT%201", headers: ["Authorization": "Basic YTpi"], body: [])
        request.memoryShort = true
        let response = await answer(request)
        XCTAssertEqual(response.status, .serviceUnavailable)
        let text = String(decoding: response.body, as: UTF8.self)
        XCTAssertTrue(text.contains("short of memory") && text.contains("not_executed"), text)
        XCTAssertTrue(response.headers.contains { $0.0 == "Retry-After" })
    }

    func testABodyOverTheLimitIs413() async {
        var request = APIRequest(method: .POST, uri: "/db/execute", headers: [:], body: [])
        request.bodyTooLarge = true
        let response = await answer(request)
        XCTAssertEqual(response.status, .payloadTooLarge)
    }
}

/// A node that answers garbage over a good mutual-TLS connection: the gateway treats the
/// attempt as sent and unanswered (never as an answer to pass on), tells the client what that
/// means for its request, and goes on serving.
final class GatewayGarbageNodeTests: XCTestCase {
    /// Writes `garbage` in answer to whatever arrives, and keeps the connection open.
    final class Garbage: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "\u{1}\u{2}NOT HTTP AT ALL\r\n\r\n")), promise: nil)
        }
    }

    /// A TLS server on loopback with `credentials`, each connection ending in `handler()`.
    static func tlsServer(credentials: ClusterCredentials, _ handler: @escaping @Sendable () -> any ChannelHandler) async throws -> any Channel {
        let serverTLS = try NIOSSLContext(configuration: credentials.clusterServer())
        return try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: serverTLS))
                    try channel.pipeline.syncOperations.addHandler(handler())
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    /// A gateway's forwarding whose topology names node-a, at `port`, the ready writer.
    static func forwarder(toNodeAt port: Int, holdMs: Int64, credentials: ClusterCredentials) throws -> GatewayForwarder {
        var config = GatewayConfig()
        config.holdMs = holdMs
        var core = GatewayCore(config: config)
        core.onTopology(GatewayTopology(version: 1, epoch: Epoch(1), writer: "node-a", writerReady: true))
        let pool = try NodePool(node: "node-a", host: "127.0.0.1", port: port, tls: credentials.clusterClient(), group: MultiThreadedEventLoopGroup.singleton)
        return GatewayForwarder(name: "gateway-test", state: GatewayState(core: core), pools: ["node-a": pool], bodyBytesMax: 1 << 20,
                                limits: RequestLimits(perAddress: .init(perSecond: 1_000, burst: 1_000)), logger: Logger(label: "test"))
    }

    static func answer(_ request: APIRequest, by forwarder: GatewayForwarder) async -> APIResponse {
        await withCheckedContinuation { continuation in forwarder.respond(to: request) { make in continuation.resume(returning: make()) } }
    }

    func testANodeAnsweringGarbageIsNoAnswerAndTheGatewayGoesOn() async throws {
        let directory = NSTemporaryDirectory() + "apiary-garbage-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let ca = try CertificateAuthority.create(in: directory)
        try ca.issue(PeerIdentity(role: .node, name: "node-a"), into: directory)
        try ca.issue(PeerIdentity(role: .gateway, name: "gateway"), into: directory)
        let server = try await Self.tlsServer(credentials: ClusterCredentials(directory: directory, name: "node-a")) { Garbage() }
        defer { server.close(promise: nil) }
        let forwarder = try Self.forwarder(toNodeAt: try XCTUnwrap(server.localAddress?.port), holdMs: 500,
                                           credentials: ClusterCredentials(directory: directory, name: "gateway"))
        func answer(_ request: APIRequest) async -> APIResponse { await Self.answer(request, by: forwarder) }

        // A write without a key reached the node and got no answer: its outcome is unknown.
        let write = await answer(APIRequest(method: .POST, uri: "/db/execute", headers: ["Authorization": "Basic YTpi"], body: Array(#"["INSERT INTO t VALUES (1)"]"#.utf8)))
        XCTAssertEqual(write.status, .internalServerError)
        XCTAssertTrue(write.outcomeUnknown)
        XCTAssertTrue(String(decoding: write.body, as: UTF8.self).contains("outcome_unknown"))
        XCTAssertFalse(String(decoding: write.body, as: UTF8.self).contains("NOT HTTP"), "the garbage is never passed on")
        // A read may be sent again; none answers within the hold: not executed, safe to retry.
        let read = await answer(APIRequest(method: .GET, uri: "/db/query?q=SELECT%201", headers: ["Authorization": "Basic YTpi"], body: []))
        XCTAssertEqual(read.status, .serviceUnavailable)
        XCTAssertFalse(read.outcomeUnknown)
        XCTAssertTrue(String(decoding: read.body, as: UTF8.self).contains("not_executed"))
    }

    /// Counts what reaches it after a handshake: a request the gateway should never send.
    final class Impostor: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let received = LockedValue(0)
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            received.withLock { $0 += unwrapInboundIn(data).readableBytes }
        }
    }

    /// A node's address answered by a server whose certificate is of another CA (an impostor,
    /// or a node of another cluster): the handshake fails, no byte of any request reaches it,
    /// and the client hears "not executed", never "outcome unknown" or the impostor's words.
    func testANodeWithACertificateOfAnotherCAIsNeverSentARequest() async throws {
        let directory = NSTemporaryDirectory() + "apiary-impostor-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let ca = try CertificateAuthority.create(in: directory + "/cluster")
        try ca.issue(PeerIdentity(role: .gateway, name: "gateway"), into: directory + "/cluster")
        let other = try CertificateAuthority.create(in: directory + "/other")
        try other.issue(PeerIdentity(role: .node, name: "node-a"), into: directory + "/other") // the right name, the wrong CA
        let impostor = Impostor()
        let server = try await Self.tlsServer(credentials: ClusterCredentials(directory: directory + "/other", name: "node-a")) { impostor }
        defer { server.close(promise: nil) }
        let forwarder = try Self.forwarder(toNodeAt: try XCTUnwrap(server.localAddress?.port), holdMs: 300,
                                           credentials: ClusterCredentials(directory: directory + "/cluster", name: "gateway"))
        let write = await Self.answer(APIRequest(method: .POST, uri: "/db/execute", headers: ["Authorization": "Basic YTpi"],
                                                 body: Array(#"["INSERT INTO t VALUES (1)"]"#.utf8)), by: forwarder)
        XCTAssertEqual(write.status, .serviceUnavailable, String(decoding: write.body, as: UTF8.self))
        XCTAssertFalse(write.outcomeUnknown, "never sent: nothing can have run")
        XCTAssertTrue(String(decoding: write.body, as: UTF8.self).contains("not_executed"))
        XCTAssertEqual(impostor.received.withLock { $0 }, 0, "no byte of the request (nor the credentials) reached the impostor")
        XCTAssertTrue(write.headers.contains { $0.0 == "Retry-After" && $0.1 == "1" }, "\(write.headers)")
    }

    /// A monitor impostor (another CA's certificate) at the monitor's address: the topology
    /// watch never completes a handshake with it, so nothing it could say is adopted and no
    /// request is ever written to it; the watch keeps trying.
    func testAMonitorWithACertificateOfAnotherCATeachesTheGatewayNothing() async throws {
        let directory = NSTemporaryDirectory() + "apiary-impostor-monitor-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let ca = try CertificateAuthority.create(in: directory + "/cluster")
        try ca.issue(PeerIdentity(role: .gateway, name: "gateway"), into: directory + "/cluster")
        let other = try CertificateAuthority.create(in: directory + "/other")
        try other.issue(PeerIdentity(role: .monitor, name: "monitor"), into: directory + "/other")
        let impostor = Impostor()
        let tries = expectation(description: "the watch connected twice: it tried, failed, and tried again")
        tries.expectedFulfillmentCount = 2
        tries.assertForOverFulfill = false
        let server = try await Self.tlsServer(credentials: ClusterCredentials(directory: directory + "/other", name: "monitor")) {
            tries.fulfill()
            return impostor
        }
        defer { server.close(promise: nil) }
        let state = GatewayState(core: GatewayCore(config: GatewayConfig()))
        let watch = TopologyWatch(host: "127.0.0.1", port: try XCTUnwrap(server.localAddress?.port),
                                  tls: try ClusterCredentials(directory: directory + "/cluster", name: "gateway").clusterClient(),
                                  group: MultiThreadedEventLoopGroup.singleton, state: state, logger: Logger(label: "test"))
        watch.start()
        defer { watch.stop() }
        await fulfillment(of: [tries], timeout: 60)
        XCTAssertEqual(state.with { $0.topology }, .unknown, "nothing adopted from a monitor the gateway cannot verify")
        XCTAssertEqual(impostor.received.withLock { $0 }, 0, "no request written to it")
    }
}
