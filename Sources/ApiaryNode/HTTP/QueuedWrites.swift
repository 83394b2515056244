import ApiaryCore
import ApiaryStorage
import Foundation

/// rqlite's queued writes (`POST /db/execute?queue`, docs/rqlite-compatibility.md): a request
/// is answered as soon as it is queued, with a sequence number, and the node writes what its
/// tenant's queue holds in batches, many requests in one commit, as rqlite does.
///
/// The decisions (what to send, when, what a failure means, when to give up) are made by this
/// pure core, driven with explicit time; ``QueuedWrites`` carries them out. Generic over what
/// a request carries so that the core holds no SQL (tests queue numbers).
///
/// Rules:
/// - A tenant's requests are written in the order they were queued, one batch at a time.
/// - A batch is sent when it is full (requests, statements or bytes) or when its first request
///   has waited ``Config/flushAfterMs`` (rqlite's 100 ms).
/// - Each request of a batch ends on its own: written (statements inside it may have failed:
///   not reported, as in rqlite), refused (no such tenant, a statement too large), or of
///   unknown outcome. Only requests the node said were **not executed** (no standby, not
///   primary for a moment, the writer's own queue full) are sent again, never one of unknown
///   outcome, so a queued write is never applied twice (rqlite retries every failure).
/// - A request still "not executed" ``Config/giveUpAfterMs`` after its batch was first sent is
///   given up: it ends "not applied".
struct QueuedWritesCore<Payload> {
    struct Config: Sendable {
        /// Requests waiting per tenant at most (rqlite's queue capacity).
        var requestsMax = 1024
        /// Bytes queued at this node at most, every tenant together (as the shell counts them).
        var bytesMax = 64 << 20
        /// Requests in one batch at most (rqlite's batch size).
        var batchRequestsMax = 128
        /// Statements in one batch at most (a request's own limit).
        var batchStatementsMax = 10_000
        /// Bytes in one batch at most (the writer's own batch bound); a larger request goes alone.
        var batchBytesMax = 4 << 20
        /// How long the first request of a batch waits for others (rqlite's queue timeout).
        var flushAfterMs: Int64 = 100
        /// How long after "not executed" a batch is sent again (rqlite's retry delay).
        var retryAfterMs: Int64 = 1_000
        /// How long after its first sending a batch that keeps failing is given up.
        var giveUpAfterMs: Int64 = 30_000
    }

    /// One request's part: what it carries, how many statements and bytes.
    struct Request {
        var sequenceNumber: UInt64
        var payload: Payload
        var statements: Int
        var bytes: Int
        var queuedAtMs: Int64
    }

    /// A batch to send: the payloads of its requests, in order.
    struct Send {
        var tenant: TenantID
        /// The batch's name: its last request's sequence number when first sent.
        var batch: UInt64
        var payloads: [Payload]
    }

    /// What sending one request of a batch came to.
    enum Outcome: Equatable {
        /// Committed (statements inside it may have failed).
        case committed
        /// Surely not applied, and worth sending again.
        case notExecuted
        /// Maybe applied.
        case outcomeUnknown
        /// Surely not applied, and sending it again will not change that; why.
        case refused(String)
    }

    /// How a request ended.
    enum Applied: Equatable {
        case yes
        /// Not applied; why.
        case no(String)
        case unknown
    }

    struct Ended: Equatable {
        var sequenceNumber: UInt64
        var applied: Applied
    }

    enum Refusal: Error, Equatable {
        /// The tenant has ``Config/requestsMax`` requests waiting.
        case tenantFull
        /// The node's queued bytes would pass ``Config/bytesMax``.
        case nodeFull
    }

    private struct InFlight {
        var send: Send
        var requests: [Request]
        var firstSentAtMs: Int64
        /// Nil while an attempt is out.
        var retryAtMs: Int64?
    }

    private struct TenantQueue {
        var waiting: [Request] = []
        var inFlight: InFlight?
        var isEmpty: Bool { waiting.isEmpty && inFlight == nil }
    }

    let config: Config
    /// Only tenants with requests waiting or out.
    private var tenants: [TenantID: TenantQueue] = [:]
    private var nextSequenceNumber: UInt64
    private(set) var bytesQueued = 0

    /// - Parameter firstSequenceNumber: rqlite's are nanoseconds of the wall clock, so that they
    ///   keep growing across restarts; the shell passes the time it started.
    init(config: Config = Config(), firstSequenceNumber: UInt64) {
        self.config = config
        nextSequenceNumber = max(1, firstSequenceNumber)
    }

    /// Queues one request; its sequence number, or why not (nothing queued then).
    mutating func enqueue(_ tenant: TenantID, _ payload: Payload, statements: Int, bytes: Int, nowMs: Int64) -> Result<UInt64, Refusal> {
        var queue = tenants[tenant] ?? TenantQueue()
        guard queue.waiting.count < config.requestsMax else { return .failure(.tenantFull) }
        guard bytesQueued + bytes <= config.bytesMax else { return .failure(.nodeFull) }
        let number = nextSequenceNumber
        nextSequenceNumber += 1
        queue.waiting.append(Request(sequenceNumber: number, payload: payload, statements: statements, bytes: bytes, queuedAtMs: nowMs))
        tenants[tenant] = queue
        bytesQueued += bytes
        return .success(number)
    }

