import Foundation
import NIOCore
import NIOPosix
import XCTest

/// `apiary chaos run smoke` as CI runs it: a real cluster, the workload through the gateways,
/// mixed process, network and disk faults, and every check must pass (no acknowledged write lost, nothing applied
/// twice, the bank's total constant in every strong read, one writer per epoch, identical
/// replicas after healing).
final class ChaosSmokeTests: XCTestCase {
    func testTheSmokeScenarioPasses() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let reports = NSTemporaryDirectory() + "apiary-chaos-reports-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: reports) }
        let (status, text) = try runApiary(["chaos", "run", "smoke", "--scenarios", root + "/chaos/scenarios", "--reports", reports,
                                            "--base-port", String(freeBasePort())])
        XCTAssertEqual(status, 0, text.split(separator: "\n").suffix(60).joined(separator: "\n"))
        XCTAssertTrue(text.contains("scenario smoke: PASSED"), text.split(separator: "\n").suffix(30).joined(separator: "\n"))
        if geteuid() == 0 {
            // As root (CI) the zones are namespaces and every fault of the scenario is applied.
            XCTAssertTrue(text.contains("network: zones a, b, c in network namespaces"), text)
            for applied in ["isolate primary (zone ", "cut primary (zone ", "loss primary (30% of zone ", "delay primary (zone ", "fill_disk standby (node-", "fill_disk primary (node-"] {
                XCTAssertTrue(text.contains(applied), "'\(applied)' applied: " + text.split(separator: "\n").prefix(30).joined(separator: "\n"))
            }
            XCTAssertFalse(text.contains("skipped"), text)
            XCTAssertFalse(text.contains(": failed ("), "a fault that could not be applied: " + text)
        }
        let written = (try? FileManager.default.contentsOfDirectory(atPath: reports)) ?? []
        XCTAssertTrue(written.contains { $0.hasSuffix(".json") } && written.contains { $0.hasSuffix(".html") }, "\(written)")
    }
}

/// Bad input: a run whose cluster cannot start fails fast, and its report holds what each
/// process said (here node-a's API port is taken).
final class ChaosStartFailureTests: XCTestCase {
    func testARunThatCannotStartItsClusterFailsFastWithTheLogsInItsReport() async throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let reports = NSTemporaryDirectory() + "apiary-chaos-reports-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: reports) }
        let basePort = freeBasePort()
        let taken = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: basePort).get()
        defer { taken.close(promise: nil) }

        let (status, text) = try runApiary(["chaos", "run", "smoke", "--scenarios", root + "/chaos/scenarios", "--reports", reports,
                                            "--base-port", String(basePort), "--loopback"])
        XCTAssertEqual(status, 1, text)
        XCTAssertTrue(text.contains("the cluster did not start") && text.contains("[FAIL] cluster started"), text)
        let json = try XCTUnwrap((try FileManager.default.contentsOfDirectory(atPath: reports)).first { $0.hasSuffix(".json") }, "a report is written")
        let report = try String(contentsOfFile: reports + "/" + json, encoding: .utf8)
        XCTAssertTrue(report.contains("---- node-a (last 40 lines) ----"), report)
        XCTAssertTrue(report.contains("in use"), "node-a's own words on the taken port: \(report.prefix(3000))")
    }
}
