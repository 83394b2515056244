import ApiaryCore
import ApiaryStorage
import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS
import XCTest
@testable import ApiaryNode

/// A TLS client that writes raw bytes and collects whatever comes back, for what
/// `HTTPSConnection` cannot send: pipelined requests, malformed HTTP, HTTP/1.0.
final class RawTLSConnection: @unchecked Sendable {
    final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        private let lock = NSLock()
        private var received: [UInt8] = []
        private var inactive = false
        private var handshake = false

        var bytes: [UInt8] { lock.withLock { received } }
        var isClosed: Bool { lock.withLock { inactive } }
        var handshakeCompleted: Bool { lock.withLock { handshake } }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case TLSUserEvent.handshakeCompleted = event { lock.withLock { handshake = true } }
            context.fireUserInboundEventTriggered(event)
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buffer = unwrapInboundIn(data)
            let bytes = buffer.readBytes(length: buffer.readableBytes) ?? []
            lock.withLock { received += bytes }
        }

        func channelInactive(context: ChannelHandlerContext) {
            lock.withLock { inactive = true }
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }

    let channel: any Channel
    let collector: Collector

    private init(channel: any Channel, collector: Collector) {
        self.channel = channel
        self.collector = collector
    }

    static func connect(port: Int, tls: TLSConfiguration, group: any EventLoopGroup) async throws -> RawTLSConnection {
        let context = try NIOSSLContext(configuration: tls)
        let collector = Collector()
        let channel = try await ClientBootstrap(group: group)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: nil))
                    try channel.pipeline.syncOperations.addHandler(collector)
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return RawTLSConnection(channel: channel, collector: collector)
    }

    /// Sends `text` in one write (so requests in it arrive back-to-back).
    func send(_ text: String) {
        channel.writeAndFlush(ByteBuffer(string: text), promise: nil)
    }

    var responses: [RawHTTPResponse] { RawHTTPResponse.parse(collector.bytes) }
    var isClosed: Bool { collector.isClosed }

    func close() async {
        try? await channel.close()
    }
}

/// One HTTP/1.x response with a Content-Length body, parsed from raw bytes.
struct RawHTTPResponse {
    var statusLine: String
    var status: Int
    /// Lower-cased names.
    var headers: [String: String]
    var body: String

    /// The complete responses at the start of `bytes`.
    static func parse(_ bytes: [UInt8]) -> [RawHTTPResponse] {
        var out: [RawHTTPResponse] = []
        var start = 0
        let separator: [UInt8] = Array("\r\n\r\n".utf8)
        while let end = firstIndex(of: separator, in: bytes, from: start) {
            var lines = String(decoding: bytes[start..<end], as: UTF8.self).components(separatedBy: "\r\n")
            let statusLine = lines.removeFirst()
            var headers: [String: String] = [:]
            for line in lines {
                guard let colon = line.firstIndex(of: ":") else { continue }
                headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
            let length = Int(headers["content-length"] ?? "0") ?? 0
            let bodyStart = end + separator.count
            guard bytes.count - bodyStart >= length else { break }
            let parts = statusLine.split(separator: " ")
            out.append(RawHTTPResponse(statusLine: statusLine, status: parts.count > 1 ? Int(parts[1]) ?? 0 : 0, headers: headers,
                                       body: String(decoding: bytes[bodyStart..<(bodyStart + length)], as: UTF8.self)))
            start = bodyStart + length
        }
        return out
    }

    private static func firstIndex(of needle: [UInt8], in bytes: [UInt8], from: Int) -> Int? {
        guard bytes.count >= needle.count, from <= bytes.count - needle.count else { return nil }
        for i in from...(bytes.count - needle.count) where bytes[i..<(i + needle.count)].elementsEqual(needle) { return i }
        return nil
    }
}

/// Polls `condition` every 10 ms for up to `seconds`.
func eventually(seconds: Double = 10, _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int64(seconds * 1000))
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}

struct TimedOut: Error, CustomStringConvertible {
    var seconds: Double
    var description: String { "no answer within \(seconds) s" }
}

/// Resumes a continuation once: the first of an answer and a timeout wins.
final class ResumeOnce<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var continuation: CheckedContinuation<T, any Error>?
    init(_ continuation: CheckedContinuation<T, any Error>) { self.continuation = continuation }
    func resume(_ result: Result<T, any Error>) {
        let continuation = lock.withLock { () -> CheckedContinuation<T, any Error>? in
            defer { self.continuation = nil }
            return self.continuation
        }
        continuation?.resume(with: result)
    }
}

/// Runs `body`, giving up after `seconds`. A future that never completes cannot be cancelled,
/// so a hung `body` is abandoned rather than awaited (a task group would wait for it forever).
func within<T: Sendable>(_ seconds: Double = 10, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    return try await withCheckedThrowingContinuation { continuation in
        let once = ResumeOnce<T>(continuation)
        let timer = Task {
            try? await Task.sleep(for: .milliseconds(Int64(seconds * 1000)))
            once.resume(.failure(TimedOut(seconds: seconds)))
        }
        Task {
            do { once.resume(.success(try await body())) } catch { once.resume(.failure(error)) }
            timer.cancel()
        }
    }
}

