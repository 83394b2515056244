import ApiaryNode
import Foundation
import NIOHTTP1
import XCTest

/// Tenants, users and authentication on real nodes (issue: anyone who reached a node's API port
/// could read and change any tenant with plain curl and no credentials).
final class AccountsTests: NodeProcessTestCase {
    var accounts: AccountsClient!
    static let passwords = ["alice": "alice-password-1", "bob": "bob-password-22", "ann": "ann-password-333", "gina": "gina-password-4444"]

    override func setUp() async throws {
        directory = NSTemporaryDirectory() + "apiary-accounts-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort())
        try cluster.startBoth()
        accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.primary.apiPort)
        try await accounts.createTenant("acme")
        try await accounts.createTenant("globex")
        try await accounts.createUser("alice", tenant: "acme", role: "writer", password: Self.passwords["alice"]!)
        try await accounts.createUser("bob", tenant: "acme", role: "reader", password: Self.passwords["bob"]!)
        try await accounts.createUser("ann", tenant: "acme", role: "admin", password: Self.passwords["ann"]!)
        try await accounts.createUser("gina", tenant: "globex", role: "writer", password: Self.passwords["gina"]!)
    }

    /// A request as an application sends it: no client certificate, maybe basic auth.
    func send(_ method: HTTPMethod, _ path: String, as user: String? = nil, password: String? = nil, headers: [(String, String)] = [],
              body: String? = nil, port: Int? = nil) async throws -> HTTPSConnection.Response {
        let c = try await APIClient(port: port ?? cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem", asOperator: false).connect()
        defer { Task { await c.close() } }
        var all = headers
        if let user { all.append(("Authorization", AccountsClient.basicAuthorization(user: user, password: password ?? Self.passwords[user]!))) }
        return try await c.request(method, path, headers: all, body: body.map { Array($0.utf8) })
    }

    func testNoOrWrongCredentialsAre401AndReadyzIsOpen() async throws {
        let none = try await send(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: #"["CREATE TABLE t (x)"]"#)
        XCTAssertEqual(none.status, 401, none.text)
        XCTAssertEqual(none.header("WWW-Authenticate")?.hasPrefix("Basic"), true)
        let noneRead = try await send(.GET, "/db/query?q=SELECT+1", headers: [("X-Apiary-Tenant", "acme")])
        XCTAssertEqual(noneRead.status, 401, noneRead.text)
        let wrong = try await send(.GET, "/db/query?q=SELECT+1", as: "alice", password: "not-alices-password")
        XCTAssertEqual(wrong.status, 401, wrong.text)
        let unknown = try await send(.GET, "/db/query?q=SELECT+1", as: "mallory", password: "whatever-it-is-1")
        XCTAssertEqual(unknown.status, 401, unknown.text)
        XCTAssertEqual(wrong.text, unknown.text, "a wrong password and an unknown user must look the same")
        let malformed = try await send(.GET, "/db/query?q=SELECT+1", headers: [("Authorization", "Basic !!!not-base64")])
        XCTAssertEqual(malformed.status, 401, malformed.text)
        let ready = try await send(.GET, "/readyz")
        XCTAssertEqual(ready.status, 200)
        XCTAssertFalse(wrong.text.contains("not-alices-password"), "the answer must not echo a password")
    }

    func testTheUsersCredentialsNameItsTenantAndNoOther() async throws {
        // No header needed: alice's tenant is acme.
        let created = try await send(.POST, "/db/execute", as: "alice", body: #"["CREATE TABLE t (x)", "INSERT INTO t VALUES ('acme-secret')"]"#)
        XCTAssertEqual(created.status, 200, created.text)
        let read = try await send(.GET, "/db/query?q=SELECT+x+FROM+t", as: "alice")
        XCTAssertTrue(read.text.contains("acme-secret"), read.text)

        // Naming another tenant, by header or path, is refused, not followed.
        let byHeader = try await send(.GET, "/db/query?q=SELECT+1", as: "alice", headers: [("X-Apiary-Tenant", "globex")])
        XCTAssertEqual(byHeader.status, 403, byHeader.text)
        let byPath = try await send(.GET, "/tenants/globex/db/query?q=SELECT+1", as: "alice")
        XCTAssertEqual(byPath.status, 403, byPath.text)
        // Gina (globex) sees nothing of acme's.
        let other = try await send(.GET, "/db/query?q=SELECT+x+FROM+t", as: "gina")
        XCTAssertEqual(other.status, 200)
        XCTAssertFalse(other.text.contains("acme-secret"), other.text)
        XCTAssertTrue(other.text.contains("no such table"), other.text)
    }

    func testRolesReaderCannotWriteWriterCannotAdminister() async throws {
        _ = try await send(.POST, "/db/execute", as: "alice", body: #"["CREATE TABLE t (x)"]"#)
        let readerWrites = try await send(.POST, "/db/execute", as: "bob", body: #"["INSERT INTO t VALUES (1)"]"#)
        XCTAssertEqual(readerWrites.status, 403, readerWrites.text)
        let readerReads = try await send(.GET, "/db/query?q=SELECT+count(*)+FROM+t", as: "bob")
        XCTAssertEqual(readerReads.status, 200, readerReads.text)
        XCTAssertTrue(readerReads.text.contains("[[0]]"), readerReads.text)

        let newUser = #"{"name": "carl", "role": "reader", "password": "carl-password-55"}"#
        let writerAdministers = try await send(.POST, "/admin/tenants/acme/users", as: "alice", body: newUser)
        XCTAssertEqual(writerAdministers.status, 403, writerAdministers.text)
        let adminOfOther = try await send(.POST, "/admin/tenants/globex/users", as: "ann", body: newUser)
        XCTAssertEqual(adminOfOther.status, 403, adminOfOther.text)
        let adminMakesTenant = try await send(.POST, "/admin/tenants", as: "ann", body: #"{"name": "initech"}"#)
        XCTAssertEqual(adminMakesTenant.status, 403, adminMakesTenant.text)
        let admin = try await send(.POST, "/admin/tenants/acme/users", as: "ann", body: newUser)
        XCTAssertEqual(admin.status, 201, admin.text)
        let carl = try await send(.GET, "/db/query?q=SELECT+1", as: "carl", password: "carl-password-55")
        XCTAssertEqual(carl.status, 200, carl.text)
        // Dropped by the admin: carl's credentials stop working at once.
        let dropped = try await send(.DELETE, "/admin/tenants/acme/users/carl", as: "ann")
        XCTAssertEqual(dropped.status, 200, dropped.text)
        let carlAfter = try await send(.GET, "/db/query?q=SELECT+1", as: "carl", password: "carl-password-55")
        XCTAssertEqual(carlAfter.status, 401, carlAfter.text)
        let writerDrops = try await send(.DELETE, "/admin/tenants/acme/users/bob", as: "alice")
        XCTAssertEqual(writerDrops.status, 403, writerDrops.text)
        let readded = try await send(.POST, "/admin/tenants/acme/users", as: "ann", body: newUser)
        XCTAssertEqual(readded.status, 201, readded.text)
        let duplicate = try await send(.POST, "/admin/tenants/acme/users", as: "ann", body: newUser)
        XCTAssertEqual(duplicate.status, 409, duplicate.text)
        let weak = try await send(.POST, "/admin/tenants/acme/users", as: "ann", body: #"{"name": "dan", "role": "reader", "password": "short"}"#)
        XCTAssertEqual(weak.status, 400, weak.text)
    }

    func testADroppedTenantsUsersAreRefused() async throws {
        let before = try await send(.GET, "/db/query?q=SELECT+1", as: "gina")
        XCTAssertEqual(before.status, 200, before.text)
        let dropped = try await accounts.request(.DELETE, "/admin/tenants/globex")
        XCTAssertEqual(dropped.status, 200, dropped.text)
        let after = try await send(.GET, "/db/query?q=SELECT+1", as: "gina")
        XCTAssertEqual(after.status, 401, after.text)
        let list = try await accounts.request(.GET, "/admin/tenants")
        XCTAssertTrue(list.text.contains("acme") && !list.text.contains("globex"), list.text)
        XCTAssertFalse(list.text.contains("_system"), "the system database is not a tenant: \(list.text)")
        let again = try await accounts.request(.POST, "/admin/tenants", json: ["name": "globex"])
        XCTAssertEqual(again.status, 409, again.text)
    }

    /// Dropping a tenant deletes its data: on the primary before the drop is answered, on the
    /// running standby once it applied the drop (and, had it been down, when it next starts:
    /// it deletes what its system database lists as dropped before it replicates again). Other
    /// tenants are untouched, and both nodes agree afterwards.
    func testADroppedTenantsFilesAreDeletedOnBothNodes() async throws {
        let wrote = try await send(.POST, "/db/execute", as: "gina", body: #"["CREATE TABLE t (x)", "INSERT INTO t VALUES ('globex-secret')"]"#)
        XCTAssertEqual(wrote.status, 200, wrote.text)
        let kept = try await send(.POST, "/db/execute", as: "alice", body: #"["CREATE TABLE t (x)", "INSERT INTO t VALUES ('acme-data')"]"#)
        XCTAssertEqual(kept.status, 200, kept.text)
        let verifier = try ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
        func verify() async throws -> ClusterVerifier.Report {
            try await verifier.verify(primary: ("127.0.0.1", cluster.primary.apiPort), standby: ("127.0.0.1", cluster.standby.apiPort), waitMs: 20_000)
        }
        let before = try await verify()
        XCTAssertTrue(before.consistent && before.text.contains("globex"), before.text)
        let primaryFiles = directory + "/\(cluster.primary.name)/tenants/globex"
        let standbyFiles = directory + "/\(cluster.standby.name)/tenants/globex"
        XCTAssertTrue(FileManager.default.fileExists(atPath: standbyFiles), "the standby holds globex before the drop")

        let dropped = try await accounts.request(.DELETE, "/admin/tenants/globex")
        XCTAssertEqual(dropped.status, 200, dropped.text)
        XCTAssertFalse(FileManager.default.fileExists(atPath: primaryFiles), "the primary deleted globex's files before answering")
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: directory + "/\(cluster.primary.name)/tenants")
        XCTAssertFalse(leftovers.contains { $0.contains("globex") }, "\(leftovers)")
        let again = try await accounts.request(.DELETE, "/admin/tenants/globex")
        XCTAssertEqual(again.status, 404, again.text)

        // The running standby deletes them once it applied the drop: it says so when done.
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "tenant dropped: its files are deleted on this node"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: standbyFiles), "the standby deleted globex's files")
        // The other tenant serves on, and its writes still replicate.
        let more = try await send(.POST, "/db/execute", as: "alice", body: #"["INSERT INTO t VALUES ('after the drop')"]"#)
        XCTAssertEqual(more.status, 200, more.text)
        let after = try await verify()
        XCTAssertTrue(after.consistent, after.text)
        XCTAssertFalse(after.text.contains("globex"), after.text)
        let read = try await send(.GET, "/db/query?q=SELECT+count(*)+FROM+t", as: "alice")
        XCTAssertTrue(read.text.contains("[[2]]"), read.text)
    }

    /// Files of a dropped tenant that a node finds when it starts (it stopped between the drop
    /// and the deletion): a primary deletes them before its standby can connect; a standby
    /// once it applies the system database from its primary again (not at its start: a former
    /// primary's system database may hold a drop that never committed). Here the files are put
    /// back by hand from a copy made before the drop, with each node stopped.
    func testADroppedTenantsFilesFoundAtStartAreDeleted() async throws {
        let wrote = try await send(.POST, "/db/execute", as: "gina", body: #"["CREATE TABLE t (x)", "INSERT INTO t VALUES ('globex-secret')"]"#)
        XCTAssertEqual(wrote.status, 200, wrote.text)
        let copies = directory + "/copies"
        try FileManager.default.createDirectory(atPath: copies, withIntermediateDirectories: true)
        for node in [cluster.standby, cluster.primary] {
            cluster.kill(node, signal: SIGTERM)
            try FileManager.default.copyItem(atPath: directory + "/\(node.name)/tenants/globex", toPath: copies + "/\(node.name)")
        }
        try cluster.startBoth()
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "streaming from the primary"))
        let dropped = try await accounts.request(.DELETE, "/admin/tenants/globex")
        XCTAssertEqual(dropped.status, 200, dropped.text)
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "tenant dropped: its files are deleted on this node"))
        for node in [cluster.standby, cluster.primary] {
            cluster.kill(node, signal: SIGTERM)
            try FileManager.default.copyItem(atPath: copies + "/\(node.name)", toPath: directory + "/\(node.name)/tenants/globex")
        }
        try cluster.start(cluster.primary)
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory + "/\(cluster.primary.name)/tenants/globex"), "the primary deleted them as it started")
        try cluster.start(cluster.standby)
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "streaming from the primary"))
        // A change to the accounts: the standby applies the system database, and finds the drop.
        try await accounts.createUser("hal", tenant: "acme", role: "reader", password: "hal-password-55555")
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "tenant dropped: its files are deleted on this node"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory + "/\(cluster.standby.name)/tenants/globex"), "the standby deleted them")
        for node in [cluster.primary, cluster.standby] {
            XCTAssertEqual(cluster.outputCount(of: node, containing: "tenant dropped: its files are deleted on this node"), 1, node.name)
        }
        let report = try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", cluster.primary.apiPort), standby: ("127.0.0.1", cluster.standby.apiPort), waitMs: 20_000)
        XCTAssertTrue(report.consistent && !report.text.contains("globex"), report.text)
    }

    /// A drop that cannot commit (the sync standby is down) is refused as not executed, and the
    /// tenant, whose writer was stopped for it, is opened again and serves on; with the standby
    /// back, the same drop goes through.
    func testADropThatCannotCommitLeavesTheTenantServing() async throws {
        let wrote = try await send(.POST, "/db/execute", as: "gina", body: #"["CREATE TABLE t (x)", "INSERT INTO t VALUES ('kept')"]"#)
        XCTAssertEqual(wrote.status, 200, wrote.text)
        cluster.kill(cluster.standby)
        let refused = try await accounts.request(.DELETE, "/admin/tenants/globex")
        XCTAssertEqual(refused.status, 503, refused.text)
        XCTAssertTrue(refused.text.contains("not_executed"), refused.text)
        XCTAssertTrue(FileManager.default.fileExists(atPath: directory + "/\(cluster.primary.name)/tenants/globex"))
        let read = try await send(.GET, "/db/query?q=SELECT+x+FROM+t", as: "gina")
        XCTAssertEqual(read.status, 200, read.text)
        XCTAssertTrue(read.text.contains("kept"), "the tenant serves on after the drop failed: \(read.text)")
        try cluster.start(cluster.standby)
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "streaming from the primary"))
        let dropped = try await accounts.request(.DELETE, "/admin/tenants/globex")
        XCTAssertEqual(dropped.status, 200, dropped.text)
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory + "/\(cluster.primary.name)/tenants/globex"))
    }

    /// A drop whose commit ends "outcome unknown" (the standby took the record and went silent)
    /// may have reached the standby, which would delete the tenant if promoted: the tenant
    /// stays closed, each request told why (409), never opened again to take writes that such
    /// a promotion would lose. Dropped again with the standby back, it is gone from both nodes.
    func testADropOfUnknownOutcomeKeepsTheTenantClosedUntilDroppedAgain() async throws {
        let wrote = try await send(.POST, "/db/execute", as: "gina", body: #"["CREATE TABLE t (x)", "INSERT INTO t VALUES ('kept')"]"#)
        XCTAssertEqual(wrote.status, 200, wrote.text)
        let standbyPid = try XCTUnwrap(cluster.processID(of: cluster.standby))
        kill(standbyPid, SIGSTOP)
        var paused = true
        defer { if paused { kill(standbyPid, SIGCONT) } }
        // Sent, never confirmed: the primary gives the silent standby up and cannot tell.
        let unknown = try await accounts.request(.DELETE, "/admin/tenants/globex")
        XCTAssertEqual(unknown.status, 500, unknown.text)
        XCTAssertTrue(unknown.text.contains("outcome_unknown"), unknown.text)
        kill(standbyPid, SIGCONT)
        paused = false
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "streaming from the primary", times: 2))

        // With the standby back, the tenant still serves nothing: not reads, not writes.
        for (method, path, body) in [(HTTPMethod.GET, "/db/query?q=SELECT+x+FROM+t", nil), (.POST, "/db/execute", #"["INSERT INTO t VALUES ('lost?')"]"#)] {
            let refused = try await send(method, path, as: "gina", body: body)
            XCTAssertEqual(refused.status, 409, refused.text)
            XCTAssertTrue(refused.text.contains("drop it again") || refused.text.contains("drops it again"), refused.text)
        }
        let other = try await send(.POST, "/db/execute", as: "alice", body: #"["CREATE TABLE t (x)"]"#)
        XCTAssertEqual(other.status, 200, "another tenant serves on: \(other.text)")
        let status = try await accounts.request(.GET, "/status")
        XCTAssertTrue(status.text.contains(#""undecidedDrops":["globex"]"#), "operators see the closed tenant: \(status.text)")
        let again = try await accounts.request(.POST, "/admin/tenants", json: ["name": "globex"])
        XCTAssertEqual(again.status, 409, "a tenant being dropped is not created again: \(again.text)")

        let dropped = try await accounts.request(.DELETE, "/admin/tenants/globex")
        XCTAssertEqual(dropped.status, 200, dropped.text)
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory + "/\(cluster.primary.name)/tenants/globex"))
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "tenant dropped: its files are deleted on this node"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory + "/\(cluster.standby.name)/tenants/globex"))
        let gone = try await send(.GET, "/db/query?q=SELECT+1", as: "gina")
        XCTAssertEqual(gone.status, 401, "the dropped tenant's users are gone: \(gone.text)")
        let after = try await accounts.request(.GET, "/status")
        XCTAssertFalse(after.text.contains("undecidedDrops"), after.text)
    }

    /// A tenant dropped while its writes keep coming: each write is answered (applied before
    /// the drop, or refused after it), the node stays up, the standby deletes the tenant too
    /// and replicates on, and promoted it serves without it.
    func testATenantDroppedUnderWritesIsDeletedAndAPromotedStandbyDeletesItToo() async throws {
        let made = try await send(.POST, "/db/execute", as: "gina", body: #"["CREATE TABLE t (x)"]"#)
        XCTAssertEqual(made.status, 200, made.text)
        let port = cluster.primary.apiPort, ca = cluster.certificates + "/ca.pem", password = Self.passwords["gina"]!
        // The writer says when 20 of its writes are in: the drop comes while it goes on (counted, not timed).
        let (twentyIn, twentyInSignal) = AsyncStream<Void>.makeStream()
        let writer = Task { () -> [Int] in
            let c = try await APIClient(port: port, caPath: ca, asOperator: false).connect()
            defer { Task { await c.close() } }
            var statuses: [Int] = []
            // Until the drop turns it away: 401 (gina is gone with her tenant) or 404/503 in between.
            while statuses.last.map({ $0 == 200 }) ?? true, statuses.count < 100_000 {
                let r = try await c.request(.POST, "/db/execute", headers: [("Authorization", AccountsClient.basicAuthorization(user: "gina", password: password))],
                                            body: Array(#"["INSERT INTO t VALUES (1)"]"#.utf8))
                statuses.append(r.status)
                if statuses.count == 20 { twentyInSignal.yield() }
            }
            twentyInSignal.finish()
            return statuses
        }
        for await _ in twentyIn { break }
        let dropped = try await accounts.request(.DELETE, "/admin/tenants/globex")
        XCTAssertEqual(dropped.status, 200, dropped.text)
        let statuses = try await writer.value
        XCTAssertTrue(Set(statuses.dropLast()).isSubset(of: [200]), "\(Set(statuses))")
        XCTAssertTrue([401, 404, 503].contains(statuses.last ?? 0), "the write after the drop: \(statuses.last ?? 0)")
        XCTAssertTrue(cluster.isRunning(cluster.primary))
        let acme = try await send(.POST, "/db/execute", as: "alice", body: #"["CREATE TABLE t (x)"]"#)
        XCTAssertEqual(acme.status, 200, "another tenant commits with the standby after the drop: \(acme.text)")

        let standbyFiles = directory + "/\(cluster.standby.name)/tenants/globex"
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "tenant dropped: its files are deleted on this node"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: standbyFiles), "the standby deleted globex's files")
        cluster.kill(cluster.primary)
        let promoted = try cluster.promoteWithCtl(cluster.standby)
        XCTAssertEqual(promoted.status, 0, promoted.output)
        let read = try await send(.GET, "/db/query?q=SELECT+count(*)+FROM+t", as: "alice", port: cluster.standby.apiPort)
        XCTAssertEqual(read.status, 200, read.text)
        let list = try await AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.standby.apiPort)
            .request(.GET, "/admin/tenants")
        XCTAssertFalse(list.text.contains("globex"), list.text)
    }

    /// Bearer tokens: made by an operator (or the tenant's admin) for a user, shown once; a
    /// client that sends one acts as that user in that user's tenant; a wrong, malformed,
    /// revoked or dropped tenant's token is 401; a token outlives a failover like any account.
    func testBearerTokensSignInAsTheirUserUntilRevoked() async throws {
        let made = try await accounts.createToken(user: "alice", tenant: "acme")
        XCTAssertTrue(made.token.hasPrefix("apiary_" + made.id + "_"), made.token)
        let bearer = [("Authorization", "Bearer " + made.token)]
        let write = try await send(.POST, "/db/execute", headers: bearer, body: #"["CREATE TABLE t (x)", "INSERT INTO t VALUES ('by-token')"]"#)
        XCTAssertEqual(write.status, 200, write.text)
        let read = try await send(.GET, "/db/query?q=SELECT+x+FROM+t", headers: bearer)
        XCTAssertTrue(read.text.contains("by-token"), read.text)
        let otherTenant = try await send(.GET, "/db/query?q=SELECT+1", headers: bearer + [("X-Apiary-Tenant", "globex")])
        XCTAssertEqual(otherTenant.status, 403, otherTenant.text)

        // A reader's token reads only; a tenant's admin makes tokens for its own users only.
        let adminMade = try await send(.POST, "/admin/tenants/acme/users/bob/tokens", as: "ann", body: #"{"ttl_seconds": 3600}"#)
        XCTAssertEqual(adminMade.status, 201, adminMade.text)
        let bobToken = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(adminMade.body)) as? [String: Any])?["token"] as? String)
        let bobWrites = try await send(.POST, "/db/execute", headers: [("Authorization", "Bearer " + bobToken)], body: #"["INSERT INTO t VALUES (1)"]"#)
        XCTAssertEqual(bobWrites.status, 403, bobWrites.text)
        let crossTenant = try await send(.POST, "/admin/tenants/globex/users/gina/tokens", as: "ann", body: "{}")
        XCTAssertEqual(crossTenant.status, 403, crossTenant.text)
        let writerMakes = try await send(.POST, "/admin/tenants/acme/users/alice/tokens", as: "alice", body: "{}")
        XCTAssertEqual(writerMakes.status, 403, writerMakes.text)
        let noSuchUser = try await accounts.request(.POST, "/admin/tenants/acme/users/gina/tokens", jsonObject: [:])
        XCTAssertEqual(noSuchUser.status, 404, noSuchUser.text)
        let tooLong = try await accounts.request(.POST, "/admin/tenants/acme/users/alice/tokens", jsonObject: ["ttl_seconds": 400 * 86_400])
        XCTAssertEqual(tooLong.status, 400, tooLong.text)
        // A token does not make tokens (nor users), even an admin's: a leaked one must not mint more.
        let annToken = try await accounts.createToken(user: "ann", tenant: "acme")
        let minted = try await send(.POST, "/admin/tenants/acme/users/alice/tokens", headers: [("Authorization", "Bearer " + annToken.token)], body: "{}")
        XCTAssertEqual(minted.status, 403, minted.text)
        // Listing names ids and expiry, never a token; another tenant's admin neither lists nor revokes.
        let listed = try await send(.GET, "/admin/tenants/acme/users/alice/tokens", as: "ann")
        XCTAssertEqual(listed.status, 200, listed.text)
        XCTAssertTrue(listed.text.contains(made.id) && !listed.text.contains(made.token), listed.text)
        try await accounts.createUser("gus", tenant: "globex", role: "admin", password: "gus-password-12345")
        let foreignRevoke = try await send(.DELETE, "/admin/tenants/globex/tokens/\(made.id)", as: "gus", password: "gus-password-12345")
        XCTAssertEqual(foreignRevoke.status, 404, "not globex's token: \(foreignRevoke.text)")
        let foreignList = try await send(.GET, "/admin/tenants/acme/users/alice/tokens", as: "gus", password: "gus-password-12345")
        XCTAssertEqual(foreignList.status, 403, foreignList.text)
        // A user has a bounded number of tokens.
        var capped: HTTPSConnection.Response?
        for _ in 0..<25 {
            let r = try await accounts.request(.POST, "/admin/tenants/acme/users/bob/tokens", jsonObject: [:])
            if r.status != 201 { capped = r; break }
        }
        XCTAssertEqual(capped?.status, 409, capped?.text ?? "25 tokens made for one user")

        // Wrong secret, malformed, unknown id: 401, and the answer echoes nothing.
        let wrongSecret = String(made.token.dropLast(4)) + "AAAA"
        for bad in [wrongSecret, "apiary_0123456789abcdef_" + String(repeating: "A", count: 43), "not-a-token"] {
            let r = try await send(.GET, "/db/query?q=SELECT+1", headers: [("Authorization", "Bearer " + bad)])
            XCTAssertEqual(r.status, 401, "\(bad): \(r.text)")
            XCTAssertFalse(r.text.contains(bad), r.text)
        }

        // Revoked: refused at once (the node's cache of verified credentials is cleared).
        let revoked = try await accounts.request(.DELETE, "/admin/tenants/acme/tokens/\(made.id)")
        XCTAssertEqual(revoked.status, 200, revoked.text)
        let afterRevoke = try await send(.GET, "/db/query?q=SELECT+1", headers: bearer)
        XCTAssertEqual(afterRevoke.status, 401, afterRevoke.text)
        let revokedTwice = try await accounts.request(.DELETE, "/admin/tenants/acme/tokens/\(made.id)")
        XCTAssertEqual(revokedTwice.status, 404, revokedTwice.text)

        // A dropped tenant's tokens die with it.
        let ginaToken = try await accounts.createToken(user: "gina", tenant: "globex")
        let ginaReads = try await send(.GET, "/db/query?q=SELECT+1", headers: [("Authorization", "Bearer " + ginaToken.token)])
        XCTAssertEqual(ginaReads.status, 200, ginaReads.text)
        _ = try await accounts.request(.DELETE, "/admin/tenants/globex")
        let ginaAfter = try await send(.GET, "/db/query?q=SELECT+1", headers: [("Authorization", "Bearer " + ginaToken.token)])
        XCTAssertEqual(ginaAfter.status, 401, ginaAfter.text)

        // Replicated like every account: the token works on the promoted standby.
        let kept = try await accounts.createToken(user: "alice", tenant: "acme")
        cluster.kill(cluster.primary)
        let promoted = try cluster.promoteWithCtl(cluster.standby)
        XCTAssertEqual(promoted.status, 0, promoted.output)
        let onNewPrimary = try await send(.GET, "/db/query?q=SELECT+x+FROM+t", headers: [("Authorization", "Bearer " + kept.token)], port: cluster.standby.apiPort)
        XCTAssertEqual(onNewPrimary.status, 200, onNewPrimary.text)
        XCTAssertTrue(onNewPrimary.text.contains("by-token"), onNewPrimary.text)
    }

    /// Accounts live in the replicated system database: after a failover the same credentials
    /// work on the new primary.
    func testAccountsSurviveAFailover() async throws {
        let write = try await send(.POST, "/db/execute", as: "alice", body: #"["CREATE TABLE t (x)", "INSERT INTO t VALUES (1)"]"#)
        XCTAssertEqual(write.status, 200, write.text)
        cluster.kill(cluster.primary)
        let promoted = try cluster.promoteWithCtl(cluster.standby)
        XCTAssertEqual(promoted.status, 0, promoted.output)
        let read = try await send(.GET, "/db/query?q=SELECT+count(*)+FROM+t", as: "alice", port: cluster.standby.apiPort)
        XCTAssertEqual(read.status, 200, read.text)
        XCTAssertTrue(read.text.contains("[[1]]"), read.text)
        let wrong = try await send(.GET, "/db/query?q=SELECT+1", as: "alice", password: "not-alices-password", port: cluster.standby.apiPort)
        XCTAssertEqual(wrong.status, 401, wrong.text)
    }
}

/// A node holds a bounded number of tenants (invariant 8): past it, creating one is refused
/// with a clear error. Only the admin API creates one: a write to a tenant that does not exist
/// is 404, even an operator's.
final class TenantLimitTests: XCTestCase {
    func testTenantsPastTheNodesLimitAreRefused() async throws {
        let directory = NSTemporaryDirectory() + "apiary-tenant-limit-" + UUID().uuidString
        let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                                   primaryArguments: ["--mode", "single", "--tenants-max", "2"])
        defer {
            cluster.stopAll()
            try? FileManager.default.removeItem(atPath: directory)
        }
        try cluster.prepareCertificates()
        try cluster.start(cluster.primary)
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.primary.apiPort)
        try await accounts.createTenant("one")
        // Users live in the system database, which does not count as a tenant.
        try await accounts.createUser("uno", tenant: "one", role: "writer", password: "uno-password-1")
        try await accounts.createTenant("two")
        let third = try await accounts.request(.POST, "/admin/tenants", json: ["name": "three"])
        XCTAssertEqual(third.status, 507, third.text)
        XCTAssertTrue(third.text.contains("maximum of 2 tenants"), third.text)
        let c = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        // A write, even an operator's, never makes a tenant: a mistyped name is an error.
        let write = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "four")], body: Array(#"["CREATE TABLE t (x)"]"#.utf8))
        XCTAssertEqual(write.status, 404, write.text)
        XCTAssertTrue(write.text.contains("no such tenant four: create it first"), write.text)
        let listed = try await accounts.request(.GET, "/admin/tenants")
        XCTAssertFalse(listed.text.contains("four"), listed.text)
        let existing = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "two")], body: Array(#"["CREATE TABLE t (x)"]"#.utf8))
        XCTAssertEqual(existing.status, 200, existing.text)
        await c.close()
    }
}
