import ApiaryChaos
import Foundation
import XCTest

/// The register checker: hand-written histories it must pass and fail, its bound, and histories
/// of a simulated atomic register (linearizable by construction) before and after corruption.
final class LinearizabilityTests: XCTestCase {
    // MARK: Building histories (key 0 unless told; initial value 0)

    func read(_ client: Int, _ value: Int?, _ from: Int64, _ to: Int64, _ outcome: Outcome = .ok, key: Int = 0) -> WorkloadOperation {
        .registerRead(client: client, key: key, value: value, invokedMs: from, completedMs: to, outcome: outcome)
    }

    func write(_ client: Int, _ value: Int, _ from: Int64, _ to: Int64, _ outcome: Outcome = .ok, key: Int = 0) -> WorkloadOperation {
        .registerWrite(client: client, key: key, value: value, invokedMs: from, completedMs: to, outcome: outcome)
    }

    func cas(_ client: Int, _ expected: Int, _ value: Int, swapped: Bool?, _ from: Int64, _ to: Int64, _ outcome: Outcome = .ok, key: Int = 0) -> WorkloadOperation {
        .registerCAS(client: client, key: key, expected: expected, value: value, swapped: outcome == .ok ? swapped : nil,
                     invokedMs: from, completedMs: to, outcome: outcome)
    }

    func verdict(_ history: [WorkloadOperation], statesMax: Int = Linearizability.statesMaxDefault) -> Linearizability.Verdict {
        let results = Linearizability.check(history: history, statesMax: statesMax)
        if results.contains(where: { $0.verdict == .undecided }) { return .undecided }
        return results.allSatisfy { $0.verdict == .linearizable } ? .linearizable : .notLinearizable
    }

    // MARK: Linearizable

    func testSequentialReadsWritesAndCompareAndSets() {
        let history = [
            read(0, 0, 0, 5),
            write(0, 1, 10, 20),
            read(1, 1, 30, 40),
            cas(1, 1, 2, swapped: true, 50, 60),
            cas(0, 1, 3, swapped: false, 70, 80), // saw 2, not 1: an observation, and a right one
            read(0, 2, 90, 100),
        ]
        XCTAssertEqual(verdict(history), .linearizable)
    }

    func testOverlappingOperationsMayTakeEffectInEitherOrder() {
        // Two writes over each other; readers inside see them in opposite orders, which one
        // order explains (2 then 1).
        let history = [
            write(0, 1, 0, 100),
            write(1, 2, 10, 90),
            read(2, 0, 5, 15), // before both
            read(2, 2, 20, 30),
            read(3, 1, 95, 110),
            read(3, 1, 120, 130),
        ]
        XCTAssertEqual(verdict(history), .linearizable)
        // Ending at the same millisecond as the next begins counts as overlapping (the clock
        // cannot order them).
        XCTAssertEqual(verdict([write(0, 1, 0, 10), read(1, 0, 10, 20)]), .linearizable)
    }

    func testACompareAndSetRacingAWrite() {
        // The write lands first, so the compare-and-set from 0 fails; a later read sees the write.
        let history = [
            write(0, 1, 0, 50),
            cas(1, 0, 2, swapped: false, 10, 60),
            read(2, 1, 70, 80),
        ]
        XCTAssertEqual(verdict(history), .linearizable)
        // Or the compare-and-set lands first and the write overwrites it.
        XCTAssertEqual(verdict([write(0, 1, 0, 50), cas(1, 0, 2, swapped: true, 10, 60), read(2, 2, 20, 30), read(2, 1, 70, 80)]), .linearizable)
    }