    /// The batches to send now: retries that are due, and new batches full or old enough.
    mutating func due(nowMs: Int64) -> [Send] {
        var sends: [Send] = []
        for (tenant, var queue) in tenants {
            if var inFlight = queue.inFlight {
                guard let retryAt = inFlight.retryAtMs, retryAt <= nowMs else { continue }
                inFlight.retryAtMs = nil
                queue.inFlight = inFlight
                sends.append(inFlight.send)
            } else if let first = queue.waiting.first, isFull(queue.waiting) || nowMs - first.queuedAtMs >= config.flushAfterMs {
                let count = batchCount(queue.waiting)
                let requests = Array(queue.waiting.prefix(count))
                queue.waiting.removeFirst(count)
                let send = Send(tenant: tenant, batch: requests.last!.sequenceNumber, payloads: requests.map(\.payload))
                queue.inFlight = InFlight(send: send, requests: requests, firstSentAtMs: nowMs)
                sends.append(send)
            } else {
                continue
            }
            tenants[tenant] = queue
        }
        return sends
    }

    /// What an attempt at `batch` of `tenant` came to, one outcome per request sent (in
    /// order); the requests that ended. Those not executed are sent again later (the batch
    /// shrinks to them) until the batch is given up.
    mutating func onOutcomes(_ tenant: TenantID, batch: UInt64, _ outcomes: [Outcome], nowMs: Int64) -> [Ended] {
        guard var queue = tenants[tenant], var inFlight = queue.inFlight, inFlight.send.batch == batch, inFlight.retryAtMs == nil,
              outcomes.count == inFlight.requests.count else { return [] }
        let givesUp = nowMs - inFlight.firstSentAtMs >= config.giveUpAfterMs
        var ended: [Ended] = []
        var again: [Request] = []
        for (request, outcome) in zip(inFlight.requests, outcomes) {
            switch outcome {
            case .committed: ended.append(Ended(sequenceNumber: request.sequenceNumber, applied: .yes))
            case .outcomeUnknown: ended.append(Ended(sequenceNumber: request.sequenceNumber, applied: .unknown))
            case .refused(let why): ended.append(Ended(sequenceNumber: request.sequenceNumber, applied: .no(why)))
            case .notExecuted where givesUp:
                ended.append(Ended(sequenceNumber: request.sequenceNumber,
                                   applied: .no("the node could not write it for \(config.giveUpAfterMs / 1000) s")))
            case .notExecuted: again.append(request)
            }
            if case .notExecuted = outcome, !givesUp { continue }
            bytesQueued -= request.bytes
        }
        if again.isEmpty {
            queue.inFlight = nil
        } else {
            inFlight.requests = again
            inFlight.send.payloads = again.map(\.payload)
            inFlight.retryAtMs = nowMs + config.retryAfterMs
            queue.inFlight = inFlight
        }
        tenants[tenant] = queue.isEmpty ? nil : queue
        return ended
    }

    /// When ``due(nowMs:)`` next has something to send, if ever without new requests.
    func nextDueMs() -> Int64? {
        var earliest: Int64?
        for queue in tenants.values {
            let at: Int64?
            if let inFlight = queue.inFlight {
                at = inFlight.retryAtMs
            } else if let first = queue.waiting.first {
                at = isFull(queue.waiting) ? first.queuedAtMs : first.queuedAtMs + config.flushAfterMs
            } else {
                at = nil
            }
            if let at { earliest = min(earliest ?? at, at) }
        }
        return earliest
    }

    /// Requests of `tenant` waiting or out.
    func queued(_ tenant: TenantID) -> Int { tenants[tenant].map { $0.waiting.count + ($0.inFlight?.requests.count ?? 0) } ?? 0 }

    /// Whether the waiting requests fill a batch.
    private func isFull(_ waiting: [Request]) -> Bool { batchCount(waiting) < waiting.count || waiting.count >= config.batchRequestsMax }

    /// How many of the waiting requests go in the next batch: in order, within every bound,
    /// at least one.
    private func batchCount(_ waiting: [Request]) -> Int {
        var count = 0, statements = 0, bytes = 0
        for request in waiting {
            guard count < config.batchRequestsMax else { break }
            if count > 0, statements + request.statements > config.batchStatementsMax || bytes + request.bytes > config.batchBytesMax { break }
            count += 1
            statements += request.statements
            bytes += request.bytes
        }
        return count
    }
}

/// Carries out ``QueuedWritesCore`` at one node: batches go to the service's ordinary write
/// path (as one request of many statements, outside a transaction, as rqlite sends a queue's
/// batch), timers on a queue of its own. What is queued lives in this process's memory until
/// it is written: a crash, a restart or a failover of the node loses it, as in rqlite. Only an
/// answer to `?queue&wait` says a write is durable.
final class QueuedWrites: @unchecked Sendable {
    typealias Core = QueuedWritesCore<[SQLStatement]>

