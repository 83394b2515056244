import ApiaryCore
import ApiaryNode
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import XCTest

/// Hostile input to a real gateway process (issue 10, "Bad input"): each gets a clear answer (or
/// a closed connection, never a hang), and the gateway stays unharmed: afterwards a fresh client
/// is served `GET /readyz` through it. The node's tests cover the same HTTPS server in-process
/// (`APIServerTests`); these show the gateway has it too, with its defaults.
final class GatewayBadInputTests: NodeProcessTestCase {
    /// Raw clients to close at teardown (before the cluster stops).
    private var rawClients: [GatewayRawClient] = []

    override func setUp() async throws {
        directory = NSTemporaryDirectory() + "apiary-gateway-bad-input-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               monitorArguments: ["--tick-interval-ms", "20"], gateways: 1)
        try cluster.startBoth()
    }

    override func tearDown() async throws {
        for client in rawClients { await client.close() }
        rawClients = []
        try await super.tearDown()
    }

    var gatewayPort: Int { cluster.gateways[0].apiPort }
    var caPath: String { cluster.certificates + "/ca.pem" }

    /// An application's connection to the gateway: the cluster CA trusted, no certificate.
    func connect() async throws -> HTTPSConnection {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(caPath)
        return try await HTTPSConnection.connect(host: "127.0.0.1", port: gatewayPort, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
    }

    /// A raw TLS connection to the gateway, handshake completed.
    private func connectRaw(alpn: [String] = [], receiveBufferBytes: Int? = nil) async throws -> GatewayRawClient {
        let client = try await GatewayRawClient.connect(port: gatewayPort, caPath: caPath, alpn: alpn, receiveBufferBytes: receiveBufferBytes)
        rawClients.append(client)
        return client
    }

    /// The gateway is unharmed: still running, and a new client gets 200 for `GET /readyz`.
    func assertAFreshClientIsServed(file: StaticString = #filePath, line: UInt = #line) async throws {
        XCTAssertTrue(cluster.isRunning(cluster.gateways[0]), "the gateway process ended", file: file, line: line)
        let client = try await connect()
        let ready = try await client.request(.GET, "/readyz", timeoutMs: 10_000)
        await client.close()
        XCTAssertEqual(ready.status, 200, "a fresh client through the gateway: \(ready.text)", file: file, line: line)
    }

    // MARK: Cases

    /// A body past the 8 MiB limit is read to its end and dropped, answered 413 `too_large`
    /// without reaching a node; the connection goes on.
    func testABodyPastTheLimitGets413() async throws {
        let client = try await connect()
        let body = [UInt8](repeating: UInt8(ascii: "x"), count: 9 << 20)
        let refused = try await client.request(.POST, "/db/execute", headers: [("Content-Type", "application/json")], body: body, timeoutMs: 60_000)
        XCTAssertEqual(refused.status, 413, refused.text)
        XCTAssertTrue(refused.text.contains("\"code\":\"too_large\""), refused.text)
        XCTAssertNil(refused.header("X-Apiary-Node"), "a body past the limit is not forwarded")
        XCTAssertNotNil(refused.header("X-Apiary-Gateway"), "the gateway's own answers say which gateway gave them")
        let next = try await client.request(.GET, "/readyz", timeoutMs: 10_000)
        XCTAssertEqual(next.status, 200, "the same connection goes on: \(next.text)")
        await client.close()
        try await assertAFreshClientIsServed()
    }

    func testAMalformedRequestLineGets400AndIsClosed() async throws {
        let client = try await connectRaw()
        try await client.send("GARBAGE\r\n\r\n")
        let closed = await client.wait { $0.closed }
        XCTAssertTrue(closed, "the gateway kept a connection open after malformed HTTP")
        let responses = client.seen.responses
        XCTAssertEqual(responses.map(\.status), [400], "\(responses.map(\.statusLine))")
        XCTAssertEqual(responses.first?.headers["connection"], "close")
        XCTAssertTrue(responses.first?.text.contains("\"code\":\"bad_request\"") ?? false, responses.first?.text ?? "")
        XCTAssertEqual(responses.first?.headers["x-apiary-gateway"], "gateway-1", "the server's own answers say which gateway gave them")
        XCTAssertEqual(responses.first?.headers["strict-transport-security"], "max-age=31536000")
        XCTAssertEqual(responses.first?.headers["x-rqlite-version"], ApiaryVersion.rqliteHeaderValue)
        try await assertAFreshClientIsServed()
    }

    func testHTTP10WithoutKeepAliveIsAnsweredInHTTP10AndClosed() async throws {
        let client = try await connectRaw()
        try await client.send("GET /readyz HTTP/1.0\r\n\r\n")
        let closed = await client.wait { $0.closed }
        XCTAssertTrue(closed, "the gateway kept an HTTP/1.0 connection without keep-alive open")
        let responses = client.seen.responses
        XCTAssertEqual(responses.count, 1, "\(responses.map(\.statusLine))")
        XCTAssertTrue(responses.first?.statusLine.hasPrefix("HTTP/1.0 200") ?? false, "\(responses.map(\.statusLine))")
        XCTAssertEqual(responses.first?.headers["connection"], "close")
        XCTAssertEqual(responses.first?.text, "[+]node ok\n[+]leader ok\n[+]store ok")
        try await assertAFreshClientIsServed()
    }

    /// An HTTP/2 client: no ALPN is offered, so one that asks for h2 is not given it (and falls
    /// back to HTTP/1.1); one that speaks HTTP/2 anyway (its connection preface, then an empty
    /// SETTINGS frame) gets a 4xx or a closed connection, never a hang.
    func testAnHTTP2ClientGetsAnAnswerOrAClosedConnection() async throws {
        let offering = try await connectRaw(alpn: ["h2", "http/1.1"])
        XCTAssertNotEqual(offering.seen.negotiatedProtocol, "h2")
        try await offering.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let fellBack = await offering.wait { !$0.responses.isEmpty || $0.closed }
        XCTAssertTrue(fellBack)
        XCTAssertEqual(offering.seen.responses.first?.status, 200, "an h2 client that fell back to HTTP/1.1")

        let h2 = try await connectRaw(alpn: ["h2"])
        XCTAssertNotEqual(h2.seen.negotiatedProtocol, "h2")
        let emptySettings: [UInt8] = [0, 0, 0, 0x04, 0, 0, 0, 0, 0]
        try await h2.send(Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8) + emptySettings)
        let ended = await h2.wait { $0.closed || !$0.responses.isEmpty }
        XCTAssertTrue(ended, "the gateway neither answered nor closed an HTTP/2 connection preface")
        let responses = h2.seen.responses
        if let first = responses.first {
            XCTAssertTrue((400..<500).contains(first.status), "\(first.statusLine): \(first.text)")
            XCTAssertTrue(first.statusLine.hasPrefix("HTTP/1.1 "), first.statusLine)
        }
        try await assertAFreshClientIsServed()
    }

