import ApiaryChaos
import XCTest

/// The chaos checkers judge histories: each catches what it must, and passes a clean one.
final class CheckerTests: XCTestCase {
    func op(_ kind: WorkloadOperation.Kind, _ value: Int, _ outcome: Outcome, at ms: Int64 = 0, read: Int? = nil) -> WorkloadOperation {
        var o = WorkloadOperation(kind: kind, client: 0, value: value, invokedMs: ms, completedMs: ms + 5, outcome: outcome, detail: "")
        o.readValue = read
        return o
    }

    func testTheSetCheckerCatchesLostDuplicatedAndPhantomInserts() {
        let history = [op(.add, 1, .ok), op(.add, 2, .ok), op(.add, 3, .unknown), op(.add, 4, .failed)]
        XCTAssertTrue(Checkers.set(history: history, finalValues: [1, 2, 3]).passed, "an unknown outcome may or may not be there")
        XCTAssertTrue(Checkers.set(history: history, finalValues: [1, 2]).passed)
        XCTAssertFalse(Checkers.set(history: history, finalValues: [1]).passed, "an acknowledged insert lost")
        XCTAssertFalse(Checkers.set(history: history, finalValues: [1, 2, 2]).passed, "applied twice")
        XCTAssertFalse(Checkers.set(history: history, finalValues: [1, 2, 9]).passed, "nobody inserted 9")
        XCTAssertFalse(Checkers.set(history: history, finalValues: [1, 2, 4]).passed, "4 was answered 'not executed'")
    }

    func testTheBankCheckerCatchesAChangedTotal() {
        let history = [op(.transfer, 1, .ok), op(.readTotal, 2, .ok, read: 800), op(.readTotal, 3, .failed)]
        XCTAssertTrue(Checkers.bank(history: history, total: 800, finalTotal: 800).passed)
        XCTAssertFalse(Checkers.bank(history: history + [op(.readTotal, 4, .ok, read: 795)], total: 800, finalTotal: 800).passed)
        XCTAssertFalse(Checkers.bank(history: history, total: 800, finalTotal: 805).passed)
    }

    func testOneWriterPerEpoch() {
        XCTAssertTrue(Checkers.oneWriterPerEpoch(claims: [("node-a", 1), ("node-a", 1), ("node-b", 2)]).passed)
        XCTAssertFalse(Checkers.oneWriterPerEpoch(claims: [("node-a", 1), ("node-b", 1)]).passed)
    }

    func testAvailabilityBothWays() {
        // 10 s, 100 requests, the failures all in seconds 3 and 4.
        var history = (0..<100).map { op(.add, $0, .ok, at: Int64($0) * 100) }
        history[31].outcome = .failed
        history[45].outcome = .unknown
        let a = Availability(history: history, durationMs: 10_000)
        XCTAssertEqual(a.byRequests, 0.98, accuracy: 1e-9)
        XCTAssertEqual(a.windows, 10)
        XCTAssertEqual(a.cleanWindows, 8)
    }

    func testScenariosInTheRepositoryAreValid() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        for name in ["smoke", "hour"] {
            let s = try Scenario.load(name, directory: root + "/chaos/scenarios")
            XCTAssertEqual(s.name, name)
        }
        let smoke = try Scenario.load("smoke", directory: root + "/chaos/scenarios")
        XCTAssertLessThanOrEqual(smoke.seconds, 120, "smoke runs in CI: at most a few minutes")
        XCTAssertGreaterThan(smoke.registerClients, 0, "smoke checks registers for linearizability too")
    }
}
