import ApiaryCore
import ApiaryKeeper
import ApiaryMonitor
import ApiaryReplication
import XCTest

/// The keeper's rules (docs/monitor.md, "What the keeper needs"), one decision at a time.
final class KeeperCoreTests: XCTestCase {
    let e1 = Epoch(1), e2 = Epoch(2)

    func primary(_ mode: ReplicationMode = .sync, standby: NodeID? = "node-b") -> KeeperCore {
        KeeperCore(state: NodeState(role: .primary, epoch: e1, mode: mode), primarySetup: PrimarySetup(mode: mode, standby: standby))
    }

    func standby() -> KeeperCore { KeeperCore(state: NodeState(role: .standby, epoch: e1, mode: .sync), primarySetup: nil) }

    func assign(_ goal: KeeperState, _ epoch: Epoch, _ sequence: UInt64, peer: NodeID? = "node-b") -> Assignment {
        Assignment(goal: goal, epoch: epoch, sequence: sequence, peer: peer)
    }

    func testAPrimaryChangesItsSetupAndReportsTheGoalOnlyOnceDone() {
        var k = primary()
        XCTAssertEqual(k.onAssignment(assign(.waitPrimary, e1, 1)), [.run(.configurePrimary(PrimarySetup(mode: .waitPrimary, standby: "node-b")))])
        XCTAssertNil(k.report(tenants: [:], streaming: false).reached, "not reached before the step is done")
        XCTAssertEqual(k.onAssignment(assign(.waitPrimary, e1, 1)), [], "one step at a time")
        XCTAssertEqual(k.onStepDone(), [])
        XCTAssertEqual(k.state.mode, .waitPrimary)
        XCTAssertEqual(k.reached, ReachedGoal(.waitPrimary, sequence: 1))
        XCTAssertEqual(k.onAssignment(assign(.primary, e1, 3)), [.run(.configurePrimary(PrimarySetup(mode: .sync, standby: "node-b")))])
        _ = k.onStepDone()
        XCTAssertEqual(k.report(tenants: [:], streaming: true).reached, ReachedGoal(.primary, sequence: 3))
        XCTAssertEqual(k.onAssignment(assign(.draining, e1, 5)), [.run(.configurePrimary(PrimarySetup(mode: .sync, standby: "node-b", draining: true)))])
    }

    func testAHandoverPromotionSkipsTheLeaseWaitAndOnlyThen() {
        var k = standby()
        XCTAssertEqual(k.onAssignment(Assignment(goal: .waitPrimary, epoch: e2, sequence: 5, peer: "node-a", handover: true)),
                       [.run(.promote(epoch: e2, setup: PrimarySetup(mode: .waitPrimary, standby: "node-a"), handover: true))])
    }

    func testAPrimaryNotYetConfirmedIsSetUpByTheFirstWriterGoalEvenWhenItMatches() {
        var k = KeeperCore(state: NodeState(role: .primary, epoch: e1, mode: .sync), primarySetup: nil)
        XCTAssertEqual(k.onAssignment(assign(.primary, e1, 4)), [.run(.configurePrimary(PrimarySetup(mode: .sync, standby: "node-b")))],
                       "the set-up confirms the lease; without it a restarted primary would serve strong reads the monitor does not know of")
        _ = k.onStepDone()
        XCTAssertEqual(k.reached, ReachedGoal(.primary, sequence: 4))
    }

    func testAnOlderAssignmentIsIgnored() {
        var k = primary()
        _ = k.onAssignment(assign(.primary, e1, 7))
        XCTAssertEqual(k.reached, ReachedGoal(.primary, sequence: 7), "already set up as asked")
        XCTAssertEqual(k.onAssignment(assign(.waitPrimary, e1, 5)), [])
        XCTAssertEqual(k.target?.sequence, 7)
    }

    func testAPrimaryStepsDownBeforeItAdoptsANewerEpochThenRejoinsAsTheStandby() {
        var k = primary()
        _ = k.onAssignment(assign(.primary, e1, 3))
        XCTAssertEqual(k.onAssignment(assign(.demoted, e2, 6)), [.run(.stepDown)], "never adopt an epoch while primary")
        XCTAssertEqual(k.state.epoch, e1)
        XCTAssertEqual(k.onStepDone(), [.run(.adoptEpoch(e2))])
        XCTAssertEqual(k.state, NodeState(role: .demoted, epoch: e1, mode: .sync))
        XCTAssertNil(k.reached, "a primary goal is not a demoted node's")
        XCTAssertEqual(k.onStepDone(), [])
        XCTAssertEqual(k.reached, ReachedGoal(.demoted, sequence: 6))
        XCTAssertEqual(k.state.epoch, e2)
        XCTAssertEqual(k.onAssignment(assign(.catchingUp, e2, 7, peer: "node-b")), [.run(.follow(primary: "node-b"))])
        XCTAssertEqual(k.onStepDone(), [])
        XCTAssertEqual(k.state, NodeState(role: .standby, epoch: e2, mode: .sync))
        XCTAssertEqual(k.report(tenants: [:], streaming: true).reached, ReachedGoal(.catchingUp, sequence: 7))
    }

