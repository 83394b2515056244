import ApiaryChaos
import ApiaryNode
import ApiaryStorage
import Foundation
import XCTest

/// The primary's disk fills up: writes are refused with a clear error, nothing refused is
/// applied anywhere, nothing acknowledged is lost, and the replicas stay identical.
final class FullDiskTests: XCTestCase {
    func testPrimaryWithAFullDiskRefusesWritesClearlyAndLosesNothing() async throws {
        let directory = NSTemporaryDirectory() + "apiary-full-" + UUID().uuidString
        let primaryData = directory + "/node-a"
        try FileManager.default.createDirectory(atPath: primaryData, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        guard run("/bin/mount", ["-t", "tmpfs", "-o", "size=3m", "tmpfs", primaryData]) == 0 else {
            throw XCTSkip("mounting a small tmpfs needs root (CI runs as root)")
        }
        defer { _ = run("/bin/umount", ["-l", primaryData]) }

        let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort())
        defer { cluster.stopAll() }
        try cluster.startBoth()
        let c = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        try await createTenant("acme", on: c)
        let create = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: Array(#"["CREATE TABLE kv (id INTEGER PRIMARY KEY, payload BLOB)"]"#.utf8))
        XCTAssertEqual(create.status, 200, create.text)

        var acked: [Int] = []
        var refusal: HTTPSConnection.Response?
        for id in 0..<5_000 {
            let r = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")],
                                        body: Array("[[\"INSERT INTO kv VALUES (?, randomblob(4000))\", \(id)]]".utf8))
            if r.status == 200 && !r.text.contains("\"error\"") {
                acked.append(id)
            } else {
                refusal = r
                break
            }
        }
        let refused = try XCTUnwrap(refusal, "3 MiB must fill up within 5,000 inserts of 4 KB")
        XCTAssertTrue(refused.status == 503 || refused.status == 200, "not applied, or a statement error: \(refused.status) \(refused.text)")
        XCTAssertTrue(refused.text.lowercased().contains("full") || refused.text.contains("No space"), "the error says the disk is full: \(refused.text)")
        XCTAssertGreaterThan(acked.count, 10)

        // Still serving, still consistent, every acknowledged write on both nodes.
        let count = try await c.request(.GET, "/db/query?q=SELECT%20count(*)%20FROM%20kv", headers: [("X-Apiary-Tenant", "acme")])
        XCTAssertEqual(count.status, 200, count.text)
        XCTAssertTrue(count.text.contains("[[\(acked.count)]]"), "primary holds exactly the acknowledged rows: \(count.text)")
        await c.close()
        let report = try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", cluster.primary.apiPort), standby: ("127.0.0.1", cluster.standby.apiPort), waitMs: 20_000)
        XCTAssertTrue(report.consistent, report.text)
        cluster.stopAll()
        let standbyRows = try DatabaseFile.query(copyOf: directory + "/node-b/tenants/acme/db.sqlite", "SELECT count(*) FROM kv")
        XCTAssertEqual(standbyRows, [[.integer(Int64(acked.count))]])
    }

    private func run(_ tool: String, _ arguments: [String]) -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = arguments
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return -1 }
        p.waitUntilExit()
        return p.terminationStatus
    }
}

/// The standby's disk fills up under writes: it stops replicating (nothing it could not make
/// durable is acknowledged), the monitor lets the primary commit alone, and once there is room
/// again the standby resumes by itself from what is durable, catches up, and is in sync and
/// promotable, with identical replicas. (Found by the chaos runner's `fill_disk`: the standby
/// stopped for good, until an operator restarted it.)
final class StandbyFullDiskTests: NodeProcessTestCase {
    func testAStandbyWhoseDiskFillsResumesByItselfOnceThereIsRoom() async throws {
        guard geteuid() == 0 else { throw XCTSkip("mounting a small tmpfs needs root (CI runs as root)") }
        directory = NSTemporaryDirectory() + "apiary-standby-full-" + UUID().uuidString
        let disk = try SmallDisk(path: directory + "/node-b", bytes: 64 << 20)
        defer { disk.unmount() }
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               monitorArguments: ["--tick-interval-ms", "20"])
        try cluster.startBoth()
        let monitor = try await MonitorClient(cluster: cluster)
        try await monitor.waitUntil("in sync", timeoutSeconds: 60) { s in
            s.node("node-a")?.reported == "primary" && s.node("node-b")?.promotable == true
        }
        let c = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        defer { Task { await c.close() } }
        func insert(_ id: Int) async throws {
            let r = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")],
                                        body: Array("[[\"INSERT INTO kv VALUES (?, randomblob(2000))\", \(id)]]".utf8))
            XCTAssertEqual(r.status, 200, r.text)
            XCTAssertFalse(r.text.contains("\"error\""), r.text)
        }
        try await createTenant("acme", on: c)
        let create = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: Array(#"["CREATE TABLE kv (id INTEGER PRIMARY KEY, payload BLOB)"]"#.utf8))
        XCTAssertEqual(create.status, 200, create.text)
        for id in 0..<20 { try await insert(id) }

        try disk.fill()
        // Writes go on until the standby meets the full disk and the primary commits alone.
        var id = 20
        var alone = false
        while !alone, id < 20_000 {
            try await insert(id)
            id += 1
            if id % 20 == 0, let s = try? await monitor.status() {
                alone = s.node("node-a")?.reported == "wait_primary" && s.node("node-b")?.promotable == false
            }
        }
        XCTAssertTrue(alone, "the standby's full disk made the primary commit alone")
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "waiting for free space", timeoutSeconds: 30))
        for more in id..<(id + 20) { try await insert(more) }

        disk.free()
        XCTAssertTrue(cluster.waitForOutput(of: cluster.standby, containing: "restarting in place", timeoutSeconds: 30))
        try await monitor.waitUntil("the standby caught up and is promotable again", timeoutSeconds: 60) { s in
            s.node("node-a")?.reported == "primary" && s.node("node-b")?.reported == "secondary" && s.node("node-b")?.promotable == true
        }
        let report = try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", cluster.primary.apiPort), standby: ("127.0.0.1", cluster.standby.apiPort), waitMs: 20_000)
        XCTAssertTrue(report.consistent, report.text)
    }
}
