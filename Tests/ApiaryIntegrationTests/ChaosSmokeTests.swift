import Foundation
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
            for applied in ["isolate primary (zone ", "cut primary (zone ", "loss primary (30% of zone ", "fill_disk standby (node-", "fill_disk primary (node-"] {
                XCTAssertTrue(text.contains(applied), "'\(applied)' applied: " + text.split(separator: "\n").prefix(30).joined(separator: "\n"))
            }
            XCTAssertFalse(text.contains("skipped"), text)
        }
        let written = (try? FileManager.default.contentsOfDirectory(atPath: reports)) ?? []
        XCTAssertTrue(written.contains { $0.hasSuffix(".json") } && written.contains { $0.hasSuffix(".html") }, "\(written)")
    }
}