    func testAPrimaryToldANonWriterGoalInItsEpochStepsDown() {
        var k = primary()
        XCTAssertEqual(k.onAssignment(assign(.catchingUp, e1, 4)), [.run(.stepDown)])
    }

    func testAStandbyIsPromotedOnlyIntoANewerEpochAfterItsLeaseWait() {
        var k = standby()
        _ = k.onAssignment(assign(.secondary, e1, 4, peer: "node-a"))
        XCTAssertEqual(k.reached, ReachedGoal(.secondary, sequence: 4))
        XCTAssertEqual(k.onAssignment(assign(.waitPrimary, e2, 5, peer: "node-a")),
                       [.run(.promote(epoch: e2, setup: PrimarySetup(mode: .waitPrimary, standby: "node-a"), handover: false))])
        XCTAssertEqual(k.report(tenants: [:], streaming: false).role, .standby, "still a standby while the promotion runs")
        XCTAssertEqual(k.onStepDone(), [])
        XCTAssertEqual(k.state, NodeState(role: .primary, epoch: e2, mode: .waitPrimary))
        XCTAssertEqual(k.reached, ReachedGoal(.waitPrimary, sequence: 5))
        XCTAssertEqual(k.primarySetup, PrimarySetup(mode: .waitPrimary, standby: "node-a"))
    }

    func testAStandbyToldToWriteInItsOwnEpochRefusesAndSaysSoOnce() {
        var k = standby()
        let actions = k.onAssignment(assign(.primary, e1, 4))
        XCTAssertEqual(actions.count, 1)
        guard case .note(let text)? = actions.first else { return XCTFail("\(actions)") }
        XCTAssertTrue(text.contains("only into a newer epoch"), text)
        XCTAssertEqual(k.onAssignment(assign(.primary, e1, 4)), [], "said once")
        XCTAssertNil(k.running)
    }

    func testADemotedNodeIsNeverPromoted() {
        var k = KeeperCore(state: NodeState(role: .demoted, epoch: e2, mode: .sync), primarySetup: nil)
        let actions = k.onAssignment(assign(.waitPrimary, e2, 9))
        guard case .note(let text)? = actions.first, actions.count == 1 else { return XCTFail("\(actions)") }
        XCTAssertTrue(text.contains("never promoted"), text)
        XCTAssertEqual(k.state.role, .demoted)
    }

    func testAStandbyAdoptsANewerEpochFromTheMonitor() {
        var k = standby()
        XCTAssertEqual(k.onAssignment(assign(.catchingUp, e2, 8, peer: "node-a")), [.run(.adoptEpoch(e2))])
        XCTAssertEqual(k.onStepDone(), [])
        XCTAssertEqual(k.state, NodeState(role: .standby, epoch: e2, mode: .sync))
        XCTAssertEqual(k.reached, ReachedGoal(.catchingUp, sequence: 8))
    }

    func testAnAssignmentFromAnOlderEpochThanTheNodesIsNotFollowed() {
        var k = KeeperCore(state: NodeState(role: .standby, epoch: e2, mode: .sync), primarySetup: nil)
        let actions = k.onAssignment(assign(.waitPrimary, e1, 9))
        guard case .note? = actions.first, actions.count == 1 else { return XCTFail("\(actions)") }
        XCTAssertEqual(k.state.role, .standby)
    }

    func testAFailedStepIsTriedAgainAtTheNextAnswer() {
        var k = standby()
        let promote = KeeperAction.run(.promote(epoch: e2, setup: PrimarySetup(mode: .waitPrimary, standby: "node-a"), handover: false))
        XCTAssertEqual(k.onAssignment(assign(.waitPrimary, e2, 5, peer: "node-a")), [promote])
        let failed = k.onStepFailed("the standby does not answer")
        guard case .note? = failed.first else { return XCTFail("\(failed)") }
        XCTAssertEqual(k.state.role, .standby, "a failed step leaves the node as it was")
        XCTAssertEqual(k.onAssignment(assign(.waitPrimary, e2, 5, peer: "node-a")), [promote])
    }

    func testAPeerStepDownDuringASetupChangeLeavesTheNodeDemoted() {
        var k = primary()
        _ = k.onAssignment(assign(.waitPrimary, e1, 2))
        _ = k.onSteppedDownByPeer()
        _ = k.onStepDone()
        XCTAssertEqual(k.state.role, .demoted)
        XCTAssertNil(k.primarySetup)
        XCTAssertNil(k.reached)
    }
}
