import ApiaryCore
import ApiaryMonitor
import ApiaryReplication
import XCTest

// Short scenarios for the failover rules of DESIGN §6, in the SimCluster DSL. Nodes report every
// 50 ms; the primary timeout is 500 ms, the startup grace 2 s.

extension SimCluster {
    /// Primary (reached) and a promotable secondary (reached).
    var isConverged: Bool {
        guard let w = state.writer, let s = state.other(than: w.id) else { return false }
        return w.goal == .primary && w.reported == .primary && s.goal == .secondary && s.promotable && s.reported == .secondary
    }

    /// Runs until converged; fails the test after `maxMs`.
    func converge(maxMs: Milliseconds = 10_000, commitsPerStep: Int = 0, file: StaticString = #filePath, line: UInt = #line) {
        var elapsed: Milliseconds = 0
        while !isConverged {
            guard elapsed < maxMs else {
                XCTFail("did not converge in \(maxMs) ms: \(state.nodes)\n" + trace.suffix(40).joined(separator: "\n"), file: file, line: line)
                return
            }
            run(ms: 50, commitsPerStep: commitsPerStep)
            elapsed += 50
        }
    }

    func assertClean(file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(violations, [], "\n" + trace.suffix(60).joined(separator: "\n"), file: file, line: line)
    }

    /// The index of the first action matching `body` in the last call's actions.
    func index(of body: (MonitorAction) -> Bool) -> Int? { lastActions.firstIndex(where: body) }

    func persistIndex() -> Int? { index { if case .persist = $0 { return true } else { return false } } }

    func answerIndex(_ i: NodeID, _ goal: KeeperState) -> Int? {
        index { if case .answer(i, let a) = $0 { return a.goal == goal } else { return false } }
    }
}

final class MonitorScenarioTests: XCTestCase {
    func testANewFormationConvergesToAPrimaryAndAPromotableSecondary() {
        let cluster = SimCluster()
        XCTAssertEqual(cluster.goal(.a), .waitPrimary)
        XCTAssertEqual(cluster.goal(.b), .catchingUp)
        cluster.converge(commitsPerStep: 1)
        XCTAssertEqual(cluster.id(.primary), "a")
        XCTAssertEqual(cluster.epoch, Epoch(1))
        XCTAssertFalse(cluster.events(containing: "seen in sync").isEmpty)
        cluster.assertClean()
    }

    /// A primary's report of what its rejoining standby discarded is recorded once, however
    /// often the keeper repeats it (until a heartbeat carrying it is answered), and survives the
    /// wire form.
    func testARejoinsDivergenceReportIsRecordedOnce() throws {
        let cluster = SimCluster()
        cluster.converge(commitsPerStep: 1)
        let w = cluster.id(.primary), s = cluster.id(.standby)
        var report = cluster.report(of: w)
        report.divergences = [Divergence(tenant: try TenantID("acme"), standby: s, sharedThroughLSN: 19, discardedFromLSN: 20,
                                         discardedThroughLSN: 21, discardedEpochs: [Epoch(1)], bySnapshot: true)]
        guard case .success(let decoded) = try JSONDecoder().decode(HeartbeatBody.self, from: JSONEncoder().encode(HeartbeatBody(report))).report() else {
            return XCTFail("the wire form did not decode")
        }
        XCTAssertEqual(decoded, report)
        cluster.heartbeat(w, report: decoded)
        cluster.heartbeat(w, report: decoded)
        let noted = cluster.events(containing: "rejoin: node \(s) discards tenant acme's lsns 20–21 (epoch 1)")
        XCTAssertEqual(noted.count, 1, "\(cluster.events.suffix(5))")
        XCTAssertEqual(noted.first?.node, s)
        cluster.assertClean()
    }

    func testAMalformedDivergenceReportIsRefused() {
        var body = HeartbeatBody(role: "primary", epoch: 1, reached: nil, streaming: true)
        body.divergences = [.init(tenant: "acme", standby: "b", sharedThroughLSN: 30, discardedFromLSN: 20, discardedThroughLSN: 21,
                                  discardedEpochs: [1], bySnapshot: true)]
        guard case .failure(let error) = body.report() else { return XCTFail("a shared lsn past the discarded ones was accepted") }
        XCTAssertTrue("\(error)".contains("malformed divergence report"), "\(error)")
    }

