// ApiaryGateway: the gateway's decisions (DESIGN §7) as a pure state machine.
//
// A gateway forwards each client request to the formation's writer, and through a failover it
// holds requests (bounded) and sends them again — but only when that cannot apply a write twice:
// the request never reached a node, the node said it did not execute it, it is a read, or it
// carries an idempotency key (the node answers a repeated key with the first answer). Otherwise
// the client is told that the outcome is unknown; never a false failure, never a double apply.
// The shell (`Sources/ApiaryNode/Gateway/`) carries the requests; it decides nothing itself.
import ApiaryCore

// Times are monotonic milliseconds (Int64), as in the other cores.

/// What the gateway knows of the formation (from the monitor's topology watch).
public struct GatewayTopology: Hashable, Sendable {
    /// The watch's version: grows with every change within one run of the monitor.
    public var version: UInt64
    /// The monitor process's run: a new one starts its versions over.
    public var run: UInt64
    public var epoch: Epoch
    /// The node with a writer goal, if any.
    public var writer: NodeID?
    /// The writer reached its goal: it takes writes now.
    public var writerReady: Bool

    public init(version: UInt64, run: UInt64 = 0, epoch: Epoch, writer: NodeID?, writerReady: Bool) {
        self.version = version
        self.run = run
        self.epoch = epoch
        self.writer = writer
        self.writerReady = writerReady
    }

    /// Before the first answer of the watch.
    public static let unknown = GatewayTopology(version: 0, epoch: .zero, writer: nil, writerReady: false)
}

/// What a request is, as far as resending it goes.
public struct RequestTraits: Hashable, Sendable {
    /// A query: executing it again changes nothing.
    public var isRead: Bool
    /// It carries an `Idempotency-Key`: the node answers a repeat with the first answer.
    public var hasIdempotencyKey: Bool

    public init(isRead: Bool, hasIdempotencyKey: Bool) {
        self.isRead = isRead
        self.hasIdempotencyKey = hasIdempotencyKey
    }

    /// Sending it again can never apply a write twice.
    public var resendable: Bool { isRead || hasIdempotencyKey }
}

/// How one attempt to forward a request ended.
public enum AttemptOutcome: Hashable, Sendable {
    /// Nothing of the request left the gateway: no connection, a failed handshake, or the
    /// connection closed before the request was written.
    case notSent
    /// The request was sent, and the connection broke before an answer came: the node may or
    /// may not have executed it.
    case noAnswer
    /// The node answered. `code` is the answer's machine-readable error code, if any;
    /// `outcomeUnknown` its `X-Apiary-Outcome: unknown`.
    case answered(status: Int, code: String?, outcomeUnknown: Bool)
}

/// What to do with a request now.
public enum GatewayDecision: Hashable, Sendable {
    /// Send it to this node.
    case forward(NodeID)
    /// No writer to send it to yet (a failover), or one just refused it: wait for the topology
    /// to change, or until `untilMs`, then ask again.
    case wait(untilMs: Int64)
    /// Answer the client with the node's answer as it is.
    case answer
    /// Answer the client with the gateway's own refusal.
    case fail(GatewayFailure)
}

public enum GatewayFailure: Hashable, Sendable {
    /// No node took the request within the hold time, and none executed it: safe to retry
    /// (503, `not_executed`, `Retry-After`).
    case noWriter
    /// The request may have been executed and cannot be sent again safely: the client is told
    /// so (500, `outcome_unknown`, `X-Apiary-Outcome: unknown`).
    case outcomeUnknown
}

/// One request in flight through the gateway.
public struct RequestProgress: Hashable, Sendable {
    public let traits: RequestTraits
    public let startedAt: Int64
    public fileprivate(set) var attempts = 0
    /// Some attempt may have been executed by a node (sent, and not answered "not executed").
    public fileprivate(set) var mayHaveExecuted = false
    /// The topology of the last attempt that a node refused or that could not be sent; the
    /// next goes to the same writer only once the topology changed or a backoff passed.
    fileprivate var refusedUnder: GatewayTopology?
    /// The topology when the last attempt was sent: a refusal counts against that topology (a
    /// newer one explains it, and the request goes on at once).
    fileprivate var sentUnder = GatewayTopology.unknown
    fileprivate var retryAt: Int64 = .min

    public init(traits: RequestTraits, now: Int64) {
        self.traits = traits
        self.startedAt = now
    }
}

/// The gateway's limits for holding and resending.
public struct GatewayConfig: Hashable, Sendable {
    /// How long a request may be held (waiting for a writer, resending) before the client is
    /// answered with a refusal: what a failover may cost a client at most.
    public var holdMs: Int64 = 5_000
    /// Attempts per request at most (a bound on top of the time).
    public var attemptsMax = 50
    /// After a refusal by the writer the topology does not yet explain, the next attempt waits
    /// this long times the attempts so far, at most `backoffMaxMs` (a node that is changing
    /// roles answers "not executed" for a moment).
    public var backoffStepMs: Int64 = 20
    public var backoffMaxMs: Int64 = 200

