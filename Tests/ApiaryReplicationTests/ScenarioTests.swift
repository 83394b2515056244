import ApiaryCore
import ApiaryReplication
import Foundation
import XCTest

// Short scenarios for the known edges, driving one core at a time by hand (the simulator
// covers them in combination). Records carry made-up checksums: the cores compare them but
// never compute them.

private let tenant = try! TenantID("acme")
private let standbyPeer = PeerIdentity(nodeID: "node-b", role: .node)
private let primaryPeer = PeerIdentity(nodeID: "node-a", role: .node)
private let conn1 = ConnectionID(1)
private let conn2 = ConnectionID(2)

private func record(_ lsn: LSN, epoch: Epoch = Epoch(1), variant: UInt64 = 0) -> Record {
    Record(epoch: epoch, lsn: lsn, dbSizePages: 1, checksum: lsn &* 1_000 &+ variant, pages: [Page(number: 1, bytes: [UInt8(truncatingIfNeeded: lsn)])])
}

private func summary(_ lsn: LSN, epoch: Epoch = Epoch(1), variant: UInt64 = 0) -> RecordSummary {
    RecordSummary(record(lsn, epoch: epoch, variant: variant))
}

private func testConfig() -> ReplicationConfig {
    var c = ReplicationConfig()
    c.standbyWaitMs = 500
    c.peerTimeoutMs = 1_000
    c.heartbeatIntervalMs = 100
    c.leaseMs = 1_000
    return c
}

/// `actions` without the periodic heartbeats.
private func withoutHeartbeats(_ actions: [PrimaryAction]) -> [PrimaryAction] {
    actions.filter { if case .send(_, .primaryHeartbeat) = $0 { return false } else { return true } }
}

/// The messages sent, in order, among `actions`.
private func sent(_ actions: [PrimaryAction]) -> [Message] {
    actions.compactMap { if case .send(_, let m) = $0 { return m } else { return nil } }
}

private func sent(_ actions: [StandbyAction]) -> [Message] {
    actions.compactMap { if case .send(_, let m) = $0 { return m } else { return nil } }
}

private func hello(epoch: Epoch = Epoch(1), _ positions: [TenantPosition]) -> Message {
    .hello(Hello(nodeID: "node-b", epoch: epoch, tenants: positions))
}

/// A primary of epoch 1 whose log holds `lastLSN` records of `tenant`, with the standby
/// connected on `conn1` and its hello processed; returns the hello's actions.
private func primary(
    lastLSN: LSN = 0, firstLSN: LSN = 1, mode: ReplicationMode = .sync,
    standby position: TenantPosition? = nil
) -> (PrimaryReplication, [PrimaryAction]) {
    let logs: [TenantID: PrimaryTenantLog] = lastLSN == 0 ? [:] : [
        tenant: PrimaryTenantLog(last: summary(lastLSN), firstLSN: firstLSN, baseChecksum: (firstLSN - 1) * 1_000),
    ]
    var p = PrimaryReplication(nodeID: "node-a", epoch: Epoch(1), mode: mode, config: testConfig(), standbyNodeID: "node-b", tenants: logs)
    XCTAssertEqual(p.onConnected(conn1, peer: standbyPeer, now: 0), [])
    let actions = p.onMessage(hello(position.map { [$0] } ?? []), from: conn1, now: 0)
    return (p, actions)
}

final class PrimaryScenarioTests: XCTestCase {
    func testSyncCommitCompletesOnlyAfterTheStandbysAck() {
        var (p, actions) = primary()
        XCTAssertEqual(actions, [.send(conn1, .welcome(Welcome(epoch: Epoch(1), nodeID: "node-a")))])
        let r = record(1)
        XCTAssertEqual(p.onLocalRecord(tenant, r, now: 10),
                       [.send(conn1, .record(RecordMessage(epoch: Epoch(1), tenant: tenant, committedLSN: 0, record: r)))])
        XCTAssertEqual(p.status(of: tenant)?.committedLSN, 0)
        XCTAssertEqual(p.onMessage(.ack(Ack(epoch: Epoch(1), tenant: tenant, lsn: 1, leaseMs: 1_000)), from: conn1, now: 30),
                       [.commitDurable(tenant, 1)])
        // The lease counts from when the record was sent, not from when the ack arrived.
        XCTAssertEqual(p.leaseGrantedUntil, 1_010)
    }

    func testADrainingPrimaryTakesNoCommitAndGivesItsLeaseUpAtOnce() {
        var (p, _) = primary()
        _ = p.onLocalRecord(tenant, record(1), now: 10)
        _ = p.onMessage(.ack(Ack(epoch: Epoch(1), tenant: tenant, lsn: 1, leaseMs: 1_000)), from: conn1, now: 30)
        XCTAssertTrue(p.holdsLease(now: 40))
        _ = p.onDrainingChanged(true, now: 50)
        XCTAssertFalse(p.holdsLease(now: 50), "a hand-over's standby is promoted without waiting out this lease")
        XCTAssertEqual(p.onLocalRecord(tenant, record(2), now: 60), [.commitFailed(tenant, 2, .draining)])
        _ = p.onDrainingChanged(false, now: 70)
        XCTAssertTrue(p.holdsLease(now: 70))
    }

