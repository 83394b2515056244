import ApiaryCore
import ApiaryStorage
import Foundation
import NIOHTTP1
import XCTest
@testable import ApiaryNode

/// rqlite's queued writes (`/db/execute?queue`): the core's decisions with explicit time, then
/// the routes over a recording service (no timing: batches are sent when full, or the flush
/// delay is an hour and `wait` is what the test waits on).
final class QueuedWritesTests: XCTestCase {
    typealias Core = QueuedWritesCore<Int>
    let acme = try! TenantID("acme")
    let globex = try! TenantID("globex")

    func core(_ change: (inout Core.Config) -> Void = { _ in }) -> Core {
        var config = Core.Config()
        change(&config)
        return Core(config: config, firstSequenceNumber: 1_000)
    }

    func queued(_ result: Result<UInt64, Core.Refusal>, file: StaticString = #filePath, line: UInt = #line) -> UInt64 {
        guard case .success(let number) = result else { XCTFail("refused: \(result)", file: file, line: line); return 0 }
        return number
    }

    // MARK: The core

    func testABatchGoesWhenFullOrWhenItsFirstRequestHasWaitedAndInOrder() {
        var core = core { $0.batchRequestsMax = 3; $0.flushAfterMs = 100 }
        let numbers = (1...4).map { queued(core.enqueue(acme, $0, statements: 1, bytes: 10, nowMs: 0)) }
        XCTAssertEqual(numbers, [1_000, 1_001, 1_002, 1_003], "sequence numbers grow by one from the first")
        XCTAssertEqual(core.nextDueMs(), 0, "a full batch is due at once")
        let first = core.due(nowMs: 0)
        XCTAssertEqual(first.map(\.payloads), [[1, 2, 3]])
        XCTAssertEqual(first.first?.batch, 1_002, "a batch is named by its last request")
        XCTAssertEqual(core.due(nowMs: 500).count, 0, "one batch of a tenant at a time, however long the next waits")
        XCTAssertNil(core.nextDueMs(), "nothing is due while the batch is out")
        XCTAssertEqual(core.onOutcomes(acme, batch: 1_002, [.committed, .committed, .committed], nowMs: 1).map(\.sequenceNumber), [1_000, 1_001, 1_002])
        XCTAssertEqual(core.nextDueMs(), 100, "the fourth waits for its flush delay from when it was queued")
        XCTAssertEqual(core.due(nowMs: 99).count, 0)
        XCTAssertEqual(core.due(nowMs: 100).map(\.payloads), [[4]])
        XCTAssertEqual(core.queued(acme), 1, "the fourth is out, not yet written")
    }

    func testTenantsQueueApartAndABatchKeepsToItsBounds() {
        var core = core { $0.batchStatementsMax = 10; $0.batchBytesMax = 100; $0.flushAfterMs = 0 }
        _ = queued(core.enqueue(acme, 1, statements: 6, bytes: 10, nowMs: 0))
        _ = queued(core.enqueue(acme, 2, statements: 6, bytes: 10, nowMs: 0))
        _ = queued(core.enqueue(globex, 3, statements: 1, bytes: 500, nowMs: 0))
        let sends = core.due(nowMs: 0)
        let byTenant = Dictionary(uniqueKeysWithValues: sends.map { ($0.tenant, $0.payloads) })
        XCTAssertEqual(byTenant, [acme: [1], globex: [3]], "statements past the bound wait for the next batch; a request past the byte bound goes alone")
    }

