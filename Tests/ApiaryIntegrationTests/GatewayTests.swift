import ApiaryCore
import ApiaryMonitor
import ApiaryNode
import ApiaryTLS
import Foundation
import NIOHTTP1
import NIOPosix
import NIOSSL
import XCTest

/// The gateway (issue 10) with real processes on loopback: a monitor, two nodes, a gateway.
/// Applications talk to the gateway only, with HTTP basic auth, as they would in production.
final class GatewayTests: NodeProcessTestCase {
    var user = ""
    var password = ""

    override func setUp() async throws {
        directory = NSTemporaryDirectory() + "apiary-gateway-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               monitorArguments: ["--tick-interval-ms", "20"], gateways: 1)
        try cluster.startBoth()
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.primary.apiPort)
        try await accounts.createTenant("app")
        user = "app-writer"
        password = AccountsClient.randomPassword()
        try await accounts.createUser(user, tenant: "app", role: "admin", password: password)
    }

    /// A client of the gateway, as an application: the cluster CA trusted, no certificate.
    func connect() async throws -> HTTPSConnection {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(cluster.certificates + "/ca.pem")
        return try await HTTPSConnection.connect(host: "127.0.0.1", port: cluster.gateways[0].apiPort, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
    }

    var authorization: (String, String) { ("Authorization", "Basic " + Data("\(user):\(password)".utf8).base64EncodedString()) }

    /// Through kills of the primary: a client whose writes carry idempotency keys sees no error
    /// at all and no write applied twice; a client without keys sees only successes or an
    /// honest "outcome unknown", never a false failure; every acknowledged write is there once.
    func testWritesThroughTheGatewaySurviveKillsOfThePrimary() async throws {
        let monitor = try await MonitorClient(cluster: cluster)
        let setup = try await connect()
        let created = try await setup.request(.POST, "/db/execute", headers: [authorization],
                                              body: Array(#"["CREATE TABLE t (id INTEGER, keyed INTEGER)"]"#.utf8))
        XCTAssertEqual(created.status, 200, created.text)
        XCTAssertEqual(created.header("X-Apiary-Node"), "node-a")
        XCTAssertEqual(created.header("X-Apiary-Epoch"), "1")
        XCTAssertEqual(created.header(ApiaryVersion.rqliteHeader), ApiaryVersion.rqliteHeaderValue)
        await setup.close()
        // A node that does not believe gateways (the default) takes an operator's certificate
        // only directly: through the gateway the operator is no one.
        let operatorViaGateway = try await AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1",
                                                          port: cluster.gateways[0].apiPort).request(.GET, "/status")
        XCTAssertEqual(operatorViaGateway.status, 403, operatorViaGateway.text)

        let keyed = GatewayWriter(), unkeyed = GatewayWriter()
        let writers = [Task { await self.write(keyed, withKeys: true) }, Task { await self.write(unkeyed, withKeys: false) }]
        var primary = cluster.primary
        for round in 1...3 {
            let standby = cluster.peer(of: primary)
            try await monitor.waitUntil("round \(round): in sync", timeoutSeconds: 60) { s in
                s.node(primary.name)?.reported == "primary" && s.node(standby.name)?.promotable == true
            }
            try await keyed.waitForMore(5, timeoutSeconds: 60)
            cluster.kill(primary)
            try await monitor.waitUntil("round \(round): \(standby.name) promoted", timeoutSeconds: 30) { s in s.node(standby.name)?.reported == "wait_primary" }
            try await keyed.waitForMore(5, timeoutSeconds: 30)
            try cluster.start(primary)
            primary = standby
        }
        keyed.stop()
        unkeyed.stop()
        for w in writers { await w.value }

        XCTAssertEqual(keyed.failures, [], "a client with idempotency keys saw errors through failovers")
        XCTAssertEqual(unkeyed.failures.filter { !$0.hasPrefix("500 outcome_unknown") }, [], "false failures through failovers")
        XCTAssertGreaterThan(keyed.acked.count, 15)
        XCTAssertTrue(keyed.epochsSeen.count >= 2, "the answers' X-Apiary-Epoch shows the failovers: \(keyed.epochsSeen)")

        let check = try await connect()
        defer { Task { await check.close() } }
        let r = try await check.request(.GET, "/db/query?q=" + "SELECT id, keyed FROM t".addingPercentEncoding(withAllowedCharacters: .alphanumerics)!,
                                        headers: [authorization])
        XCTAssertEqual(r.status, 200, r.text)
        let rows = Self.rows(r)
        let keyedIDs = rows.filter { $0.1 == 1 }.map(\.0), unkeyedIDs = rows.filter { $0.1 == 0 }.map(\.0)
        XCTAssertEqual(keyedIDs.count, Set(keyedIDs).count, "a keyed write was applied twice")
        XCTAssertEqual(unkeyedIDs.count, Set(unkeyedIDs).count, "a write without a key was applied twice")
        XCTAssertEqual(Set(keyed.acked).subtracting(keyedIDs), [], "acknowledged keyed writes missing")
        XCTAssertEqual(Set(unkeyed.acked).subtracting(unkeyedIDs), [], "acknowledged writes missing")
    }

    /// A primary that stops answering without closing its connections (paused, or its zone cut
    /// off): the requests the gateway had already sent it are sent to the new primary as soon
    /// as it is ready, rather than waiting out the attempt's timeout and failing as "outcome
    /// unknown" (GatewayCore.abandons). Clients with idempotency keys see no error at all.
    func testAPausedPrimaryCostsKeyedClientsNoError() async throws {
        let monitor = try await MonitorClient(cluster: cluster)
        let setup = try await connect()
        let created = try await setup.request(.POST, "/db/execute", headers: [authorization],
                                              body: Array(#"["CREATE TABLE t (id INTEGER, keyed INTEGER)"]"#.utf8))
        XCTAssertEqual(created.status, 200, created.text)
        await setup.close()
        try await monitor.waitUntil("in sync", timeoutSeconds: 60) { s in
            s.node("node-a")?.reported == "primary" && s.node("node-b")?.promotable == true
        }
        // Several clients, so that requests are under way to node-a when it stops.
        let clients = (0..<3).map { _ in GatewayWriter() }
        let writers = clients.enumerated().map { i, w in Task { await self.write(w, withKeys: true, idsFrom: i * 1_000_000) } }
        for w in clients { try await w.waitForMore(5, timeoutSeconds: 60) }
        let pid = try XCTUnwrap(cluster.processID(of: cluster.primary))
        kill(pid, SIGSTOP)
        var paused = true
        defer { if paused { kill(pid, SIGCONT) } }
        try await monitor.waitUntil("node-b promoted", timeoutSeconds: 30) { s in s.node("node-b")?.reported == "wait_primary" }
        for w in clients { try await w.waitForMore(5, timeoutSeconds: 30) }
        kill(pid, SIGCONT)
        paused = false
        try await monitor.waitUntil("node-a rejoined", timeoutSeconds: 60) { s in s.node("node-a")?.reported == "secondary" }
        for w in clients { w.stop() }
        for w in writers { await w.value }
        for w in clients { XCTAssertEqual(w.failures, [], "a keyed client saw errors while the primary was paused") }
        let grep = (try? String(contentsOfFile: directory + "/logs/gateway-1.log", encoding: .utf8)) ?? ""
        XCTAssertTrue(grep.contains("attempts still waiting on the former writer are sent to the new one"), "requests were under way to node-a when it stopped")
    }

    /// A planned switchover and a failover drill, under writes through the gateway: a client
    /// whose writes carry idempotency keys sees no error at all.
    func testASwitchoverAndADrillCostAGatewayClientNoError() async throws {
        let monitor = try await MonitorClient(cluster: cluster)
        let setup = try await connect()
        let created = try await setup.request(.POST, "/db/execute", headers: [authorization],
                                              body: Array(#"["CREATE TABLE t (id INTEGER, keyed INTEGER)"]"#.utf8))
        XCTAssertEqual(created.status, 200, created.text)
        await setup.close()
        let keyed = GatewayWriter()
        let writer = Task { await self.write(keyed, withKeys: true) }
        for (round, command) in ["switchover", "failover"].enumerated() {
            try await monitor.waitUntil("in sync before the \(command)", timeoutSeconds: 60) { s in
                s.nodes.contains { $0.reported == "primary" } && s.nodes.contains { $0.promotable && $0.reported == "secondary" }
            }
            try await keyed.waitForMore(10, timeoutSeconds: 60)
            let answer = try ctl([command])
            XCTAssertEqual(answer.status, 0, answer.output)
            try await monitor.waitUntil("the \(command) done", timeoutSeconds: 60) { s in s.epoch == UInt64(round + 2) && s.nodes.contains { $0.reported == "wait_primary" || $0.reported == "primary" } }
            try await keyed.waitForMore(10, timeoutSeconds: 60)
        }
        keyed.stop()
        await writer.value
        XCTAssertEqual(keyed.failures, [], "a switchover or a drill showed a gateway client errors")
        XCTAssertTrue(keyed.epochsSeen.isSuperset(of: ["1", "2", "3"]), "\(keyed.epochsSeen)")
    }

    /// One client of the gateway. With keys, it sends each write once (the gateway does the
    /// resending); without, it moves on after "outcome unknown" (the id may or may not be there).
    func write(_ w: GatewayWriter, withKeys: Bool, idsFrom first: Int = 0) async {
        var connection: HTTPSConnection?
        var id = first
        while !w.stopped {
            do {
                if connection?.isOpen != true { connection = try await connect() }
                var headers = [authorization]
                if withKeys { headers.append(("Idempotency-Key", "k\(id)")) }
                let r = try await connection!.request(.POST, "/db/execute", headers: headers,
                                                      body: Array("[[\"INSERT INTO t(id, keyed) VALUES(?, ?)\", \(id), \(withKeys ? 1 : 0)]]".utf8))
                if r.status == 200, !r.text.contains("\"error\"") {
                    w.acknowledge(id, epoch: r.header("X-Apiary-Epoch"))
                } else {
                    let code = (try? JSONSerialization.jsonObject(with: Data(r.body)) as? [String: Any])?["code"] as? String
                    w.fail("\(r.status) \(code ?? "-") \(r.text.prefix(200))")
                }
            } catch {
                // The gateway itself did not answer: that is a failure the client sees.
                w.fail("no answer from the gateway: \(error)")
                await connection?.close()
                connection = nil
            }
            id += 1
        }
        await connection?.close()
    }

    static func rows(_ response: HTTPSConnection.Response) -> [(Int, Int)] {
        (response.integerRows ?? []).compactMap { $0.count == 2 ? ($0[0], $0[1]) : nil }
    }
}

/// What one gateway client was told.
final class GatewayWriter: @unchecked Sendable {
    private let condition = NSCondition()
    private(set) var acked: [Int] = []
    private(set) var failures: [String] = []
    private(set) var epochsSeen = Set<String>()
    private var isStopped = false
    private var waitedFor = 0

    func acknowledge(_ id: Int, epoch: String?) {
        condition.withLock {
            acked.append(id)
            if let epoch { epochsSeen.insert(epoch) }
            condition.broadcast()
        }
    }
    func fail(_ text: String) { condition.withLock { failures.append(text) } }
    func stop() { condition.withLock { isStopped = true } }
    var stopped: Bool { condition.withLock { isStopped } }

    /// Until `count` more writes were acknowledged than at the previous call.
    func waitForMore(_ count: Int, timeoutSeconds: Double) async throws {
        let ok = await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
            Thread.detachNewThread {
                let deadline = Date().addingTimeInterval(timeoutSeconds)
                let ok = self.condition.withLock { () -> Bool in
                    let target = self.waitedFor + count
                    while self.acked.count < target { if !self.condition.wait(until: deadline) { return self.acked.count >= target } }
                    self.waitedFor = self.acked.count
                    return true
                }
                c.resume(returning: ok)
            }
        }
        if !ok { throw NodeError("fewer than \(count) writes acknowledged through the gateway within \(timeoutSeconds)s; failures: \(failures.suffix(5))") }
    }
}

/// The gateway's limits per client (issue 10): a client past its request rate or its number of
/// connections is refused clearly while another client is still served. Clients are told apart
/// by address: each connects from its own loopback address.
final class GatewayLimitsTests: NodeProcessTestCase {
    override func setUp() async throws {
        directory = NSTemporaryDirectory() + "apiary-gateway-limits-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               primaryArguments: ["--tenant-rate", "0.01", // one request, then one per 100 s
                                                  "--operators-via-gateways"],
                               monitorArguments: ["--tick-interval-ms", "20"], gateways: 1,
                               gatewayArguments: ["--client-rate", "5", "--client-connections-max", "3", "--http-listen", "127.0.0.1:0"])
        try cluster.startBoth()
    }

    func connect(from address: String) async throws -> HTTPSConnection {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(cluster.certificates + "/ca.pem")
        return try await HTTPSConnection.connect(host: "127.0.0.1", port: cluster.gateways[0].apiPort, tls: tls,
                                                 group: MultiThreadedEventLoopGroup.singleton, localAddress: address)
    }

    func testAClientPastItsRateIsRefusedWhileAnotherIsServed() async throws {
        let greedy = try await connect(from: "127.0.0.2")
        var statuses: [Int] = []
        var refusal: HTTPSConnection.Response?
        // Rate 5/s with a burst of 10: 30 requests at once cannot all pass, however fast the machine.
        for _ in 0..<30 {
            let r = try await greedy.request(.GET, "/readyz")
            statuses.append(r.status)
            if r.status == 429 { refusal = r }
        }
        await greedy.close()
        XCTAssertTrue(statuses.contains(429), "\(statuses)")
        let answer = try XCTUnwrap(refusal)
        XCTAssertNotNil(answer.header("Retry-After"))
        XCTAssertTrue(answer.text.contains("\"code\":\"rate_limited\"") && answer.text.contains("\"retry_safe\":true"), answer.text)
        let other = try await connect(from: "127.0.0.3")
        let served = try await other.request(.GET, "/readyz")
        await other.close()
        XCTAssertEqual(served.status, 200, "another client is still served: \(served.text)")
    }

    /// Warm pools: the gateway keeps connections open to both nodes before any request, so
    /// the first requests to a new writer after a failover do not each wait for a handshake.
    func testTheGatewayKeepsConnectionsOpenToBothNodesAheadOfNeed() throws {
        for node in [cluster.primary, cluster.standby] {
            XCTAssertTrue(cluster.waitForOutput(of: cluster.gateways[0], containing: "keeping connections open to \(node.name) ahead of need",
                                                timeoutSeconds: 60), node.name)
            XCTAssertGreaterThanOrEqual(try Self.establishedConnections(toPort: node.apiPort), 8, node.name)
        }
    }

    /// Connections in ESTABLISHED state to `port` on this machine, from /proc/net/tcp.
    static func establishedConnections(toPort port: Int) throws -> Int {
        let table = try XCTUnwrap(ProcFile.read("/proc/net/tcp"))
        let suffix = String(format: ":%04X", port)
        return table.split(separator: "\n").dropFirst().filter { line in
            let fields = line.split(separator: " ")
            return fields.count > 3 && fields[2].hasSuffix(suffix) && fields[3] == "01"
        }.count
    }

    /// An operator's certificate works through the gateway as it does at a node (the node sees
    /// the gateway's certificate, and believes the operator the gateway vouches for); the
    /// header that carries it is believed from no one else: not from an application through
    /// the gateway, not from anyone talking to a node directly.
    func testAnOperatorCertificateWorksThroughTheGatewayAndNoOneElseCanClaimIt() async throws {
        let viaGateway = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.gateways[0].apiPort)
        try await viaGateway.createTenant("ops-made")
        let status = try await viaGateway.request(.GET, "/status")
        XCTAssertEqual(status.status, 200, status.text)
        XCTAssertTrue(status.text.contains("\"tenants\"") && status.text.contains("ops-made"), "Apiary's own status, for operators: \(status.text)")
        XCTAssertEqual(status.header("X-Apiary-Node"), "node-a")

        let forged = [("X-Apiary-Operator", "operator")]
        let application = try await connect(from: "127.0.0.8")
        let claimed = try await application.request(.POST, "/admin/tenants", headers: forged + [("Content-Type", "application/json")],
                                                    body: Array(#"{"name":"forged"}"#.utf8))
        XCTAssertEqual(claimed.status, 401, "the gateway passes on no operator its client did not prove: \(claimed.text)")
        let claimedStatus = try await application.request(.GET, "/status", headers: forged)
        XCTAssertEqual(claimedStatus.status, 403, claimedStatus.text)
        await application.close()

        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(cluster.certificates + "/ca.pem")
        let direct = try await HTTPSConnection.connect(host: "127.0.0.1", port: cluster.primary.apiPort, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
        let claimedAtNode = try await direct.request(.GET, "/status", headers: forged)
        await direct.close()
        XCTAssertEqual(claimedAtNode.status, 403, "a node believes the header only from a gateway: \(claimedAtNode.text)")
        let tenants = try await AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.primary.apiPort)
            .request(.GET, "/admin/tenants")
        XCTAssertTrue(tenants.text.contains("ops-made") && !tenants.text.contains("forged"), tenants.text)
    }

    /// Tenants are limited by the nodes (`apiary node --tenant-rate`), where credentials are
    /// checked: one tenant past its allowance is refused through the gateway, another is served.
    func testATenantPastItsRateIsRefusedByTheNodeWhileAnotherTenantIsServed() async throws {
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.primary.apiPort)
        var authorization: [String: (String, String)] = [:]
        for tenant in ["acme", "globex"] {
            try await accounts.createTenant(tenant)
            let password = AccountsClient.randomPassword()
            try await accounts.createUser(tenant + "-app", tenant: tenant, role: "writer", password: password)
            authorization[tenant] = ("Authorization", AccountsClient.basicAuthorization(user: tenant + "-app", password: password))
        }
        let acme = try await connect(from: "127.0.0.6")
        let first = try await acme.request(.GET, "/db/query?q=SELECT%201", headers: [authorization["acme"]!])
        let second = try await acme.request(.GET, "/db/query?q=SELECT%201", headers: [authorization["acme"]!])
        await acme.close()
        XCTAssertEqual(first.status, 200, first.text)
        XCTAssertEqual(second.status, 429, second.text)
        XCTAssertTrue(second.text.contains("too many requests for tenant acme") && second.text.contains("\"code\":\"rate_limited\""), second.text)
        XCTAssertNotNil(second.header("Retry-After"))
        XCTAssertEqual(second.header("X-Apiary-Node"), "node-a", "refused by the node, not the gateway")
        let globex = try await connect(from: "127.0.0.7")
        let served = try await globex.request(.GET, "/db/query?q=SELECT%201", headers: [authorization["globex"]!])
        await globex.close()
        XCTAssertEqual(served.status, 200, served.text)
    }

    /// The plain-HTTP port only redirects (308, the method kept) to the same path over HTTPS,
    /// and HTTPS answers carry HSTS. Plain HTTP is spoken over a raw socket: no client library
    /// between the test and the bytes.
    func testPlainHTTPOnlyRedirectsAndHTTPSAnswersCarryHSTS() async throws {
        XCTAssertTrue(cluster.waitForOutput(of: cluster.gateways[0], containing: "redirect=http://127.0.0.1:"))
        let text = try String(contentsOfFile: directory + "/logs/gateway-1.log", encoding: .utf8)
        let port = try XCTUnwrap(text.components(separatedBy: "redirect=http://127.0.0.1:").last?.prefix { $0.isNumber }).description
        let answer = try rawHTTP(port: Int(port)!, "POST /db/execute?pretty HTTP/1.1\r\nHost: localhost:\(port)\r\nContent-Length: 2\r\n\r\n[]")
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 308"), answer)
        XCTAssertTrue(answer.contains("Location: https://localhost:\(cluster.gateways[0].apiPort)/db/execute?pretty"), answer)
        let evil = try rawHTTP(port: Int(port)!, "GET / HTTP/1.1\r\nHost: evil.example/x?\r\n\r\n")
        XCTAssertTrue(evil.contains("Location: https://127.0.0.1:\(cluster.gateways[0].apiPort)/"), "a malformed Host is not echoed: \(evil)")
        let c = try await connect(from: "127.0.0.6")
        let served = try await c.request(.GET, "/readyz")
        await c.close()
        XCTAssertEqual(served.header("Strict-Transport-Security"), "max-age=31536000")
    }

    /// The gateway's client TLS, with `openssl s_client` as an independent client.
    func testTheGatewayAcceptsOnlyTLS12And13WithModernSuites() throws {
        try assertOnlyModernTLS(port: cluster.gateways[0].apiPort)
    }

    func rawHTTP(port: Int, _ request: String) throws -> String {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard connected == 0 else { throw NodeError("cannot connect to the redirect port") }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        _ = request.withCString { send(fd, $0, strlen($0), 0) }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            received += buffer[0..<n]
        }
        return String(decoding: received, as: UTF8.self)
    }

    func testAClientPastItsConnectionsIsRefusedWhileAnotherConnects() async throws {
        var open: [HTTPSConnection] = []
        for _ in 0..<3 {
            let c = try await connect(from: "127.0.0.4")
            let served = try await c.request(.GET, "/readyz")
            XCTAssertEqual(served.status, 200)
            open.append(c)
        }
        // The fourth from the same address is told so: 503, Retry-After, not executed.
        let fourth = try await connect(from: "127.0.0.4")
        let refused = try await fourth.request(.GET, "/readyz")
        await fourth.close()
        XCTAssertEqual(refused.status, 503, refused.text)
        XCTAssertEqual(refused.header("Retry-After"), "1")
        XCTAssertTrue(refused.text.contains("too many connections open"), refused.text)
        XCTAssertNotNil(refused.header("X-Apiary-Gateway"), "the server's own refusal says which gateway gave it")
        let other = try await connect(from: "127.0.0.5")
        let served = try await other.request(.GET, "/readyz")
        XCTAssertEqual(served.status, 200, "another address still connects")
        await other.close()
        for c in open { await c.close() }
    }
}