    func testAPrimaryStartedUnconfirmedUsesNoLeaseUntilTheMonitorConfirmsIt() {
        var p = PrimaryReplication(nodeID: "node-a", epoch: Epoch(1), mode: .sync, config: testConfig(), standbyNodeID: "node-b", leaseConfirmed: false)
        _ = p.onConnected(conn1, peer: standbyPeer, now: 0)
        _ = p.onMessage(hello([]), from: conn1, now: 0)
        _ = p.onLocalRecord(tenant, record(1), now: 10)
        XCTAssertEqual(p.onMessage(.ack(Ack(epoch: Epoch(1), tenant: tenant, lsn: 1, leaseMs: 1_000)), from: conn1, now: 30), [.commitDurable(tenant, 1)],
                       "it commits in sync mode as usual")
        XCTAssertFalse(p.holdsLease(now: 40), "it may have been handing over when it stopped")
        p.onLeaseConfirmed()
        XCTAssertTrue(p.holdsLease(now: 40))
    }

    /// A record taken alone (wait_primary) whose local fsync is not done when the mode switches
    /// to sync still commits without the standby: the monitor must see it as the primary's
    /// (readyLSN), or it could count the standby in sync without it (invariant 2).
    func testARecordTakenAloneIsReportedReadyAcrossASwitchToSync() {
        var p = PrimaryReplication(nodeID: "node-a", epoch: Epoch(1), mode: .waitPrimary, config: testConfig(), standbyNodeID: "node-b",
                                   reportsLocalSync: true)
        XCTAssertEqual(p.onLocalRecord(tenant, record(1), now: 10).filter { if case .commitDurable = $0 { return true }; return false }, [],
                       "not committed before its local fsync")
        _ = p.onModeChanged(.sync, now: 11)
        XCTAssertEqual(p.status(of: tenant)?.committedLSN, 0)
        XCTAssertEqual(p.status(of: tenant)?.readyLSN, 1, "it will commit without the standby: the monitor must count it")
        XCTAssertEqual(p.onLocalSynced(tenant, throughLSN: 1, now: 12), [.commitDurable(tenant, 1)])
    }

    func testLocalModesCommitAtOnceAndStillStream() {
        var (p, _) = primary(mode: .waitPrimary)
        let r = record(1)
        XCTAssertEqual(p.onLocalRecord(tenant, r, now: 10), [
            .commitDurable(tenant, 1),
            .send(conn1, .record(RecordMessage(epoch: Epoch(1), tenant: tenant, committedLSN: 1, record: r))),
        ])
    }

    func testStandbyBehindCatchesUpFromTheLog() {
        // The standby applied lsn 2 of a log that now ends at 5.
        var (p, actions) = primary(lastLSN: 5, standby: TenantPosition(tenant: tenant, appliedLSN: 2, appliedChecksum: summary(2).checksum, lastLSN: 2, tail: []))
        guard case .readLogSummaries(conn1, let request)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertEqual([request.fromLSN, request.throughLSN], [2, 2], "only the applied point needs checking")
        actions = p.onLogSummaries(conn1, request: request, summaries: [summary(2)], now: 1)
        guard case .readLog(conn1, let read)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertEqual([read.fromLSN, read.throughLSN], [3, 5])
        actions = p.onLogRead(conn1, request: read, records: [record(3), record(4), record(5)], now: 2)
        XCTAssertEqual(sent(actions).map(\.kind), ["record", "record", "record"])
        XCTAssertEqual(p.status(of: tenant)?.inFlightRecords, 3)
    }