/// `APIServer` over real sockets and real TLS, with certificates from the project's own CA.
final class APIServerTests: XCTestCase {
    var dir: String!
    var group: MultiThreadedEventLoopGroup!
    var servers: [APIServer] = []
    var clients: [HTTPSConnection] = []
    var rawClients: [RawTLSConnection] = []
    var services: [RecordingSQLService] = []
    /// What the servers logged: the signals the tests wait for.
    var signals: LogSignals!
    /// Logged when a request is read while an earlier one is answered (it waits its turn).
    static let readBehind = "API request read while an earlier one is answered"

    let insert = Array(#"["INSERT INTO t VALUES(1)"]"#.utf8)

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "apiary-api-" + UUID().uuidString
        let ca = try CertificateAuthority.create(in: dir)
        try ca.issue(ApiaryTLS.PeerIdentity(role: .node, name: "node-1"), into: dir)
        try ca.issue(ApiaryTLS.PeerIdentity(role: .operator, name: "operator"), into: dir)
        try ca.issue(ApiaryTLS.PeerIdentity(role: .monitor, name: "monitor"), into: dir)
        group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        signals = LogSignals()
    }

    override func tearDown() async throws {
        for client in clients { await client.close() }
        for client in rawClients { await client.close() }
        // A test that failed may have left a slow call waiting: closing would wait out the drain.
        for service in services { service.slowGate.open() }
        for server in servers { await server.close() }
        clients = []
        rawClients = []
        servers = []
        services = []
        try await group.shutdownGracefully()
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// A raw `GET /db/query` request for tenant acme, to send (or pipeline) by hand.
    static func query(_ q: String) -> String {
        "GET /db/query?q=\(q) HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\n\r\n"
    }

    func startServer(_ service: RecordingSQLService, limits: APIServer.Limits = .init()) async throws -> APIServer {
        let logger = signals.logger(label: "apiary.test.api")
        services.append(service)
        let server = try await APIServer.start(service: service, accounts: nil, credentials: try ClusterCredentials(directory: dir, name: "node-1"),
                                               host: "127.0.0.1", port: 0, group: group, logger: logger, limits: limits)
        servers.append(server)
        XCTAssertNotEqual(server.port, 0)
        return server
    }

    /// What an application uses: the cluster CA trusted, no client certificate.
    func applicationTLS() -> TLSConfiguration {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(dir + "/ca.pem")
        return tls
    }

    /// A cluster member's client configuration (its certificate is presented).
    func memberTLS(_ name: String) throws -> TLSConfiguration {
        try ClusterCredentials(directory: dir, name: name).clusterClient()
    }

    func connect(_ server: APIServer, tls: TLSConfiguration? = nil) async throws -> HTTPSConnection {
        let client = try await HTTPSConnection.connect(host: "127.0.0.1", port: server.port, tls: tls ?? applicationTLS(), group: group)
        clients.append(client)
        return client
    }

    func connectRaw(_ server: APIServer, tls: TLSConfiguration? = nil) async throws -> RawTLSConnection {
        let client = try await RawTLSConnection.connect(port: server.port, tls: tls ?? applicationTLS(), group: group)
        rawClients.append(client)
        return client
    }

    func request(_ client: HTTPSConnection, _ method: HTTPMethod, _ path: String, tenant: String? = "acme",
                 headers: [(String, String)] = [], body: [UInt8]? = nil) async throws -> HTTPSConnection.Response {
        let headers = (tenant.map { [("X-Apiary-Tenant", $0)] } ?? []) + headers
        return try await within { try await client.request(method, path, headers: headers, body: body) }
    }

    func expectStatus(_ expected: Int, _ client: HTTPSConnection, _ method: HTTPMethod, _ path: String, tenant: String? = "acme",
                      body: [UInt8]? = nil, file: StaticString = #filePath, line: UInt = #line) async throws {
        let response = try await request(client, method, path, tenant: tenant, body: body)
        XCTAssertEqual(response.status, expected, "\(method) \(path): \(response.text)", file: file, line: line)
    }

    func json(_ body: [UInt8], file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        let object = try JSONSerialization.jsonObject(with: Data(body))
        return try XCTUnwrap(object as? [String: Any], "not a JSON object: \(String(decoding: body, as: UTF8.self))", file: file, line: line)
    }

    // MARK: Keep-alive

    func testSeveralRequestsOnOneKeepAliveConnection() async throws {
        let service = RecordingSQLService()
        let server = try await startServer(service)
        let client = try await connect(server)

        let executed = try await request(client, .POST, "/db/execute?transaction", body: insert)
        XCTAssertEqual(executed.status, 200, executed.text)
        XCTAssertEqual(executed.header("Content-Type"), "application/json")
        XCTAssertEqual(executed.header("Content-Length"), String(executed.body.count))
        XCTAssertNil(executed.header("Connection"))
        XCTAssertNil(executed.header("X-Apiary-Outcome"))
        let results = try XCTUnwrap(try json(executed.body)["results"] as? [[String: Any]])
        XCTAssertEqual(results.first?["rows_affected"] as? Int, 1)

        let queried = try await request(client, .GET, "/db/query?q=SELECT+x+FROM+t&level=strong")
        XCTAssertEqual(queried.status, 200, queried.text)
        let values = try XCTUnwrap(try json(queried.body)["results"] as? [[String: Any]]).first?["values"] as? [[String]]
        XCTAssertEqual(values, [["SELECT x FROM t"]])

        let viaPath = try await request(client, .POST, "/tenants/other/db/query", tenant: nil, body: Array(#"["SELECT 2"]"#.utf8))
        XCTAssertEqual(viaPath.status, 200, viaPath.text)

        let ready = try await request(client, .GET, "/readyz", tenant: nil)
        XCTAssertEqual(ready.status, 200)
        XCTAssertEqual(ready.text, "[+]node ok\n[+]leader ok\n[+]store ok")

        let missing = try await request(client, .GET, "/nope")
        XCTAssertEqual(missing.status, 404)
        XCTAssertNotNil(try json(missing.body)["error"] as? String)

        let wrongMethod = try await request(client, .GET, "/db/execute")
        XCTAssertEqual(wrongMethod.status, 405)

        let noTenant = try await request(client, .POST, "/db/execute", tenant: nil, body: insert)
        XCTAssertEqual(noTenant.status, 400)

        // Still the same connection, still open.
        XCTAssertTrue(client.channel.isActive)
        XCTAssertEqual(service.calls, [
            RecordingSQLService.Call(kind: .execute(transaction: true), tenant: "acme", statements: [SQLStatement("INSERT INTO t VALUES(1)")]),
            RecordingSQLService.Call(kind: .query(.strong), tenant: "acme", statements: [SQLStatement("SELECT x FROM t")]),
            RecordingSQLService.Call(kind: .query(.weak), tenant: "other", statements: [SQLStatement("SELECT 2")]),
        ])
    }

    func testErrorStatusesAndOutcomeHeaderOverTheWire() async throws {
        let unknown = try await startServer(RecordingSQLService(error: APIError(.outcomeUnknown, "standby lost mid-commit")))
        let client = try await connect(unknown)
        let response = try await request(client, .POST, "/db/execute", body: insert)
        XCTAssertEqual(response.status, 500)
        XCTAssertEqual(response.header("X-Apiary-Outcome"), "unknown")
        XCTAssertEqual(try json(response.body)["error"] as? String, "standby lost mid-commit")
        // An error answer does not end the connection.
        let again = try await request(client, .GET, "/readyz", tenant: nil)
        XCTAssertEqual(again.status, 200)

        let notExecuted = try await startServer(RecordingSQLService(error: APIError(.notExecuted, "not primary")))
        let other = try await connect(notExecuted)
        let refused = try await request(other, .POST, "/db/execute", body: insert)
        XCTAssertEqual(refused.status, 503)
        XCTAssertNil(refused.header("X-Apiary-Outcome"))
    }

    // MARK: Pipelining

    /// Three requests in one write: a slow read ("slow"), a write with a body, a fast read.
    func sendSlowReadWriteFastRead(_ client: RawTLSConnection) {
        let body = #"["INSERT INTO t VALUES(1)"]"#
        client.send(Self.query("slow")
            + "POST /db/execute HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
            + Self.query("fast"))
    }

    func testPipelinedRequestsAreAnsweredInOrder() async throws {
        let service = RecordingSQLService(slowSQL: "slow")
        let server = try await startServer(service)
        let client = try await connectRaw(server)
        sendSlowReadWriteFastRead(client)
        // The slow read is answered only once the other two were read behind it.
        let queued = await signals.wait(for: Self.readBehind, count: 2)
        XCTAssertTrue(queued, "the requests behind the slow one were not read while it was answered")
        service.slowGate.open()
        let answered = await eventually { client.responses.count >= 3 }
        XCTAssertTrue(answered, "responses: \(client.responses.map(\.statusLine))")
        let responses = client.responses
        XCTAssertEqual(responses.map(\.status), [200, 200, 200])
        guard responses.count == 3 else { return }
        XCTAssertTrue(responses[0].body.contains(#"[["slow"]]"#), responses[0].body)
        XCTAssertTrue(responses[1].body.contains(#""rows_affected":1"#), responses[1].body)
        XCTAssertTrue(responses[2].body.contains(#"[["fast"]]"#), responses[2].body)
        XCTAssertEqual(service.calls.map { $0.statements.first?.sql }, ["slow", "INSERT INTO t VALUES(1)", "fast"])
        XCTAssertFalse(client.isClosed)

        // The connection serves more requests afterwards; a last one asking to close is honoured.
        client.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\nGET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        let closed = await eventually { client.isClosed }
        XCTAssertTrue(closed, "the server kept the connection open after Connection: close")
        XCTAssertEqual(client.responses.map(\.status), [200, 200, 200, 200, 200])
        XCTAssertEqual(client.responses.last?.headers["connection"], "close")
    }

    // MARK: Connection lifecycle

    func testConnectionCloseIsHonoured() async throws {
        let server = try await startServer(RecordingSQLService())
        let client = try await connect(server)
        let first = try await request(client, .GET, "/readyz", tenant: nil)
        XCTAssertEqual(first.status, 200)
        XCTAssertNil(first.header("Connection"))
        let last = try await request(client, .GET, "/db/query?q=SELECT+1", headers: [("Connection", "close")])
        XCTAssertEqual(last.status, 200)
        XCTAssertEqual(last.header("Connection")?.lowercased(), "close")
        let closed = await eventually { !client.channel.isActive }
        XCTAssertTrue(closed, "the server kept the connection open after Connection: close")
    }

    func testHTTP10WithoutKeepAliveIsClosed() async throws {
        let server = try await startServer(RecordingSQLService())
        let client = try await connectRaw(server)
        client.send("GET /readyz HTTP/1.0\r\n\r\n")
        let closed = await eventually { client.isClosed }
        XCTAssertTrue(closed)
        let responses = client.responses
        XCTAssertEqual(responses.count, 1)
        XCTAssertTrue(responses.first?.statusLine.hasPrefix("HTTP/1.0 200") ?? false, "\(responses.map(\.statusLine))")
        XCTAssertEqual(responses.first?.headers["connection"], "close")
        XCTAssertEqual(responses.first?.body, "[+]node ok\n[+]leader ok\n[+]store ok")
    }

    /// A query in a URL of up to rqlite's limit (Go's 1 MiB of request line and headers) is
    /// taken, as rqlite takes it.
    func testAQueryInAURLOfNearlyAMebibyteIsAnswered() async throws {
        let service = RecordingSQLService()
        let server = try await startServer(service)
        let client = try await connectRaw(server)
        let sql = "SELECT '" + String(repeating: "x", count: 1_000_000) + "'"
        client.send("GET /db/query?q=" + sql.addingPercentEncoding(withAllowedCharacters: .alphanumerics)! + " HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\n\r\n")
        let answered = await eventually(seconds: 30) { client.responses.count == 1 }
        XCTAssertTrue(answered)
        XCTAssertEqual(client.responses.first?.status, 200, client.responses.first?.body ?? "")
        XCTAssertEqual(service.calls.map { $0.statements.first?.sql }, [sql])
    }

    /// A request line past 1 MiB (a long query in the URL) gets 431, as rqlite answers, with the
    /// way out in the message; the server is unharmed.
    func testAnOverlongRequestLineGets431() async throws {
        let service = RecordingSQLService()
        let server = try await startServer(service)
        let client = try await connectRaw(server)
        client.send("GET /db/query?q=" + String(repeating: "x", count: 1_100_000) + " HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\n\r\n")
        let closed = await eventually { client.isClosed }
        XCTAssertTrue(closed)
        XCTAssertEqual(client.responses.map(\.status), [431])
        XCTAssertTrue(client.responses.first?.body.contains("POST body") ?? false, client.responses.first?.body ?? "")
        let next = try await connectRaw(server)
        next.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let answered = await eventually { next.responses.count == 1 }
        XCTAssertTrue(answered)
        XCTAssertEqual(next.responses.first?.status, 200)
    }

    func testMalformedHTTPGets400AndIsClosed() async throws {
        let service = RecordingSQLService()
        let server = try await startServer(service)
        let client = try await connectRaw(server)
        client.send("GARBAGE\r\n\r\n")
        let closed = await eventually { client.isClosed }
        XCTAssertTrue(closed, "the server kept a connection open after malformed HTTP")
        XCTAssertEqual(client.responses.map(\.status), [400])
        XCTAssertEqual(client.responses.first?.headers["connection"], "close")

        // A good request pipelined before the garbage is still answered, first.
        let second = try await connectRaw(server)
        second.send("GET /db/query?q=before HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\n\r\nGARBAGE\r\n\r\n")
        let secondClosed = await eventually { second.isClosed }
        XCTAssertTrue(secondClosed)
        XCTAssertEqual(second.responses.map(\.status), [200, 400])
        XCTAssertTrue(second.responses.first?.body.contains("before") ?? false)
        XCTAssertEqual(service.calls.map { $0.statements.first?.sql }, ["before"])
    }

    func testOversizedBodyGets413AndTheConnectionGoesOn() async throws {
        let service = RecordingSQLService()
        var limits = APIServer.Limits()
        limits.bodyBytesMax = 64
        let server = try await startServer(service, limits: limits)
        let client = try await connect(server)

        let big = Array(("[" + Array(repeating: #""SELECT 1""#, count: 40).joined(separator: ",") + "]").utf8)
        XCTAssertGreaterThan(big.count, 64)
        let refused = try await request(client, .POST, "/db/execute", body: big)
        XCTAssertEqual(refused.status, 413)
        let message = try XCTUnwrap(try json(refused.body)["error"] as? String)
        XCTAssertTrue(message.contains("larger than 64 bytes"), message)
        XCTAssertTrue(service.calls.isEmpty)

        let small = try await request(client, .POST, "/db/execute", body: insert)
        XCTAssertEqual(small.status, 200, small.text)
        XCTAssertEqual(service.calls.count, 1)
        XCTAssertTrue(client.channel.isActive)

        // A chunked body over the limit is dropped too, and the next request still works.
        let raw = try await connectRaw(server)
        let chunk = String(repeating: "x", count: 50)
        raw.send("POST /db/execute HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\nTransfer-Encoding: chunked\r\n\r\n"
            + "32\r\n\(chunk)\r\n32\r\n\(chunk)\r\n0\r\n\r\n"
            + "GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let answered = await eventually { raw.responses.count >= 2 }
        XCTAssertTrue(answered, "\(raw.responses.map(\.statusLine))")
        XCTAssertEqual(raw.responses.map(\.status), [413, 200])
        XCTAssertFalse(raw.isClosed)
        XCTAssertEqual(service.calls.count, 1)
    }

    // MARK: Client certificates

    func testStatusAndPromoteByCertificateRole() async throws {
        let service = RecordingSQLService()
        let server = try await startServer(service)

        let application = try await connect(server)
        let anonymous = try await request(application, .GET, "/status", tenant: nil)
        XCTAssertEqual(anonymous.status, 403)
        XCTAssertTrue((try json(anonymous.body)["error"] as? String)?.contains("operator") ?? false)
        try await expectStatus(403, application, .POST, "/admin/promote", tenant: nil)
        // The application's connection is fine otherwise.
        try await expectStatus(200, application, .POST, "/db/execute", body: insert)

        let node = try await connect(server, tls: try memberTLS("node-1"))
        try await expectStatus(403, node, .GET, "/status", tenant: nil)
        try await expectStatus(403, node, .POST, "/admin/promote", tenant: nil)

        let monitor = try await connect(server, tls: try memberTLS("monitor"))
        try await expectStatus(200, monitor, .GET, "/status", tenant: nil)
        try await expectStatus(403, monitor, .POST, "/admin/promote", tenant: nil)
        XCTAssertEqual(service.promoteCount, 0)

        let operatorClient = try await connect(server, tls: try memberTLS("operator"))
        let status = try await request(operatorClient, .GET, "/status", tenant: nil)
        XCTAssertEqual(status.status, 200)
        XCTAssertEqual(try json(status.body)["role"] as? String, "primary")
        let promoted = try await request(operatorClient, .POST, "/admin/promote", tenant: nil)
        XCTAssertEqual(promoted.status, 200)
        XCTAssertEqual(try json(promoted.body)["promoted"] as? Bool, true)
        XCTAssertEqual(service.promoteCount, 1)
        // An operator's certificate is no tenant: SQL still needs one, and works with one.
        try await expectStatus(400, operatorClient, .GET, "/db/query?q=SELECT+1", tenant: nil)
        try await expectStatus(200, operatorClient, .GET, "/db/query?q=SELECT+1")
    }

    func testClientCertificateFromAnotherCAIsRefused() async throws {
        let server = try await startServer(RecordingSQLService())
        let otherDir = dir + "/other-ca"
        let other = try CertificateAuthority.create(in: otherDir, commonName: "Someone else's CA")
        try other.issue(ApiaryTLS.PeerIdentity(role: .operator, name: "operator"), into: otherDir)
        let impostor = try ClusterCredentials(directory: otherDir, name: "operator")
        // It trusts our CA (so it accepts the server) but presents a certificate ours never signed.
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(dir + "/ca.pem")
        tls.certificateChain = impostor.certificateChain.map { .certificate($0) }
        tls.privateKey = .privateKey(impostor.privateKey)

        for version in [TLSVersion.tlsv12, .tlsv13] {
            tls.minimumTLSVersion = version
            tls.maximumTLSVersion = version
            let client = try await connectRaw(server, tls: tls)
            client.send("GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
            let closed = await eventually { client.isClosed }
            XCTAssertTrue(closed, "\(version): the connection stayed open")
            XCTAssertTrue(client.responses.isEmpty, "\(version): \(client.responses.map(\.statusLine))")
        }
    }

    // MARK: Limits

    func testConnectionsBeyondMaxAreAnswered503AndClosed() async throws {
        var limits = APIServer.Limits()
        limits.connectionsMax = 2
        limits.refusalsMax = 1
        let service = RecordingSQLService()
        let server = try await startServer(service, limits: limits)
        let first = try await connect(server)
        let second = try await connect(server)
        try await expectStatus(200, first, .GET, "/readyz", tenant: nil)
        try await expectStatus(200, second, .GET, "/readyz", tenant: nil)

        // The third is told why, and when to come back; nothing it sent runs.
        let third = try await connectRaw(server)
        third.send("POST /db/execute HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\nContent-Length: 28\r\n\r\n[\"INSERT INTO t VALUES (1)\"]")
        let closed = await eventually { third.isClosed }
        XCTAssertTrue(closed, "a third connection was kept")
        XCTAssertEqual(third.responses.map(\.status), [503])
        XCTAssertEqual(third.responses.first?.headers["retry-after"], "1")
        XCTAssertTrue(third.responses.first?.body.contains("too many connections open") ?? false, third.responses.first?.body ?? "")
        XCTAssertTrue(third.responses.first?.body.contains("not_executed") ?? false, third.responses.first?.body ?? "")
        XCTAssertTrue(service.calls.isEmpty)

        // Telling costs a handshake: past `refusalsMax` being told at once, one is closed at accept.
        let silent = try await connectRaw(server) // its handshake completes; it sends no request: it holds the one refusal
        let handshaken = await eventually { silent.collector.handshakeCompleted }
        XCTAssertTrue(handshaken)
        let fifth = try await connectRaw(server)
        fifth.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let fifthClosed = await eventually { fifth.isClosed }
        XCTAssertTrue(fifthClosed)
        XCTAssertTrue(fifth.responses.isEmpty)
        XCTAssertFalse(fifth.collector.handshakeCompleted)
        await silent.close()
        // The two admitted connections are unaffected.
        try await expectStatus(200, first, .GET, "/readyz", tenant: nil)

        // Closing one frees its slot once the server has seen the close.
        await first.close()
        let freed = await eventually { server.openConnectionCount == 1 }
        XCTAssertTrue(freed, "the server still counts \(server.openConnectionCount) connections")
        let next = try await connectRaw(server)
        next.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        _ = await eventually { next.isClosed || !next.responses.isEmpty }
        XCTAssertEqual(next.responses.first?.status, 200, "the slot of a closed connection was not freed")
        try await expectStatus(200, second, .GET, "/readyz", tenant: nil)
    }

    // MARK: Found in review

    /// Shutdown must not leave keep-alive clients sending requests into a stopping node.
    func testCloseEndsOpenConnections() async throws {
        let server = try await startServer(RecordingSQLService())
        let client = try await connect(server)
        try await expectStatus(200, client, .GET, "/readyz", tenant: nil)
        await server.close()
        let response = try? await request(client, .GET, "/readyz", tenant: nil)
        XCTAssertNil(response, "a connection outlived the server's close")
    }

    /// Graceful shutdown mid-answer: the answer in progress is written, each request waiting
    /// behind it is told it was not executed (so a retry is safe), then the connection closes.
    func testQuiesceFinishesTheAnswerInProgressAndRefusesTheWaitingOnes() async throws {
        let service = RecordingSQLService(slowSQL: "slow")
        let server = try await startServer(service)
        let client = try await connectRaw(server)
        sendSlowReadWriteFastRead(client)
        let started = await service.slowGate.reached()
        let queued = await signals.wait(for: Self.readBehind, count: 2)
        XCTAssertTrue(started && queued, "the slow read was not answered with two requests waiting behind it")
        let closing = Task { await server.close() }
        // The slow answer is given only once the connection was told to quiesce.
        let told = await signals.wait(for: "the node is shutting down")
        XCTAssertTrue(told, "the connection answering was not told to quiesce")
        service.slowGate.open()
        let closed = await eventually { client.isClosed }
        await closing.value
        XCTAssertTrue(closed)
        let responses = client.responses
        XCTAssertEqual(responses.map(\.status), [200, 503, 503])
        guard responses.count == 3 else { return }
        XCTAssertTrue(responses[0].body.contains(#"[["slow"]]"#), responses[0].body)
        XCTAssertNil(responses[0].headers["connection"])
        XCTAssertTrue(responses[1].body.contains("not executed"), responses[1].body)
        XCTAssertEqual(responses[2].headers["connection"], "close")
        XCTAssertEqual(service.calls.map { $0.statements.first?.sql }, ["slow"], "nothing after the answer in progress ran")
    }

    /// HEAD gets the headers GET would (Content-Length included) and no body: a client on a
    /// keep-alive connection would otherwise read the body as the next response (found in review).
    func testHeadGetsHeadersWithoutABody() async throws {
        let server = try await startServer(RecordingSQLService())
        let client = try await connectRaw(server)
        client.send("HEAD /readyz HTTP/1.1\r\nHost: localhost\r\n\r\nGET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let answered = await eventually { String(decoding: client.collector.bytes, as: UTF8.self).hasSuffix("store ok") }
        XCTAssertTrue(answered, String(decoding: client.collector.bytes, as: UTF8.self))
        let text = String(decoding: client.collector.bytes, as: UTF8.self)
        let blocks = text.components(separatedBy: "\r\n\r\n")
        XCTAssertEqual(blocks.count, 3, text)
        XCTAssertTrue(blocks[0].hasPrefix("HTTP/1.1 200"), text)
        XCTAssertTrue(blocks[0].lowercased().contains("content-length: 35"), text)
        XCTAssertTrue(blocks[1].hasPrefix("HTTP/1.1 200"), "the HEAD answer carried a body: \(text)")
        XCTAssertEqual(blocks[2], "[+]node ok\n[+]leader ok\n[+]store ok")
        XCTAssertFalse(client.isClosed)
    }

    /// Thousands of pipelined requests refused at once (no tenant) behind a slow one: all
    /// answered, in order, with reading held back meanwhile (found in review: answers given at
    /// once recursed once per waiting request).
    func testManyPipelinedRefusalsBehindASlowAnswerAreAnsweredInOrder() async throws {
        let service = RecordingSQLService(slowSQL: "slow")
        let count = 3000
        var limits = APIServer.Limits()
        limits.pipelinedRequestsMax = count
        let server = try await startServer(service, limits: limits)
        let client = try await connectRaw(server)
        client.send(Self.query("slow")
            + String(repeating: "POST /db/execute HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n[]", count: count))
        // The refusals wait behind the slow answer: it is given only once they are being read.
        let behind = await signals.wait(for: Self.readBehind)
        XCTAssertTrue(behind, "no request was read behind the slow one")
        service.slowGate.open()
        let answered = await eventually(seconds: 30) { client.responses.count >= count + 1 }
        let responses = client.responses
        XCTAssertTrue(answered, "\(responses.count) answers")
        XCTAssertEqual(responses.first?.status, 200)
        XCTAssertEqual(Set(responses.dropFirst().map(\.status)), [400])
        XCTAssertTrue(responses.last?.body.contains("no tenant") ?? false)
        XCTAssertFalse(client.isClosed)
        client.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let more = await eventually { client.responses.count == count + 2 }
        XCTAssertTrue(more, "the connection stopped reading")
    }

    /// Requests waiting behind a slow answer are bounded per connection: past the limit the
    /// waiting ones are refused (503, not executed), the rest are dropped unread, and the
    /// connection closes after the answer in progress.
    func testPipelinedRequestsPastTheLimitAreRefused() async throws {
        let service = RecordingSQLService(slowSQL: "slow")
        var limits = APIServer.Limits()
        limits.pipelinedRequestsMax = 4
        let server = try await startServer(service, limits: limits)
        let client = try await connectRaw(server)
        client.send(Self.query("slow")
            + String(repeating: Self.query("next"), count: 10))
        // The slow answer is given only once the connection has seen too many behind it.
        let limited = await signals.wait(for: "too many pipelined requests")
        XCTAssertTrue(limited, "the pipelining limit was not reached while the slow read was answered")
        service.slowGate.open()
        let closed = await eventually(seconds: 5) { client.isClosed }
        XCTAssertTrue(closed, "the connection stayed open past the pipelining limit")
        let responses = client.responses
        XCTAssertEqual(responses.map(\.status), [200, 503, 503, 503, 503])
        XCTAssertTrue(responses.last?.body.contains("too many pipelined requests") ?? false, responses.last?.body ?? "")
        XCTAssertEqual(responses.last?.headers["connection"], "close")
        XCTAssertEqual(service.calls.map { $0.statements.first?.sql }, ["slow"], "a refused request ran")
    }

    /// "100 Continue" for a request waiting behind a slow answer comes after that answer, not
    /// in the middle of the byte stream of responses.
    func testContinueForAWaitingRequestFollowsTheAnswerBeforeIt() async throws {
        let service = RecordingSQLService(slowSQL: "slow")
        let server = try await startServer(service)
        let raw = try await connectRaw(server)
        raw.send(Self.query("slow")
            + "POST /db/execute HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n")
        // The slow answer is given only once the request asking to continue was read behind it.
        let behind = await signals.wait(for: Self.readBehind)
        XCTAssertTrue(behind, "the request asking to continue was not read while the slow one was answered")
        service.slowGate.open()
        let continued = await eventually(seconds: 5) { String(decoding: raw.collector.bytes, as: UTF8.self).contains("100 Continue") }
        XCTAssertTrue(continued)
        let text = String(decoding: raw.collector.bytes, as: UTF8.self)
        XCTAssertTrue(text.hasPrefix("HTTP/1.1 200"), text)
        XCTAssertTrue(text.hasSuffix("HTTP/1.1 100 Continue\r\n\r\n"), text)
        raw.send(#"["SELECT 1"]"#)
        let answered = await eventually(seconds: 5) { String(decoding: raw.collector.bytes, as: UTF8.self).components(separatedBy: "HTTP/1.1 200").count == 3 }
        XCTAssertTrue(answered, String(decoding: raw.collector.bytes, as: UTF8.self))
    }

    /// NIO's decoder parses nothing after an Upgrade request: it is answered, then the
    /// connection closes (rather than buffering whatever follows).
    func testAnUpgradeRequestIsAnsweredAndTheConnectionCloses() async throws {
        let server = try await startServer(RecordingSQLService())
        let raw = try await connectRaw(server)
        raw.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            + "GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let closed = await eventually(seconds: 5) { raw.isClosed }
        XCTAssertTrue(closed)
        XCTAssertEqual(raw.responses.map(\.status), [200])
        XCTAssertEqual(raw.responses.first?.headers["connection"], "close")
    }

    /// A request's read deadline that passes while an earlier request is answered does not
    /// throw that answer away (a write's outcome would become unknown): it is written, then the
    /// connection closes (found in review).
    func testTheReadDeadlineDoesNotCutAnAnswerInProgress() async throws {
        let service = RecordingSQLService(slowSQL: "slow")
        var limits = APIServer.Limits()
        limits.requestReadTimeoutMs = 300
        let server = try await startServer(service, limits: limits)
        let raw = try await connectRaw(server)
        raw.send(Self.query("slow")
            + "POST /db/execute HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\nContent-Length: 100\r\n\r\n[")
        // The slow answer is given only once the half-sent request's read deadline has passed.
        let expired = await signals.wait(for: "the connection's request read timeout")
        XCTAssertTrue(expired, "the read deadline did not pass while the slow read was answered")
        service.slowGate.open()
        let closed = await eventually(seconds: 5) { raw.isClosed }
        XCTAssertTrue(closed, "the half-sent request kept its connection")
        XCTAssertEqual(raw.responses.map(\.status), [200], "the answer in progress was lost")
        XCTAssertEqual(raw.responses.first?.headers["connection"], "close")
    }

    /// The client must fail, not hang, when asked to use a connection that is gone.
    func testRequestOnAClosedConnectionFails() async throws {
        let server = try await startServer(RecordingSQLService())
        let client = try await connect(server)
        _ = try await request(client, .GET, "/readyz", tenant: nil, headers: [("Connection", "close")])
        _ = await eventually { !client.channel.isActive }
        do {
            _ = try await within(3) { try await client.request(.GET, "/readyz") }
            XCTFail("a closed connection answered")
        } catch {
            XCTAssertFalse(error is TimedOut, "hung instead of failing: \(error)")
        }
    }

    func testExpectContinueIsAnswered() async throws {
        let server = try await startServer(RecordingSQLService())
        let raw = try await connectRaw(server)
        raw.send("POST /db/execute HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n")
        let got = await eventually(seconds: 2) { String(decoding: raw.collector.bytes, as: UTF8.self).hasPrefix("HTTP/1.1 100") }
        XCTAssertTrue(got, "no 100 Continue")
        raw.send(#"["SELECT 1"]"#)
        let answered = await eventually(seconds: 5) { String(decoding: raw.collector.bytes, as: UTF8.self).contains("HTTP/1.1 200") }
        XCTAssertTrue(answered, String(decoding: raw.collector.bytes, as: UTF8.self))
    }

    func testAnIdleConnectionIsClosed() async throws {
        var limits = APIServer.Limits()
        limits.idleTimeoutMs = 300
        let server = try await startServer(RecordingSQLService(), limits: limits)
        let client = try await connect(server)
        try await expectStatus(200, client, .GET, "/readyz", tenant: nil)
        let closed = await eventually(seconds: 5) { !client.channel.isActive }
        XCTAssertTrue(closed, "an idle connection kept its slot")
    }

    /// A client that starts a request and then trickles (or stops) must not hold its slot
    /// forever: the request has to arrive whole within the read timeout (found in review).
    func testARequestThatNeverCompletesLosesItsConnection() async throws {
        var limits = APIServer.Limits()
        limits.requestReadTimeoutMs = 300
        let server = try await startServer(RecordingSQLService(), limits: limits)
        let raw = try await connectRaw(server)
        raw.send("POST /db/execute HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\nContent-Length: 100\r\n\r\n[\"SEL")
        let closed = await eventually(seconds: 5) { raw.isClosed }
        XCTAssertTrue(closed, "a half-sent request kept its connection")
    }

    /// Headers trickled a byte at a time count against the read deadline too (found in review).
    func testTrickledHeadersLoseTheirConnection() async throws {
        var limits = APIServer.Limits()
        limits.requestReadTimeoutMs = 400
        let server = try await startServer(RecordingSQLService(), limits: limits)
        let raw = try await connectRaw(server)
        for byte in "POST /db/execute HTTP/1.1\r\nHost: loc".map(String.init) {
            if raw.isClosed { break }
            raw.send(byte)
            try await Task.sleep(for: .milliseconds(50))
        }
        let closed = await eventually(seconds: 5) { raw.isClosed }
        XCTAssertTrue(closed, "trickled headers kept their connection")
    }
}

