import ApiaryNode
import ApiaryStorage
import Foundation
import XCTest

/// A standby stopped at any step of installing a snapshot starts again, catches up and matches
/// its primary (issue 8). Each test forces a snapshot (the standby is down while the primary
/// writes more than its small log keeps, as in `SnapshotCatchUpTests`), starts the standby with
/// the test seam armed at one step (`APIARY_TEST_EXIT_AT`, `TestExitPoint.swift`: `_exit` there,
/// page cache kept, as a `kill -9` would), and restarts it without the seam.
final class SnapshotInstallTests: NodeProcessTestCase {
    let tenant = [("X-Apiary-Tenant", "acme")]

    // MARK: - One test per step

    /// Before the marker: the install never happened; the scratch file is removed at start and
    /// the primary sends a new snapshot.
    func testAStandbyStoppedOnceTheSnapshotIsVerifiedRestarts() async throws {
        try await stopInstallingASnapshot(at: "snapshot-scratch-verified", restartSays: "removed the scratch file of an unfinished snapshot install",
                                      thenInstalls: 1)
    }

    /// From the marker on, the install is finished at start (rolled forward), and the standby
    /// catches up from the snapshot's lsn by records: no second snapshot.
    func testAStandbyStoppedOnceTheInstallMarkerIsDurableRestarts() async throws {
        try await stopInstallingASnapshot(at: "snapshot-marker-written", restartSays: "finished an interrupted snapshot install", thenInstalls: 0)
    }

    func testAStandbyStoppedOnceTheSnapshotReplacedTheDatabaseRestarts() async throws {
        try await stopInstallingASnapshot(at: "snapshot-renamed", restartSays: "finished an interrupted snapshot install", thenInstalls: 0)
    }

    func testAStandbyStoppedOnceItsLogIsResetRestarts() async throws {
        try await stopInstallingASnapshot(at: "snapshot-log-reset", restartSays: "finished an interrupted snapshot install", thenInstalls: 0)
    }

    func testAStandbyStoppedOnceItsAppliedStateIsWrittenRestarts() async throws {
        try await stopInstallingASnapshot(at: "snapshot-applied-written", restartSays: "finished an interrupted snapshot install", thenInstalls: 0)
    }

    // MARK: - The scenario

    var standbyTenantDirectory: String { directory + "/node-b/tenants/acme" }

    /// - Parameter installs: how many snapshots the restarted standby installs.
    func stopInstallingASnapshot(at point: String, restartSays expected: String, thenInstalls installs: Int,
                                 file: StaticString = #filePath, line: UInt = #line) async throws {
        directory = NSTemporaryDirectory() + "apiary-snapinstall-" + UUID().uuidString
        let smallLog = ["--log-segment-bytes-max", "65536", "--log-retained-bytes-max", "131072"]
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               primaryArguments: ["--mode", "wait-primary"] + smallLog, standbyArguments: smallLog)
        try cluster.startBoth()
        let c = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        try await createTenant("acme", on: c)
        func write(_ sql: String) async throws {
            let r = try await c.request(.POST, "/db/execute", headers: tenant, body: Array("[\"\(sql)\"]".utf8))
            XCTAssertEqual(r.status, 200, r.text, file: file, line: line)
        }
        // lsn 1 bootstrap, 2 the table, 3...7 rows the standby receives.
        try await write("CREATE TABLE kv (id INTEGER PRIMARY KEY, payload BLOB)")
        for i in 0..<5 { try await write("INSERT INTO kv VALUES (\(i), randomblob(1000))") }
        // The standby's database holds them (the install replaces a real state, not an empty file).
        let before = try await verify()
        XCTAssertTrue(before.consistent, before.text, file: file, line: line)
        cluster.kill(cluster.standby, signal: SIGKILL)
        // ~40 KiB a record, ten of them: far more than the primary's log keeps (128 KiB).
        for i in 5..<15 { try await write("INSERT INTO kv VALUES (\(i), randomblob(40000))") }
        let firstRetained = try FileManager.default.contentsOfDirectory(atPath: directory + "/node-a/tenants/acme/log")
            .compactMap { $0.hasSuffix(".log") ? UInt64($0.dropLast(4)) : nil }.min() ?? 0
        XCTAssertGreaterThan(firstRetained, 8, "the primary's log no longer reaches the standby's position", file: file, line: line)

        // The standby asks for a snapshot and stops at the step.
        var armed = cluster.standby
        armed.environment["APIARY_TEST_EXIT_AT"] = point
        let status = try cluster.runUntilExit(armed, timeoutSeconds: 60)
        XCTAssertEqual(status, 86, "the standby ended through the seam", file: file, line: line)
        let stopped = standbyLog
        XCTAssertTrue(stopped.contains("test seam APIARY_TEST_EXIT_AT: exiting at \(point)"), "the standby stopped at \(point), not elsewhere", file: file, line: line)
        XCTAssertFalse(stopped.contains("installed a snapshot"), "the install was interrupted", file: file, line: line)

        // A write while it is down; then it starts without the seam and catches up.
        try await write("INSERT INTO kv VALUES (15, randomblob(1000))")
        try cluster.start(cluster.standby)
        XCTAssertTrue(standbyLog.contains(expected), "the restarted standby says: \(expected)", file: file, line: line)
        var report = try await verify()
        XCTAssertTrue(report.consistent, report.text, file: file, line: line)
        try await write("INSERT INTO kv VALUES (16, randomblob(1000))")
        report = try await verify()
        XCTAssertTrue(report.consistent, report.text, file: file, line: line)
        await c.close()

        cluster.stopAll()
        let rows = try DatabaseFile.query(copyOf: standbyTenantDirectory + "/db.sqlite", "SELECT count(*) FROM kv")
        XCTAssertEqual(rows, [[.integer(17)]], file: file, line: line)
        let log = standbyLog
        XCTAssertFalse(log.contains("stopped replicating"), "the standby replicated throughout", file: file, line: line)
        let installed = log.dropFirst(stopped.count).components(separatedBy: "installed a snapshot").count - 1
        XCTAssertEqual(installed, installs, "snapshots installed after the restart", file: file, line: line)
        for leftover in ["snapshot.tmp", "snapshot.install"] {
            XCTAssertFalse(FileManager.default.fileExists(atPath: standbyTenantDirectory + "/" + leftover), "\(leftover) is gone", file: file, line: line)
        }
    }

    var standbyLog: String { (try? String(contentsOfFile: directory + "/logs/node-b.log", encoding: .utf8)) ?? "" }

    func verify() async throws -> ClusterVerifier.Report {
        try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: ("127.0.0.1", cluster.primary.apiPort), standby: ("127.0.0.1", cluster.standby.apiPort), waitMs: 20_000)
    }
}
