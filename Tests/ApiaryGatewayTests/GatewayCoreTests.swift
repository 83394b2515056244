import ApiaryCore
import ApiaryGateway
import XCTest

/// The gateway's rules for holding and resending (DESIGN §7), one decision at a time.
final class GatewayCoreTests: XCTestCase {
    let write = RequestTraits(isRead: false, hasIdempotencyKey: false)
    let keyedWrite = RequestTraits(isRead: false, hasIdempotencyKey: true)
    let read = RequestTraits(isRead: true, hasIdempotencyKey: false)

    func core(writer: NodeID? = "node-a", ready: Bool = true, version: UInt64 = 1, epoch: UInt64 = 1) -> GatewayCore {
        var c = GatewayCore()
        c.onTopology(GatewayTopology(version: version, epoch: Epoch(epoch), writer: writer, writerReady: ready))
        return c
    }

    func testARequestGoesToTheReadyWriterAndItsAnswerIsPassedOn() {
        let c = core()
        var r = RequestProgress(traits: write, now: 0)
        XCTAssertEqual(c.next(r, now: 0), .forward("node-a"))
        c.sending(&r)
        XCTAssertEqual(c.onOutcome(.answered(status: 200, code: nil, outcomeUnknown: false), of: &r, now: 1), .answer)
        XCTAssertEqual(c.onOutcome(.answered(status: 400, code: "bad_request", outcomeUnknown: false), of: &r, now: 1), .answer)
    }

    func testWithoutAReadyWriterTheRequestIsHeldThenRefusedAsNotExecuted() {
        let c = core(writer: "node-b", ready: false)
        let r = RequestProgress(traits: write, now: 100)
        XCTAssertEqual(c.next(r, now: 100), .wait(untilMs: 5_100))
        XCTAssertEqual(c.next(r, now: 5_100), .fail(.noWriter), "held no longer than the hold time, and never executed")
    }

    func testARequestThatNeverLeftIsSentAgainOnceTheTopologyChanges() {
        var c = core()
        var r = RequestProgress(traits: write, now: 0)
        c.sending(&r)
        XCTAssertEqual(c.onOutcome(.notSent, of: &r, now: 10), .wait(untilMs: 30), "the same writer only after a backoff")
        c.onTopology(GatewayTopology(version: 2, epoch: Epoch(2), writer: "node-b", writerReady: true))
        XCTAssertEqual(c.next(r, now: 11), .forward("node-b"))
    }

    func testANodeThatDidNotExecuteItIsAskedNoMoreThanTheBackoffAllows() {
        let c = core()
        var r = RequestProgress(traits: write, now: 0)
        c.sending(&r)
        XCTAssertEqual(c.onOutcome(.answered(status: 503, code: "not_executed", outcomeUnknown: false), of: &r, now: 10), .wait(untilMs: 30))
        XCTAssertEqual(c.next(r, now: 30), .forward("node-a"))
    }

    /// A primary cut off or paused may never answer: once another writer is ready, an attempt
    /// still waiting on the old one is given up and sent again, if that is safe.
    func testAnAttemptOnAFormerWriterIsAbandonedOnlyWhenItMayBeSentAgain() {
        var c = core()
        var keyed = RequestProgress(traits: keyedWrite, now: 0), reading = RequestProgress(traits: read, now: 0), plain = RequestProgress(traits: write, now: 0)
        c.sending(&keyed) // all three sent to node-a in version 1
        c.sending(&reading)
        c.sending(&plain)
        for r in [keyed, reading, plain] { XCTAssertFalse(c.abandons(r, sentTo: "node-a"), "the writer is still node-a") }
        c.onTopology(GatewayTopology(version: 2, epoch: Epoch(2), writer: "node-b", writerReady: false))
        XCTAssertFalse(c.abandons(keyed, sentTo: "node-a"), "no other writer is ready yet: nowhere better to send it")
        c.onTopology(GatewayTopology(version: 3, epoch: Epoch(2), writer: "node-b", writerReady: true))
        XCTAssertTrue(c.abandons(keyed, sentTo: "node-a"))
        XCTAssertTrue(c.abandons(reading, sentTo: "node-a"))
        XCTAssertFalse(c.abandons(plain, sentTo: "node-a"), "a write without a key waits for its own outcome")
        XCTAssertFalse(c.abandons(keyed, sentTo: "node-b"))
        // The abandoned attempt ends as "no answer"; the keyed write goes to node-b at once (no
        // backoff: the new topology explains the refusal).
        XCTAssertEqual(c.onOutcome(.noAnswer, of: &keyed, now: 10), .forward("node-b"))
        XCTAssertEqual(c.onOutcome(.noAnswer, of: &reading, now: 10), .forward("node-b"))
    }

    func testAWriteWithoutAKeyIsNeverSentAgainOnceItMayHaveBeenExecuted() {
        let c = core()
        var r = RequestProgress(traits: write, now: 0)
        c.sending(&r)
        XCTAssertEqual(c.onOutcome(.noAnswer, of: &r, now: 10), .fail(.outcomeUnknown))
        var unknown = RequestProgress(traits: write, now: 0)
        c.sending(&unknown)
        XCTAssertEqual(c.onOutcome(.answered(status: 500, code: "outcome_unknown", outcomeUnknown: true), of: &unknown, now: 10), .answer,
                       "the node's own 'outcome unknown' is passed on")
    }