    /// Slowloris: clients that send part of a request and then nothing do not stop another
    /// client from being served while they are open; they are held, not dropped (the read
    /// timeout, 30 s, is not waited for).
    func testAClientSendingAPartialRequestDoesNotStopAnother() async throws {
        let slowHead = try await connectRaw()
        try await slowHead.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        let slowBody = try await connectRaw()
        try await slowBody.send("POST /db/execute HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[")

        try await assertAFreshClientIsServed()
        for (name, slow) in [("head", slowHead), ("body", slowBody)] {
            XCTAssertFalse(slow.seen.closed, "the partial \(name) was closed")
            XCTAssertTrue(slow.seen.responses.isEmpty, "the partial \(name) was answered: \(slow.seen.responses.map(\.statusLine))")
        }
        // The partial request was being held: its end brings its answer.
        try await slowHead.send("1\r\n\r\n")
        let answered = await slowHead.wait { !$0.responses.isEmpty || $0.closed }
        XCTAssertTrue(answered)
        XCTAssertEqual(slowHead.seen.responses.map(\.status), [200])
    }

    /// A client that pipelines many requests for large answers (200 KB each, 12.8 MB in all,
    /// far more than the socket buffers hold) and does not read them: the gateway holds its
    /// answers instead of growing its memory, and another client is served meanwhile, large
    /// answers too. (The greedy client reads the first bytes it is sent, so that the test
    /// knows the gateway has begun answering it, then nothing.) When it reads at last, every
    /// answer is there, whole.
    func testAClientThatPipelinesLargeAnswersAndStopsReadingDoesNotStopAnother() async throws {
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.primary.apiPort)
        try await accounts.createTenant("app")
        let password = AccountsClient.randomPassword()
        try await accounts.createUser("app-reader", tenant: "app", role: "reader", password: password)
        let authorization = AccountsClient.basicAuthorization(user: "app-reader", password: password)
        let query = "/db/query?q=SELECT%20hex(zeroblob(100000))"
        let count = 64 // under the 128 requests one connection may have waiting

        let greedy = try await connectRaw(receiveBufferBytes: 32 << 10)
        try await greedy.stopReadingAfterTheFirstBytes()
        try await greedy.send(String(repeating: "GET \(query) HTTP/1.1\r\nHost: localhost\r\nAuthorization: \(authorization)\r\n\r\n", count: count))
        let begun = await greedy.wait { $0.bytesReceived > 0 }
        XCTAssertTrue(begun, "the gateway did not begin answering the greedy client")

