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
                                            "upgrade", "host", "content-length", "x-forwarded-for", "expect"]

    func respond(to request: APIRequest, then done: @escaping @Sendable (_ make: @escaping @Sendable () -> APIResponse) -> Void) {
        Task {
            var answer = await forward(request)
            // Browsers (and clients that honour it) never try plain HTTP to this host again.
            answer.headers.append(("Strict-Transport-Security", "max-age=31536000"))
            // Which gateway answered: its own refusals too, not only the nodes' answers.
            answer.headers.append(("X-Apiary-Gateway", name))
            let response = answer
            done { response }
        }
    }

    private func forward(_ request: APIRequest) async -> APIResponse {
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
        if let refusal = limits.admit(request) { return refusal }
        let path = request.path
        // /db/query, also under /tenants/{t}/; GETs other than the SQL endpoints (status, nodes).
        let isRead = path.hasSuffix("/db/query") || (request.method == .GET && !path.contains("/db/"))
        let traits = RequestTraits(isRead: isRead, hasIdempotencyKey: request.headers.contains(name: "idempotency-key"))
        var progress = RequestProgress(traits: traits, now: monotonicNowMs())
        var (decision, seen) = state.with { ($0.next(progress, now: monotonicNowMs()), $0.topology) }
        var lastAnswer: APIResponse?
        while true {
            switch decision {
            case .forward(let node):
                state.with { $0.sending(&progress) }
                let (outcome, answer) = await attempt(request, on: node, progress: progress)
                lastAnswer = answer
                (decision, seen) = state.with { ($0.onOutcome(outcome, of: &progress, now: monotonicNowMs()), $0.topology) }
            case .wait(let untilMs):
                await state.waitForChange(from: seen, untilMs: untilMs, loop: MultiThreadedEventLoopGroup.singleton.next())
                (decision, seen) = state.with { ($0.next(progress, now: monotonicNowMs()), $0.topology) }
            case .answer:
                return lastAnswer ?? Self.failure(.noWriter, holdMs: state.with { $0.config.holdMs })
            case .fail(let failure):
                return Self.failure(failure, holdMs: state.with { $0.config.holdMs })
            }
        }
    }

    /// One attempt on `node`: how it ended, and the node's answer if it gave one.
    private func attempt(_ request: APIRequest, on node: NodeID, progress: RequestProgress) async -> (AttemptOutcome, APIResponse?) {
        guard let pool = pools[node] else {
            logger.warning("the monitor names a writer this gateway has no address for", metadata: ["node": "\(node)"])
            return (.notSent, nil)
        }
        let connection: HTTPSConnection
        do { connection = try await pool.take() } catch { return (.notSent, nil) }
        var headers: [(String, String)] = request.headers.compactMap { Self.notForwarded.contains($0.name.lowercased()) ? nil : ($0.name, $0.value) }
        if let client = request.clientAddress { headers.append(("X-Forwarded-For", client)) }
        let channel = connection.channel
        let timeout = channel.eventLoop.scheduleTask(in: .milliseconds(Self.attemptTimeoutMs)) { connection.abandon() }
        defer { timeout.cancel() }
        // While the attempt is under way, a change of writer may make waiting for it pointless
        // (GatewayCore.abandons): the state then closes its connection and the core sends it again.
        let token = state.attemptBegins(progress, on: node, connection: connection)
        defer { state.attemptEnded(token) }
        let response: HTTPSConnection.Response
        do {
            response = try await connection.request(request.method, request.uri, headers: headers,
                                                    body: request.method == .GET || request.method == .HEAD ? nil : request.body)
        } catch is HTTPSRequestNotSent {
            await pool.discard(connection)
            return (.notSent, nil)
        } catch {
            await pool.discard(connection)
            return (.noAnswer, nil)
        }
        if response.header("connection")?.lowercased() == "close" { await pool.discard(connection) } else { pool.give(back: connection) }
        // Only a refusal's code matters to the core; a 200's body (results) is never parsed.
        let code = response.status == 200 ? nil : response.errorCode
        // The node's epoch may be news the monitor's watch has not brought yet. Only a success
        // of an SQL endpoint says the node is the writer (a standby's /status is 200 too).
        if request.path.contains("/db/"), response.status == 200, let epoch = response.header("x-apiary-epoch").flatMap(UInt64.init) {
            state.onWriterAnswer(from: node, epoch: Epoch(epoch))
        }
        let unknown = response.header("x-apiary-outcome")?.lowercased() == "unknown"
        var answer = APIResponse(status: HTTPResponseStatus(statusCode: response.status), body: response.body,
                                 outcomeUnknown: unknown, contentType: response.header("content-type") ?? "application/json",
                                 allow: response.header("allow"), asksForCredentials: response.header("www-authenticate") != nil)
        for name in ["X-Apiary-Node", "X-Apiary-Epoch", "Retry-After"] {
            if let value = response.header(name) { answer.headers.append((name, value)) }
        }
        return (.answered(status: response.status, code: code, outcomeUnknown: unknown), answer)
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
