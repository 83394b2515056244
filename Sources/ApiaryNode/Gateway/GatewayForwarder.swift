import ApiaryCore
import ApiaryGateway
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

/// The gateway's responder: each client request goes to the writer the topology names, and is
/// held and sent again only as ``GatewayCore`` decides. It decides nothing itself.
struct GatewayForwarder: HTTPResponder {
    let name: String
    let state: GatewayState
    let pools: [NodeID: NodePool]
    let bodyBytesMax: Int
    let limits: RequestLimits
    let logger: Logger
    /// An attempt not answered within this long is given up (its connection closed): longer
    /// than a node's own bound on a request (15 s) and its commit wait.
    static let attemptTimeoutMs: Int64 = 20_000

    /// Headers that describe one hop, not the request (RFC 9110 §7.6.1), and those the gateway
    /// sets itself: never passed on.
    static let notForwarded: Set<String> = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                                            "upgrade", "host", "content-length", "x-forwarded-for", "expect", "x-apiary-operator"]

    /// On every answer of the gateway, its server's own refusals too (a 400, a 431, a 503 to a
    /// connection past the limits), not only the nodes' answers: which gateway answered, and
    /// HSTS (browsers, and clients that honour it, never try plain HTTP to this host again).
    static func answerHeaders(name: String) -> [(String, String)] {
        [("Strict-Transport-Security", "max-age=31536000"), ("X-Apiary-Gateway", name),
         (ApiaryVersion.rqliteHeader, ApiaryVersion.rqliteHeaderValue)]
    }

    func respond(to request: APIRequest, then done: @escaping @Sendable (_ make: @escaping @Sendable () -> APIResponse) -> Void) {
        // (The server adds `answerHeaders` to every answer, this one's and its own.)
        let finish: @Sendable (APIResponse) -> Void = { answer in done { answer } }
        if let refusal = refusal(of: request) { return finish(refusal) }
        let loop = request.eventLoop ?? MultiThreadedEventLoopGroup.singleton.next()
        let forwarding = Forwarding(forwarder: self, request: request, loop: loop, finish: finish)
        loop.execute { forwarding.start() }
    }

    /// What the gateway answers itself, before any node sees the request; nil to forward it.
    private func refusal(of request: APIRequest) -> APIResponse? {
        if request.bodyTooLarge {
            return APIResponse(status: .payloadTooLarge, body: RqliteJSON.error("request body larger than \(bodyBytesMax) bytes", code: .tooLarge))
        }
        if request.memoryShort {
            // The body was dropped unread: forwarding the request without it would run
            // something else (a POST /db/query's `q=`) or fail falsely. Nothing was sent.
            var refusal = APIResponse(status: .serviceUnavailable,
                                      body: RqliteJSON.error("not executed: the gateway is short of memory for request bodies; send it again", code: .notExecuted))
            refusal.headers.append(("Retry-After", "1"))
            return refusal
        }
        return limits.admit(request)
    }

    static func failure(_ failure: GatewayFailure, holdMs: Int64) -> APIResponse {
        switch failure {
        case .noWriter:
            var r = APIResponse(status: .serviceUnavailable,
                                body: RqliteJSON.error("no primary took the request within \(holdMs) ms (a failover may be in progress); it was not executed: send it again", code: .notExecuted))
            r.headers.append(("Retry-After", "1"))
            return r
        case .outcomeUnknown:
            return APIResponse(status: .internalServerError,
                               body: RqliteJSON.error("outcome unknown: the request reached the primary and no answer came back; it may or may not have been applied (send it again only with an Idempotency-Key)", code: .outcomeUnknown),
                               outcomeUnknown: true)
        }
    }
}

/// One client request on its way through the gateway. Every step runs on the event loop of the
/// client's connection, and ``NodePool`` gives it a connection on that same loop when one is idle
/// there: a request that finds its writer crosses no thread and makes no task (docs/gateway.md,
/// "The forwarding path"). Each step asks ``GatewayCore`` what to do next.
private final class Forwarding: @unchecked Sendable {
    let forwarder: GatewayForwarder
    let request: APIRequest
    let loop: any EventLoop
    let finish: @Sendable (APIResponse) -> Void
    /// The request's headers as they go to the node: those of the hop removed, the client's
    /// address added.
    let fields: HTTPHeaders
    private var progress: RequestProgress
    private var seen = GatewayTopology.unknown
    private var lastAnswer: APIResponse?

    init(forwarder: GatewayForwarder, request: APIRequest, loop: any EventLoop, finish: @escaping @Sendable (APIResponse) -> Void) {
        self.forwarder = forwarder
        self.request = request
        self.loop = loop
        self.finish = finish
        var fields = request.headers
        for name in GatewayForwarder.notForwarded where fields.contains(name: name) { fields.remove(name: name) }
        if let client = request.clientAddress { fields.add(name: "X-Forwarded-For", value: client) }
        // The node sees the gateway's certificate, not the client's: an operator's is vouched for.
        if let peer = request.peer, peer.role == .operator { fields.add(name: APIRoutes.operatorHeader, value: peer.name) }
        self.fields = fields
        // /db/query, also under /tenants/{t}/; GETs other than the SQL endpoints (status, nodes).
        let path = request.path
        let isRead = path.hasSuffix("/db/query") || (request.method == .GET && !path.contains("/db/"))
        progress = RequestProgress(traits: RequestTraits(isRead: isRead, hasIdempotencyKey: request.headers.contains(name: "idempotency-key")),
                                   now: monotonicNowMs())
    }