    func testNotExecutedIsSentAgainAfterTheDelayAndGivenUpAtLast() {
        var core = core { $0.flushAfterMs = 0; $0.retryAfterMs = 1_000; $0.giveUpAfterMs = 2_500 }
        let number = queued(core.enqueue(acme, 7, statements: 1, bytes: 1, nowMs: 0))
        XCTAssertEqual(core.due(nowMs: 0).map(\.payloads), [[7]])
        XCTAssertEqual(core.onOutcomes(acme, batch: number, [.notExecuted], nowMs: 10), [])
        XCTAssertEqual(core.nextDueMs(), 1_010)
        XCTAssertEqual(core.due(nowMs: 1_009).count, 0)
        XCTAssertEqual(core.due(nowMs: 1_010).map(\.payloads), [[7]], "the same batch again")
        XCTAssertEqual(core.onOutcomes(acme, batch: number, [.notExecuted], nowMs: 1_020), [])
        XCTAssertEqual(core.onOutcomes(acme, batch: number, [.committed], nowMs: 1_021), [], "no attempt is out: an answer for none is ignored")
        XCTAssertEqual(core.due(nowMs: 2_020).count, 1)
        XCTAssertEqual(core.onOutcomes(acme, batch: number, [.notExecuted], nowMs: 2_600),
                       [Core.Ended(sequenceNumber: number, applied: .no("the node could not write it for 2 s"))])
        XCTAssertEqual(core.queued(acme), 0)
        XCTAssertEqual(core.bytesQueued, 0)
    }

    func testAnUnknownOutcomeIsNeverSentAgainAndARefusalEndsAtOnce() {
        var core = core { $0.flushAfterMs = 0; $0.retryAfterMs = 0 }
        let first = queued(core.enqueue(acme, 1, statements: 1, bytes: 1, nowMs: 0))
        _ = core.due(nowMs: 0)
        XCTAssertEqual(core.onOutcomes(acme, batch: first, [.outcomeUnknown], nowMs: 1).map(\.applied), [.unknown])
        let second = queued(core.enqueue(acme, 2, statements: 1, bytes: 1, nowMs: 1))
        XCTAssertEqual(core.due(nowMs: 1).map(\.payloads), [[2]], "the unknown one is not sent again")
        XCTAssertEqual(core.onOutcomes(acme, batch: second, [.refused("no such tenant")], nowMs: 2).map(\.applied), [.no("no such tenant")])
        XCTAssertEqual(core.due(nowMs: 100).count, 0)
    }

    func testAFullQueueRefusesAndQueuesNothing() {
        var core = core { $0.requestsMax = 2; $0.bytesMax = 100 }
        _ = queued(core.enqueue(acme, 1, statements: 1, bytes: 10, nowMs: 0))
        _ = queued(core.enqueue(acme, 2, statements: 1, bytes: 10, nowMs: 0))
        XCTAssertEqual(core.enqueue(acme, 3, statements: 1, bytes: 10, nowMs: 0), .failure(.tenantFull))
        XCTAssertEqual(core.enqueue(globex, 4, statements: 1, bytes: 81, nowMs: 0), .failure(.nodeFull))
        XCTAssertEqual(core.enqueue(globex, 5, statements: 1, bytes: 80, nowMs: 0), .success(1_002), "a refusal takes no sequence number")
        XCTAssertEqual(core.queued(acme), 2)
    }

    /// Each request of a batch ends on its own; only those not executed go again, and the
    /// batch shrinks to them, still in order.
    func testRequestsOfABatchEndOnTheirOwnAndOnlyTheNotExecutedGoAgain() {
        var core = core { $0.flushAfterMs = 0; $0.retryAfterMs = 10; $0.batchRequestsMax = 4 }
        let numbers = (1...4).map { queued(core.enqueue(acme, $0, statements: 1, bytes: 5, nowMs: 0)) }
        let send = core.due(nowMs: 0)[0]
        let ended = core.onOutcomes(acme, batch: send.batch, [.committed, .notExecuted, .refused("statement too large"), .notExecuted], nowMs: 1)
        XCTAssertEqual(ended, [Core.Ended(sequenceNumber: numbers[0], applied: .yes), Core.Ended(sequenceNumber: numbers[2], applied: .no("statement too large"))])
        XCTAssertEqual(core.bytesQueued, 10, "the two that go again still count")
        XCTAssertEqual(core.due(nowMs: 11).map(\.payloads), [[2, 4]])
        XCTAssertEqual(core.onOutcomes(acme, batch: send.batch, [.committed, .committed], nowMs: 12).map(\.sequenceNumber), [numbers[1], numbers[3]])
        XCTAssertEqual(core.bytesQueued, 0)
        XCTAssertNil(core.nextDueMs())
    }