    // MARK: Primary lost

    func testKilledPrimaryIsReplacedOnlyAfterTheTimeoutAndTheStandbysConfirmation() {
        let cluster = SimCluster()
        cluster.converge(commitsPerStep: 1)
        cluster.run(ms: 500, commitsPerStep: 2)
        cluster.kill(.primary)
        let killedAt = cluster.now
        // The standby confirms at once (its stream is gone); the monitor waits out primaryTimeoutMs.
        cluster.run(ms: 450)
        XCTAssertEqual(cluster.epoch, Epoch(1), "promoted before the primary timeout")
        XCTAssertEqual(cluster.goal(.b), .secondary)
        cluster.run(ms: 100)
        XCTAssertEqual(cluster.epoch, Epoch(2))
        XCTAssertEqual(cluster.goal(.b), .waitPrimary)
        XCTAssertEqual(cluster.goal(.a), .demoted)
        XCTAssertFalse(cluster.events(containing: "b confirms it lost the stream").isEmpty)
        XCTAssertGreaterThanOrEqual(cluster.now - killedAt, cluster.config.primaryTimeoutMs)
        XCTAssertEqual(cluster.node(.b).role, .primary)
        XCTAssertEqual(cluster.node(.b).epoch, Epoch(2))

        // The former primary comes back demoted, rejoins, and the formation converges again.
        cluster.revive(.a)
        cluster.converge(commitsPerStep: 1)
        XCTAssertEqual(cluster.id(.primary), "b")
        XCTAssertEqual(cluster.node(.a).role, .standby)
        XCTAssertEqual(cluster.epoch, Epoch(2))
        cluster.assertClean()
    }

    func testThePromotionsEpochIsPersistedBeforeTheStandbyIsToldToPromote() {
        let cluster = SimCluster()
        cluster.converge()
        cluster.kill(.primary)
        cluster.run(ms: 450)
        // The next heartbeat of b (the standby) comes after the timeout: it carries the decision.
        cluster.now += 100
        cluster.heartbeat(.b)
        let persist = try! XCTUnwrap(cluster.persistIndex())
        let answer = try! XCTUnwrap(cluster.answerIndex("b", .waitPrimary))
        XCTAssertLessThan(persist, answer)
        guard case .persist(let change) = cluster.lastActions[persist] else { return XCTFail() }
        XCTAssertEqual(change.epoch, Epoch(2))
        guard case .answer(_, let assignment) = cluster.lastActions[answer] else { return XCTFail() }
        XCTAssertEqual(assignment.epoch, Epoch(2))
        XCTAssertEqual(assignment.peer, "a")
        cluster.assertClean()
    }

    func testNoPromotionWhileTheStandbyStillReceivesThePrimarysStream() {
        let cluster = SimCluster()
        cluster.converge()
        // The monitor loses the primary, but the primary still streams to the standby.
        cluster.cutFromMonitor(.primary)
        cluster.run(ms: 3_000, commitsPerStep: 1)
        XCTAssertEqual(cluster.epoch, Epoch(1))
        XCTAssertEqual(cluster.goal(.a), .primary)
        XCTAssertEqual(cluster.events(containing: "still receives a's stream").count, 1, "said once, not at every tick")
        cluster.healMonitorLink(.primary)
        cluster.run(ms: 500, commitsPerStep: 1)
        XCTAssertTrue(cluster.isConverged)
        cluster.assertClean()
    }

    func testNoPromotionWhenPrimaryAndStandbyAreBothLost() {
        let cluster = SimCluster()
        cluster.converge()
        cluster.kill(.primary)
        cluster.kill(.standby)
        cluster.run(ms: 5_000)
        XCTAssertEqual(cluster.epoch, Epoch(1))
        XCTAssertFalse(cluster.events(containing: "both are lost").isEmpty)
        // The same when the standby is only cut off from the monitor.
        let other = SimCluster()
        other.converge()
        other.cutFromMonitor(.standby)
        other.kill(.primary)
        other.run(ms: 5_000)
        XCTAssertEqual(other.epoch, Epoch(1))
        XCTAssertFalse(other.events(containing: "both are lost").isEmpty)
        cluster.assertClean()
        other.assertClean()
    }

