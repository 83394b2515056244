import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import XCTest
@testable import ApiaryNode

/// Bodies, answers and connections of all clients count against one memory budget per node
/// (invariant 8): past it new work is refused (503, or a closed connection), the node serves on,
/// and everything given back returns the budget to where it was.
final class MemoryBudgetTests: XCTestCase {
    var dir: String!
    var group: MultiThreadedEventLoopGroup!
    var server: APIServer!
    var service: RecordingSQLService!
    var raws: [RawTLSConnection] = []
    static let connectionBytes = 64 << 10

    func start(budget: Int) async throws {
        dir = NSTemporaryDirectory() + "apiary-budget-" + UUID().uuidString
        let ca = try CertificateAuthority.create(in: dir)
        try ca.issue(ApiaryTLS.PeerIdentity(role: .node, name: "node-1"), into: dir)
        group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        var logger = Logger(label: "apiary.test.budget")
        logger.logLevel = .critical
        var limits = APIServer.Limits()
        limits.memoryBudgetBytes = budget
        limits.connectionMemoryBytes = Self.connectionBytes
        service = RecordingSQLService()
        server = try await APIServer.start(service: service, accounts: nil, credentials: try ClusterCredentials(directory: dir, name: "node-1"),
                                           host: "127.0.0.1", port: 0, group: group, logger: logger, limits: limits)
    }

    override func tearDown() async throws {
        for raw in raws { await raw.close() }
        await server?.close()
        try await group?.shutdownGracefully()
        if let dir { try? FileManager.default.removeItem(atPath: dir) }
    }

    func connect() async throws -> RawTLSConnection {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(dir + "/ca.pem")
        let raw = try await RawTLSConnection.connect(port: server.port, tls: tls, group: group)
        raws.append(raw)
        return raw
    }