    public init() {}
}

/// The gateway's decisions for its requests. Pure: the shell passes `now` (monotonic ms) in.
public struct GatewayCore: Sendable {
    public let config: GatewayConfig
    public private(set) var topology = GatewayTopology.unknown

    public init(config: GatewayConfig = GatewayConfig()) {
        precondition(config.holdMs > 0 && config.attemptsMax > 0 && config.backoffStepMs >= 0 && config.backoffMaxMs >= config.backoffStepMs,
                     "invalid gateway configuration \(config)")
        self.config = config
    }

    /// The monitor's watch answered. An older version (a late answer) changes nothing.
    /// - Returns: whether the topology changed (waiting requests should ask again).
    @discardableResult
    public mutating func onTopology(_ next: GatewayTopology) -> Bool {
        // Never back to an older epoch. Within one run of the monitor, only a newer version; a
        // restarted monitor starts its versions over, so its answers count as they come.
        guard next.epoch >= topology.epoch else { return false }
        guard next.epoch > topology.epoch || next.run != topology.run || next.version > topology.version else { return false }
        topology = next
        return true
    }

    /// A node served a request as the writer in `epoch` (its `X-Apiary-Epoch` on a success).
    /// An epoch newer than the topology's is news the watch has not brought yet (the monitor may
    /// be slow or cut off from this gateway), and the newer epoch wins, as the watch's own
    /// answers do: the node is the writer. An epoch the topology has already, or an older one,
    /// changes nothing. (A refusal teaches nothing: the writer itself refuses for reasons of
    /// its own — overloaded, draining, no lease for a strong read — so a refusal in a newer
    /// epoch does not tell who the writer is, nor that it is not this node.)
    /// - Returns: whether the topology changed (waiting requests should ask again).
    @discardableResult
    public mutating func onWriterAnswer(from node: NodeID, epoch: Epoch) -> Bool {
        guard epoch > topology.epoch else { return false }
        topology.epoch = epoch
        topology.writer = node
        topology.writerReady = true
        return true
    }

    /// What to do with `request` now: forward it, wait, or give up.
    public func next(_ request: RequestProgress, now: Int64) -> GatewayDecision {
        if now - request.startedAt >= config.holdMs || request.attempts >= config.attemptsMax {
            return .fail(request.mayHaveExecuted && !request.traits.isRead ? .outcomeUnknown : .noWriter)
        }
        let deadline = request.startedAt + config.holdMs
        guard let writer = topology.writer, topology.writerReady else { return .wait(untilMs: deadline) }
        if request.refusedUnder == topology, now < request.retryAt {
            return .wait(untilMs: min(request.retryAt, deadline))
        }
        return .forward(writer)
    }

    /// An attempt of `request` is under way on `node`, and the topology changed: whether to give
    /// that attempt up now (close its connection; it then ends as "no answer") rather than wait
    /// for its answer. Only when another writer is ready and the request may be sent again
    /// safely (a read, or a write with an idempotency key): a primary that lost its role, paused
    /// or cut off, may never answer, and the request should not wait out the attempt's timeout.
    /// A write without a key stays with its attempt: its outcome is the client's to learn.
    public func abandons(_ request: RequestProgress, sentTo node: NodeID) -> Bool {
        guard request.traits.resendable, let writer = topology.writer, topology.writerReady else { return false }
        return writer != node
    }

    /// The shell is about to send `request` (after `.forward`).
    public func sending(_ request: inout RequestProgress) {
        request.attempts += 1
        request.sentUnder = topology
    }

    /// How the attempt ended: answer the client, ask `next` again, or give up.
    public func onOutcome(_ outcome: AttemptOutcome, of request: inout RequestProgress, now: Int64) -> GatewayDecision {
        switch outcome {
        case .notSent:
            refused(&request, now: now)
            return next(request, now: now)
        case .noAnswer:
            request.mayHaveExecuted = true
            guard request.traits.resendable else { return .fail(.outcomeUnknown) }
            refused(&request, now: now)
            return next(request, now: now)
        case .answered(let status, let code, let outcomeUnknown):
            if status == 503, code == "not_executed" {
                // The node says it did not execute it (not the writer, changing roles, draining,
                // no lease for a strong read): safe to send again, to the writer.
                refused(&request, now: now)
                return next(request, now: now)
            }
            if outcomeUnknown {
                guard request.traits.resendable else { return .answer }
                request.mayHaveExecuted = true
                refused(&request, now: now)
                return next(request, now: now)
            }
            return .answer
        }
    }

    private func refused(_ request: inout RequestProgress, now: Int64) {
        request.refusedUnder = request.sentUnder
        request.retryAt = now + min(config.backoffMaxMs, config.backoffStepMs * Int64(request.attempts))
    }
}
