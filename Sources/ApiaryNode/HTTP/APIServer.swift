import ApiaryCore
import ApiaryStorage
import ApiaryTLS
import Foundation
import Hummingbird
import HummingbirdTLS
import HTTPTypes
import Logging
import NIOCore
import NIOSSL

/// Read consistency levels, with rqlite's names (DESIGN §3).
public enum ReadLevel: String, Sendable {
    case none, weak, strong, linearizable
}

/// What the HTTP API needs from a node. Errors thrown are `APIError`s.
public protocol SQLService: Sendable {
    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool) async throws -> [StatementResult]
    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult]
    /// Operator-only status (tenant names, positions): JSON bytes.
    func statusJSON() async -> [UInt8]
    /// Operator-only: make this standby the primary of a new epoch (DESIGN §6, manual until
    /// the monitor exists). Returns a JSON report.
    func promote() async throws -> [UInt8]
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
    }
    public let kind: Kind
    public let message: String
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }
    public var description: String { message }

    var status: HTTPResponse.Status {
        switch kind {
        case .badRequest: return .badRequest
        case .notFound: return .notFound
        case .notExecuted: return .serviceUnavailable
        case .outcomeUnknown: return .internalServerError
        case .forbidden: return .forbidden
        }
    }
}

/// Request context that keeps the channel, to read the TLS peer certificate for admin routes.
public struct APIRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: any Channel
    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

public enum APIServer {
    public struct Limits: Sendable {
        public var bodyBytesMax = 8 << 20
        public var statementsMax = 10_000
        public init() {}
    }

    static let tenantHeader = HTTPField.Name("X-Apiary-Tenant")!
    static let outcomeHeader = HTTPField.Name("X-Apiary-Outcome")!

    /// The router: `/db/execute`, `/db/query` (tenant by `X-Apiary-Tenant` header, or under
    /// `/tenants/{tenant}/db/...`), `/status` (operator certificate), `/readyz`.
    public static func router(service: any SQLService, limits: Limits = Limits()) -> Router<APIRequestContext> {
        let router = Router(context: APIRequestContext.self)
        let execute: @Sendable (Request, APIRequestContext) async throws -> Response = { request, context in
            await respond {
                let tenant = try tenantID(request, context)
                let body = try await collect(request, limits)
                let statements = try parse { try RqliteJSON.statements(fromBody: body, statementsMax: limits.statementsMax) }
                let transaction = request.uri.queryParameters["transaction"] != nil
                return try await service.execute(tenant: tenant, statements, transaction: transaction)
            }
        }
        let query: @Sendable (Request, APIRequestContext) async throws -> Response = { request, context in
            await respond {
                let tenant = try tenantID(request, context)
                let levelName = request.uri.queryParameters["level"].map(String.init) ?? "weak"
                guard let level = ReadLevel(rawValue: levelName) else {
                    throw APIError(.badRequest, "unknown level '\(levelName)': use none, weak, strong or linearizable")
                }
                let statements: [SQLStatement]
                if request.method == .get {
                    guard let q = formValue("q", in: request.uri.query) else { throw APIError(.badRequest, "GET /db/query needs ?q=SQL") }
                    statements = [SQLStatement(q)]
                } else {
                    let body = try await collect(request, limits)
                    statements = try parse { try RqliteJSON.statements(fromBody: body, statementsMax: limits.statementsMax) }
                }
                return try await service.query(tenant: tenant, statements, level: level)
            }
        }
        router.post("/db/execute", use: execute)
        router.post("/tenants/:tenant/db/execute", use: execute)
        router.get("/db/query", use: query)
        router.post("/db/query", use: query)
        router.get("/tenants/:tenant/db/query", use: query)
        router.post("/tenants/:tenant/db/query", use: query)
        router.get("/readyz") { _, _ in Response(status: .ok, body: .init(byteBuffer: ByteBuffer(string: "ok\n"))) }
        router.post("/admin/promote") { _, context in
            do {
                try await requireRole([.operator], context)
                return json(.ok, try await service.promote())
            } catch let error as APIError {
                return json(error.status, RqliteJSON.error(error.message))
            } catch {
                return json(.internalServerError, RqliteJSON.error("promotion failed: \(error)"))
            }
        }
        router.get("/status") { _, context in
            do {
                try await requireRole([.operator, .monitor], context)
            } catch let error as APIError {
                return json(error.status, RqliteJSON.error(error.message))
            }
            return json(.ok, await service.statusJSON())
        }
        return router
    }

