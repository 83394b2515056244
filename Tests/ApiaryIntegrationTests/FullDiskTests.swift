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