    func testDivergedUnappliedTailIsRewound() {
        // The standby's lsn 5 is a record the primary rolled back (another checksum).
        let position = TenantPosition(tenant: tenant, appliedLSN: 3, appliedChecksum: summary(3).checksum, lastLSN: 5,
                                      tail: [summary(4), summary(5, variant: 7)])
        var (p, actions) = primary(lastLSN: 6, standby: position)
        guard case .readLogSummaries(conn1, let request)? = actions.last else { return XCTFail("\(actions)") }
        actions = p.onLogSummaries(conn1, request: request, summaries: (request.fromLSN...request.throughLSN).map { summary($0) }, now: 1)
        XCTAssertEqual(sent(actions), [.rewind(Rewind(epoch: Epoch(1), tenant: tenant, toLSN: 4))])
        guard case .readLog(_, let read)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertEqual([read.fromLSN, read.throughLSN], [5, 6])

        // The standby side of the same rewind.
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), tenants: [
            tenant: StandbyTenantLog(appliedLSN: 3, appliedChecksum: summary(3).checksum, tail: [summary(4), summary(5, variant: 7)]),
        ], now: 0)
        let welcomed = welcomedStandby(&s)
        XCTAssertEqual(welcomed, hello([position]))
        XCTAssertEqual(s.onMessage(.rewind(Rewind(epoch: Epoch(1), tenant: tenant, toLSN: 4)), from: conn1, now: 2),
                       [.truncateLog(tenant, afterLSN: 4)])
        XCTAssertEqual(s.status(of: tenant)?.lastLSN, 4)
    }

    func testDivergedUnappliedTailIsReportedExactly() {
        let position = TenantPosition(tenant: tenant, appliedLSN: 3, appliedChecksum: summary(3).checksum, lastLSN: 5,
                                      tail: [summary(4), summary(5, variant: 7)])
        var (p, actions) = primary(lastLSN: 6, standby: position)
        guard case .readLogSummaries(conn1, let request)? = actions.last else { return XCTFail("\(actions)") }
        actions = p.onLogSummaries(conn1, request: request, summaries: (request.fromLSN...request.throughLSN).map { summary($0) }, now: 1)
        let reports = actions.compactMap { if case .standbyDiverged(let d) = $0 { return d } else { return nil } }
        XCTAssertEqual(reports, [Divergence(tenant: tenant, standby: "node-b", sharedThroughLSN: 4, discardedFromLSN: 5, discardedThroughLSN: 5,
                                            discardedEpochs: [Epoch(1)], bySnapshot: false)])
    }

    /// A former primary rejoins: its database holds lsn 5 of epoch 1, which it committed but
    /// its standby never confirmed; the new primary wrote its own lsn 5 and 6 in epoch 2. The
    /// rejoining node's history (its applied records) lets the new primary name exactly what
    /// the snapshot replaces.
    func testARejoiningFormerPrimarysDiscardedRecordsAreNamedExactly() {
        let history = (1...4).map { summary($0) } + [summary(5, variant: 9)]
        let position = TenantPosition(tenant: tenant, appliedLSN: 5, appliedChecksum: summary(5, variant: 9).checksum, lastLSN: 5, tail: [],
                                      history: history)
        let ours: [LSN: RecordSummary] = [1: summary(1), 2: summary(2), 3: summary(3), 4: summary(4), 5: summary(5, epoch: Epoch(2)), 6: summary(6, epoch: Epoch(2))]
        let logs = [tenant: PrimaryTenantLog(last: ours[6]!, firstLSN: 1, baseChecksum: 0)]
        var p = PrimaryReplication(nodeID: "node-a", epoch: Epoch(2), mode: .sync, config: testConfig(), standbyNodeID: "node-b", tenants: logs)
        _ = p.onConnected(conn1, peer: standbyPeer, now: 0)
        var actions = p.onMessage(hello(epoch: Epoch(2), [position]), from: conn1, now: 0)
        // First the applied point is checked; it differs, so the history is read and compared.
        guard case .readLogSummaries(conn1, let check)? = actions.last else { return XCTFail("\(actions)") }
        actions = p.onLogSummaries(conn1, request: check, summaries: (check.fromLSN...check.throughLSN).map { ours[$0]! }, now: 1)
        guard case .readLogSummaries(conn1, let compare)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertEqual([compare.fromLSN, compare.throughLSN], [1, 5])
        actions = p.onLogSummaries(conn1, request: compare, summaries: (compare.fromLSN...compare.throughLSN).map { ours[$0]! }, now: 2)
        XCTAssertEqual(actions.count, 2, "\(actions)")
        XCTAssertEqual(actions.first, .standbyDiverged(Divergence(tenant: tenant, standby: "node-b", sharedThroughLSN: 4, discardedFromLSN: 5,
                                                                  discardedThroughLSN: 5, discardedEpochs: [Epoch(1)], bySnapshot: true)))
        guard case .sendSnapshot(conn1, _)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertEqual("\(Divergence(tenant: tenant, standby: "node-b", sharedThroughLSN: 4, discardedFromLSN: 5, discardedThroughLSN: 7, discardedEpochs: [Epoch(1)], bySnapshot: true))",
                       "node node-b discards tenant acme's lsns 5–7 (epoch 1): not on the primary's history; histories part after lsn 4; replaced by a snapshot")
    }

    /// Without a history (an older standby's log compacted), the report says the point was
    /// not found rather than guessing.
    func testADivergenceWithoutHistorySaysThePointWasNotFound() {
        let position = TenantPosition(tenant: tenant, appliedLSN: 7, appliedChecksum: 42, lastLSN: 7, tail: [])
        let (_, actions) = primary(lastLSN: 6, standby: position)
        XCTAssertEqual(actions.compactMap { if case .standbyDiverged(let d) = $0 { return d } else { return nil } },
                       [Divergence(tenant: tenant, standby: "node-b", sharedThroughLSN: nil, discardedFromLSN: 7, discardedThroughLSN: 7, discardedEpochs: [], bySnapshot: true)])
        guard case .sendSnapshot? = actions.last else { return XCTFail("\(actions)") }
    }

    func testTheStandbyKeepsItsLastAppliedRecordsForItsHello() {
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), tenants: [
            tenant: StandbyTenantLog(appliedLSN: 2, appliedChecksum: summary(2).checksum, tail: [summary(3)], history: [summary(1), summary(2)]),
        ], now: 0)
        guard case .hello(let h)? = welcomedStandby(&s) else { return XCTFail() }
        XCTAssertEqual(h.tenants.first?.history, [summary(1), summary(2)])
        // Applying moves records from the tail into the history.
        _ = s.onMessage(.primaryHeartbeat(PrimaryHeartbeat(epoch: Epoch(1), sentAtMs: 1, committed: [TenantCommitted(tenant: tenant, committedLSN: 3)])), from: conn1, now: 1)
        XCTAssertEqual(s.status(of: tenant)?.appliedLSN, 3)
        _ = s.onDisconnected(conn1, now: 2)
        XCTAssertEqual(s.onTick(now: 10_000), [.connect])
        guard case .hello(let again)? = sent(s.onConnected(conn2, peer: primaryPeer, now: 10_000)).first else { return XCTFail() }
        XCTAssertEqual(again.tenants.first?.history, [summary(1), summary(2), summary(3)])
    }

    func testLogNoLongerReachingBackSendsASnapshotThenStreams() {
        var (p, actions) = primary(lastLSN: 12, firstLSN: 10, standby: TenantPosition(tenant: tenant, appliedLSN: 3, appliedChecksum: summary(3).checksum, lastLSN: 3, tail: []))
        guard case .sendSnapshot(conn1, let request)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertEqual(request.epoch, Epoch(1))
        XCTAssertEqual(p.onSnapshotSent(conn1, request: request, lsn: 12, now: 5), [])
        XCTAssertEqual(p.onLocalRecord(tenant, record(13), now: 6), [], "records wait for the snapshot's ack")
        actions = p.onMessage(.ack(Ack(epoch: Epoch(1), tenant: tenant, lsn: 12, leaseMs: 1_000)), from: conn1, now: 20)
        guard case .readLog(_, let read)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertEqual([read.fromLSN, read.throughLSN], [13, 13])
        XCTAssertEqual(p.leaseGrantedUntil, 1_000, "the snapshot's lease counts from when it was asked for")

        // The standby side: scratch file, install, ack.
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), now: 0)
        _ = welcomedStandby(&s)
        let page = Page(number: 1, bytes: [1])
        XCTAssertEqual(s.onMessage(.snapshotBegin(SnapshotBegin(epoch: Epoch(1), tenant: tenant, lsn: 12, dbSizePages: 1)), from: conn1, now: 1),
                       [.beginSnapshot(tenant, lsn: 12, dbSizePages: 1)])
        XCTAssertEqual(s.onMessage(.snapshotPages(SnapshotPages(epoch: Epoch(1), tenant: tenant, pages: [page])), from: conn1, now: 1),
                       [.writeSnapshotPages(tenant, [page])])
        XCTAssertEqual(s.onMessage(.snapshotEnd(SnapshotEnd(epoch: Epoch(1), tenant: tenant, lsn: 12, checksum: 99)), from: conn1, now: 1),
                       [.installSnapshot(tenant, lsn: 12, dbSizePages: 1, checksum: 99)])
        XCTAssertEqual(sent(s.onSnapshotInstalled(tenant, lsn: 12, now: 3)), [.ack(Ack(epoch: Epoch(1), tenant: tenant, lsn: 12, leaseMs: 1_000))])
        XCTAssertEqual(s.status(of: tenant)?.appliedLSN, 12)
    }

    func testNoStandbyInSyncModeFailsAfterStandbyWaitAsUnavailable() {
        var p = PrimaryReplication(nodeID: "node-a", epoch: Epoch(1), mode: .sync, config: testConfig(), standbyNodeID: "node-b")
        XCTAssertEqual(p.onLocalRecord(tenant, record(1), now: 0), [])
        XCTAssertEqual(p.onTick(now: 499), [], "a commit never fails before standbyWaitMs")
        XCTAssertEqual(p.onTick(now: 500), [.commitFailed(tenant, 1, .standbyUnavailable)])
        XCTAssertEqual(p.status(of: tenant)?.lastLSN, 0, "the lsn is free for the next commit")
        XCTAssertEqual(p.onLocalRecord(tenant, record(1, variant: 1), now: 600), [])
    }

    func testSentButUnackedFailsAsOutcomeUnknownAndIsRewoundOnceItsAcksAreIn() {
        var (p, _) = primary()
        _ = p.onLocalRecord(tenant, record(1), now: 0)
        XCTAssertEqual(withoutHeartbeats(p.onTick(now: 500)), [.commitFailed(tenant, 1, .outcomeUnknown)])
        // The next commit reuses lsn 1 but is not sent while the old record's ack may be under way.
        XCTAssertEqual(p.onLocalRecord(tenant, record(1, variant: 1), now: 510), [])
        let actions = p.onMessage(.ack(Ack(epoch: Epoch(1), tenant: tenant, lsn: 1, leaseMs: 1_000)), from: conn1, now: 520)
        XCTAssertFalse(actions.contains(.commitDurable(tenant, 1)), "an ack of the rolled-back record commits nothing")
        XCTAssertEqual(sent(actions), [.rewind(Rewind(epoch: Epoch(1), tenant: tenant, toLSN: 0))])
        guard case .readLog(_, let read)? = actions.last else { return XCTFail("\(actions)") }
        XCTAssertEqual([read.fromLSN, read.throughLSN], [1, 1])
    }

    func testAReconnectingStandbysHelloCompletesWhatItHolds() {
        var (p, _) = primary()
        _ = p.onLocalRecord(tenant, record(1), now: 0)
        XCTAssertEqual(p.onDisconnected(conn1, now: 10), [])
        XCTAssertEqual(p.onConnected(conn2, peer: standbyPeer, now: 20), [])
        let actions = p.onMessage(hello([TenantPosition(tenant: tenant, appliedLSN: 0, appliedChecksum: 0, lastLSN: 1, tail: [summary(1)])]), from: conn2, now: 30)
        XCTAssertTrue(actions.contains(.commitDurable(tenant, 1)), "\(actions)")
    }

    func testAStandbyThatProvablyLacksARecordMakesItsTimeoutUnavailableNotUnknown() {
        var (p, _) = primary()
        _ = p.onLocalRecord(tenant, record(1), now: 0)
        _ = p.onDisconnected(conn1, now: 10)
        _ = p.onConnected(conn2, peer: standbyPeer, now: 20)
        // The standby's lsn 1 is another record: ours never arrived.
        _ = p.onMessage(hello([TenantPosition(tenant: tenant, appliedLSN: 0, appliedChecksum: 0, lastLSN: 1, tail: [summary(1, variant: 5)])]), from: conn2, now: 30)
        _ = p.onDisconnected(conn2, now: 40)
        XCTAssertEqual(p.onTick(now: 500), [.commitFailed(tenant, 1, .standbyUnavailable)])
    }

    func testOlderEpochMessageIsRejected() {
        var (p, _) = primary()
        _ = p.onLocalRecord(tenant, record(1), now: 0)
        let actions = p.onMessage(.ack(Ack(epoch: Epoch(0), tenant: tenant, lsn: 1, leaseMs: 1_000)), from: conn1, now: 5)
        guard case .send(conn1, .reject(let r))? = actions.first else { return XCTFail("\(actions)") }
        XCTAssertEqual(r.code, .staleEpoch)
        XCTAssertEqual(actions.last, .closeConnection(conn1, .rejectedPeer(.staleEpoch)))
        XCTAssertNil(p.leaseGrantedUntil)
        XCTAssertEqual(p.status(of: tenant)?.committedLSN, 0)

        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(5), config: testConfig(), now: 0)
        _ = welcomedStandby(&s, epoch: Epoch(5))
        let standbyActions = s.onMessage(.record(RecordMessage(epoch: Epoch(4), tenant: tenant, committedLSN: 1, record: record(1))), from: conn1, now: 1)
        XCTAssertEqual(standbyActions.count, 2)
        guard case .send(conn1, .reject(let sr))? = standbyActions.first else { return XCTFail("\(standbyActions)") }
        XCTAssertEqual(sr.code, .staleEpoch)
        XCTAssertEqual(standbyActions.last, .closeConnection(conn1, .rejectedPeer(.staleEpoch)))
        XCTAssertNil(s.status(of: tenant), "nothing of the stale message was kept")
    }

    func testNewerEpochMakesThePrimaryStepDown() {
        var (p, _) = primary()
        _ = p.onLocalRecord(tenant, record(1), now: 0)
        _ = p.onLocalRecord(tenant, record(2), now: 0)
        _ = p.onConnected(conn2, peer: standbyPeer, now: 1)
        XCTAssertEqual(p.onMessage(hello(epoch: Epoch(2), []), from: conn2, now: 2), [
            .stepDown(newerEpoch: Epoch(2)),
            .commitFailed(tenant, 1, .outcomeUnknown),
            .commitFailed(tenant, 2, .outcomeUnknown),
            .closeConnection(conn2, .newerEpoch(Epoch(2))),
            .closeConnection(conn1, .newerEpoch(Epoch(2))),
        ])
        XCTAssertEqual(p.steppedDownTo, Epoch(2))
        XCTAssertEqual(p.onLocalRecord(tenant, record(1), now: 3), [.commitFailed(tenant, 1, .steppedDown)])

        // A standby that hears of a newer epoch reports it and drops the connection.
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), now: 0)
        _ = welcomedStandby(&s)
        let actions = s.onMessage(.primaryHeartbeat(PrimaryHeartbeat(epoch: Epoch(3), sentAtMs: 0, committed: [])), from: conn1, now: 5)
        XCTAssertEqual(actions, [.epochStale(newerEpoch: Epoch(3)), .closeConnection(conn1, .newerEpoch(Epoch(3)))])
    }

    func testUnknownProtocolVersionIsRejectedClearly() throws {
        var w = ByteWriter()
        w.write(UInt8(1))
        w.write(UInt32(0x4150_5250))
        let unknown = Hello.currentProtocolVersion + 1
        w.write(unknown)
        w.write([1, 2, 3])
        let message = try WireCodec.decode(body: w.bytes)
        var p = PrimaryReplication(nodeID: "node-a", epoch: Epoch(1), mode: .sync, config: testConfig(), standbyNodeID: "node-b")
        _ = p.onConnected(conn1, peer: standbyPeer, now: 0)
        let actions = p.onMessage(message, from: conn1, now: 1)
        guard case .send(conn1, .reject(let r))? = actions.first else { return XCTFail("\(actions)") }
        XCTAssertEqual(r.code, .unsupportedVersion)
        XCTAssertTrue(r.reason.contains("version \(unknown)") && r.reason.contains("version \(Hello.currentProtocolVersion)"), r.reason)
        XCTAssertEqual(actions.last, .closeConnection(conn1, .rejectedPeer(.unsupportedVersion)))
    }

    func testPeersOtherThanTheStandbyNodeAreRejected() {
        var p = PrimaryReplication(nodeID: "node-a", epoch: Epoch(1), mode: .sync, config: testConfig(), standbyNodeID: "node-b")
        XCTAssertEqual(sent(p.onConnected(conn1, peer: PeerIdentity(nodeID: "gw", role: .other("gateway")), now: 0)).map(\.kind), ["reject"])
        // Refused on its certificate's name, before it says anything.
        let actions = p.onConnected(conn2, peer: PeerIdentity(nodeID: "node-c", role: .node), now: 0)
        guard case .send(conn2, .reject(let r))? = actions.first else { return XCTFail("\(actions)") }
        XCTAssertTrue(r.reason.contains("'node-c' is not this primary's standby (the standby is 'node-b')"), r.reason)
        XCTAssertEqual(actions.last, .closeConnection(conn2, .rejectedPeer(.unexpectedPeer)))
        XCTAssertEqual(p.onMessage(.hello(Hello(nodeID: "node-c", epoch: Epoch(1), tenants: [])), from: conn2, now: 1), [])
        // A primary with no standby assigned lets no node replicate.
        var alone = PrimaryReplication(nodeID: "node-a", epoch: Epoch(1), mode: .single, config: testConfig())
        XCTAssertEqual(alone.onConnected(conn1, peer: standbyPeer, now: 0).last, .closeConnection(conn1, .rejectedPeer(.unexpectedPeer)))
    }

    func testSilentStandbyIsClosedAfterPeerTimeout() {
        var (p, _) = primary()
        XCTAssertEqual(p.onTick(now: 999).filter { if case .closeConnection = $0 { return true } else { return false } }, [])
        XCTAssertTrue(p.onTick(now: 1_000).contains(.closeConnection(conn1, .peerTimeout)))
        XCTAssertNil(p.standbyConnection)
    }

    func testCommitLimits() {
        var c = testConfig()
        c.pendingCommitsMax = 1
        c.recordBytesMax = 40
        var p = PrimaryReplication(nodeID: "node-a", epoch: Epoch(1), mode: .sync, config: c, standbyNodeID: "node-b")
        let big = Record(epoch: Epoch(1), lsn: 1, dbSizePages: 1, checksum: 1, pages: [Page(number: 1, bytes: Array(repeating: 0, count: 64))])
        XCTAssertEqual(p.onLocalRecord(tenant, big, now: 0), [.commitFailed(tenant, 1, .recordTooLarge)])
        XCTAssertEqual(p.onLocalRecord(tenant, record(1), now: 0), [])
        XCTAssertEqual(p.onLocalRecord(tenant, record(2), now: 0), [.commitFailed(tenant, 2, .overloaded)])
    }

    /// A dropped tenant: forgotten once its commits are settled. Acks still on their way for
    /// its records are no violation, nothing more is sent for it (heartbeats included), and a
    /// standby that reconnects still holding it gets no stream for it.
    func testARemovedTenantIsForgottenAndItsLateAcksAreNoViolation() {
        var (p, _) = primary(mode: .waitPrimary)
        let r1 = record(1), r2 = record(2)
        _ = p.onLocalRecord(tenant, r1, now: 10)
        _ = p.onLocalRecord(tenant, r2, now: 11)
        XCTAssertEqual(p.status(of: tenant)?.committedLSN, 2, "committed alone: nothing waits")
        XCTAssertEqual(p.onTenantRemoved(tenant, now: 20), [])
        XCTAssertNil(p.status(of: tenant))
        XCTAssertFalse(p.tenantIDs.contains(tenant))
        XCTAssertEqual(p.onMessage(.ack(Ack(epoch: Epoch(1), tenant: tenant, lsn: 2, leaseMs: 1_000)), from: conn1, now: 30), [],
                       "an ack sent before the drop is ignored, not a protocol violation")
        let beats = sent(p.onTick(now: 1_000)).compactMap { m -> PrimaryHeartbeat? in if case .primaryHeartbeat(let h) = m { return h } else { return nil } }
        XCTAssertFalse(beats.contains { $0.committed.contains { $0.tenant == tenant } }, "heartbeats tell nothing of it")
        // A standby that still holds it reconnects: no stream, no snapshot, no rewind.
        XCTAssertEqual(p.onDisconnected(conn1, now: 1_100), [])
        XCTAssertEqual(p.onConnected(conn2, peer: standbyPeer, now: 1_200), [])
        let position = TenantPosition(tenant: tenant, appliedLSN: 2, appliedChecksum: summary(2).checksum, lastLSN: 2, tail: [])
        XCTAssertEqual(withoutHeartbeats(p.onMessage(hello([position]), from: conn2, now: 1_200)),
                       [.send(conn2, .welcome(Welcome(epoch: Epoch(1), nodeID: "node-a")))])
        // An ack for a tenant the primary never had is still a violation.
        let other = try! TenantID("other")
        XCTAssertTrue(p.onMessage(.ack(Ack(epoch: Epoch(1), tenant: other, lsn: 1, leaseMs: 1_000)), from: conn2, now: 1_300)
            .contains { if case .closeConnection(conn2, _) = $0 { return true } else { return false } })
    }

    func testLeavingSyncModeCompletesWaitingCommits() {
        var p = PrimaryReplication(nodeID: "node-a", epoch: Epoch(1), mode: .sync, config: testConfig(), standbyNodeID: "node-b")
        _ = p.onLocalRecord(tenant, record(1), now: 0)
        _ = p.onLocalRecord(tenant, record(2), now: 0)
        XCTAssertEqual(p.onModeChanged(.waitPrimary, now: 1), [.commitDurable(tenant, 1), .commitDurable(tenant, 2)])
    }
}