    func testUnknownOutcomesMayTakeEffectLateOrNever() {
        // Applied long after its client gave up on it.
        XCTAssertEqual(verdict([write(0, 5, 0, 10, .unknown), read(1, 0, 20, 30), read(1, 5, 1_000, 1_010)]), .linearizable)
        // Never applied.
        XCTAssertEqual(verdict([write(0, 5, 0, 10, .unknown), read(1, 0, 20, 30), read(1, 0, 1_000, 1_010)]), .linearizable)
        // An unknown compare-and-set that applied, one that could not (its value was gone).
        XCTAssertEqual(verdict([write(0, 1, 0, 10), cas(1, 1, 2, swapped: nil, 20, 30, .unknown), cas(2, 0, 3, swapped: nil, 20, 30, .unknown),
                                read(0, 2, 40, 50)]), .linearizable)
        // Not executed: never applied; reads that did not succeed observe nothing.
        XCTAssertEqual(verdict([write(0, 7, 0, 10, .failed), read(1, 0, 20, 30), read(1, 99, 40, 50, .failed), read(1, 98, 40, 50, .unknown)]), .linearizable)
        // Many unknown writes nobody reads, between acknowledged operations.
        var history: [WorkloadOperation] = []
        for i in 0..<40 {
            history.append(write(i % 4, 100 + i, Int64(i) * 10, Int64(i) * 10 + 5, .unknown))
            history.append(write(4, 1_000 + i, Int64(i) * 10, Int64(i) * 10 + 8))
            history.append(read(5, 1_000 + i, Int64(i) * 10 + 9, Int64(i) * 10 + 9))
        }
        XCTAssertEqual(verdict(history), .linearizable)
        // A compare-and-set answered "not swapped" explained only by an unknown write applied before it.
        XCTAssertEqual(verdict([write(0, 1, 0, 10), write(1, 9, 20, 30, .unknown), cas(2, 1, 3, swapped: false, 40, 50), read(2, 1, 60, 70, .failed)]),
                       .linearizable)
    }

    func testKeysAreIndependent() {
        // Each key alone is linearizable; mixed into one register they would not be.
        XCTAssertEqual(verdict([write(0, 1, 0, 10, key: 1), read(1, 0, 20, 30, key: 2), read(1, 1, 20, 30, key: 1)]), .linearizable)
    }

    // MARK: Not linearizable

    func testAStaleReadAfterACompletedWrite() {
        XCTAssertEqual(verdict([write(0, 1, 0, 10), read(1, 0, 20, 30)]), .notLinearizable)
        let result = Linearizability.checkKey(3, operations: [write(0, 1, 0, 10, key: 3), read(1, 0, 20, 30, key: 3)], initialValue: 0)
        XCTAssertTrue(result.explanation.contains("key 3"), result.explanation)
        XCTAssertTrue(result.explanation.contains("client 1 read → 0 [20, 30] ms"), result.explanation)
    }

    func testAReadOfAValueNeverWritten() {
        XCTAssertEqual(verdict([write(0, 1, 0, 10), read(1, 42, 5, 30)]), .notLinearizable)
        XCTAssertEqual(verdict([read(1, nil, 5, 30)]), .notLinearizable, "no row: nothing writes that")
        XCTAssertEqual(verdict([write(0, 7, 0, 10, .failed), read(1, 7, 20, 30)]), .notLinearizable, "a write answered 'not executed' was seen")
    }

    func testALostWriteSeenThenUnseen() {
        // 1 and 2 written concurrently: readers may see either first, but not 1, then 2, then 1.
        let history = [write(0, 1, 0, 10), write(1, 2, 0, 10), read(2, 1, 20, 30), read(2, 2, 40, 50), read(3, 1, 60, 70)]
        XCTAssertEqual(verdict(history), .notLinearizable)
        // The same with an unknown write: it takes effect at most once.
        XCTAssertEqual(verdict([write(0, 1, 0, 10, .unknown), write(1, 2, 20, 30), read(2, 1, 15, 25), read(2, 2, 40, 50), read(3, 1, 60, 70)]),
                       .notLinearizable)
        // And a write acknowledged, seen, then gone (lost in a failover) with nothing after it.
        XCTAssertEqual(verdict([write(0, 1, 0, 10), read(1, 1, 20, 30), read(1, 0, 40, 50)]), .notLinearizable)
    }

    func testACompareAndSetOnAValueThatCannotBeCurrent() {
        // 1 was overwritten by 2 before the compare-and-set began.
        XCTAssertEqual(verdict([write(0, 1, 0, 10), write(0, 2, 20, 30), cas(1, 1, 3, swapped: true, 40, 50)]), .notLinearizable)
        // "Not swapped" while the register can only hold the expected value.
        XCTAssertEqual(verdict([write(0, 1, 0, 10), cas(1, 1, 3, swapped: false, 20, 30)]), .notLinearizable)
        // Two compare-and-sets from the same value both swapped.
        XCTAssertEqual(verdict([write(0, 1, 0, 10), cas(1, 1, 3, swapped: true, 20, 30), cas(2, 1, 4, swapped: true, 20, 30)]), .notLinearizable)
    }