    func testNoAutomaticPromotionOfAStandbyThatIsNotPromotable() {
        let cluster = SimCluster()
        cluster.converge()
        cluster.kill(.standby)
        cluster.run(ms: 200)
        XCTAssertEqual(cluster.goal(.a), .waitPrimary)
        cluster.kill(.primary)
        cluster.revive(.b)
        cluster.run(ms: 3_000)
        XCTAssertEqual(cluster.epoch, Epoch(1))
        XCTAssertFalse(cluster.events(containing: "b is not promotable").isEmpty)
        cluster.assertClean()
    }

    // MARK: Standby lost and back

    func testStandbyLostMarksItNotPromotableBeforeThePrimaryCommitsAlone() {
        let cluster = SimCluster()
        cluster.converge()
        XCTAssertTrue(cluster.promotable(.b))
        cluster.kill(.standby)
        // The primary's next heartbeat says its stream is down: one persist, then the answer.
        cluster.now += 50
        cluster.heartbeat(.a)
        let persist = try! XCTUnwrap(cluster.persistIndex())
        let answer = try! XCTUnwrap(cluster.answerIndex("a", .waitPrimary))
        XCTAssertLessThan(persist, answer)
        guard case .persist(let change) = cluster.lastActions[persist] else { return XCTFail() }
        XCTAssertEqual(change.nodes.first { $0.id == "b" }?.promotable, false)
        XCTAssertEqual(change.nodes.first { $0.id == "a" }?.goal, .waitPrimary)
        XCTAssertFalse(cluster.promotable(.b))
        cluster.assertClean()
    }

    func testAStandbyBackFromAnOutageIsPromotableOnlyOnceCaughtUpAndSeenInSync() {
        let cluster = SimCluster()
        cluster.converge()
        cluster.kill(.standby)
        cluster.run(ms: 100)
        XCTAssertEqual(cluster.node(.a).reached?.state, .waitPrimary)
        for _ in 0..<200 { cluster.commit(acme) } // committed alone
        cluster.revive(.b)

        // The stream brings it 10 records closer per step: catching up, not promotable.
        var sawSecondary = false
        for _ in 0..<60 {
            cluster.now += 50
            cluster.heartbeat("a")
            cluster.heartbeat("b")
            cluster.replicate(records: 10)
            cluster.tick()
            let lag = cluster.node(.a).lsns[acme]! - cluster.node(.b).lsns[acme]!
            if cluster.goal(.b) == .secondary && !sawSecondary {
                sawSecondary = true
                XCTAssertLessThanOrEqual(lag, cluster.config.catchUpLagMax + 10, "told secondary while far behind")
            }
            if lag > cluster.config.catchUpLagMax + 10 { XCTAssertEqual(cluster.goal(.b), .catchingUp) }
            if cluster.promotable(.b) {
                XCTAssertEqual(cluster.node(.a).reached?.state, .primary, "promotable before the primary commits in sync mode")
                XCTAssertGreaterThanOrEqual(cluster.node(.b).lsns[acme]!, cluster.node(.a).lsns[acme]!)
                break
            }
        }
        XCTAssertTrue(sawSecondary)
        XCTAssertTrue(cluster.promotable(.b))
        XCTAssertFalse(cluster.events(containing: "b caught up with a").isEmpty)
        cluster.converge()
        cluster.assertClean()
    }

    func testAPrimaryStillCommittingAloneDoesNotMakeItsStandbyPromotable() {
        // The primary was told to go sync and reports its standby fully caught up, but it has
        // not reached the primary goal yet (it still commits alone): not promotable.
        let cluster = SimCluster()
        cluster.applyAnswersAtOnce = false
        var rounds = 0
        while cluster.goal(.a) != .primary {
            rounds += 1
            guard rounds < 20 else { return XCTFail("a never told primary: \(cluster.state.nodes)") }
            cluster.now += 50
            cluster.keeperStep("a")
            cluster.keeperStep("b")
            cluster.heartbeat("a")
            cluster.heartbeat("b")
            cluster.replicate()
            cluster.tick()
        }
        for _ in 0..<10 {
            cluster.now += 50
            cluster.keeperStep("b") // b reaches secondary; a does not act on its answer
            cluster.commit(acme)
            cluster.replicate()
            cluster.heartbeat("a")
            cluster.heartbeat("b")
            cluster.tick()
        }
        XCTAssertEqual(cluster.node(.a).reached?.state, .waitPrimary)
        XCTAssertEqual(cluster.node(.b).reached?.state, .secondary)
        XCTAssertEqual(cluster.report(of: "a").tenants[acme]?.standbyLSN, cluster.report(of: "a").tenants[acme]?.lsn)
        XCTAssertFalse(cluster.promotable(.b))
        cluster.keeperStep("a") // a goes sync
        cluster.now += 50
        cluster.heartbeat("a")
        cluster.heartbeat("b")
        XCTAssertTrue(cluster.promotable(.b))
        cluster.assertClean()
    }

