@testable import ApiaryChaos
import Foundation
import XCTest

/// The run report's timeline: throughput, latency, the writer and the epoch, the faults.
final class ReportTests: XCTestCase {
    func report() -> ChaosReport {
        // Second 0: three fast successes; second 1: a slow success and a failure (a failover).
        let ops = [
            WorkloadOperation(kind: .add, client: 0, value: 1, invokedMs: 100, completedMs: 102, outcome: .ok, detail: "200"),
            WorkloadOperation(kind: .add, client: 0, value: 2, invokedMs: 200, completedMs: 204, outcome: .ok, detail: "200"),
            WorkloadOperation(kind: .add, client: 1, value: 3, invokedMs: 300, completedMs: 306, outcome: .ok, detail: "200"),
            WorkloadOperation(kind: .add, client: 0, value: 4, invokedMs: 400, completedMs: 1_600, outcome: .ok, detail: "200"),
            WorkloadOperation(kind: .add, client: 1, value: 5, invokedMs: 500, completedMs: 1_700, outcome: .unknown, detail: "no answer"),
        ]
        var report = ChaosReport(scenario: "t", startedAt: "2026-12-07T00:00:00Z", durationMs: 2_000, network: "loopback",
                                 checks: [CheckResult(name: "c", passed: true, detail: "d")],
                                 availability: Availability(history: ops, durationMs: 2_000),
                                 faults: [FaultRecord(atMs: 450, text: "kill primary (node-a)")], operations: ops)
        report.roles = [RoleSample(atMs: 0, epoch: 1, writer: "node-a", writerReady: true),
                        RoleSample(atMs: 500, epoch: 1, writer: nil, writerReady: false),
                        RoleSample(atMs: 1_500, epoch: 2, writer: "node-b", writerReady: true)]
        return report
    }

    func testPerSecondCountsAndLatencies() {
        let seconds = report().perSecond
        XCTAssertEqual(seconds.count, 2)
        XCTAssertEqual(seconds[0].ok, 3)
        XCTAssertEqual(seconds[0].bad, 0)
        XCTAssertEqual(seconds[0].p50Ms, 4)
        XCTAssertEqual(seconds[0].p99Ms, 6)
        XCTAssertEqual(seconds[1].ok, 1)
        XCTAssertEqual(seconds[1].bad, 1)
        XCTAssertEqual(seconds[1].p99Ms, 1_200)
    }

    func testTheTimelineShowsLatencyRolesEpochsAndFaults() {
        let html = report().html
        XCTAssertEqual(html.components(separatedBy: "<polyline").count - 1, 2, "p50 and p99 lines")
        XCTAssertTrue(html.contains(">e1 node-a<") && html.contains(">e1 none<") && html.contains(">e2 node-b<"), "the writer and epoch at each change")
        XCTAssertTrue(html.contains("kill primary (node-a)"))
        XCTAssertTrue(html.contains("1200 ms"), "the latency scale's top")
    }

    func testTheRolesAreInTheJSON() throws {
        let json = try JSONEncoder().encode(report())
        let decoded = try JSONSerialization.jsonObject(with: json) as? [String: Any]
        XCTAssertEqual((decoded?["roles"] as? [[String: Any]])?.count, 3)
    }
}
