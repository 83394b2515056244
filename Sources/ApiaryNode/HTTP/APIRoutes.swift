import ApiaryCore
import ApiaryStorage
import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOHTTP1

/// One HTTP request as the routes see it: already read whole (bounded), with the caller's
/// cluster identity when it presented a certificate.
struct APIRequest: Sendable {
    var method: HTTPMethod
    var uri: String
    var headers: HTTPHeaders
    var body: [UInt8]
    /// The body passed ``APIRoutes/Limits/bodyBytesMax`` and was dropped unread.
    var bodyTooLarge = false
    /// The node's memory budget had no room for the body: it was dropped unread.
    var memoryShort = false
    /// Bytes of the node's memory budget this request's body holds until it is answered.
    var reservedBytes = 0
    /// From the TLS client certificate, if any (applications present none).
    var peer: ApiaryTLS.PeerIdentity?

    // Searched as UTF-8 ('?' is ASCII): a Character search costs grapheme breaking per byte.
    var path: Substring { uri[..<(uri.utf8.firstIndex(of: UInt8(ascii: "?")) ?? uri.endIndex)] }
    var query: Substring? { uri.utf8.firstIndex(of: UInt8(ascii: "?")).map { uri[uri.utf8.index(after: $0)...] } }
}

struct APIResponse: Sendable {
    var status: HTTPResponseStatus
    var body: [UInt8]
    /// Sets `X-Apiary-Outcome: unknown`: the write may or may not have been applied.
    var outcomeUnknown = false
    var contentType = "application/json"
    /// For 405: the methods the path takes (RFC 9110 requires `Allow`).
    var allow: String?
    /// For 401: ask for HTTP basic auth (RFC 9110 requires `WWW-Authenticate`).
    var asksForCredentials = false
}

/// The HTTP API (rqlite's, DESIGN §7): `/db/execute`, `/db/query`, `/readyz`; accounts under
/// `/admin/tenants`; and with an operator (or monitor) certificate `/status` and
/// `POST /admin/promote`.
///
/// Every request but `/readyz` is authenticated (DESIGN §8): an application by HTTP basic auth
/// (its user names its tenant: no header needed, and one naming another tenant is refused),
/// a cluster operator by its certificate (it names the tenant by the `X-Apiary-Tenant` header
/// or a `/tenants/{tenant}/db/...` path).
///
/// Pure request → response over an `SQLService`, so that tests call it without a socket;
/// `APIServer` carries it over HTTPS.
struct APIRoutes: Sendable {
    struct Limits: Sendable {
        var bodyBytesMax = 8 << 20
        var statementsMax = 10_000
    }

    let service: any SQLService
    /// Who may do what. Nil only in unit tests of the HTTP layer itself: every request then
    /// acts as an operator (a node always passes its accounts; `APIServer.start` requires them).
    let accounts: (any AccountService)?
    var limits = Limits()
    /// Where unexpected errors are told in full (clients get no internals: paths, file names).
    var logger = Logger(label: "apiary.api")

    /// The answer to `request`, given to `done` on whichever thread finishes the work, as a
    /// closure that makes it: the writer thread that finishes a write only hands the answer
    /// on, and the connection's loop encodes it (the writer's next batch waits meanwhile).
    /// Writes are answered without a task (the event loop's hottest path); the rest through
    /// ``respond(to:)``.
    func respond(to request: APIRequest, then done: @escaping @Sendable (_ make: @escaping @Sendable () -> APIResponse) -> Void) {
        let (tenantInPath, route) = Self.route(request.path)
        guard request.method == .POST, route.elementsEqual(["db", "execute"]) else {
            Task {
                let response = await respond(to: request)
                done { response }
            }
            return
        }
        let started = ContinuousClock.now
        do {
            guard let principal = try cachedPrincipal(request) else {
                // Not verified lately: the slow path (the accounts database, scrypt).
                Task {
                    let response = await respond(to: request)
                    done { response }
                }
                return
            }
            let tenant = try Access.tenant(for: principal, named: Self.tenantName(request, tenantInPath))
            try Access.check(principal, may: .write)
            let statements = try parse(try body(request))
            let transaction = try Self.formValue("transaction", in: request.query) != nil
            let idempotencyKey = try Self.idempotencyKey(request)
            service.execute(tenant: tenant, statements, transaction: transaction, idempotencyKey: idempotencyKey) { result in
                done { sqlResponse(result, started: started) }
            }
        } catch {
            done { sqlResponse(.failure(error), started: started) }
        }
    }