    func testAHeldUpReportFromBeforeTheLastGoalDoesNotMakeTheStandbyPromotable() {
        // a's heartbeat "primary, standby in sync" is held up in the network. Meanwhile the stream
        // breaks (a goes wait_primary and commits alone), heals, and a is told primary again but
        // has not acted on it. The old report then arrives: it names an older goal, so it does
        // not count, though its state matches the goal's name.
        let cluster = SimCluster()
        cluster.converge()
        cluster.delayHeartbeat("a")
        cluster.applyAnswersAtOnce = false
        cluster.cutStream()
        cluster.now += 50
        cluster.heartbeat("a")
        XCTAssertEqual(cluster.goal(.a), .waitPrimary)
        cluster.keeperStep("a")
        cluster.keeperStep("b")
        cluster.commit(acme) // alone
        cluster.healStream()
        var rounds = 0
        while cluster.goal(.a) != .primary {
            rounds += 1
            guard rounds < 20 else { return XCTFail("a never told primary again: \(cluster.state.nodes)") }
            cluster.now += 50
            cluster.replicate()
            cluster.heartbeat("b")
            cluster.keeperStep("b")
            cluster.heartbeat("a")
        }
        cluster.keeperStep("b")
        cluster.now += 50
        cluster.heartbeat("b")
        XCTAssertEqual(cluster.node(.a).reached?.state, .waitPrimary)
        XCTAssertEqual(cluster.node(.b).reached?.state, .secondary)
        XCTAssertFalse(cluster.promotable(.b))
        cluster.deliverDelayedHeartbeat("a", index: 0)
        XCTAssertFalse(cluster.promotable(.b), "a report from before the last goal made b promotable")
        cluster.keeperStep("a")
        cluster.now += 50
        cluster.heartbeat("a")
        cluster.heartbeat("b")
        XCTAssertTrue(cluster.promotable(.b))
        cluster.assertClean()
    }

    // MARK: Operator commands

    func testSwitchoverIsRefusedWhileTheStandbyIsNotInSync() {
        let cluster = SimCluster()
        cluster.run(ms: 50)
        let result = cluster.switchover()
        XCTAssertFalse(result.accepted)
        XCTAssertTrue(result.message.contains("not in sync"), result.message)
        XCTAssertEqual(cluster.state.events.last?.kind, .refusal)
        XCTAssertEqual(cluster.epoch, Epoch(1))
        cluster.assertClean()
    }

    func testSwitchoverUnderLoadHandsOverWithoutLosingAnAcknowledgedWrite() {
        let cluster = SimCluster()
        cluster.converge(commitsPerStep: 2)
        let result = cluster.switchover()
        XCTAssertTrue(result.accepted, result.message)
        XCTAssertEqual(cluster.goal(.a), .draining)
        var elapsed: Milliseconds = 0
        while cluster.epoch == Epoch(1), elapsed < 2_000 {
            cluster.run(ms: 50, commitsPerStep: 2)
            elapsed += 50
        }
        XCTAssertEqual(cluster.epoch, Epoch(2))
        XCTAssertEqual(cluster.goal(.b), .waitPrimary)
        cluster.converge(commitsPerStep: 2)
        XCTAssertEqual(cluster.id(.primary), "b")
        XCTAssertTrue(cluster.promotable(.a))
        cluster.assertClean()
    }

    func testASwitchoverThatDoesNotFinishIsAbandoned() {
        let cluster = SimCluster()
        cluster.converge()
        cluster.applyAnswersAtOnce = false // a never drains
        XCTAssertTrue(cluster.switchover().accepted)
        cluster.run(ms: cluster.config.switchoverTimeoutMs + 100)
        XCTAssertEqual(cluster.goal(.a), .primary)
        XCTAssertTrue(cluster.promotable(.b))
        XCTAssertFalse(cluster.events(containing: "switchover abandoned").isEmpty)
        cluster.assertClean()
    }