    /// How a waiting request ended.
    enum WaitResult: Equatable {
        case finished(Core.Applied)
        /// Still queued (or being written) when its wait ended.
        case timedOut
    }

    private struct Waiter {
        var answer: @Sendable (UInt64, WaitResult) -> Void
        /// Cancelled when the request ends first: a long `timeout` leaves no timer behind.
        var timeout: DispatchWorkItem?
    }

    private let lock = NSLock()
    private var core: Core
    /// Taken out of the map by whichever comes first, the request's end or its wait's end: each
    /// answer is given once.
    private var waiters: [UInt64: Waiter] = [:]
    private let service: any SQLService
    private let timers = DispatchQueue(label: "apiary.queued-writes")
    /// The earliest pump already scheduled (lock held).
    private var wakeAtMs: Int64?

    init(service: any SQLService, config: Core.Config = Core.Config()) {
        self.service = service
        core = Core(config: config, firstSequenceNumber: UInt64(max(0, Date().timeIntervalSince1970 * 1e9)))
    }

    /// What a request holds in memory, as the node's queue bound counts it: its SQL and values,
    /// and what each statement and value costs beyond them.
    static func bytes(_ statements: [SQLStatement]) -> Int {
        statements.reduce(0) { $0 + $1.byteCount + 64 + 16 * $1.parameters.count }
    }

    /// Queues `statements` of `tenant`; its sequence number, or why not. With `waited`, that is
    /// called once, with the sequence number, when the request ends or after `waitMs`.
    func enqueue(_ tenant: TenantID, _ statements: [SQLStatement], waitMs: Int64 = 30_000,
                 waited: (@Sendable (UInt64, WaitResult) -> Void)? = nil) -> Result<UInt64, Core.Refusal> {
        let queued: Result<UInt64, Core.Refusal> = lock.withLock {
            let queued = core.enqueue(tenant, statements, statements: statements.count, bytes: Self.bytes(statements), nowMs: monotonicNowMs())
            if case .success(let number) = queued, let waited {
                let timeout = DispatchWorkItem { [self] in lock.withLock { waiters.removeValue(forKey: number) }?.answer(number, .timedOut) }
                waiters[number] = Waiter(answer: waited, timeout: timeout)
                timers.asyncAfter(deadline: .now() + .milliseconds(Int(clamping: max(0, waitMs))), execute: timeout)
            }
            return queued
        }
        pump()
        return queued
    }

    /// Requests of `tenant` waiting or being written (tests, status).
    func queued(_ tenant: TenantID) -> Int { lock.withLock { core.queued(tenant) } }

    /// What `/status` tells of the queue (rqlite's `http.queue._default`): its bounds, and the
    /// asking tenant's own requests waiting or being written (never another tenant's).
    struct Figures: Sendable, Equatable {
        var maxSize: Int
        var batchSize: Int
        var timeoutMs: Int64
        var depth: Int?
    }

    func figures(for tenant: TenantID?) -> Figures {
        lock.withLock {
            Figures(maxSize: core.config.requestsMax, batchSize: core.config.batchRequestsMax, timeoutMs: core.config.flushAfterMs,
                    depth: tenant.map { core.queued($0) })
        }
    }

    /// Sends what is due and schedules the next look.
    private func pump() {
        let now = monotonicNowMs()
        let (sends, wakeIn): ([Core.Send], Int64?) = lock.withLock {
            if let wake = wakeAtMs, wake <= now { wakeAtMs = nil }
            let sends = core.due(nowMs: now)
            guard let next = core.nextDueMs(), wakeAtMs.map({ next < $0 }) ?? true else { return (sends, nil) }
            wakeAtMs = next
            return (sends, max(0, next - now))
        }
        if let wakeIn {
            timers.asyncAfter(deadline: .now() + .milliseconds(Int(wakeIn))) { [self] in pump() }
        }
        for send in sends {
            service.execute(tenant: send.tenant, group: send.payloads) { [self] results in
                let ended = lock.withLock { () -> [(UInt64, Core.Applied, Waiter)] in
                    core.onOutcomes(send.tenant, batch: send.batch, results.map(Self.outcome), nowMs: monotonicNowMs()).compactMap { end in
                        waiters.removeValue(forKey: end.sequenceNumber).map { (end.sequenceNumber, end.applied, $0) }
                    }
                }
                for (number, applied, waiter) in ended {
                    waiter.timeout?.cancel()
                    waiter.answer(number, .finished(applied))
                }
                // Off the writer's thread, which only hands the answer on.
                timers.async { [self] in pump() }
            }
        }
    }

    /// What the write path's answer to one request means (`SQLService`'s errors are `APIError`s).
    static func outcome(_ result: Result<[StatementResult], any Error>) -> Core.Outcome {
        switch result {
        case .success: return .committed
        case .failure(let error as APIError):
            switch error.kind {
            case .notExecuted, .rateLimited, .capacity: return .notExecuted
            case .notFound, .badRequest, .tooLarge, .forbidden, .unauthorized, .conflict, .idempotencyKeyReused: return .refused(error.message)
            case .outcomeUnknown: return .outcomeUnknown
            }
        case .failure: return .outcomeUnknown
        }
    }
}