        try await assertAFreshClientIsServed()
        let other = try await connect()
        let large = try await other.request(.GET, query, headers: [("Authorization", authorization)], timeoutMs: 10_000)
        await other.close()
        XCTAssertEqual(large.status, 200, large.text)
        XCTAssertGreaterThan(large.body.count, 200_000)
        XCTAssertFalse(greedy.seen.closed)
        XCTAssertLessThan(greedy.seen.bytesReceived, 1 << 20, "the greedy client was not held back")

        try await greedy.resumeReading()
        let all = await greedy.wait(seconds: 60) { $0.responses.count >= count || $0.closed }
        let responses = greedy.seen.responses
        XCTAssertTrue(all, "\(responses.count) of \(count) answers")
        XCTAssertEqual(responses.count, count)
        XCTAssertEqual(Set(responses.map(\.status)), [200])
        XCTAssertTrue(responses.allSatisfy { $0.body.count == large.body.count }, "\(Set(responses.map(\.body.count)))")
        XCTAssertFalse(greedy.seen.closed)
    }

    /// A request line past 1 MiB (a long query in the URL) gets 431 with the way out in the
    /// message, and the connection closes.
    func testARequestLinePastAMebibyteGets431() async throws {
        let client = try await connectRaw()
        // The gateway may close before it has read the last bytes: the write may fail then.
        try? await client.send("GET /db/query?q=" + String(repeating: "x", count: 1_100_000) + " HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let closed = await client.wait { $0.closed }
        XCTAssertTrue(closed, "the gateway kept the connection open")
        let responses = client.seen.responses
        XCTAssertEqual(responses.map(\.status), [431], "\(responses.map(\.statusLine))")
        XCTAssertTrue(responses.first?.text.contains("\"code\":\"too_large\"") ?? false, responses.first?.text ?? "")
        XCTAssertTrue(responses.first?.text.contains("POST body") ?? false, responses.first?.text ?? "")
        XCTAssertEqual(responses.first?.headers["x-apiary-gateway"], "gateway-1", "the server's own answers say which gateway gave them")
        try await assertAFreshClientIsServed()
    }
}

/// A TLS client that writes raw bytes (no HTTP library between the test and the wire) and parses
/// the answers as they arrive; a test waits for what it expects and is woken by the bytes or the
/// close that bring it (no polling). Cut down from `RawTLSConnection` (ApiaryNodeTests).
private final class GatewayRawClient: @unchecked Sendable {
    /// One HTTP/1.x answer with a Content-Length body.
    struct Response {
        var statusLine: String
        var status: Int
        /// Lower-cased names.
        var headers: [String: String]
        var body: [UInt8]
        var text: String { String(decoding: body, as: UTF8.self) }
    }

    /// What the client has seen so far.
    struct Seen {
        var handshakeCompleted = false
        var negotiatedProtocol: String?
        var responses: [Response] = []
        /// Bytes of answers read (decrypted).
        var bytesReceived = 0
        var closed = false
    }

    final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        private struct Waiter {
            let id: Int
            let condition: (Seen) -> Bool
            let continuation: CheckedContinuation<Bool, Never>
        }

        private let lock = NSLock()
        private var state = Seen()
        private var waiters: [Waiter] = []
        private var nextWaiter = 0
        /// Bytes not yet part of a complete answer; where the search for its head's end goes on.
        private var pending: [UInt8] = []
        private var scanned = 0
        /// Stop reading at the next bytes that arrive. Loop only.
        var pauseAtNextBytes = false

        var seen: Seen { lock.withLock { state } }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case TLSUserEvent.handshakeCompleted(let negotiated) = event {
                update { $0.handshakeCompleted = true; $0.negotiatedProtocol = negotiated }
            }
            context.fireUserInboundEventTriggered(event)
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            if pauseAtNextBytes {
                pauseAtNextBytes = false
                context.channel.setOption(ChannelOptions.autoRead, value: false).whenFailure { _ in context.close(promise: nil) }
            }
            update { seen in
                seen.bytesReceived += buffer.readableBytes
                pending += buffer.readableBytesView
                while let response = nextResponse() { seen.responses.append(response) }
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            update { $0.closed = true }
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }

        /// The next complete answer at the start of `pending`, removed from it. Under the lock.
        private func nextResponse() -> Response? {
            let separator = Array("\r\n\r\n".utf8)
            var end: Int?
            var i = max(0, scanned - 3)
            while i + 4 <= pending.count {
                if pending[i] == separator[0], pending[i + 1] == separator[1], pending[i + 2] == separator[2], pending[i + 3] == separator[3] {
                    end = i
                    break
                }
                i += 1
            }
            guard let end else {
                scanned = pending.count
                return nil
            }
            scanned = end // found again at once next time, until the body is complete
            var lines = String(decoding: pending[..<end], as: UTF8.self).components(separatedBy: "\r\n")
            let statusLine = lines.removeFirst()
            var headers: [String: String] = [:]
            for line in lines {
                guard let colon = line.firstIndex(of: ":") else { continue }
                headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
            let bodyStart = end + 4
            let length = Int(headers["content-length"] ?? "0") ?? 0
            guard pending.count - bodyStart >= length else { return nil }
            let parts = statusLine.split(separator: " ")
            let response = Response(statusLine: statusLine, status: parts.count > 1 ? Int(parts[1]) ?? 0 : 0, headers: headers,
                                    body: Array(pending[bodyStart..<(bodyStart + length)]))
            pending.removeFirst(bodyStart + length)
            scanned = 0
            return response
        }

        /// Changes what was seen and wakes the waiters whose condition now holds.
        private func update(_ change: (inout Seen) -> Void) {
            let woken: [Waiter] = lock.withLock {
                change(&state)
                let met = waiters.filter { $0.condition(state) }
                waiters.removeAll { waiter in met.contains { $0.id == waiter.id } }
                return met
            }
            for waiter in woken { waiter.continuation.resume(returning: true) }
        }

        /// Waits until `condition` holds of what was seen, at most `seconds`: whether it did.
        func wait(seconds: Int64, on loop: any EventLoop, until condition: @escaping (Seen) -> Bool) async -> Bool {
            await withCheckedContinuation { continuation in
                let id: Int? = lock.withLock {
                    if condition(state) { return nil }
                    nextWaiter += 1
                    waiters.append(Waiter(id: nextWaiter, condition: condition, continuation: continuation))
                    return nextWaiter
                }
                guard let id else { return continuation.resume(returning: true) }
                loop.scheduleTask(in: .seconds(seconds)) { [self] in
                    let expired: Waiter? = lock.withLock {
                        guard let i = waiters.firstIndex(where: { $0.id == id }) else { return nil }
                        return waiters.remove(at: i)
                    }
                    expired?.continuation.resume(returning: false)
                }
            }
        }
    }

    let channel: any Channel
    private let collector: Collector

    private init(channel: any Channel, collector: Collector) {
        self.channel = channel
        self.collector = collector
    }

    /// Connects to `127.0.0.1:port` trusting the CA at `caPath`, and waits for the handshake.
    /// - Parameter receiveBufferBytes: a small socket buffer, for a client that will not read.
    static func connect(port: Int, caPath: String, alpn: [String], receiveBufferBytes: Int?) async throws -> GatewayRawClient {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(caPath)
        tls.applicationProtocols = alpn
        tls.shutdownTimeout = .seconds(1) // a close need not wait long for the gateway's close_notify
        let context = try NIOSSLContext(configuration: tls)
        let collector = Collector()
        var bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connectTimeout(.seconds(5))
        if let receiveBufferBytes {
            bootstrap = bootstrap.channelOption(.socketOption(.so_rcvbuf), value: SocketOptionValue(receiveBufferBytes))
        }
        let channel = try await bootstrap
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: nil))
                    try channel.pipeline.syncOperations.addHandler(collector)
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        let client = GatewayRawClient(channel: channel, collector: collector)
        let ended = await client.wait { $0.handshakeCompleted || $0.closed }
        guard ended, client.seen.handshakeCompleted else {
            await client.close()
            throw NodeError("no TLS handshake with the gateway on port \(port)")
        }
        return client
    }

    var seen: Seen { collector.seen }

    /// Waits (at most `seconds`) until `condition` holds of what was seen.
    func wait(seconds: Int64 = 10, until condition: @escaping (Seen) -> Bool) async -> Bool {
        await collector.wait(seconds: seconds, on: channel.eventLoop, until: condition)
    }

    /// Sends `bytes` in one write; returns once the socket has taken them.
    func send(_ bytes: [UInt8]) async throws {
        let written = channel.eventLoop.makePromise(of: Void.self)
        channel.writeAndFlush(channel.allocator.buffer(bytes: bytes), promise: written)
        try await written.futureResult.get()
    }

    func send(_ text: String) async throws { try await send(Array(text.utf8)) }

    /// Reads the next bytes the gateway sends, then nothing more from the socket: what it sends
    /// after them stays in the buffers, and then in the gateway.
    func stopReadingAfterTheFirstBytes() async throws {
        try await channel.eventLoop.submit { [collector] in collector.pauseAtNextBytes = true }.get()
    }

    func resumeReading() async throws {
        try await channel.setOption(ChannelOptions.autoRead, value: true).get()
        channel.read()
    }

    func close() async {
        try? await channel.setOption(ChannelOptions.autoRead, value: true).get() // to read the gateway's close_notify
        try? await channel.close()
    }
}