    func testFailoverDrillPromotesAtOnceAndIsRefusedWhenItWouldLoseWrites() {
        let refused = SimCluster()
        refused.run(ms: 50)
        let no = refused.failover()
        XCTAssertFalse(no.accepted)
        XCTAssertTrue(no.message.contains("not promotable"), no.message)

        let cluster = SimCluster()
        cluster.converge(commitsPerStep: 1)
        let result = cluster.failover()
        XCTAssertTrue(result.accepted, result.message)
        XCTAssertEqual(cluster.epoch, Epoch(2))
        let persist = try! XCTUnwrap(cluster.persistIndex())
        let answer = try! XCTUnwrap(cluster.answerIndex("b", .waitPrimary))
        XCTAssertLessThan(persist, answer)
        cluster.converge(commitsPerStep: 1)
        XCTAssertEqual(cluster.id(.primary), "b")
        cluster.assertClean()
        refused.assertClean()
    }

    func testForcedPromotionReportsTheLostLSNs() {
        let cluster = SimCluster()
        cluster.converge()
        for _ in 0..<5 { cluster.commit(acme) }
        cluster.kill(.standby)
        cluster.run(ms: 100)
        for _ in 0..<7 { cluster.commit(acme) }
        for _ in 0..<2 { cluster.commit(globex) }
        cluster.run(ms: 100) // a reports its lsns: acme 12, globex 2; b holds acme 5, globex 0
        cluster.kill(.primary)
        cluster.revive(.b)
        cluster.run(ms: 1_000)
        XCTAssertEqual(cluster.epoch, Epoch(1))

        let plain = cluster.promote("b")
        XCTAssertFalse(plain.accepted)
        XCTAssertTrue(plain.message.contains("acme lsns 6...12 (7 commits)"), plain.message)
        let forceOnly = cluster.promote("b", force: true)
        XCTAssertFalse(forceOnly.accepted)
        XCTAssertTrue(forceOnly.message.contains("--accept-data-loss"), forceOnly.message)

        let forced = cluster.promote("b", force: true, acceptDataLoss: true)
        XCTAssertTrue(forced.accepted, forced.message)
        let loss = try! XCTUnwrap(forced.dataLoss)
        XCTAssertEqual(loss.tenants.map(\.tenant), [acme, globex])
        XCTAssertEqual(loss.tenants.map(\.promotedLSN), [5, 0])
        XCTAssertEqual(loss.tenants.map(\.primaryLSN), [12, 2])
        XCTAssertTrue(loss.description.contains("globex lsns 1...2 (2 commits)"), loss.description)
        XCTAssertEqual(cluster.epoch, Epoch(2))
        XCTAssertEqual(cluster.goal(.b), .waitPrimary)
        XCTAssertFalse(cluster.events(containing: "accepting data loss").isEmpty)
        cluster.assertClean()
    }

    func testForcedPromotionIsRefusedWhileThePrimaryIsHeard() {
        let cluster = SimCluster()
        cluster.converge()
        cluster.kill(.standby)
        cluster.run(ms: 200)
        cluster.revive(.standby)
        cluster.cutStream() // b stays behind
        cluster.run(ms: 200)
        let result = cluster.promote("b", force: true, acceptDataLoss: true)
        XCTAssertFalse(result.accepted)
        XCTAssertTrue(result.message.contains("it is not lost"), result.message)
        XCTAssertEqual(cluster.epoch, Epoch(1))
        cluster.assertClean()
    }

    func testMaintenanceOfTheStandbyAndBack() {
        let cluster = SimCluster()
        cluster.converge()
        let on = cluster.maintenance(.b, true)
        XCTAssertTrue(on.accepted, on.message)
        // Not promotable and the primary alone first, in that order.
        let persist = try! XCTUnwrap(cluster.persistIndex())
        let answer = try! XCTUnwrap(cluster.answerIndex("a", .waitPrimary))
        XCTAssertLessThan(persist, answer)
        XCTAssertFalse(cluster.promotable(.b))
        XCTAssertEqual(cluster.goal(.b), .catchingUp)
        cluster.run(ms: 200)
        XCTAssertEqual(cluster.goal(.b), .maintenance)
        XCTAssertEqual(cluster.node(.b).reached?.state, .maintenance)

        // b is down for maintenance: a is the only healthy node.
        let refused = cluster.maintenance(.a, true)
        XCTAssertFalse(refused.accepted)
        XCTAssertTrue(refused.message.contains("only healthy node"), refused.message)

        XCTAssertTrue(cluster.maintenance(.b, false).accepted)
        cluster.converge()
        cluster.assertClean()
    }

