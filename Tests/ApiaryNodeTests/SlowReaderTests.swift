import ApiaryCore
import ApiaryStorage
import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import XCTest
@testable import ApiaryNode

/// A client that pipelines queries with large results and never reads them must not grow the
/// server's memory: the server stops answering (and reading) once the client stops taking its
/// answers, and goes on when it reads again (invariant 8).
final class SlowReaderTests: XCTestCase {
    /// Every query answers one 1 MiB text value and counts itself.
    final class LargeResultService: SQLService, @unchecked Sendable {
        static let valueBytes = 1 << 20
        private let lock = NSLock()
        private var count = 0
        var queries: Int { lock.withLock { count } }

        func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] { [] }
        func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] {
            lock.withLock { count += 1 }
            var outcome = StatementOutcome()
            outcome.columns = ["v"]
            outcome.declaredTypes = ["text"]
            outcome.rows = [[.text(String(repeating: "x", count: Self.valueBytes))]]
            return [.success(outcome)]
        }
        func statusJSON() async -> [UInt8] { Array("{}".utf8) }
        func promote() async throws -> [UInt8] { [] }
    }

    func testAClientThatDoesNotReadStopsBeingAnsweredAndResumesWhenItReads() async throws {
        let dir = NSTemporaryDirectory() + "apiary-slow-reader-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try CertificateAuthority.create(in: dir)
        try ca.issue(ApiaryTLS.PeerIdentity(role: .node, name: "node-1"), into: dir)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        var logger = Logger(label: "apiary.test.slow-reader")
        logger.logLevel = .critical
        let service = LargeResultService()
        let server = try await APIServer.start(service: service, accounts: nil, credentials: try ClusterCredentials(directory: dir, name: "node-1"),
                                               host: "127.0.0.1", port: 0, group: group, logger: logger)
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(dir + "/ca.pem")
        let counter = ByteCounter(handshake: group.next().makePromise())
        let sslContext = try NIOSSLContext(configuration: tls)
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: sslContext, serverHostname: nil))
                    try channel.pipeline.syncOperations.addHandler(counter)
                }
            }
            .connect(host: "127.0.0.1", port: server.port).get()

        // Stop reading (once TLS is up): the kernel's buffers fill, then the server's.
        try await counter.handshake.futureResult.get()
        try await channel.setOption(.autoRead, value: false).get()
        let pipelined = 120 // × 1 MiB: far more than socket buffers hold
        let request = "GET /db/query?q=SELECT+v+FROM+t HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\n\r\n"
        try await channel.writeAndFlush(ByteBuffer(string: String(repeating: request, count: pipelined))).get()

        let held = await eventually(seconds: 30) { server.answersHeldForSlowReaders > 0 }
        XCTAssertTrue(held, "the server never held back an answer for a client that does not read")
        // Held: nothing more is answered until the client reads, so this count stays put.
        let answeredWhileHeld = service.queries
        XCTAssertLessThan(answeredWhileHeld, pipelined / 2,
                          "the server answered \(answeredWhileHeld) of \(pipelined) 1 MiB results to a client that read none")

        // Reading again resumes: every request is answered, each answer whole.
        try await channel.setOption(.autoRead, value: true).get()
        channel.read()
        let all = await eventually(seconds: 60) { service.queries == pipelined && counter.received >= pipelined * LargeResultService.valueBytes }
        XCTAssertTrue(all, "answered \(service.queries) of \(pipelined) after the client read again")
        let statuses = await eventually(seconds: 30) { counter.statuses.count == pipelined }
        XCTAssertTrue(statuses, "\(counter.statuses.count) whole answers of \(pipelined)")
        XCTAssertEqual(Set(counter.statuses), [200])

        try? await channel.close()
        await server.close()
        try await group.shutdownGracefully()
    }
}

/// Counts what arrives and parses it as a stream of HTTP/1.1 answers with Content-Length
/// bodies (without keeping the bodies: 120 MiB arrive).
final class ByteCounter: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    private let lock = NSLock()
    private var count = 0
    private var header: [UInt8] = []
    private var bodyRemaining = 0
    private var parsed: [Int] = []
    var received: Int { lock.withLock { count } }
    /// The status of each whole answer so far.
    var statuses: [Int] { lock.withLock { parsed } }
    let handshake: EventLoopPromise<Void>
    init(handshake: EventLoopPromise<Void>) { self.handshake = handshake }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event { handshake.succeed(()) }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshake.fail(ChannelError.ioOnClosedChannel) // no effect once succeeded
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        let bytes = buffer.readableBytesView
        lock.withLock {
            count += bytes.count
            var index = bytes.startIndex
            while index < bytes.endIndex {
                if bodyRemaining > 0 {
                    let take = min(bodyRemaining, bytes.endIndex - index)
                    bodyRemaining -= take
                    index += take
                    if bodyRemaining == 0, let status = pendingStatus {
                        parsed.append(status)
                        pendingStatus = nil
                    }
                    continue
                }
                header.append(bytes[index])
                index += 1
                guard header.count >= 4, header.suffix(4).elementsEqual([13, 10, 13, 10]) else { continue }
                let lines = String(decoding: header, as: UTF8.self).components(separatedBy: "\r\n")
                header.removeAll()
                let status = lines.first.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
                let length = lines.first { $0.lowercased().hasPrefix("content-length:") }
                    .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) } ?? 0
                if length == 0 { parsed.append(status) } else { bodyRemaining = length; pendingStatus = status }
            }
        }
    }
    private var pendingStatus: Int?
}
