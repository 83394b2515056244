import ApiaryCore
import ApiaryStorage
import ApiaryTLS
import Foundation
import NIOHTTP1

/// Read consistency levels, with rqlite's names (DESIGN §3).
public enum ReadLevel: String, Sendable {
    case none, weak, strong, linearizable
}

/// What the HTTP API needs from a node. Errors thrown are `APIError`s.
public protocol SQLService: Sendable {
    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult]
    /// The same for the API's event loops, without a task per request (the insert path's
    /// hottest: a task cost as much as routing, parsing and answering together). `done` may
    /// run on any thread and must only hand the result on.
    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?,
                 then done: @escaping @Sendable (Result<[StatementResult], any Error>) -> Void)
    /// Queued writes (``QueuedWrites``): `requests` in order, each applied or failing on its own
    /// and outside a transaction, committed together where the service can; one result per
    /// request, in order, to `done` (any thread). By default one at a time, each sent once the
    /// one before it is answered.
    func execute(tenant: TenantID, group requests: [[SQLStatement]],
                 then done: @escaping @Sendable ([Result<[StatementResult], any Error>]) -> Void)
    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult]
    /// The same, the statements reading one snapshot when `transaction` (rqlite's
    /// `?transaction` on a query). By default: as ``query(tenant:_:level:)``.
    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel, transaction: Bool) async throws -> [StatementResult]
    /// The same on the calling thread (an event loop), when it can be done at once and
    /// quickly (a read by key); nil: call ``query(tenant:_:level:transaction:)``, which
    /// answers every case (errors included). By default nil.
    func queryInline(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel, transaction: Bool) -> [StatementResult]?
    /// Operator-only status (tenant names, positions): JSON bytes.
    func statusJSON() async -> [UInt8]
    /// This node's name, role and epoch (rqlite's `/readyz`, `/status`, `/nodes`); nil while
    /// it changes roles. The default derives it from ``statusJSON()``.
    func summary() async -> NodeSummary?
    /// Operator-only: make this standby the primary of a new epoch (DESIGN §6, manual until
    /// the monitor exists). Returns a JSON report.
    func promote() async throws -> [UInt8]
    /// Where rqlite clients are sent (`host:port` of the writer's API, answered 301) while this
    /// node is not the writer; nil: requests are answered here.
    var redirectTarget: String? { get }
    /// Whether this node writes now (a primary): queued writes are taken only then. By
    /// default true.
    var isWriter: Bool { get }
}

extension SQLService {
    public var redirectTarget: String? { nil }

    public var isWriter: Bool { true }

    public func queryInline(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel, transaction: Bool) -> [StatementResult]? { nil }

    public func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel, transaction: Bool) async throws -> [StatementResult] {
        try await query(tenant: tenant, statements, level: level)
    }
}

extension SQLService {
    public func execute(tenant: TenantID, group requests: [[SQLStatement]],
                        then done: @escaping @Sendable ([Result<[StatementResult], any Error>]) -> Void) {
        @Sendable func next(_ index: Int, _ answered: [Result<[StatementResult], any Error>]) {
            guard index < requests.count else { return done(answered) }
            execute(tenant: tenant, requests[index], transaction: false, idempotencyKey: nil) { next(index + 1, answered + [$0]) }
        }
        next(0, [])
    }

    public func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?,
                        then done: @escaping @Sendable (Result<[StatementResult], any Error>) -> Void) {
        Task {
            do { done(.success(try await execute(tenant: tenant, statements, transaction: transaction, idempotencyKey: idempotencyKey))) } catch { done(.failure(error)) }
        }
    }
}

/// The stable, machine-readable reason of a failed request, in every non-200 JSON answer
/// (`{"error": message, "code": code, "retry_safe": bool}`): programs act on the code, people
/// read the message. Codes are never renamed; new ones may be added.
public enum ErrorCode: String, Sendable, CaseIterable {
    case badRequest = "bad_request"
    case unauthorized
    case forbidden
    case notFound = "not_found"
    case methodNotAllowed = "method_not_allowed"
    case conflict
    case tooLarge = "too_large"
    /// Not applied: the same request may be sent again as it is.
    case notExecuted = "not_executed"
    /// May or may not be applied: only a request with an `Idempotency-Key` may be sent again.
    case outcomeUnknown = "outcome_unknown"
    case capacity
    /// Refused by a rate limit before anything ran: send it again after `Retry-After`.
    case rateLimited = "rate_limited"
    /// The `Idempotency-Key` came before with another request: nothing ran; use a new key.
    case idempotencyKeyReused = "idempotency_key_reused"