    func testMaintenanceOfThePrimarySwitchesOverFirst() {
        let cluster = SimCluster()
        cluster.converge(commitsPerStep: 1)
        let result = cluster.maintenance(.a, true)
        XCTAssertTrue(result.accepted, result.message)
        XCTAssertEqual(cluster.goal(.a), .draining)
        cluster.run(ms: 1_000, commitsPerStep: 1)
        XCTAssertEqual(cluster.epoch, Epoch(2))
        XCTAssertEqual(cluster.goal(.a), .maintenance)
        XCTAssertEqual(cluster.goal(.b), .waitPrimary)
        XCTAssertTrue(cluster.maintenance(.a, false).accepted)
        cluster.converge(commitsPerStep: 1)
        XCTAssertEqual(cluster.id(.primary), "b")
        cluster.assertClean()
    }

    func testMaintenanceOnTheOnlyHealthyNodeIsRefused() {
        let cluster = SimCluster()
        cluster.converge()
        cluster.kill(.primary)
        cluster.cutFromMonitor(.standby)
        cluster.run(ms: 600)
        cluster.healMonitorLink(.standby)
        cluster.run(ms: 50)
        // a is silent: b is the only healthy node.
        let result = cluster.maintenance(.b, true)
        XCTAssertFalse(result.accepted)
        XCTAssertTrue(result.message.contains("only healthy node"), result.message)
        cluster.assertClean()
    }

    // MARK: Monitor restarts

    func testARestartedMonitorPromotesNothingUntilTheGraceIsOver() {
        let cluster = SimCluster()
        cluster.converge()
        cluster.restartMonitor()
        cluster.kill(.primary) // the monitor will never hear from a again
        cluster.run(ms: 1_900)
        XCTAssertEqual(cluster.epoch, Epoch(1), "promoted during the startup grace")
        XCTAssertFalse(cluster.switchover().accepted)
        cluster.run(ms: 200)
        XCTAssertEqual(cluster.epoch, Epoch(2))
        XCTAssertFalse(cluster.events(containing: "startup grace of 2000 ms over without a word from a").isEmpty)
        cluster.assertClean()
    }

    func testARestartedMonitorDecidesAgainOnceItHeardEveryNode() {
        let cluster = SimCluster()
        cluster.converge()
        cluster.kill(.standby)
        cluster.run(ms: 100)
        XCTAssertFalse(cluster.promotable(.b))
        cluster.restartMonitor()
        XCTAssertFalse(cluster.promotable(.b), "the store kept it")
        cluster.revive(.standby)
        cluster.run(ms: 50)
        XCTAssertFalse(cluster.events(containing: "heard from every node since the monitor started").isEmpty)
        cluster.converge()
        cluster.assertClean()
    }

    // MARK: One node

    func testALoneNodeIsSingleAndHasNoFailover() {
        let cluster = SimCluster(singleNode: true)
        XCTAssertEqual(cluster.goal(.a), .single)
        cluster.run(ms: 200, commitsPerStep: 1)
        XCTAssertEqual(cluster.node(.a).reached?.state, .single)
        XCTAssertEqual(cluster.node(.a).lsns[acme], 4)
        XCTAssertFalse(cluster.switchover().accepted)
        XCTAssertFalse(cluster.failover().accepted)
        let maintenance = cluster.maintenance(.a, true)
        XCTAssertFalse(maintenance.accepted)
        XCTAssertTrue(maintenance.message.contains("only node"), maintenance.message)
        cluster.kill(.a)
        cluster.run(ms: 1_000)
        XCTAssertFalse(cluster.events(containing: "a lone node has no failover").isEmpty)
        XCTAssertEqual(cluster.epoch, Epoch(1))
        cluster.assertClean()
    }
}