    /// A write request whose body is `bytes` long (a valid rqlite body), split in head and body.
    static func request(bodyBytes bytes: Int) -> (head: String, body: String) {
        let padding = String(repeating: "x", count: bytes - #"["SELECT ''"]"#.utf8.count)
        let body = #"["SELECT '"# + padding + #"'"]"#
        return ("POST /db/execute HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\nContent-Length: \(body.utf8.count)\r\n\r\n", body)
    }

    func testABodyTheBudgetCannotHoldIsRefusedUnreadAndTheNodeServesOn() async throws {
        try await start(budget: 2 << 20)
        let raw = try await connect()
        let big = Self.request(bodyBytes: 3 << 20) // under the 8 MiB body limit, over the budget
        raw.send(big.head + big.body)
        raw.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let answered = await eventually(seconds: 30) { raw.responses.count >= 2 }
        XCTAssertTrue(answered, "\(raw.responses.map(\.statusLine))")
        XCTAssertEqual(raw.responses.map(\.status), [503, 200])
        XCTAssertTrue(raw.responses[0].body.contains("short of memory"), raw.responses[0].body)
        XCTAssertTrue(service.calls.isEmpty, "a refused request must not run")
        let settled = await eventually { self.server.memoryInUseBytes == Self.connectionBytes }
        XCTAssertTrue(settled, "budget in use \(server.memoryInUseBytes), expected one connection's \(Self.connectionBytes)")
    }

    func testConcurrentBodiesShareOneBudget() async throws {
        try await start(budget: (5 << 20) / 2) // 2.5 MiB
        let a = try await connect()
        let b = try await connect()
        let request = Self.request(bodyBytes: 3 << 19) // 1.5 MiB each: one fits, two do not
        // A's head arrives with part of its body: its whole length is held from the head on.
        a.send(request.head + String(request.body.prefix(1000)))
        let held = await eventually { self.server.memoryInUseBytes >= (3 << 19) }
        XCTAssertTrue(held, "A's body was never counted: \(server.memoryInUseBytes)")
        b.send(request.head + request.body)
        let refused = await eventually(seconds: 30) { b.responses.count == 1 }
        XCTAssertTrue(refused)
        XCTAssertEqual(b.responses.first?.status, 503, b.responses.first?.body ?? "")

        // A completes and is answered; its budget comes back, and B's retry fits.
        a.send(String(request.body.dropFirst(1000)))
        let aAnswered = await eventually(seconds: 30) { a.responses.count == 1 }
        XCTAssertTrue(aAnswered)
        XCTAssertEqual(a.responses.first?.status, 200, a.responses.first?.body ?? "")
        let released = await eventually { self.server.memoryInUseBytes == 2 * Self.connectionBytes }
        XCTAssertTrue(released, "in use: \(server.memoryInUseBytes)")
        b.send(request.head + request.body)
        let bAnswered = await eventually(seconds: 30) { b.responses.count == 2 }
        XCTAssertTrue(bAnswered)
        XCTAssertEqual(b.responses.last?.status, 200, b.responses.last?.body ?? "")
        XCTAssertEqual(service.calls.count, 2)
    }

    /// A long head (a query in the URL, up to 1 MiB) holds the budget from its bytes' arrival
    /// to its answer: past the connection's own charge, every byte of it.
    func testALongHeadIsChargedAsItArrivesAndGivenBackWhenAnswered() async throws {
        try await start(budget: 8 << 20)
        let raw = try await connect()
        let head = "GET /db/query?q=SELECT%20'" + String(repeating: "x", count: 600_000)
        raw.send(head)
        let charged = await eventually { self.server.memoryInUseBytes == head.utf8.count }
        XCTAssertTrue(charged, "in use \(server.memoryInUseBytes), expected the head's \(head.utf8.count) (its first \(Self.connectionBytes) the connection's own)")
        raw.send("' HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\n\r\n")
        let answered = await eventually(seconds: 30) { raw.responses.count == 1 }
        XCTAssertTrue(answered)
        XCTAssertEqual(raw.responses.first?.status, 200, raw.responses.first?.body ?? "")
        let released = await eventually { self.server.memoryInUseBytes == Self.connectionBytes }
        XCTAssertTrue(released, "in use \(server.memoryInUseBytes), expected one connection's \(Self.connectionBytes)")
    }

    /// A chunked body's trailers are held by the decoder like a head: charged as they arrive,
    /// given back at the request's end.
    func testTrailersAreChargedAsTheyArrive() async throws {
        try await start(budget: 8 << 20)
        let raw = try await connect()
        let body = #"["INSERT INTO t VALUES (1)"]"#
        raw.send("POST /db/execute HTTP/1.1\r\nHost: localhost\r\nX-Apiary-Tenant: acme\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + String(body.utf8.count, radix: 16) + "\r\n" + body + "\r\n0\r\n")
        let trailer = "X-Padding: " + String(repeating: "x", count: 600_000)
        raw.send(trailer)
        let charged = await eventually { self.server.memoryInUseBytes >= trailer.utf8.count }
        XCTAssertTrue(charged, "in use \(server.memoryInUseBytes), the trailer alone is \(trailer.utf8.count)")
        raw.send("\r\n\r\n")
        let answered = await eventually(seconds: 30) { raw.responses.count == 1 }
        XCTAssertTrue(answered)
        XCTAssertEqual(raw.responses.first?.status, 200, raw.responses.first?.body ?? "")
        let released = await eventually { self.server.memoryInUseBytes == Self.connectionBytes }
        XCTAssertTrue(released, "in use \(server.memoryInUseBytes), expected one connection's \(Self.connectionBytes)")
    }

    func testAHeadTheBudgetCannotHoldClosesItsConnectionAndTheNodeServesOn() async throws {
        try await start(budget: 4 * Self.connectionBytes)
        let long = try await connect()
        let other = try await connect()
        long.send("GET /db/query?q=" + String(repeating: "x", count: 500_000))
        let closed = await eventually(seconds: 30) { long.isClosed }
        XCTAssertTrue(closed, "a head past the budget was kept")
        XCTAssertEqual(long.responses.count, 0)
        other.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let answered = await eventually { other.responses.count == 1 }
        XCTAssertTrue(answered)
        XCTAssertEqual(other.responses.first?.status, 200)
        XCTAssertTrue(service.calls.isEmpty)
        let settled = await eventually { self.server.memoryInUseBytes == Self.connectionBytes }
        XCTAssertTrue(settled, "in use \(server.memoryInUseBytes), expected one connection's \(Self.connectionBytes)")
    }

    func testConnectionsPastTheBudgetAreClosedAndItsReturnLetsThemIn() async throws {
        try await start(budget: 3 * Self.connectionBytes)
        var open: [RawTLSConnection] = []
        for _ in 0..<3 { open.append(try await connect()) }
        for raw in open { raw.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n") }
        let served = await eventually { open.allSatisfy { $0.responses.count == 1 } }
        XCTAssertTrue(served)

        // The fourth is closed at accept: its handshake never completes.
        let fourth = try? await connect()
        if let fourth {
            let closed = await eventually { fourth.isClosed }
            XCTAssertTrue(closed, "a connection past the budget was kept open")
            XCTAssertFalse(fourth.collector.handshakeCompleted)
        }
        await open[0].close()
        let freed = await eventually { self.server.memoryInUseBytes == 2 * Self.connectionBytes }
        XCTAssertTrue(freed, "in use: \(server.memoryInUseBytes)")
        let again = try await connect()
        again.send("GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        let answered = await eventually { again.responses.count == 1 }
        XCTAssertTrue(answered)
        XCTAssertEqual(again.responses.first?.status, 200)
    }
}
