import ApiaryCore
import ApiaryMonitor
import ApiaryReplication
import XCTest

// Issue 8, "Bad input": each case is refused with a clear reason and an event in the history, and
// never changes a goal, promotability or the epoch.

final class MonitorBadInputTests: XCTestCase {
    /// A converged formation (a primary, b promotable secondary) in epoch 1.
    private func converged() -> SimCluster {
        let cluster = SimCluster()
        cluster.converge()
        return cluster
    }

    /// Sends `report` as `node`, and checks the refusal, its event and that nothing changed.
    @discardableResult
    private func assertRefused(_ cluster: SimCluster, _ node: NodeID, _ report: NodeReport, role: PeerRole = .node,
                               saying text: String, file: StaticString = #filePath, line: UInt = #line) -> String {
        let before = cluster.state
        let actions = cluster.heartbeat(node, report: report, role: role)
        guard case .refuse(node, let reason)? = actions.last else {
            XCTFail("not refused: \(actions)", file: file, line: line)
            return ""
        }
        XCTAssertTrue(reason.contains(text), "reason: \(reason)", file: file, line: line)
        XCTAssertFalse(actions.contains { if case .answer = $0 { return true } else { return false } }, file: file, line: line)
        XCTAssertEqual(cluster.state.nodes, before.nodes, file: file, line: line)
        XCTAssertEqual(cluster.state.epoch, before.epoch, file: file, line: line)
        XCTAssertEqual(cluster.state.events.last?.kind, .refusal, file: file, line: line)
        XCTAssertEqual(cluster.state.events.last?.text, reason, file: file, line: line)
        cluster.assertClean(file: file, line: line)
        return reason
    }

    func testAHeartbeatFromAnUnknownNodeIsRefusedOnce() {
        let cluster = converged()
        let report = NodeReport(role: .standby, epoch: Epoch(1), reached: nil, streaming: false)
        assertRefused(cluster, "z", report, saying: "'z' is not a node of formation f1")
        // Said again and again: refused every time, recorded once.
        let events = cluster.state.events.count
        for _ in 0..<10 { cluster.heartbeat("z", report: report) }
        XCTAssertEqual(cluster.state.events.count, events)
        XCTAssertNotNil(cluster.lastRefusal["z"])
    }

    func testAHeartbeatWithACertificateOfTheWrongRoleIsRefused() {
        let cluster = converged()
        assertRefused(cluster, "a", cluster.report(of: "a"), role: .other("gateway"), saying: "needs a node certificate")
    }

    func testAHeartbeatFromANewerEpochIsRefused() {
        let cluster = converged()
        var report = cluster.report(of: "b")
        report.epoch = Epoch(7)
        assertRefused(cluster, "b", report, saying: "newer than the formation's 1")
    }

    func testAHeartbeatFromAnOlderEpochIsNotRecordedButAnswered() {
        let cluster = converged()
        cluster.cutFromMonitor(.a)
        XCTAssertTrue(cluster.failover().accepted)
        XCTAssertEqual(cluster.epoch, Epoch(2))
        let before = cluster.state
        // a still believes it is primary of epoch 1, in sync.
        let report = NodeReport(role: .primary, epoch: Epoch(1), reached: ReachedGoal(.primary, sequence: 3),
                                tenants: [acme: TenantReport(lsn: 99, standbyLSN: 99)], streaming: true)
        let actions = cluster.heartbeat("a", report: report)
        guard case .answer("a", let assignment)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertEqual(assignment.goal, .demoted)
        XCTAssertEqual(assignment.epoch, Epoch(2))
        XCTAssertEqual(cluster.state.nodes, before.nodes, "an older epoch's report changed the state")
        XCTAssertEqual(cluster.state.events.last?.kind, .refusal)
        XCTAssertTrue(cluster.state.events.last!.text.contains("older than the formation's 2"))
        let events = cluster.state.events.count
        cluster.heartbeat("a", report: report)
        XCTAssertEqual(cluster.state.events.count, events, "the same refusal recorded twice")
        cluster.assertClean()
    }

    func testANodeClaimingThePrimaryRoleInAnEpochWhoseWriterIsAnotherIsRefused() {
        let cluster = converged()
        var report = cluster.report(of: "b")
        report.role = .primary
        report.reached = nil
        assertRefused(cluster, "b", report, saying: "claims to be primary in epoch 1, whose writer is a")
    }

    func testAReportOfAGoalTheMonitorNeverAssignedIsRefused() {
        let cluster = converged()
        var report = cluster.report(of: "b")
        report.reached = ReachedGoal(.secondary, sequence: 99)
        assertRefused(cluster, "b", report, saying: "which the monitor never assigned")
        report.reached = ReachedGoal(.catchingUp, sequence: cluster.record(.b).goalSequence)
        assertRefused(cluster, "b", report, saying: "which asked for secondary")
    }

    func testAReportWhoseRoleContradictsItsStateIsRefused() {
        let cluster = converged()
        var report = cluster.report(of: "b")
        report.reached = ReachedGoal(.primary, sequence: 1)
        assertRefused(cluster, "b", report, saying: "reports role standby but says it reached primary")
    }

    func testAReportWithTooManyTenantsIsRefused() {
        var config = SimCluster.defaultConfig
        config.tenantsMax = 1
        let cluster = SimCluster(config: config)
        let report = cluster.report(of: "a") // acme and globex
        assertRefused(cluster, "a", report, saying: "more than the 1 a heartbeat may carry")
    }

    // MARK: Commands

    private func assertCommandRefused(_ cluster: SimCluster, _ result: CommandResult, saying text: String,
                                      file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(result.accepted, result.message, file: file, line: line)
        XCTAssertTrue(result.message.contains(text), result.message, file: file, line: line)
        XCTAssertEqual(cluster.state.events.last?.kind, .refusal, file: file, line: line)
        XCTAssertEqual(cluster.state.events.last?.text, result.message, file: file, line: line)
        cluster.assertClean(file: file, line: line)
    }

    func testSwitchoverWhileTheStandbyIsNotInSyncIsRefused() {
        let cluster = converged()
        cluster.cutStream()
        cluster.run(ms: 100)
        assertCommandRefused(cluster, cluster.switchover(), saying: "b is not in sync with a")
    }

    func testMaintenanceOnTheOnlyHealthyNodeIsRefused() {
        let cluster = converged()
        cluster.kill(.standby)
        cluster.run(ms: 600)
        assertCommandRefused(cluster, cluster.maintenance(.a, true), saying: "a is the only healthy node")
    }

    func testPromotingANodeThatIsNotPromotableWithoutForceIsRefused() {
        let cluster = SimCluster()
        cluster.run(ms: 100)
        assertCommandRefused(cluster, cluster.promote("b"), saying: "b is not promotable")
        assertCommandRefused(cluster, cluster.promote("b", force: true), saying: "--force needs --accept-data-loss")
    }

    func testCommandsNamingAnUnknownNodeOrTheWriterAreRefused() {
        let cluster = converged()
        assertCommandRefused(cluster, cluster.promote("z"), saying: "'z' is not a node of formation f1")
        assertCommandRefused(cluster, cluster.promote("a"), saying: "a is already the writer")
    }

    func testCommandsDuringTheStartupGraceAreRefused() {
        let cluster = converged()
        cluster.restartMonitor()
        assertCommandRefused(cluster, cluster.failover(), saying: "has not heard from a, b yet")
    }
}