/// Connects `s` on `conn1` and lets the primary welcome it; returns the hello it sent.
@discardableResult
private func welcomedStandby(_ s: inout StandbyReplication, epoch: Epoch = Epoch(1)) -> Message? {
    XCTAssertEqual(s.onTick(now: 0), [.connect])
    let hello = sent(s.onConnected(conn1, peer: primaryPeer, now: 0)).first
    XCTAssertEqual(s.onMessage(.welcome(Welcome(epoch: epoch, nodeID: "node-a")), from: conn1, now: 0), [])
    XCTAssertEqual(s.streamingConnection, conn1)
    return hello
}

final class StandbyScenarioTests: XCTestCase {
    /// A promotion waits until the last lease granted, plus the drift margin, has passed.
    func testPromotionWaitsOutTheLastLeasePlusTheDriftMargin() {
        var config = testConfig()
        config.leaseDriftMarginMs = 150
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: config, now: 0)
        // At start it assumes an earlier incarnation granted a lease just before it stopped.
        XCTAssertEqual(s.promotionWaitMs(now: 0), 1_000 + 150)
        welcomedStandby(&s)
        _ = s.onMessage(.record(RecordMessage(epoch: Epoch(1), tenant: tenant, committedLSN: 0, record: record(1))), from: conn1, now: 1)
        _ = s.onPersisted(tenant, throughLSN: 1, now: 400) // the ack grants a lease until 1_400
        XCTAssertEqual(s.promotionWaitMs(now: 500), 1_400 + 150 - 500)
        XCTAssertEqual(s.promotionWaitMs(now: 1_549), 1)
        XCTAssertEqual(s.promotionWaitMs(now: 1_550), 0)
        XCTAssertEqual(s.promotionWaitMs(now: 9_999), 0)
    }

    func testPersistThenAckThenApplyOnlyWhatIsCommitted() {
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), now: 0)
        welcomedStandby(&s)
        XCTAssertEqual(s.onMessage(.record(RecordMessage(epoch: Epoch(1), tenant: tenant, committedLSN: 0, record: record(1))), from: conn1, now: 1),
                       [.persist(tenant, record(1))])
        // Fsynced: ack at once, but lsn 1 is not committed yet, so nothing is applied.
        XCTAssertEqual(s.onPersisted(tenant, throughLSN: 1, now: 2), [.send(conn1, .ack(Ack(epoch: Epoch(1), tenant: tenant, lsn: 1, leaseMs: 1_000)))])
        XCTAssertEqual(s.leasePromisedUntil, 1_002)
        let actions = s.onMessage(.primaryHeartbeat(PrimaryHeartbeat(epoch: Epoch(1), sentAtMs: 50, committed: [TenantCommitted(tenant: tenant, committedLSN: 1)])), from: conn1, now: 3)
        XCTAssertEqual(actions, [
            .send(conn1, .standbyHeartbeat(StandbyHeartbeat(epoch: Epoch(1), echoSentAtMs: 50, leaseMs: 1_000))),
            .apply(tenant, throughLSN: 1, checksum: record(1).checksum),
        ])
    }

    /// A dropped tenant: the core forgets it; the report of a persist issued before comes back
    /// ignored, records and snapshots the primary still sends for it are ignored (nothing
    /// persisted, acked or applied), and the next hello does not list it.
    func testARemovedTenantIsForgottenAndWhatStillComesForItIsIgnored() {
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), now: 0)
        welcomedStandby(&s)
        XCTAssertEqual(s.onMessage(.record(RecordMessage(epoch: Epoch(1), tenant: tenant, committedLSN: 0, record: record(1))), from: conn1, now: 1),
                       [.persist(tenant, record(1))])
        XCTAssertEqual(s.onTenantRemoved(tenant, now: 2), [])
        XCTAssertNil(s.status(of: tenant))
        XCTAssertEqual(s.onPersisted(tenant, throughLSN: 1, now: 3), [], "no ack, no apply for a persist issued before the drop")
        XCTAssertEqual(s.onMessage(.record(RecordMessage(epoch: Epoch(1), tenant: tenant, committedLSN: 1, record: record(2))), from: conn1, now: 4), [])
        XCTAssertEqual(s.onMessage(.snapshotBegin(SnapshotBegin(epoch: Epoch(1), tenant: tenant, lsn: 5, dbSizePages: 1)), from: conn1, now: 5), [])
        XCTAssertEqual(s.onMessage(.rewind(Rewind(epoch: Epoch(1), tenant: tenant, toLSN: 0)), from: conn1, now: 6), [])
        XCTAssertEqual(s.streamingConnection, conn1, "nothing of it is a protocol violation")
        // A dropped tenant this standby never held is never made from what arrives late.
        let never = try! TenantID("never-held")
        XCTAssertEqual(s.onTenantRemoved(never, now: 6), [])
        XCTAssertEqual(s.onMessage(.record(RecordMessage(epoch: Epoch(1), tenant: never, committedLSN: 0, record: record(1))), from: conn1, now: 6), [])
        XCTAssertNil(s.status(of: never))
        // Reconnected: the hello lists no position for it.
        _ = s.onDisconnected(conn1, now: 7)
        _ = s.onTick(now: 10_000)
        let hello = sent(s.onConnected(conn2, peer: primaryPeer, now: 10_000)).first
        guard case .hello(let h)? = hello else { return XCTFail("expected a hello, got \(String(describing: hello))") }
        XCTAssertFalse(h.tenants.contains { $0.tenant == tenant }, "\(h.tenants)")
    }

    func testCommittedButNotYetPersistedWaitsForTheFsync() {
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), now: 0)
        welcomedStandby(&s)
        XCTAssertEqual(s.onMessage(.record(RecordMessage(epoch: Epoch(1), tenant: tenant, committedLSN: 1, record: record(1))), from: conn1, now: 1),
                       [.persist(tenant, record(1))])
        XCTAssertEqual(s.onPersisted(tenant, throughLSN: 1, now: 2).last, .apply(tenant, throughLSN: 1, checksum: record(1).checksum))
    }

    func testHelloWaitsForOutstandingPersists() {
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), now: 0)
        welcomedStandby(&s)
        _ = s.onMessage(.record(RecordMessage(epoch: Epoch(1), tenant: tenant, committedLSN: 0, record: record(1))), from: conn1, now: 1)
        XCTAssertEqual(s.onDisconnected(conn1, now: 2), [])
        XCTAssertEqual(s.onTick(now: 2 + testConfig().reconnectDelayMs), [.connect])
        XCTAssertEqual(s.onConnected(conn2, peer: primaryPeer, now: 300), [], "no hello while lsn 1 is being fsynced")
        XCTAssertEqual(s.onPersisted(tenant, throughLSN: 1, now: 301), [
            .send(conn2, hello([TenantPosition(tenant: tenant, appliedLSN: 0, appliedChecksum: 0, lastLSN: 1, tail: [summary(1)])])),
        ], "the fsync is not acked on the new connection: the hello reports it")
    }

    func testOutOfOrderRecordIsAProtocolViolation() {
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), now: 0)
        welcomedStandby(&s)
        let actions = s.onMessage(.record(RecordMessage(epoch: Epoch(1), tenant: tenant, committedLSN: 0, record: record(2))), from: conn1, now: 1)
        XCTAssertEqual(sent(actions).map(\.kind), ["reject"])
        XCTAssertNil(s.streamingConnection)
    }

    func testARestartedStandbyAssumesItHadJustPromisedALease() {
        // Clocks need not start at zero.
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), now: -5_000)
        XCTAssertEqual(s.leasePromisedUntil, -4_000)
        XCTAssertEqual(s.onTick(now: -5_000), [.connect])
    }

    func testSilentPrimaryIsClosedAndReconnected() {
        var s = StandbyReplication(nodeID: "node-b", epoch: Epoch(1), config: testConfig(), now: 0)
        welcomedStandby(&s)
        XCTAssertEqual(s.onTick(now: 1_000), [.closeConnection(conn1, .peerTimeout)])
        XCTAssertEqual(s.onTick(now: 1_000 + testConfig().reconnectDelayMs), [.connect])
    }
}