    func testAKeyedWriteOrAReadIsSentAgainAfterALostAnswer() {
        var c = core()
        for traits in [keyedWrite, read] {
            var r = RequestProgress(traits: traits, now: 0)
            c.sending(&r)
            XCTAssertEqual(c.onOutcome(.noAnswer, of: &r, now: 10), .wait(untilMs: 30))
            c.onTopology(GatewayTopology(version: c.topology.version + 1, epoch: Epoch(2), writer: "node-b", writerReady: true))
            XCTAssertEqual(c.next(r, now: 11), .forward("node-b"))
        }
        var k = RequestProgress(traits: keyedWrite, now: 0)
        c.sending(&k)
        XCTAssertNotEqual(c.onOutcome(.answered(status: 500, code: "outcome_unknown", outcomeUnknown: true), of: &k, now: 10), .answer,
                          "a keyed write is sent again after 'outcome unknown': the node answers the repeat with the first answer")
    }

    func testAKeyedWriteThatMayHaveRunIsReportedUnknownWhenTheHoldRunsOut() {
        let c = core(writer: "node-a", ready: true)
        var r = RequestProgress(traits: keyedWrite, now: 0)
        c.sending(&r)
        _ = c.onOutcome(.noAnswer, of: &r, now: 10)
        XCTAssertEqual(c.next(r, now: 5_000), .fail(.outcomeUnknown))
        var q = RequestProgress(traits: read, now: 0)
        c.sending(&q)
        _ = c.onOutcome(.noAnswer, of: &q, now: 10)
        XCTAssertEqual(c.next(q, now: 5_000), .fail(.noWriter), "a read changed nothing")
    }

    func testARestartedMonitorsTopologyCountsThoughItsVersionsStartOver() {
        var c = GatewayCore()
        c.onTopology(GatewayTopology(version: 9, run: 1, epoch: Epoch(2), writer: "node-b", writerReady: false))
        XCTAssertTrue(c.onTopology(GatewayTopology(version: 2, run: 7, epoch: Epoch(2), writer: "node-b", writerReady: true)))
        XCTAssertTrue(c.topology.writerReady)
        XCTAssertFalse(c.onTopology(GatewayTopology(version: 3, run: 8, epoch: Epoch(1), writer: "node-a", writerReady: true)),
                       "never back to an older epoch")
    }

    /// A node that served a request as the writer in a newer epoch than the watch has brought
    /// (the monitor slow, or cut off from this gateway) wins, as a newer epoch from the watch
    /// would. The watch's later answer for that epoch still counts; an older one does not.
    func testAWritersAnswerInANewerEpochWinsOverAStaleWatch() {
        var c = core(writer: "node-a", epoch: 3)
        var r = RequestProgress(traits: keyedWrite, now: 0)
        c.sending(&r)
        XCTAssertEqual(c.onOutcome(.answered(status: 503, code: "not_executed", outcomeUnknown: false), of: &r, now: 10), .wait(untilMs: 30))
        XCTAssertFalse(c.onWriterAnswer(from: "node-a", epoch: Epoch(3)), "an epoch the topology has is no news")
        XCTAssertFalse(c.onWriterAnswer(from: "node-b", epoch: Epoch(2)), "nor an older one")

        XCTAssertTrue(c.onWriterAnswer(from: "node-b", epoch: Epoch(4)))
        XCTAssertEqual(c.next(r, now: 11), .forward("node-b"), "the new writer at once, no backoff: the refusal was under the old topology")
        XCTAssertFalse(c.onTopology(GatewayTopology(version: 9, epoch: Epoch(3), writer: "node-a", writerReady: true)), "the stale watch loses")
        XCTAssertTrue(c.onTopology(GatewayTopology(version: 10, epoch: Epoch(4), writer: "node-b", writerReady: true)), "the watch catching up counts")
        XCTAssertEqual(c.next(r, now: 12), .forward("node-b"))
    }

    func testAnOlderTopologyIsIgnored() {
        var c = core(version: 5, epoch: 3)
        XCTAssertFalse(c.onTopology(GatewayTopology(version: 4, epoch: Epoch(3), writer: "node-b", writerReady: true)))
        XCTAssertEqual(c.topology.writer, "node-a")
    }

    func testAttemptsAreBounded() {
        let c = core()
        var r = RequestProgress(traits: keyedWrite, now: 0)
        for _ in 0..<c.config.attemptsMax { c.sending(&r) }
        XCTAssertEqual(c.next(r, now: 1), .fail(.noWriter))
    }
}

/// The gateway's rate limits: token buckets per key, bounded in the keys they remember.
final class RateLimiterTests: XCTestCase {
    func testABurstThenTheRateAndOtherKeysAreUnaffected() {
        var limiter = RateLimiter(config: .init(perSecond: 10, burst: 3))
        for _ in 0..<3 { XCTAssertEqual(limiter.admit("a", now: 0), .admitted) }
        XCTAssertEqual(limiter.admit("a", now: 0), .refused(retryAfterMs: 100))
        XCTAssertEqual(limiter.admit("b", now: 0), .admitted, "another client is still served")
        XCTAssertEqual(limiter.admit("a", now: 100), .admitted, "one token back after 1/rate")
        XCTAssertEqual(limiter.admit("a", now: 100), .refused(retryAfterMs: 100))
    }

    func testRememberedKeysAreBounded() {
        var limiter = RateLimiter(config: .init(perSecond: 1, burst: 1, keysMax: 100))
        for i in 0..<1_000 { _ = limiter.admit("client-\(i)", now: Int64(i)) }
        XCTAssertLessThanOrEqual(limiter.keyCount, 100)
    }
}