    /// Builds the HTTPS application. Client certificates are optional (applications use
    /// none); when one is presented it must chain to the cluster CA, and it unlocks /status.
    public static func application(
        service: any SQLService,
        credentials: ClusterCredentials,
        host: String,
        port: Int,
        group: any EventLoopGroup,
        logger: Logger,
        onRunning: @escaping @Sendable (Int) async -> Void
    ) throws -> some ApplicationProtocol {
        var tls = credentials.clientFacingServer()
        tls.certificateVerification = .optionalVerification
        tls.trustRoots = .certificates([credentials.clusterCA])
        return Application(
            router: router(service: service),
            server: try .tls(.http1(), tlsConfiguration: tls),
            configuration: .init(address: .hostname(host, port: port), serverName: "apiary"),
            onServerRunning: { channel in await onRunning(channel.localAddress?.port ?? port) },
            eventLoopGroupProvider: .shared(group),
            logger: logger
        )
    }

    // MARK: - Helpers

    static func tenantID(_ request: Request, _ context: APIRequestContext) throws -> TenantID {
        let raw = context.parameters.get("tenant") ?? request.headers[tenantHeader]
        guard let raw else { throw APIError(.badRequest, "no tenant: send the X-Apiary-Tenant header or use /tenants/{tenant}/db/...") }
        do { return try TenantID(raw) } catch { throw APIError(.badRequest, String(describing: error)) }
    }

    /// A query-string value decoded as HTML forms encode it ('+' is a space), as curl's
    /// --data-urlencode and rqlite clients send `q`.
    static func formValue(_ name: String, in query: String?) -> String? {
        guard let query else { return nil }
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, parts[0] == name else { continue }
            return String(parts[1]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding
        }
        return nil
    }

    static func collect(_ request: Request, _ limits: Limits) async throws -> [UInt8] {
        var request = request
        do {
            let buffer = try await request.collectBody(upTo: limits.bodyBytesMax)
            return Array(buffer.readableBytesView)
        } catch {
            throw APIError(.badRequest, "request body larger than \(limits.bodyBytesMax) bytes")
        }
    }

    static func parse<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as RqliteRequestError { throw APIError(.badRequest, e.description) }
    }

    static func requireRole(_ roles: Set<ClusterRole>, _ context: APIRequestContext) async throws {
        let certificate = try? await context.channel.nioSSL_peerCertificate().get()
        guard let certificate, let identity = ClusterCredentials.identity(of: certificate), roles.contains(identity.role) else {
            throw APIError(.forbidden, "this endpoint needs a cluster certificate with role \(roles.map(\.rawValue).sorted().joined(separator: " or "))")
        }
    }

    static func respond(_ body: () async throws -> [StatementResult]) async -> Response {
        let started = ContinuousClock.now
        do {
            let results = try await body()
            let elapsed = ContinuousClock.now - started
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            return json(.ok, RqliteJSON.response(results, timeSeconds: seconds))
        } catch let error as APIError {
            var response = json(error.status, RqliteJSON.error(error.message))
            if error.kind == .outcomeUnknown { response.headers[outcomeHeader] = "unknown" }
            return response
        } catch {
            var response = json(.internalServerError, RqliteJSON.error("outcome unknown: \(error)"))
            response.headers[outcomeHeader] = "unknown"
            return response
        }
    }

    static func json(_ status: HTTPResponse.Status, _ bytes: [UInt8]) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }
}