    func start() { step(decide { core, progress, now in core.next(progress, now: now) }) }

    /// Asks the core, and notes the topology it answered under (what a wait waits to change).
    private func decide(_ ask: (inout GatewayCore, inout RequestProgress, Int64) -> GatewayDecision) -> GatewayDecision {
        let now = monotonicNowMs()
        let (decision, topology) = forwarder.state.with { core in (ask(&core, &progress, now), core.topology) }
        seen = topology
        return decision
    }

    private func step(_ decision: GatewayDecision) {
        switch decision {
        case .forward(let node):
            forwarder.state.with { $0.sending(&progress) }
            attempt(on: node)
        case .wait(let untilMs):
            forwarder.state.whenChanged(from: seen, untilMs: untilMs, on: loop) { [self] in
                step(decide { core, progress, now in core.next(progress, now: now) })
            }
        case .answer:
            finish(lastAnswer ?? GatewayForwarder.failure(.noWriter, holdMs: forwarder.state.with { $0.config.holdMs }))
        case .fail(let failure):
            finish(GatewayForwarder.failure(failure, holdMs: forwarder.state.with { $0.config.holdMs }))
        }
    }

    private func ended(_ outcome: AttemptOutcome, answer: APIResponse?) {
        lastAnswer = answer
        step(decide { core, progress, now in core.onOutcome(outcome, of: &progress, now: now) })
    }

    /// One attempt on `node`; ends in ``ended(_:answer:)`` with how it went.
    private func attempt(on node: NodeID) {
        guard let pool = forwarder.pools[node] else {
            forwarder.logger.warning("the monitor names a writer this gateway has no address for", metadata: ["node": "\(node)"])
            return ended(.notSent, answer: nil)
        }
        pool.take(on: loop).whenComplete { [self] taken in
            switch taken {
            case .failure: ended(.notSent, answer: nil)
            case .success(let connection): send(on: connection, to: node, from: pool)
            }
        }
    }

    private func send(on connection: HTTPSConnection, to node: NodeID, from pool: NodePool) {
        let timeout = connection.channel.eventLoop.scheduleTask(in: .milliseconds(GatewayForwarder.attemptTimeoutMs)) { connection.abandon() }
        // While the attempt is under way, a change of writer may make waiting for it pointless
        // (GatewayCore.abandons): the state then closes its connection and the core sends it again.
        let token = forwarder.state.attemptBegins(progress, on: node, connection: connection)
        let body = request.method == .GET || request.method == .HEAD ? nil : request.body
        connection.send(request.method, request.uri, fields: fields, body: body).hop(to: loop).whenComplete { [self] result in
            timeout.cancel()
            forwarder.state.attemptEnded(token)
            switch result {
            case .failure(let error):
                pool.discard(connection)
                ended(error is HTTPSRequestNotSent ? .notSent : .noAnswer, answer: nil)
            case .success(let response):
                if response.header("connection")?.lowercased() == "close" { pool.discard(connection) } else { pool.give(back: connection) }
                answered(response, by: node)
            }
        }
    }

    private func answered(_ response: HTTPSConnection.Response, by node: NodeID) {
        // Only a refusal's code matters to the core; a 200's body (results) is never parsed.
        let code = response.status == 200 ? nil : response.errorCode
        // The node's epoch may be news the monitor's watch has not brought yet. Only a success
        // of an SQL endpoint says the node is the writer (a standby's /status is 200 too).
        if response.status == 200, request.path.contains("/db/"), let epoch = response.header("x-apiary-epoch").flatMap(UInt64.init) {
            forwarder.state.onWriterAnswer(from: node, epoch: Epoch(epoch))
        }
        let unknown = response.header("x-apiary-outcome")?.lowercased() == "unknown"
        var answer = APIResponse(status: HTTPResponseStatus(statusCode: response.status), body: response.body,
                                 outcomeUnknown: unknown, contentType: response.header("content-type") ?? "application/json",
                                 allow: response.header("allow"), asksForCredentials: response.header("www-authenticate") != nil)
        for name in ["X-Apiary-Node", "X-Apiary-Epoch", "Retry-After"] {
            if let value = response.header(name) { answer.headers.append((name, value)) }
        }
        ended(.answered(status: response.status, code: code, outcomeUnknown: unknown), answer: answer)
    }
}

/// Requests per second per client address: one client cannot take the gateway from the others.
/// (Not per user or tenant: the gateway does not authenticate, and a limit keyed on a name no
/// one has checked would let anyone spend another user's allowance. The nodes, which check
/// credentials, limit tenants: `apiary node --tenant-rate`.)
final class RequestLimits: Sendable {
    private let byAddress: SharedRateLimit

    init(perAddress: RateLimiter.Config) {
        byAddress = SharedRateLimit(perAddress)
    }

    /// Nil when admitted; else the 429 to answer.
    func admit(_ request: APIRequest) -> APIResponse? {
        guard let retryAfterMs = byAddress.admit(request.clientAddress ?? "?") else { return nil }
        return APIRoutes.response(APIError(.rateLimited, "too many requests from this client address: not executed; send it again after Retry-After",
                                           retryAfterSeconds: max(1, (retryAfterMs + 999) / 1000)))
    }
}