    // MARK: Through the routes

    func send(_ routes: APIRoutes, _ query: String, _ sql: String, headers extra: [(String, String)] = []) async -> APIResponse {
        var headers = HTTPHeaders(extra)
        headers.add(name: "X-Apiary-Tenant", value: "acme")
        let request = APIRequest(method: .POST, uri: "/db/execute" + query, headers: headers, body: Array("[\"\(sql)\"]".utf8))
        return await withCheckedContinuation { done in routes.respond(to: request) { make in done.resume(returning: make()) } }
    }

    func body(_ response: APIResponse) throws -> [String: Any] {
        try XCTUnwrap(JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any], String(decoding: response.body, as: UTF8.self))
    }

    func routes(_ service: any SQLService, _ change: (inout QueuedWrites.Core.Config) -> Void = { _ in }) -> APIRoutes {
        var limits = APIRoutes.Limits()
        limits.queuedWrites.flushAfterMs = 3_600_000 // only a full batch goes, unless the test says
        change(&limits.queuedWrites)
        return APIRoutes(service: service, accounts: nil, limits: limits)
    }

    func testQueuedWritesAreAnsweredAtOnceThenWrittenAsOneBatchInOrder() async throws {
        let service = RecordingSQLService()
        let routes = routes(service) { $0.batchRequestsMax = 3 }
        let first = await send(routes, "?queue", "INSERT INTO t VALUES (1)")
        let second = await send(routes, "?queue&pretty", "INSERT INTO t VALUES (2)")
        XCTAssertEqual([first.status, second.status], [.ok, .ok])
        XCTAssertEqual((try body(first)["results"] as? [Any])?.count, 0, "rqlite's answer: no results")
        let n1 = try XCTUnwrap(try body(first)["sequence_number"] as? UInt64)
        let n2 = try XCTUnwrap(try body(second)["sequence_number"] as? UInt64)
        XCTAssertEqual(n2, n1 + 1)
        XCTAssertTrue(String(decoding: second.body, as: UTF8.self).contains("\n    \"sequence_number\": "), "pretty as asked")
        XCTAssertEqual(service.calls.count, 0, "answered before anything is written")
        // /status tells the asking tenant its own queue, and another tenant nothing of it.
        XCTAssertEqual(routes.queuedWrites.figures(for: acme), .init(maxSize: 1024, batchSize: 3, timeoutMs: 3_600_000, depth: 2))
        XCTAssertEqual(routes.queuedWrites.figures(for: globex).depth, 0)
        // The third fills the batch; with `wait` its answer comes once the batch is written.
        let third = await send(routes, "?queue&wait", "INSERT INTO t VALUES (3)")
        XCTAssertEqual(third.status, .ok)
        XCTAssertEqual(try body(third)["sequence_number"] as? UInt64, n2 + 1)
        XCTAssertEqual(service.calls, (1...3).map { RecordingSQLService.Call(kind: .execute(transaction: false), tenant: "acme",
                                                                             statements: [SQLStatement("INSERT INTO t VALUES (\($0))")]) },
                       "the three requests written once the third filled the batch, in order")
    }

    func testABatchNotExecutedIsSentAgainAndAWaitEndsWithIt() async throws {
        let service = FlakyService(failures: [APIError(.notExecuted, "no standby")])
        let routes = routes(service) { $0.flushAfterMs = 0; $0.retryAfterMs = 0 }
        let answer = await send(routes, "?queue&wait", "INSERT INTO t VALUES (1)")
        XCTAssertEqual(answer.status, .ok, String(decoding: answer.body, as: UTF8.self))
        XCTAssertEqual(service.attempts, 2, "refused once, then written")
    }

    func testAWaitTellsABatchGivenUpOrOfUnknownOutcome() async throws {
        let notExecuted = FlakyService(failures: Array(repeating: APIError(.notExecuted, "no standby"), count: 100))
        let givenUp = await send(routes(notExecuted) { $0.flushAfterMs = 0; $0.giveUpAfterMs = 0 }, "?queue&wait", "INSERT INTO t VALUES (1)")
        XCTAssertEqual(givenUp.status, .serviceUnavailable)
        XCTAssertEqual(try body(givenUp)["code"] as? String, "not_executed")
        XCTAssertEqual(notExecuted.attempts, 1)

        let unknown = FlakyService(failures: [APIError(.outcomeUnknown, "standby lost mid-commit")])
        let answer = await send(routes(unknown) { $0.flushAfterMs = 0; $0.retryAfterMs = 0 }, "?queue&wait", "INSERT INTO t VALUES (1)")
        XCTAssertEqual(answer.status, .internalServerError)
        XCTAssertTrue(answer.outcomeUnknown)
        XCTAssertEqual(unknown.attempts, 1, "never sent again: it may have been applied")
    }

    func testAWaitEndsAtItsTimeoutWhileTheBatchIsStillBeingWritten() async throws {
        let service = RecordingSQLService(slowSQL: "INSERT INTO t VALUES (1)")
        let routes = routes(service) { $0.flushAfterMs = 0 }
        let answer = await send(routes, "?queue&wait&timeout=1ms", "INSERT INTO t VALUES (1)")
        XCTAssertEqual(answer.status, .requestTimeout, "rqlite's 408 for a wait that timed out")
        XCTAssertTrue(answer.outcomeUnknown, "it may yet be written")
        XCTAssertEqual(try body(answer)["code"] as? String, "outcome_unknown")
        service.slowGate.open()
    }

    func testQueuedWritesAreRefusedWithAKeyOffTheWriterAndWhenFull() async throws {
        let service = RecordingSQLService()
        let routes = routes(service) { $0.requestsMax = 1 }
        let keyed = await send(routes, "?queue", "INSERT INTO t VALUES (1)", headers: [("Idempotency-Key", "k1")])
        XCTAssertEqual(keyed.status, .badRequest)
        XCTAssertTrue(try XCTUnwrap(body(keyed)["error"] as? String).contains("Idempotency-Key"))
        let queued = await send(routes, "?queue", "INSERT INTO t VALUES (1)")
        XCTAssertEqual(queued.status, .ok)
        let full = await send(routes, "?queue", "INSERT INTO t VALUES (2)")
        XCTAssertEqual(full.status, .serviceUnavailable)
        XCTAssertEqual(try body(full)["code"] as? String, "not_executed")
        XCTAssertTrue(full.headers.contains { $0.0 == "Retry-After" })

        let standby = await send(self.routes(NotWriter()), "?queue", "INSERT INTO t VALUES (1)")
        XCTAssertEqual(standby.status, .serviceUnavailable)
        XCTAssertTrue(try XCTUnwrap(body(standby)["error"] as? String).contains("not primary"))
        XCTAssertEqual(service.calls.count, 0)
    }
}

/// Fails its first executes with the given errors, then succeeds.
final class FlakyService: SQLService, @unchecked Sendable {
    private let lock = NSLock()
    private var failures: [APIError]
    private var count = 0
    init(failures: [APIError]) { self.failures = failures }
    var attempts: Int { lock.withLock { count } }

    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] {
        let failure: APIError? = lock.withLock {
            count += 1
            return failures.isEmpty ? nil : failures.removeFirst()
        }
        if let failure { throw failure }
        return statements.map { _ in .success(StatementOutcome()) }
    }
    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] { [] }
    func statusJSON() async -> [UInt8] { [] }
    func promote() async throws -> [UInt8] { [] }
}

/// A node that is not the writer now.
struct NotWriter: SQLService {
    var isWriter: Bool { false }
    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] {
        throw APIError(.notExecuted, "standby")
    }
    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] { [] }
    func statusJSON() async -> [UInt8] { [] }
    func promote() async throws -> [UInt8] { [] }
}
