import ApiaryCore
import XCTest
@testable import ApiaryReplication

/// A node's role and epoch: durable, and moved only by the monitor or an operator.
final class NodeStateTests: XCTestCase {
    let standby1 = NodeState(role: .standby, epoch: Epoch(1), mode: .sync)

    func testTheDurableStateWinsOverTheConfiguredRole() {
        let promoted = standby1.promoted()
        XCTAssertEqual(promoted, NodeState(role: .primary, epoch: Epoch(2), mode: .single))
        // Restarted with the flags it was first started with: still primary of epoch 2.
        XCTAssertEqual(NodeState.atStartup(durable: .full(promoted), configured: standby1), promoted)
        XCTAssertEqual(NodeState.atStartup(durable: nil, configured: standby1), standby1)
        // A state file from before roles were kept: the configured role in the kept epoch.
        XCTAssertEqual(NodeState.atStartup(durable: .epochOnly(Epoch(7)), configured: standby1),
                       NodeState(role: .standby, epoch: Epoch(7), mode: .sync))
    }

    func testAPrimaryThatStepsDownIsDemotedInItsOwnEpoch() {
        let primary = NodeState(role: .primary, epoch: Epoch(3), mode: .sync)
        XCTAssertEqual(primary.steppedDown(), NodeState(role: .demoted, epoch: Epoch(3), mode: .sync))
    }

    func testOnlyTheMonitorOrAnOperatorMovesTheEpoch() {
        XCTAssertNil(standby1.adopting(Epoch(5), from: .peer), "a peer's claim must not move the epoch")
        XCTAssertEqual(standby1.adopting(Epoch(5), from: .monitor)?.epoch, Epoch(5))
        XCTAssertEqual(standby1.adopting(Epoch(5), from: .operatorAction)?.epoch, Epoch(5))
        XCTAssertNil(standby1.adopting(Epoch(1), from: .monitor), "never the same or an older epoch")
    }

    func testTheFileTextRoundTripsAndDamageIsRefused() throws {
        for role in NodeState.Role.allCases {
            for mode in [ReplicationMode.sync, .single, .waitPrimary] {
                let state = NodeState(role: role, epoch: Epoch(42), mode: mode)
                XCTAssertEqual(try DurableNodeState(text: state.text), .full(state))
            }
        }
        XCTAssertEqual(try DurableNodeState(text: "epoch=9\n"), .epochOnly(Epoch(9)))
        for damaged in ["", "role=primary\n", "epoch=x\n", "role=king\nepoch=1\nmode=sync\n", "role=primary\nepoch=1\nmode=fast\n",
                        "role=primary\nepoch=1\nepoch=2\nmode=sync\n", "role=primary\nepoch=1\nmode=sync\nextra=1\n", "garbage"] {
            XCTAssertThrowsError(try DurableNodeState(text: damaged), damaged)
        }
    }
}
