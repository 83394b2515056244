import ApiaryNode
import Foundation
import NIOPosix
import NIOSSL
import XCTest

/// An application pointed at the standby still works: like an rqlite follower, the standby
/// answers its data requests with 301 and an absolute `Location` on the writer (the path and
/// query kept), which rqlite's clients follow. After a failover the roles swap and so do the
/// redirects. The cluster's own identities keep getting 503 `not_executed` (a gateway acts on
/// it), and a request without credentials is 401 on any node. A standby that lost its writer
/// sends no one there.
final class StandbyRedirectTests: NodeProcessTestCase {
    override func setUp() async throws {
        directory = NSTemporaryDirectory() + "apiary-redirect-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               monitorArguments: ["--tick-interval-ms", "20"])
        try cluster.startBoth()
    }

    func application(_ spec: LocalCluster.NodeSpec) async throws -> HTTPSConnection {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(cluster.certificates + "/ca.pem")
        return try await HTTPSConnection.connect(host: spec.host, port: spec.apiPort, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
    }

    func testAnApplicationPointedAtTheStandbyIsSentToTheWriter() async throws {
        let monitor = try await MonitorClient(cluster: cluster)
        try await monitor.waitUntil("in sync", timeoutSeconds: 60) { s in
            s.node("node-a")?.reported == "primary" && s.node("node-b")?.promotable == true
        }
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.primary.apiPort)
        try await accounts.createTenant("shop")
        let password = AccountsClient.randomPassword()
        try await accounts.createUser("app", tenant: "shop", role: "writer", password: password)
        let auth = [("Authorization", "Basic " + Data("app:\(password)".utf8).base64EncodedString())]
        let body = Array(#"["CREATE TABLE t (v TEXT)", "INSERT INTO t VALUES ('hello')"]"#.utf8)

        let standby = try await application(cluster.standby)
        let moved = try await standby.request(.POST, "/db/execute?timings&transaction", headers: auth, body: body)
        XCTAssertEqual(moved.status, 301, moved.text)
        XCTAssertEqual(moved.header("Location"), "https://127.0.0.1:\(cluster.primary.apiPort)/db/execute?timings&transaction")
        XCTAssertEqual(moved.header("Cache-Control"), "no-store", "after a failover it goes the other way")
        XCTAssertTrue(moved.text.contains("not_executed"), moved.text)
        let read = try await standby.request(.GET, "/db/query?level=strong&q=SELECT%20v%20FROM%20t", headers: auth)
        XCTAssertEqual(read.status, 301, read.text)
        XCTAssertEqual(read.header("Location"), "https://127.0.0.1:\(cluster.primary.apiPort)/db/query?level=strong&q=SELECT%20v%20FROM%20t")

        // Following it, as rqlite's clients do: the write lands on the writer.
        let primary = try await application(cluster.primary)
        let done = try await primary.request(.POST, "/db/execute?timings&transaction", headers: auth, body: body)
        XCTAssertEqual(done.status, 200, done.text)
        XCTAssertFalse(done.text.contains("\"error\""), done.text)

        // No credentials: 401, not a redirect. The cluster's own identities: 503, as before.
        let anonymous = try await standby.request(.POST, "/db/execute", body: body)
        XCTAssertEqual(anonymous.status, 401, anonymous.text)
        let asOperator = try await APIClient(port: cluster.standby.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        let refused = try await asOperator.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "shop")], body: body)
        XCTAssertEqual(refused.status, 503, refused.text)
        XCTAssertNil(refused.header("Location"))
        // Not data: the standby answers its own status.
        let ready = try await standby.request(.GET, "/readyz")
        XCTAssertNotEqual(ready.status, 301)
        XCTAssertEqual(ready.status, 503, ready.text)
        XCTAssertTrue(ready.text.contains("[+]store not ready"), "a standby says what it is: \(ready.text)")
        let primaryReady = try await primary.request(.GET, "/readyz")
        XCTAssertEqual(primaryReady.status, 200, primaryReady.text)
        let status = try await asOperator.request(.GET, "/status")
        XCTAssertTrue(status.text.contains("\"role\":\"standby\""), status.text)
        await asOperator.close()
        await standby.close()
        await primary.close()

        // A failover swaps the roles, and the redirects with them.
        let failover = try ctl(["failover"])
        XCTAssertEqual(failover.status, 0, failover.output)
        try await monitor.waitUntil("node-b primary, node-a its standby in sync", timeoutSeconds: 60) { s in
            s.node("node-b")?.reported == "primary" && s.node("node-a")?.reported == "secondary" && s.node("node-a")?.promotable == true
        }
        let former = try await application(cluster.primary)
        let sent = try await former.request(.POST, "/db/execute", headers: auth, body: Array(#"["INSERT INTO t VALUES ('again')"]"#.utf8))
        XCTAssertEqual(sent.status, 301, sent.text)
        XCTAssertEqual(sent.header("Location"), "https://127.0.0.1:\(cluster.standby.apiPort)/db/execute")

        // A standby that lost its writer does not send clients to it: 503, safe to retry. (The
        // monitor is paused so that nothing is promoted meanwhile.)
        let monitorPid = try XCTUnwrap(cluster.processID(of: cluster.monitor!))
        kill(monitorPid, SIGSTOP)
        defer { kill(monitorPid, SIGCONT) }
        let lost = "not streaming from the primary: applications get 503"
        let lostBefore = cluster.outputCount(of: cluster.primary, containing: lost)
        cluster.kill(cluster.standby) // node-b, the writer now
        XCTAssertTrue(cluster.waitForOutput(of: cluster.primary, containing: lost, times: lostBefore + 1, timeoutSeconds: 60),
                      "node-a never saw its stream end")
        let c = try await application(cluster.primary)
        let whileLost = try await c.request(.POST, "/db/execute", headers: auth, body: Array(#"["INSERT INTO t VALUES ('lost')"]"#.utf8))
        await c.close()
        XCTAssertEqual(whileLost.status, 503, whileLost.text)
        XCTAssertNil(whileLost.header("Location"))
        await former.close()
    }
}