// MARK: - Scenarios in the simulator

/// Known edges played end to end in the simulator, with no random faults: only the ones the
/// scenario names.
final class SimulatedScenarioTests: XCTestCase {
    private func cluster(mode: ReplicationMode = .sync, tenants: Int = 1, seed: UInt64 = 1) -> Simulation {
        var params = SimParameters()
        params.tenantCount = tenants
        params.mode = mode
        params.config.standbyWaitMs = 300
        params.config.peerTimeoutMs = 200
        params.config.heartbeatIntervalMs = 30
        params.config.reconnectDelayMs = 20
        params.faults = .none
        return Simulation(seed: seed, params: params, tracing: ProcessInfo.processInfo.environment["APIARY_SIM_TRACE"] != nil)
    }

    private func writeEvery(_ cluster: Simulation, ms: Int64, for duration: Int64) throws {
        let end = cluster.now + duration
        while cluster.now < end {
            for i in cluster.tenantIDs.indices { cluster.write(tenant: i) }
            try cluster.run(until: cluster.now + ms)
        }
    }

    private func settle(_ cluster: Simulation) throws {
        try cluster.run(until: cluster.now + 2_000)
        XCTAssertNil(cluster.convergenceProblem())
        if cluster.tracing { cluster.trace.suffix(300).forEach { print($0) } }
    }