    func testTheCheckFailsOnAViolationAndNamesIt() {
        let good = [write(0, 1, 0, 10, key: 0), read(1, 1, 20, 30, key: 0)]
        XCTAssertTrue(Checkers.registers(history: good).passed)
        let check = Checkers.registers(history: good + [write(0, 5, 0, 10, key: 4), read(1, 0, 20, 30, key: 4)])
        XCTAssertFalse(check.passed)
        XCTAssertTrue(check.detail.contains("NOT LINEARIZABLE, key 4"), check.detail)
    }

    // MARK: The bound

    func testCouldNotDecideIsNotAPass() {
        let history = [write(0, 1, 0, 100), write(1, 2, 0, 100), write(2, 3, 0, 100), read(3, 1, 110, 120), read(3, 2, 130, 140), read(3, 3, 150, 160)]
        XCTAssertEqual(verdict(history), .notLinearizable)
        XCTAssertEqual(verdict(history, statesMax: 2), .undecided)
        let linearizable = [write(0, 1, 0, 100), write(1, 2, 0, 100), write(2, 3, 0, 100), read(3, 3, 110, 120)]
        XCTAssertEqual(verdict(linearizable), .linearizable)
        XCTAssertEqual(verdict(linearizable, statesMax: 1), .undecided)
        let check = Checkers.registers(history: linearizable, statesMax: 1)
        XCTAssertFalse(check.passed, "could not decide must not pass")
        XCTAssertTrue(check.detail.contains("COULD NOT DECIDE"), check.detail)
    }

    // MARK: Reads never go back in time

    func testReadsGoingBackInTime() {
        let forward = [write(0, 1, 0, 10), write(0, 2, 20, 30), read(1, 1, 5, 25), read(2, 2, 26, 40), read(1, 2, 50, 60)]
        XCTAssertTrue(Checkers.registerReadsMonotonic(history: forward).passed)
        // 2 was written after 1 completed; a read that saw 2 ended before a read of 1 began.
        let back = forward + [read(3, 1, 70, 80)]
        let check = Checkers.registerReadsMonotonic(history: back)
        XCTAssertFalse(check.passed)
        XCTAssertTrue(check.detail.contains("client 3 read → 1 [70, 80] ms"), check.detail)
        XCTAssertEqual(verdict(back), .notLinearizable, "implied by linearizability")
        // The initial value after anything was seen written.
        XCTAssertFalse(Checkers.registerReadsMonotonic(history: [write(0, 1, 0, 10), read(1, 1, 0, 20), read(2, 0, 30, 40)]).passed)
        // Concurrent reads may disagree; an unknown write has no end, so it is never "before".
        XCTAssertTrue(Checkers.registerReadsMonotonic(history: [write(0, 1, 0, 10), write(0, 2, 20, 30), read(1, 2, 25, 40), read(2, 1, 22, 45)]).passed)
        XCTAssertTrue(Checkers.registerReadsMonotonic(history: [write(0, 1, 0, 10, .unknown), write(0, 2, 20, 30), read(1, 2, 35, 40), read(2, 1, 50, 60)]).passed)
    }

    // MARK: Randomized: a simulated atomic register

    func testSimulatedAtomicRegistersAreLinearizableAndCorruptionIsFound() {
        for seed: UInt64 in 1...12 {
            var rng = SplitMix64(seed: seed)
            let history = Self.simulate(keys: 3, clients: 5, operationsPerClient: 120, rng: &rng)
            let results = Linearizability.check(history: history)
            for r in results { XCTAssertEqual(r.verdict, .linearizable, "seed \(seed): \(r.explanation)") }
            XCTAssertTrue(Checkers.registerReadsMonotonic(history: history).passed, "seed \(seed)")

            // One acknowledged read returns a value nobody wrote.
            let reads = history.indices.filter { history[$0].kind == .registerRead && history[$0].outcome == .ok }
            var corrupted = history
            let victim = reads[Int(rng.next() % UInt64(reads.count))]
            corrupted[victim].readValue = 999_999_999
            let key = corrupted[victim].key!
            for r in Linearizability.check(history: corrupted) {
                XCTAssertEqual(r.verdict, r.key == key ? .notLinearizable : .linearizable, "seed \(seed), key \(r.key): \(r.explanation)")
            }

            // One acknowledged read returns a value written only after the read completed.
            var future = history
            let late = reads.compactMap { i -> (Int, Int)? in
                let r = history[i]
                guard let w = history.first(where: { $0.key == r.key && $0.written != nil && $0.invokedMs > r.completedMs }) else { return nil }
                return (i, w.written!)
            }
            if let (i, value) = late.first {
                future[i].readValue = value
                XCTAssertEqual(verdict(future.filter { $0.key == history[i].key }), .notLinearizable, "seed \(seed)")
            }
        }
    }