    /// "/db/execute" → (nil, ["db", "execute"]); "/tenants/t/db/query" → ("t", ["db", "query"]).
    static func route(_ path: Substring) -> (tenant: Substring?, route: ArraySlice<Substring>) {
        // The common case without splitting (an array per request).
        if path.utf8.elementsEqual("/db/execute".utf8) { return (nil, ["db", "execute"]) }
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        var route = parts.dropFirst()
        if route.count == 4, route.first == "tenants" {
            let tenant = route[route.startIndex + 1]
            route = route.dropFirst(2)
            return (tenant, route)
        }
        return (nil, route)
    }

    func respond(to request: APIRequest) async -> APIResponse {
        let (tenantInPath, route) = Self.route(request.path)
        switch (Array(route), request.method) {
        case (["db", "execute"], .POST):
            return await sql { try await execute(request, tenantInPath) }
        case (["db", "query"], .GET), (["db", "query"], .POST):
            return await sql { try await query(request, tenantInPath) }
        case (let path, let method) where path.first == "admin" && path.dropFirst().first == "tenants" && tenantInPath == nil:
            return await admin(request, Array(path.dropFirst(2)), method)
        case (["readyz"], .GET) where tenantInPath == nil, (["readyz"], .HEAD) where tenantInPath == nil:
            return APIResponse(status: .ok, body: Array("ok\n".utf8), contentType: "text/plain")
        case (["status"], .GET) where tenantInPath == nil:
            guard Self.allowed(request.peer, [.operator, .monitor]) else { return Self.forbidden([.operator, .monitor]) }
            return APIResponse(status: .ok, body: await service.statusJSON())
        case (["admin", "promote"], .POST) where tenantInPath == nil:
            guard Self.allowed(request.peer, [.operator]) else { return Self.forbidden([.operator]) }
            do {
                return APIResponse(status: .ok, body: try await service.promote())
            } catch let error as APIError {
                return APIResponse(status: error.status, body: RqliteJSON.error(error.message), outcomeUnknown: error.kind == .outcomeUnknown)
            } catch {
                logger.error("promotion failed unexpectedly", metadata: ["error": "\(error)"])
                return APIResponse(status: .internalServerError, body: RqliteJSON.error("promotion failed, outcome unknown: internal error (details in the node's log)"), outcomeUnknown: true)
            }
        case (["db", "execute"], _):
            return Self.methodNotAllowed(request, allow: "POST")
        case (["db", "query"], _):
            return Self.methodNotAllowed(request, allow: "GET, POST")
        case (["readyz"], _) where tenantInPath == nil:
            return Self.methodNotAllowed(request, allow: "GET, HEAD")
        case (["status"], _) where tenantInPath == nil:
            return Self.methodNotAllowed(request, allow: "GET")
        case (["admin", "promote"], _) where tenantInPath == nil:
            return Self.methodNotAllowed(request, allow: "POST")
        default:
            return APIResponse(status: .notFound, body: RqliteJSON.error("no such endpoint: \(request.path.prefix(200))"))
        }
    }

    private func execute(_ request: APIRequest, _ tenantInPath: Substring?) async throws -> [StatementResult] {
        let principal = try await self.principal(request)
        let tenant = try Access.tenant(for: principal, named: Self.tenantName(request, tenantInPath))
        try Access.check(principal, may: .write)
        let statements = try parse(try body(request))
        let transaction = try Self.formValue("transaction", in: request.query) != nil
        let idempotencyKey = try Self.idempotencyKey(request)
        return try await service.execute(tenant: tenant, statements, transaction: transaction, idempotencyKey: idempotencyKey)
    }

    private func query(_ request: APIRequest, _ tenantInPath: Substring?) async throws -> [StatementResult] {
        let principal = try await self.principal(request)
        let tenant = try Access.tenant(for: principal, named: Self.tenantName(request, tenantInPath))
        try Access.check(principal, may: .read)
        let levelName = try Self.formValue("level", in: request.query) ?? "weak"
        guard let level = ReadLevel(rawValue: levelName) else {
            throw APIError(.badRequest, "unknown level '\(levelName.prefix(40))': use none, weak, strong or linearizable")
        }
        let statements: [SQLStatement]
        if request.method == .GET {
            guard let q = try Self.formValue("q", in: request.query) else { throw APIError(.badRequest, "GET /db/query needs ?q=SQL") }
            statements = [SQLStatement(q)]
        } else {
            statements = try parse(try body(request))
        }
        return try await service.query(tenant: tenant, statements, level: level)
    }

