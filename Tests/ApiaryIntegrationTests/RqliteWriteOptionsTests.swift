import ApiaryCore
import ApiaryNode
import Foundation
import NIOHTTP1
import XCTest

/// rqlite's write options on real nodes: queued writes (answered at once with growing sequence
/// numbers, written and replicated in order, kept while the standby is away) and `raft_index`.
final class RqliteWriteOptionsTests: XCTestCase {
    /// `?raft_index`: the position of the request's commit in its tenant's log, one more for
    /// each commit; none for a read, for a request without the flag, or for an idempotent
    /// replay (which committed nothing now).
    func testRaftIndexIsTheCommitsPositionInTheTenantsLog() async throws {
        let (_, _, api) = try startSinglePrimary("raft-index")
        let c = try await api.connect()
        defer { Task { await c.close() } }
        try await createTenant("acme", on: c)
        func send(_ method: HTTPMethod, _ target: String, _ body: String = "", key: String? = nil) async throws -> (index: UInt64?, text: String) {
            var headers = [("X-Apiary-Tenant", "acme")]
            if let key { headers.append(("Idempotency-Key", key)) }
            let response = try await c.request(method, target, headers: headers, body: Array(body.utf8))
            XCTAssertEqual(response.status, 200, response.text)
            let object = try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]
            return ((object?["raft_index"] as? NSNumber)?.uint64Value, response.text)
        }
        let created = try await send(.POST, "/db/execute?raft_index", #"["CREATE TABLE t (v INTEGER)"]"#)
        // rqlite's version header, on every answer, refusals too (the server's own malformed-HTTP
        // answer carries it as well: GatewayBadInputTests, through the same server).
        let versioned = try await c.request(.GET, "/db/query?q=SELECT+1", headers: [("X-Apiary-Tenant", "acme")])
        XCTAssertEqual(versioned.header(ApiaryVersion.rqliteHeader), ApiaryVersion.rqliteHeaderValue)
        let refused = try await c.request(.GET, "/no/such/endpoint", headers: [("X-Apiary-Tenant", "acme")])
        XCTAssertEqual(refused.status, 404, refused.text)
        XCTAssertEqual(refused.header(ApiaryVersion.rqliteHeader), ApiaryVersion.rqliteHeaderValue, refused.text)
        let first = try XCTUnwrap(created.index, created.text)
        let inserted = try await send(.POST, "/db/execute?raft_index", #"["INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (2)"]"#)
        XCTAssertEqual(inserted.index, first + 1, inserted.text)
        let unflagged = try await send(.POST, "/db/execute", #"["INSERT INTO t VALUES (3)"]"#)
        XCTAssertNil(unflagged.index, unflagged.text)
        let read = try await send(.GET, "/db/query?raft_index&q=SELECT+count(*)+FROM+t")
        XCTAssertNil(read.index, "a read commits nothing: \(read.text)")
        let unified = try await send(.POST, "/db/request?raft_index", #"["INSERT INTO t VALUES (4)", "SELECT count(*) FROM t"]"#)
        XCTAssertEqual(unified.index, first + 3, unified.text)
        let keyed = try await send(.POST, "/db/execute?raft_index", #"["INSERT INTO t VALUES (5)"]"#, key: "k-5")
        XCTAssertEqual(keyed.index, first + 4, keyed.text)
        let replayed = try await send(.POST, "/db/execute?raft_index", #"["INSERT INTO t VALUES (5)"]"#, key: "k-5")
        XCTAssertNil(replayed.index, "a replay commits nothing now: \(replayed.text)")
        let failed = try await send(.POST, "/db/execute?raft_index", #"["INSERT INTO missing VALUES (1)"]"#)
        XCTAssertNil(failed.index, failed.text)
    }

    func testQueuedWritesAreWrittenInOrderAndWaitThroughAStandbyRestart() async throws {
        let directory = NSTemporaryDirectory() + "apiary-queue-" + UUID().uuidString
        let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort())
        defer {
            cluster.stopAll()
            try? FileManager.default.removeItem(atPath: directory)
        }
        try cluster.startBoth()
        try await cluster.createTenant("acme")
        let c = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        defer { Task { await c.close() } }
        let tenant = [("X-Apiary-Tenant", "acme")]
        func send(_ query: String, _ body: String) async throws -> (status: Int, sequenceNumber: UInt64?, text: String) {
            let response = try await c.request(.POST, "/db/execute" + query, headers: tenant, body: Array(body.utf8))
            let object = try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]
            return (response.status, (object?["sequence_number"] as? NSNumber)?.uint64Value, response.text)
        }
        let created = try await send("", #"["CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)"]"#)
        XCTAssertEqual(created.status, 200, created.text)

        var numbers: [UInt64] = []
        for v in 1...20 {
            let queued = try await send("?queue", #"[["INSERT INTO t (v) VALUES (?)", \#(v)]]"#)
            XCTAssertEqual(queued.status, 200, queued.text)
            XCTAssertTrue(queued.text.contains(#""results":[]"#), queued.text)
            numbers.append(try XCTUnwrap(queued.sequenceNumber, queued.text))
        }
        XCTAssertEqual(numbers, numbers.sorted(), "sequence numbers grow")
        XCTAssertEqual(Set(numbers).count, numbers.count)
        // A statement that fails inside a batch is not told (as rqlite) and fails nothing else.
        let failing = try await send("?queue", #"["INSERT INTO missing VALUES (1)"]"#)
        XCTAssertEqual(failing.status, 200, failing.text)
        let waited = try await send("?queue&wait", #"[["INSERT INTO t (v) VALUES (?)", 21]]"#)
        XCTAssertEqual(waited.status, 200, waited.text)
        XCTAssertGreaterThan(try XCTUnwrap(waited.sequenceNumber), numbers.last!)
        let rows = try await c.request(.GET, "/db/query?q=SELECT+group_concat(v)+FROM+(SELECT+v+FROM+t+ORDER+BY+id)", headers: tenant)
        XCTAssertTrue(rows.text.contains(#"[["\#((1...21).map(String.init).joined(separator: ","))"]]"#), "written in the order queued: \(rows.text)")

        // The standby goes away: a queued write is still answered at once, and written once
        // the standby is back (the primary cannot commit without it).
        try await cluster.createTenant("probe")
        cluster.kill(cluster.standby)
        // Queue nothing of acme's before the primary knows the standby is gone: a commit it
        // sent into the dying connection would end "outcome unknown" (rolled back, never sent
        // again) and the count below would be one short. Another tenant's write says when:
        // refused "not executed" once the primary has seen the connection close.
        var probes = 0
        while true {
            probes += 1
            let probe = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "probe")], body: Array(#"["CREATE TABLE IF NOT EXISTS p (x)"]"#.utf8))
            if probe.status == 503, probe.text.contains("not_executed") { break }
            XCTAssertLessThan(probes, 10_000, "the primary never noticed the standby was gone: \(probe.status) \(probe.text)")
            if probes >= 10_000 { return }
        }
        let whileAway = try await send("?queue", #"[["INSERT INTO t (v) VALUES (?)", 22]]"#)
        XCTAssertEqual(whileAway.status, 200, whileAway.text)
        try cluster.start(cluster.standby)
        let after = try await send("?queue&wait", #"[["INSERT INTO t (v) VALUES (?)", 23]]"#)
        XCTAssertEqual(after.status, 200, after.text)
        let count = try await c.request(.GET, "/db/query?q=SELECT+count(*),+sum(v)+FROM+t", headers: tenant)
        XCTAssertTrue(count.text.contains("[[23,276]]"), "each queued write once: \(count.text)")

        // Queued writes replicate like any other: the promoted standby has them all.
        cluster.kill(cluster.primary)
        let promoted = try cluster.promoteWithCtl(cluster.standby)
        XCTAssertEqual(promoted.status, 0, promoted.output)
        let s = try await APIClient(port: cluster.standby.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        let onStandby = try await s.request(.GET, "/db/query?q=SELECT+count(*),+sum(v)+FROM+t", headers: tenant)
        await s.close()
        XCTAssertTrue(onStandby.text.contains("[[23,276]]"), onStandby.text)
    }
}
