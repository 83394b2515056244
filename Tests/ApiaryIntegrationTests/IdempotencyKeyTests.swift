import ApiaryNode
import Foundation
import NIOHTTP1
import XCTest

/// A write that carries an `Idempotency-Key` applies once however often it is sent, also when
/// the primary dies between the tries and the retry reaches the promoted standby.
final class IdempotencyKeyTests: XCTestCase {
    /// A key sent again with another request is refused with 422 and a stable code, and nothing
    /// runs (a client reusing keys would otherwise get old answers for new work).
    func testAKeyReusedForAnotherRequestGets422() async throws {
        let (_, _, api) = try startSinglePrimary("idem-reuse")
        let c = try await api.connect()
        defer { Task { await c.close() } }
        let headers = [("X-Apiary-Tenant", "acme"), ("Idempotency-Key", "k-1")]
        try await createTenant("acme", on: c)
        let created = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: Array(#"["CREATE TABLE t (v TEXT)"]"#.utf8))
        XCTAssertEqual(created.status, 200, created.text)
        let first = try await c.request(.POST, "/db/execute", headers: headers, body: Array(#"[["INSERT INTO t VALUES(?)", "a"]]"#.utf8))
        XCTAssertEqual(first.status, 200, first.text)
        let reused = try await c.request(.POST, "/db/execute", headers: headers, body: Array(#"[["INSERT INTO t VALUES(?)", "b"]]"#.utf8))
        XCTAssertEqual(reused.status, 422, reused.text)
        XCTAssertTrue(reused.text.contains("\"code\":\"idempotency_key_reused\"") && reused.text.contains("\"retry_safe\":false"), reused.text)
        let rows = try await c.request(.GET, "/db/query?q=SELECT%20v%20FROM%20t", headers: [("X-Apiary-Tenant", "acme")])
        XCTAssertTrue(rows.text.contains("\"a\"") && !rows.text.contains("\"b\""), rows.text)
    }

    func testTheSameKeyAppliesOnceAlsoAcrossAFailover() async throws {
        let directory = NSTemporaryDirectory() + "apiary-idem-" + UUID().uuidString
        let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort())
        defer {
            cluster.stopAll()
            try? FileManager.default.removeItem(atPath: directory)
        }
        try cluster.startBoth()
        try await cluster.createTenant("acme")
        func send(_ port: Int, _ body: String, key: String? = nil) async throws -> HTTPSConnection.Response {
            let c = try await APIClient(port: port, caPath: cluster.certificates + "/ca.pem").connect()
            defer { Task { await c.close() } }
            var headers = [("X-Apiary-Tenant", "acme")]
            if let key { headers.append(("Idempotency-Key", key)) }
            return try await c.request(.POST, "/db/execute", headers: headers, body: Array(body.utf8))
        }
        func results(_ response: HTTPSConnection.Response) throws -> String {
            let object = try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]
            let results = try XCTUnwrap(object?["results"], response.text)
            return String(decoding: try JSONSerialization.data(withJSONObject: results, options: [.sortedKeys]), as: UTF8.self)
        }
        let primary = cluster.primary.apiPort, standby = cluster.standby.apiPort
        let created = try await send(primary, #"["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"]"#)
        XCTAssertEqual(created.status, 200, created.text)

        let insert = #"[["INSERT INTO t (v) VALUES (?)", "once"]]"#
        let first = try await send(primary, insert, key: "order-17")
        XCTAssertEqual(first.status, 200, first.text)
        let again = try await send(primary, insert, key: "order-17")
        XCTAssertEqual(try results(again), try results(first), "a retry must get the first answer")
        let firstResults = try results(first)
        XCTAssertTrue(firstResults.contains("\"last_insert_id\":1"), firstResults)

        // The primary dies; the retry goes to the promoted standby, which holds the key with the write.
        cluster.kill(cluster.primary)
        let promoted = try cluster.promoteWithCtl(cluster.standby)
        XCTAssertEqual(promoted.status, 0, promoted.output)
        let afterFailover = try await send(standby, insert, key: "order-17")
        XCTAssertEqual(afterFailover.status, 200, afterFailover.text)
        XCTAssertEqual(try results(afterFailover), try results(first), "the key must survive the failover")
        let c = try await APIClient(port: standby, caPath: cluster.certificates + "/ca.pem").connect()
        let count = try await c.request(.GET, "/db/query?q=SELECT+count(*)+FROM+t", headers: [("X-Apiary-Tenant", "acme")])
        XCTAssertTrue(count.text.contains("[[1]]"), "applied more than once: \(count.text)")
        await c.close()

        let bad = try await send(standby, insert, key: String(repeating: "k", count: 300))
        XCTAssertEqual(bad.status, 400, bad.text)
    }
}