    private func body(_ request: APIRequest) throws -> [UInt8] {
        guard !request.bodyTooLarge else { throw APIError(.tooLarge, "request body larger than \(limits.bodyBytesMax) bytes") }
        guard !request.memoryShort else { throw APIError(.notExecuted, "not executed: the node is short of memory for request bodies; retry later") }
        return request.body
    }

    private func parse(_ body: [UInt8]) throws -> [SQLStatement] {
        do { return try RqliteJSON.statements(fromBody: body, statementsMax: limits.statementsMax) } catch let e as RqliteRequestError { throw APIError(.badRequest, e.description) }
    }

    /// Runs an SQL request and answers in rqlite's format, with a status that says what the
    /// client may do (retry, or not: DESIGN §7).
    private func sql(_ body: () async throws -> [StatementResult]) async -> APIResponse {
        let started = ContinuousClock.now
        do {
            return sqlResponse(.success(try await body()), started: started)
        } catch {
            return sqlResponse(.failure(error), started: started)
        }
    }

    private func sqlResponse(_ result: Result<[StatementResult], any Error>, started: ContinuousClock.Instant) -> APIResponse {
        do {
            let results = try result.get()
            let elapsed = ContinuousClock.now - started
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            return APIResponse(status: .ok, body: RqliteJSON.response(results, timeSeconds: seconds))
        } catch let error as APIError {
            return Self.response(error)
        } catch {
            logger.error("request failed unexpectedly", metadata: ["error": "\(error)"])
            return APIResponse(status: .internalServerError, body: RqliteJSON.error("outcome unknown: internal error (details in the node's log)"), outcomeUnknown: true)
        }
    }

    static let tenantHeader = "X-Apiary-Tenant"
    static let idempotencyHeader = "Idempotency-Key"

    /// The request's `Idempotency-Key` (1...256 bytes), if any: a write that carries one runs
    /// at most once while the primary keeps the key, and a retry gets the first answer.
    static func idempotencyKey(_ request: APIRequest) throws -> String? {
        guard let key = request.headers.first(name: idempotencyHeader) else { return nil }
        guard !key.isEmpty, key.utf8.count <= 256 else { throw APIError(.badRequest, "an Idempotency-Key has 1...256 bytes") }
        return key
    }

    /// The tenant a request names, if any (its path, else its header).
    static func tenantName(_ request: APIRequest, _ inPath: Substring?) -> String? {
        inPath.map(String.init) ?? request.headers.first(name: tenantHeader)
    }

    static func response(_ error: APIError) -> APIResponse {
        APIResponse(status: error.status, body: RqliteJSON.error(error.message), outcomeUnknown: error.kind == .outcomeUnknown,
                    asksForCredentials: error.kind == .unauthorized)
    }

    // MARK: Authentication

    /// Who sent `request`: its credentials (an application), else an operator certificate.
    /// - Throws: `APIError(.unauthorized)` for none or wrong ones.
    func principal(_ request: APIRequest) async throws -> Principal {
        guard let accounts else { return .clusterOperator("tests") }
        if let credentials = try Credentials.from(request.headers) {
            guard let user = try await accounts.authenticate(credentials) else { throw APIError(.unauthorized, "wrong user name or password") }
            return .user(user)
        }
        return try Self.certificatePrincipal(request)
    }

    /// ``principal(_:)`` without waiting: nil when the credentials were not verified lately.
    func cachedPrincipal(_ request: APIRequest) throws -> Principal? {
        guard let accounts else { return .clusterOperator("tests") }
        if let credentials = try Credentials.from(request.headers) {
            return accounts.cachedAuthentication(credentials).map { .user($0) }
        }
        return try Self.certificatePrincipal(request)
    }

    static func certificatePrincipal(_ request: APIRequest) throws -> Principal {
        guard let peer = request.peer, peer.role == .operator else {
            throw APIError(.unauthorized, "credentials needed: HTTP basic auth with a user name and password")
        }
        return .clusterOperator(peer.name)
    }

    // MARK: Accounts

