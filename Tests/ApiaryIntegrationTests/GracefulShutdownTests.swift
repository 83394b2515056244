import ApiaryNode
import Foundation
import XCTest

/// SIGTERM (systemd's stop, `apiary up`'s Ctrl-C): the node stops accepting, ends its client
/// connections, exits promptly, and comes back with every acknowledged write.
final class GracefulShutdownTests: XCTestCase {
    func testSIGTERMStopsTheNodePromptlyAndLosesNothing() async throws {
        let (cluster, directory, api) = try startSinglePrimary("sigterm")
        let c = try await api.connect()
        try await createTenant("acme", on: c)
        try await executeEach(["CREATE TABLE kv (id INTEGER PRIMARY KEY)"] + (0..<20).map { "INSERT INTO kv VALUES (\($0))" }, tenant: "acme", on: c)

        let started = Date()
        cluster.kill(cluster.primary, signal: SIGTERM) // waits for the exit
        XCTAssertLessThan(Date().timeIntervalSince(started), 8, "a graceful stop must not hang")
        let log = try String(contentsOfFile: directory + "/logs/node-a.log", encoding: .utf8)
        XCTAssertTrue(log.contains("shutting down"), log)
        let closed = await waitUntil(seconds: 5) { !c.isOpen }
        XCTAssertTrue(closed, "the keep-alive connection outlived the node")

        try cluster.start(cluster.primary)
        let again = try await api.connect()
        let r = try await again.request(.GET, "/db/query?q=SELECT+count(*)+FROM+kv&level=none", headers: [("X-Apiary-Tenant", "acme")])
        XCTAssertEqual(r.status, 200, r.text)
        XCTAssertTrue(r.text.contains("[[20]]"), r.text)
        await again.close()
    }

    private func waitUntil(seconds: Double, _ condition: () -> Bool) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if condition() { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return condition()
    }
}