    func testStandbyBehindAfterAPartitionCatchesUpFromTheLog() throws {
        let c = cluster(mode: .waitPrimary)
        try writeEvery(c, ms: 10, for: 200)
        c.partition(for: 800)
        try writeEvery(c, ms: 10, for: 800)
        try settle(c)
        XCTAssertGreaterThan(c.stats["readLog"] ?? 0, 0)
        XCTAssertEqual(c.stats["snapshot"] ?? 0, 0, "the log still reached back")
    }

    func testCompactedLogSendsASnapshot() throws {
        let c = cluster(mode: .waitPrimary)
        try writeEvery(c, ms: 10, for: 200)
        c.crashStandby(restartAfter: 600)
        try writeEvery(c, ms: 10, for: 300)
        for _ in 0..<20 { c.compactPrimaryLog() }
        try writeEvery(c, ms: 10, for: 300)
        try settle(c)
        XCTAssertGreaterThan(c.stats["snapshot.installed"] ?? 0, 0)
    }

    func testSyncWritesSurviveStandbyCrashes() throws {
        let c = cluster(tenants: 3)
        for downMs: Int64 in [50, 100, 400, 50, 600] {
            try writeEvery(c, ms: 7, for: 150)
            c.crashStandby(restartAfter: downMs)
        }
        try writeEvery(c, ms: 7, for: 300)
        try settle(c)
        XCTAssertGreaterThan(c.stats["acked"] ?? 0, 50)
        // Writes during the long outages fail, as "unavailable" or, when the primary had not
        // yet noticed the dead connection and sent them, as "outcome unknown".
        XCTAssertGreaterThan((c.stats["failed.standby unavailable"] ?? 0) + (c.stats["failed.outcome unknown"] ?? 0), 0)
    }

    func testPrimaryRestartInANewEpoch() throws {
        let c = cluster(tenants: 2)
        try writeEvery(c, ms: 7, for: 200)
        c.bumpEpoch()
        try writeEvery(c, ms: 7, for: 300)
        c.crashPrimary(restartAfter: 50)
        try writeEvery(c, ms: 7, for: 400)
        try settle(c)
        XCTAssertGreaterThan(c.stats["acked"] ?? 0, 50)
    }
}