    func testALongSimulatedHistoryIsDecidedWithinTheDefaultBound() {
        var rng = SplitMix64(seed: 42)
        let history = Self.simulate(keys: 1, clients: 6, operationsPerClient: 500, rng: &rng)
        let result = Linearizability.check(history: history)[0]
        XCTAssertEqual(result.verdict, .linearizable, result.explanation)
        XCTAssertLessThan(result.statesExplored, 50_000, "a linearizable history needs few states")
    }

    /// Clients run operations one after another on random keys, each taking effect at a random
    /// point inside its interval on a real register; some writes' answers are lost (unknown:
    /// applied at some point after their invocation, possibly long after, or never), some are
    /// refused (never applied). Linearizable by construction.
    static func simulate(keys: Int, clients: Int, operationsPerClient: Int, rng: inout SplitMix64) -> [WorkloadOperation] {
        struct Planned { var op: WorkloadOperation; var effectMs: Int64?; var order: Int }
        var planned: [Planned] = []
        for client in 0..<clients {
            var t = Int64(rng.next() % 20)
            var counter = 0
            for _ in 0..<operationsPerClient {
                counter += 1
                let key = Int(rng.next() % UInt64(keys))
                let invoked = t + Int64(rng.next() % 5)
                let completed = invoked + 1 + Int64(rng.next() % 40)
                let effect = invoked + Int64(rng.next() % UInt64(completed - invoked + 1))
                let value = (client + 1) * 1_000_000 + counter
                let fate = rng.next() % 100
                var effectMs: Int64? = effect
                var outcome = Outcome.ok
                if fate < 4 {
                    outcome = .failed
                    effectMs = nil
                } else if fate < 10 {
                    outcome = .unknown
                    effectMs = rng.next() % 2 == 0 ? nil : invoked + Int64(rng.next() % 400)
                }
                let op: WorkloadOperation
                switch rng.next() % 10 {
                case 0..<4: op = .registerRead(client: client, key: key, value: nil, invokedMs: invoked, completedMs: completed, outcome: outcome)
                case 4..<7: op = .registerWrite(client: client, key: key, value: value, invokedMs: invoked, completedMs: completed, outcome: outcome)
                default: op = .registerCAS(client: client, key: key, expected: 0, value: value, swapped: nil, invokedMs: invoked, completedMs: completed, outcome: outcome)
                }
                planned.append(Planned(op: op, effectMs: effectMs, order: planned.count))
                t = completed + Int64(rng.next() % 10)
            }
        }
        // Run the register: effects in time order. A compare-and-set expects the value its key
        // held a little earlier, or the current one: some swap, some do not.
        var registers = [Int](repeating: 0, count: keys)
        var recent = [[Int]](repeating: [0], count: keys)
        var done: [WorkloadOperation] = []
        for p in planned.sorted(by: { ($0.effectMs ?? .max, $0.order) < ($1.effectMs ?? .max, $1.order) }) {
            var op = p.op
            let key = op.key!
            let applied = p.effectMs != nil
            switch op.kind {
            case .registerRead:
                op.readValue = op.outcome == .ok ? registers[key] : Int(rng.next() % 1_000) // what a lost answer "returned" is noise
            case .registerWrite:
                if applied {
                    registers[key] = op.written!
                    recent[key].append(op.written!)
                }
            default:
                let expected = rng.next() % 2 == 0 ? registers[key] : recent[key][max(0, recent[key].count - 1 - Int(rng.next() % 3))]
                op.expected = expected
                if applied {
                    let swapped = registers[key] == expected
                    if swapped {
                        registers[key] = op.written!
                        recent[key].append(op.written!)
                    }
                    if op.outcome == .ok { op.swapped = swapped }
                }
            }
            done.append(op)
        }
        return done.shuffled(using: &rng)
    }

    // MARK: Against brute force

