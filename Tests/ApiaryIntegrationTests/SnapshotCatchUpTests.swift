import ApiaryNode
import ApiaryStorage
import Foundation
import XCTest

/// A standby that falls further behind than the primary's log reaches is brought back by a
/// snapshot (real processes, small log segments and retention).
final class SnapshotCatchUpTests: XCTestCase {
    func testStandbyBeyondTheLogCatchesUpFromASnapshot() async throws {
        let directory = NSTemporaryDirectory() + "apiary-snap-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let smallLog = ["--log-segment-bytes-max", "65536", "--log-retained-bytes-max", "131072"]
        let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                                   primaryArguments: ["--mode", "wait-primary"] + smallLog, standbyArguments: smallLog)
        defer { cluster.stopAll() }
        try cluster.startBoth()
        let api = APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem")
        let c = try await api.connect()
        try await createTenant("acme", on: c)
        func write(_ sql: String) async throws {
            let r = try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: Array("[\"\(sql)\"]".utf8))
            XCTAssertEqual(r.status, 200, r.text)
        }
        try await write("CREATE TABLE kv (id INTEGER PRIMARY KEY, payload TEXT)")
        for i in 0..<20 { try await write("INSERT INTO kv VALUES (\(i), hex(randomblob(500)))") }

        cluster.kill(cluster.standby, signal: SIGKILL)
        // Far more than the primary keeps in its log (128 KiB): the standby's position is gone.
        for i in 20..<600 { try await write("INSERT INTO kv VALUES (\(i), hex(randomblob(500)))") }
        let segments = try FileManager.default.contentsOfDirectory(atPath: directory + "/node-a/tenants/acme/log")
        XCTAssertFalse(segments.contains("00000000000000000001.log"), "retention removed the oldest segment: \(segments)")

        try cluster.start(cluster.standby)
        let report = try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", cluster.primary.apiPort), standby: ("127.0.0.1", cluster.standby.apiPort), waitMs: 30_000)
        XCTAssertTrue(report.consistent, report.text)
        await c.close()
        cluster.stopAll()
        let rows = try DatabaseFile.query(copyOf: directory + "/node-b/tenants/acme/db.sqlite", "SELECT count(*) FROM kv")
        XCTAssertEqual(rows, [[.integer(600)]])
        let standbyLog = (try? String(contentsOfFile: directory + "/logs/node-b.log", encoding: .utf8)) ?? ""
        XCTAssertFalse(standbyLog.contains("stopped replicating"), standbyLog)
        XCTAssertTrue(standbyLog.contains("installed a snapshot"), "the standby caught up by snapshot, not by records")
    }
}