    /// Whether sending the same request again can never apply it twice.
    public var retrySafe: Bool { self == .notExecuted || self == .rateLimited }
}

/// A request that failed as a whole, with the HTTP status that says what the client may do.
public struct APIError: Error, CustomStringConvertible {
    public enum Kind: Sendable {
        /// Malformed request: fix it (400).
        case badRequest
        /// No such tenant (404).
        case notFound
        /// Not executed, safe to retry (503): not primary, standby unavailable before sending, overloaded.
        case notExecuted
        /// May or may not have been applied (500 with `X-Apiary-Outcome: unknown`).
        case outcomeUnknown
        /// The caller lacks the required certificate role (403).
        case forbidden
        /// The request body is larger than the node accepts (413): split the request.
        case tooLarge
        /// No credentials, or wrong ones (401, with `WWW-Authenticate`).
        case unauthorized
        /// The thing to create exists already (409).
        case conflict
        /// The node is at a capacity limit that a retry will not change (507).
        case capacity
        /// The idempotency key was used before with another request (422): nothing ran.
        case idempotencyKeyReused
        /// Past a rate limit (429, with `Retry-After`): nothing ran.
        case rateLimited
    }
    public let kind: Kind
    public let message: String
    /// For `Retry-After`: when the same request would be admitted.
    public var retryAfterSeconds: Int64?
    public init(_ kind: Kind, _ message: String, retryAfterSeconds: Int64? = nil) {
        self.kind = kind
        self.message = message
        self.retryAfterSeconds = retryAfterSeconds
    }
    public var description: String { message }

    var code: ErrorCode {
        switch kind {
        case .badRequest: return .badRequest
        case .notFound: return .notFound
        case .notExecuted: return .notExecuted
        case .outcomeUnknown: return .outcomeUnknown
        case .forbidden: return .forbidden
        case .tooLarge: return .tooLarge
        case .unauthorized: return .unauthorized
        case .conflict: return .conflict
        case .capacity: return .capacity
        case .idempotencyKeyReused: return .idempotencyKeyReused
        case .rateLimited: return .rateLimited
        }
    }

    var status: HTTPResponseStatus {
        switch kind {
        case .badRequest: return .badRequest
        case .notFound: return .notFound
        case .notExecuted: return .serviceUnavailable
        case .outcomeUnknown: return .internalServerError
        case .forbidden: return .forbidden
        case .tooLarge: return .payloadTooLarge
        case .unauthorized: return .unauthorized
        case .conflict: return .conflict
        case .capacity: return .insufficientStorage
        case .idempotencyKeyReused: return .unprocessableEntity
        case .rateLimited: return .tooManyRequests
        }
    }
}

/// What rqlite's `/readyz`, `/status` and `/nodes` say about a node.
public struct NodeSummary: Sendable, Equatable {
    /// The node's name (its certificate's).
    public var name: String
    /// `primary`, `standby` or `demoted`.
    public var role: String
    public var epoch: UInt64
    /// Why the node cannot serve, when it knows (a standby that stopped replicating).
    public var error: String?
    public init(name: String, role: String, epoch: UInt64, error: String? = nil) {
        self.name = name
        self.role = role
        self.epoch = epoch
        self.error = error
    }
}

extension SQLService {
    /// This node's name, role and epoch; nil while it changes roles.
    ///
    /// Derived from ``statusJSON()``, which lists every tenant's positions (work on the
    /// replication loop in proportion to the tenants): a service SHOULD answer this from
    /// what it holds. `APIRoutes` asks at most once a second (`NodeSummaryCache`).
    public func summary() async -> NodeSummary? {
        guard let status = try? JSONDecoder().decode(SummaryFields.self, from: Data(await statusJSON())), let role = status.role else { return nil }
        return NodeSummary(name: status.node ?? "", role: role, epoch: status.epoch ?? 0, error: status.error)
    }
}

/// The fields of a status that make its summary (others ignored, all optional).
private struct SummaryFields: Decodable {
    var node: String?
    var role: String?
    var epoch: UInt64?
    var error: String?
}