    /// `/admin/tenants[/{tenant}[/users]]`.
    private func admin(_ request: APIRequest, _ path: [Substring], _ method: HTTPMethod) async -> APIResponse {
        do {
            guard let accounts else { throw APIError(.notFound, "no accounts on this server") }
            let principal = try await self.principal(request)
            switch (path.count, method) {
            case (0, .GET):
                try Access.check(principal, may: .manageTenants)
                let names = try await accounts.listTenants().map(\.rawValue)
                return APIResponse(status: .ok, body: Self.json(["tenants": names]))
            case (0, .POST):
                try Access.check(principal, may: .manageTenants)
                let name = try Self.field("name", in: try body(request))
                let tenant: TenantID
                do { tenant = try TenantID(name) } catch { throw APIError(.badRequest, String(describing: error)) }
                try await accounts.createTenant(tenant)
                return APIResponse(status: .created, body: Self.json(["tenant": tenant.rawValue]))
            case (1, .DELETE):
                try Access.check(principal, may: .manageTenants)
                let tenant = try Self.tenant(path[0])
                try await accounts.dropTenant(tenant)
                return APIResponse(status: .ok, body: Self.json(["dropped": tenant.rawValue]))
            case (2, .GET) where path[1] == "users":
                let tenant = try Self.tenant(path[0])
                try Access.check(principal, may: .manageUsers(tenant))
                let users = try await accounts.listUsers(tenant: tenant).map { ["name": $0.name, "role": $0.role.rawValue] }
                return APIResponse(status: .ok, body: Self.json(["users": users]))
            case (2, .POST) where path[1] == "users":
                let tenant = try Self.tenant(path[0])
                try Access.check(principal, may: .manageUsers(tenant))
                let fields = try body(request)
                let name = try Self.field("name", in: fields), password = try Self.field("password", in: fields)
                let roleName = try Self.field("role", in: fields)
                guard let role = UserRole(rawValue: roleName) else { throw APIError(.badRequest, "role must be admin, writer or reader") }
                try await accounts.createUser(name, tenant: tenant, role: role, password: password)
                return APIResponse(status: .created, body: Self.json(["user": name, "tenant": tenant.rawValue, "role": role.rawValue]))
            case (0, _): return Self.methodNotAllowed(request, allow: "GET, POST")
            case (1, _): return Self.methodNotAllowed(request, allow: "DELETE")
            case (2, _) where path[1] == "users": return Self.methodNotAllowed(request, allow: "GET, POST")
            default: throw APIError(.notFound, "no such endpoint: \(request.path.prefix(200))")
            }
        } catch let error as APIError {
            return Self.response(error)
        } catch {
            logger.error("account request failed unexpectedly", metadata: ["error": "\(error)"])
            return APIResponse(status: .internalServerError, body: RqliteJSON.error("outcome unknown: internal error (details in the node's log)"), outcomeUnknown: true)
        }
    }

    static func tenant(_ name: Substring) throws -> TenantID {
        do { return try TenantID(String(name)) } catch { throw APIError(.notFound, "no such tenant") }
    }

    /// A string field of a small JSON object body (never logged: it may hold a password).
    static func field(_ name: String, in body: [UInt8]) throws -> String {
        guard let object = try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any] else {
            throw APIError(.badRequest, "the body must be a JSON object")
        }
        guard let value = object[name] as? String else { throw APIError(.badRequest, "the body needs a string field '\(name)'") }
        return value
    }

    static func json(_ object: [String: Any]) -> [UInt8] {
        (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])).map(Array.init) ?? Array("{}".utf8)
    }

    static func methodNotAllowed(_ request: APIRequest, allow: String) -> APIResponse {
        APIResponse(status: .methodNotAllowed, body: RqliteJSON.error("\(request.method) is not allowed on \(request.path): use \(allow)"), allow: allow)
    }

    static func allowed(_ peer: ApiaryTLS.PeerIdentity?, _ roles: Set<ClusterRole>) -> Bool {
        guard let peer else { return false }
        return roles.contains(peer.role)
    }

    static func forbidden(_ roles: Set<ClusterRole>) -> APIResponse {
        APIResponse(status: .forbidden, body: RqliteJSON.error("this endpoint needs a cluster certificate with role \(roles.map(\.rawValue).sorted().joined(separator: " or "))"))
    }

    /// A query-string value decoded as HTML forms encode it ('+' is a space), as curl's
    /// --data-urlencode and rqlite clients send `q`; nil when absent, "" when given bare.
    /// - Throws: `APIError(.badRequest)` when the value is not valid %-encoding (guessing
    ///   would run a query at another level or a write outside the transaction asked for).
    static func formValue(_ name: String, in query: Substring?) throws -> String? {
        guard let query else { return nil }
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts[0] == name else { continue }
            guard parts.count == 2 else { return "" }
            guard let value = String(parts[1]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding else {
                throw APIError(.badRequest, "query parameter '\(name)' is not valid %-encoding")
            }
            return value
        }
        return nil
    }
}