    /// Small random histories (values repeat, outcomes and results at random, so most are not
    /// linearizable) judged by the search and by trying every order: the same verdict each time.
    func testTheSearchAgreesWithBruteForceOnSmallHistories() {
        var rng = SplitMix64(seed: 7)
        var counts = [Linearizability.Verdict: Int]()
        for round in 0..<4_000 {
            var history: [WorkloadOperation] = []
            for _ in 0..<(2 + Int(rng.next() % 6)) {
                let client = Int(rng.next() % 3)
                let from = Int64(rng.next() % 20), to = from + Int64(rng.next() % 12)
                let outcome: Outcome = [.ok, .ok, .ok, .ok, .unknown, .failed][Int(rng.next() % 6)]
                // A wider pool in odd rounds: values nobody reads, unknown writes nobody needs.
                let pool = UInt64(round % 2 == 0 ? 4 : 10)
                let v = Int(rng.next() % pool), e = Int(rng.next() % 4)
                switch rng.next() % 3 {
                case 0: history.append(read(client, v, from, to, outcome))
                case 1: history.append(write(client, v, from, to, outcome))
                default: history.append(cas(client, e, v, swapped: rng.next() % 2 == 0, from, to, outcome))
                }
            }
            let expected = Self.bruteForce(history) ? Linearizability.Verdict.linearizable : .notLinearizable
            let got = Linearizability.checkKey(0, operations: history, initialValue: 0).verdict
            XCTAssertEqual(got, expected, "round \(round): \(history.map { "\($0.kind.rawValue) w\($0.written ?? -1) e\($0.expected ?? -1) r\($0.readValue ?? -1) s\($0.swapped.map { "\($0)" } ?? "-") [\($0.invokedMs),\($0.completedMs)] \($0.outcome.rawValue)" })")
            counts[got, default: 0] += 1
        }
        XCTAssertGreaterThan(counts[.linearizable] ?? 0, 500)
        XCTAssertGreaterThan(counts[.notLinearizable] ?? 0, 500)
    }

    /// Every order of the operations, straight from the definition: each acknowledged one placed
    /// once, in real-time order, with the result it returned; unknown writes and compare-and-sets
    /// placed at most once anywhere after their invocation.
    static func bruteForce(_ history: [WorkloadOperation]) -> Bool {
        let ops = history.filter { !($0.outcome == .failed || ($0.kind == .registerRead && $0.outcome != .ok)) }
        func completion(_ op: WorkloadOperation) -> Int64 { op.outcome == .ok ? op.completedMs : .max }
        func search(_ remaining: [WorkloadOperation], _ value: Int) -> Bool {
            if !remaining.contains(where: { $0.outcome == .ok }) { return true }
            let deadline = remaining.map(completion).min()!
            for (i, op) in remaining.enumerated() where op.invokedMs <= deadline {
                var rest = remaining
                rest.remove(at: i)
                var next = value
                switch op.kind {
                case .registerRead:
                    guard op.readValue == value else { continue }
                case .registerWrite:
                    next = op.written!
                default:
                    let swaps = value == op.expected!
                    if op.outcome == .ok, op.swapped != swaps { continue }
                    if swaps { next = op.written! }
                }
                if search(rest, next) { return true }
            }
            return false
        }
        return search(ops, 0)
    }

    // MARK: Compatibility

    func testOldReportsAndScenariosStillDecode() throws {
        let old = #"{"kind":"add","client":1,"value":7,"from":0,"to":0,"amount":0,"invokedMs":1,"completedMs":2,"outcome":"ok","detail":"200"}"#
        let op = try JSONDecoder().decode(WorkloadOperation.self, from: Data(old.utf8))
        XCTAssertNil(op.key)
        XCTAssertFalse(String(decoding: try JSONEncoder().encode(op), as: UTF8.self).contains("key"), "set and bank operations do not grow")
        let register = WorkloadOperation.registerCAS(client: 2, key: 3, expected: 4, value: 5, swapped: false, invokedMs: 1, completedMs: 2, outcome: .ok)
        XCTAssertEqual(try JSONDecoder().decode(WorkloadOperation.self, from: JSONEncoder().encode(register)), register)

        let scenario = #"{"name":"x","description":"","seconds":10,"setClients":1,"bankClients":1,"faults":[]}"#
        let s = try JSONDecoder().decode(Scenario.self, from: Data(scenario.utf8))
        XCTAssertEqual(s.registerClients, 0)
        XCTAssertEqual(s.registerKeys, 5)
        XCTAssertNil(s.linearizabilityStatesMax)
    }
}

/// A small seeded generator (SplitMix64), so every run draws the same histories.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D4_9CE3_11EB_133B
        return z ^ (z >> 31)
    }
}
