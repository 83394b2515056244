import ApiaryCore
import ApiaryGateway
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
    /// The client's IP address as the socket says.
    var clientAddress: String?
    /// The event loop of the client's connection (the gateway forwards on it).
    var eventLoop: (any EventLoop)?

    var path: Substring { let t = target; return t[..<(t.utf8.firstIndex(of: UInt8(ascii: "?")) ?? t.endIndex)] }
    var query: Substring? { let t = target; return t.utf8.firstIndex(of: UInt8(ascii: "?")).map { t[t.utf8.index(after: $0)...] } }

    /// The target from its path on. A target in absolute form (`https://host:4001/db/query?q=…`,
    /// as clients send through proxies; RFC 9112 §3.2.2: a server MUST accept it) loses its
    /// scheme and authority; "" when it has no path. Searched as UTF-8 (the delimiters are
    /// ASCII): a Character search costs grapheme breaking per byte.
    private var target: Substring {
        guard uri.utf8.first != UInt8(ascii: "/"), let scheme = uri.range(of: "://") else { return uri[...] }
        let authority = uri[scheme.upperBound...]
        guard let end = authority.utf8.firstIndex(where: { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "?") }) else { return "" }
        return authority[end...]
    }
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
    /// More headers (name, value), written as they are.
    var headers: [(String, String)] = []
}

/// What answers the requests an ``APIServer`` reads: the node's routes, or the gateway's
/// forwarding.
protocol HTTPResponder: Sendable {
    /// Bodies larger than this are dropped unread and answered 413.
    var bodyBytesMax: Int { get }
    /// Answers `request` through `done`, once, from any thread.
    func respond(to request: APIRequest, then done: @escaping @Sendable (_ make: @escaping @Sendable () -> APIResponse) -> Void)
}

/// Adds who answered, and in which epoch, to every answer of a responder.
struct IdentifiedResponder: HTTPResponder {
    let inner: any HTTPResponder
    let identity: @Sendable () -> (node: String, epoch: UInt64)
    var bodyBytesMax: Int { inner.bodyBytesMax }

    func respond(to request: APIRequest, then done: @escaping @Sendable (_ make: @escaping @Sendable () -> APIResponse) -> Void) {
        inner.respond(to: request) { make in
            done {
                var response = make()
                let (node, epoch) = identity()
                response.headers += [("X-Apiary-Node", node), ("X-Apiary-Epoch", String(epoch))]
                return response
            }
        }
    }
}

/// The HTTP API (rqlite's, DESIGN §7; docs/rqlite-compatibility.md): `/db/execute`,
/// `/db/query`, `/db/request`, `/readyz`, `/nodes`, `/status`; accounts under
/// `/admin/tenants`; and with an operator (or monitor) certificate Apiary's own `/status`
/// and `POST /admin/promote`.
///
/// Every request but `/readyz` is authenticated (DESIGN §8): an application by HTTP basic auth
/// (its user names its tenant: no header needed, and one naming another tenant is refused),
/// a cluster operator by its certificate (it names the tenant by the `X-Apiary-Tenant` header
/// or a `/tenants/{tenant}/db/...` path).
///
/// Pure request → response over an `SQLService`, so that tests call it without a socket;
/// `APIServer` carries it over HTTPS.
struct APIRoutes: HTTPResponder {
    struct Limits: Sendable {
        var bodyBytesMax = 8 << 20
        var statementsMax = 10_000
        /// Requests per second per tenant at this node (SQL endpoints); nil: no limit.
        var tenantRate: RateLimiter.Config?
        /// rqlite's queued writes (`/db/execute?queue`).
        var queuedWrites = QueuedWrites.Core.Config()
    }

    let service: any SQLService
    /// Who may do what. Nil only in unit tests of the HTTP layer itself: every request then
    /// acts as an operator (a node always passes its accounts; `APIServer.start` requires them).
    let accounts: (any AccountService)?
    let limits: Limits
    var bodyBytesMax: Int { limits.bodyBytesMax }
    /// Where unexpected errors are told in full (clients get no internals: paths, file names).
    let logger: Logger
    /// The node's summary for `/readyz`, `/status` and `/nodes`, fetched at most once a second.
    let summaryCache = NodeSummaryCache()
    /// Shared by every connection (a class): one allowance per tenant at this node.
    let tenantRate: SharedRateLimit?
    /// Shared by every connection: the node's write queues.
    let queuedWrites: QueuedWrites

    init(service: any SQLService, accounts: (any AccountService)?, limits: Limits = Limits(), logger: Logger = Logger(label: "apiary.api")) {
        self.service = service
        self.accounts = accounts
        self.limits = limits
        self.logger = logger
        tenantRate = limits.tenantRate.map { SharedRateLimit($0) }
        queuedWrites = QueuedWrites(service: service, config: limits.queuedWrites)
    }

    /// The answer to `request`, given to `done` on whichever thread finishes the work, as a
    /// closure that makes it: the writer thread that finishes a write only hands the answer
    /// on, and the connection's loop encodes it (the writer's next batch waits meanwhile).
    /// Writes are answered without a task (the event loop's hottest path); the rest through
    /// ``respond(to:)``.
    func respond(to request: APIRequest, then done: @escaping @Sendable (_ make: @escaping @Sendable () -> APIResponse) -> Void) {
        let (tenantInPath, route) = Self.route(request.path)
        if request.method == .GET || request.method == .POST, route.elementsEqual(["db", "query"]), !request.bodyTooLarge, !request.memoryShort,
           request.peer != nil || service.redirectTarget == nil, let principal = try? cachedPrincipal(request) {
            return query(request, tenantInPath, principal, then: done)
        }
        guard request.method == .POST, route.elementsEqual(["db", "execute"]), request.peer != nil || service.redirectTarget == nil else {
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
            try admit(tenant)
            let options = try RqliteQuery.parse(request.query)
            if options.queue { return queue(request, tenant, options, started: started, then: done) }
            let statements = try self.statements(request, options)
            let idempotencyKey = try Self.idempotencyKey(request)
            service.execute(tenant: tenant, statements, transaction: options.transaction, idempotencyKey: idempotencyKey) { result in
                done { sqlResponse(result, started: started, format: options.format) }
            }
        } catch {
            done { sqlResponse(.failure(error), started: started) }
        }
    }

    /// A query whose credentials were verified lately, without a task when it can be answered
    /// on the event loop (``SQLService/queryInline(tenant:_:level:transaction:)``: a weak read
    /// of an open tenant); otherwise by the service's general path, with the tenant admitted
    /// once. Checks in the order of ``query(_:_:_:)``.
    private func query(_ request: APIRequest, _ tenantInPath: Substring?, _ principal: Principal,
                       then done: @escaping @Sendable (_ make: @escaping @Sendable () -> APIResponse) -> Void) {
        let started = ContinuousClock.now
        let options: RqliteQuery, tenant: TenantID, statements: [SQLStatement]
        do {
            var parsed = try RqliteQuery.parse(request.query)
            parsed.format.allRows = true
            options = parsed
            tenant = try Access.tenant(for: principal, named: Self.tenantName(request, tenantInPath))
            try Access.check(principal, may: .read)
            try admit(tenant)
            statements = try queryStatements(request, options)
        } catch {
            return done { sqlResponse(.failure(error), started: started) }
        }
        if let results = service.queryInline(tenant: tenant, statements, level: options.level, transaction: options.transaction) {
            return done { sqlResponse(.success(results), started: started, format: options.format) }
        }
        Task {
            let result: Result<[StatementResult], any Error>
            do {
                result = .success(try await service.query(tenant: tenant, statements, level: options.level, transaction: options.transaction))
            } catch {
                result = .failure(error)
            }
            done { sqlResponse(result, started: started, format: options.format) }
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
        if route.first == "db", request.method != .OPTIONS, request.peer == nil, let writer = service.redirectTarget {
            return Self.redirect(request, to: writer)
        }
        switch (Array(route), request.method) {
        case (_, .OPTIONS):
            // rqlite answers OPTIONS on any path before authentication (CORS preflight).
            return APIResponse(status: .ok, body: [], contentType: "text/plain", allow: "OPTIONS, GET, POST")
        case (["db", "execute"], .POST):
            if (try? RqliteQuery.parse(request.query))?.queue == true { return await queuedExecute(request, tenantInPath) }
            return await sql(request) { try await execute(request, tenantInPath, $0) }
        case (["db", "query"], .GET), (["db", "query"], .POST):
            return await sql(request, allRows: true) { try await query(request, tenantInPath, $0) }
        case (["db", "request"], .POST):
            return await sql(request) { try await unified(request, tenantInPath, $0) }
        case (let path, let method) where path.first == "admin" && path.dropFirst().first == "tenants" && tenantInPath == nil:
            return await admin(request, Array(path.dropFirst(2)), method)
        case (["readyz"], .GET) where tenantInPath == nil, (["readyz"], .HEAD) where tenantInPath == nil:
            do {
                return RqliteNodeEndpoints.readyz(await summary(), try RqliteQuery.parse(request.query))
            } catch {
                return Self.response(error as? APIError ?? APIError(.badRequest, "\(error)"))
            }
        case (["status"], .GET) where tenantInPath == nil:
            if Self.allowed(request.peer, [.operator, .monitor]) { return APIResponse(status: .ok, body: await service.statusJSON()) }
            // An application that signs in gets rqlite's layout, about the node only.
            guard request.headers.contains(name: "authorization") else { return Self.forbidden([.operator, .monitor]) }
            return await nodeEndpoint(request) { summary, options, principal in
                let tenant: TenantID? = if case .user(let user) = principal { user.tenant } else { nil }
                return RqliteNodeEndpoints.status(summary, options, host: request.headers.first(name: "host"), startedAt: summaryCache.startedAt, now: Date(),
                                                  queue: queuedWrites.figures(for: tenant))
            }
        case (["nodes"], .GET) where tenantInPath == nil:
            if Self.allowed(request.peer, [.monitor]) {
                return RqliteNodeEndpoints.nodes(await summary(), (try? RqliteQuery.parse(request.query)) ?? RqliteQuery(), host: request.headers.first(name: "host"))
            }
            return await nodeEndpoint(request) { summary, options, _ in
                RqliteNodeEndpoints.nodes(summary, options, host: request.headers.first(name: "host"))
            }
        case (["admin", "promote"], .POST) where tenantInPath == nil:
            guard Self.allowed(request.peer, [.operator]) else { return Self.forbidden([.operator]) }
            do {
                return APIResponse(status: .ok, body: try await service.promote())
            } catch let error as APIError {
                return Self.response(error)
            } catch {
                logger.error("promotion failed unexpectedly", metadata: ["error": "\(error)"])
                return APIResponse(status: .internalServerError, body: RqliteJSON.error("promotion failed, outcome unknown: internal error (details in the node's log)", code: .outcomeUnknown), outcomeUnknown: true)
            }
        case (["db", "execute"], _), (["db", "request"], _):
            return Self.methodNotAllowed(request, allow: "POST")
        case (["db", "query"], _):
            return Self.methodNotAllowed(request, allow: "GET, POST")
        case (["readyz"], _) where tenantInPath == nil:
            return Self.methodNotAllowed(request, allow: "GET, HEAD")
        case (["status"], _) where tenantInPath == nil, (["nodes"], _) where tenantInPath == nil:
            return Self.methodNotAllowed(request, allow: "GET")
        case (["admin", "promote"], _) where tenantInPath == nil:
            return Self.methodNotAllowed(request, allow: "POST")
        default:
            return APIResponse(status: .notFound, body: RqliteJSON.error("no such endpoint: \(request.path.prefix(200))", code: .notFound))
        }
    }

    // MARK: SQL (rqlite's data API)

    /// Takes one request of `tenant`'s allowance at this node (`--tenant-rate`), or refuses
    /// (429, nothing run, `Retry-After`). Per tenant, not per user, and after authentication
    /// and the permission check: the name it is keyed on is one the node checked, and a
    /// request refused for its rights spends nothing.
    private func admit(_ tenant: TenantID) throws {
        if let tenantRate, let waitMs = tenantRate.admit(tenant.rawValue) {
            let seconds = max(1, (waitMs + 999) / 1000)
            throw APIError(.rateLimited, "too many requests for tenant \(tenant) at this node: not executed; send it again after Retry-After",
                           retryAfterSeconds: seconds)
        }
    }

    private func execute(_ request: APIRequest, _ tenantInPath: Substring?, _ options: RqliteQuery) async throws -> [StatementResult] {
        let principal = try await self.principal(request)
        let tenant = try Access.tenant(for: principal, named: Self.tenantName(request, tenantInPath))
        try Access.check(principal, may: .write)
        try admit(tenant)
        let statements = try self.statements(request, options)
        let idempotencyKey = try Self.idempotencyKey(request)
        return try await service.execute(tenant: tenant, statements, transaction: options.transaction, idempotencyKey: idempotencyKey)
    }

    /// `/db/execute?queue` on the general path: the checks of ``execute(_:_:_:)``, then ``queue``.
    private func queuedExecute(_ request: APIRequest, _ tenantInPath: Substring?) async -> APIResponse {
        let started = ContinuousClock.now
        do {
            let principal = try await self.principal(request)
            let tenant = try Access.tenant(for: principal, named: Self.tenantName(request, tenantInPath))
            try Access.check(principal, may: .write)
            try admit(tenant)
            let options = try RqliteQuery.parse(request.query)
            return await withCheckedContinuation { answered in
                queue(request, tenant, options, started: started) { make in answered.resume(returning: make()) }
            }
        } catch {
            return sqlResponse(.failure(error), started: started)
        }
    }

    /// rqlite's queued write (``QueuedWrites``): answered once queued, `{"results": [],
    /// "sequence_number": N}`, or with `wait` once its batch is written. Only on the writer (a
    /// queue elsewhere would answer for writes it cannot make), and never with an
    /// `Idempotency-Key`: a queued write's outcome is never told, so a key could promise what
    /// it cannot keep. A full queue refuses (503, `Retry-After`), nothing queued.
    private func queue(_ request: APIRequest, _ tenant: TenantID, _ options: RqliteQuery, started: ContinuousClock.Instant,
                       then done: @escaping @Sendable (_ make: @escaping @Sendable () -> APIResponse) -> Void) {
        let format = options.format
        do {
            guard try Self.idempotencyKey(request) == nil else {
                throw APIError(.badRequest, "a queued write cannot carry an Idempotency-Key: its outcome is never told (send it without ?queue)")
            }
            guard service.isWriter else {
                throw APIError(.notExecuted, "not primary: this node takes no queued writes now; send it to the primary")
            }
            // rqlite takes an empty request with `wait`: it waits for what was queued before it.
            let statements = options.wait && Self.isEmptyArray(request.body) ? [] : try self.statements(request, options)
            let answer: @Sendable (UInt64, QueuedWrites.WaitResult) -> Void = { number, result in
                done {
                    switch result {
                    case .finished(.yes):
                        return APIResponse(status: .ok, body: RqliteJSON.response([], format: format, timeSeconds: Self.seconds(since: started), sequenceNumber: number))
                    case .finished(.no(let why)):
                        return Self.response(APIError(.notExecuted, "queued write \(number) was not applied: \(why)"))
                    case .finished(.unknown):
                        return Self.response(APIError(.outcomeUnknown, "queued write \(number): outcome unknown (its commit was interrupted)"))
                    case .timedOut:
                        return APIResponse(status: .requestTimeout,
                                           body: RqliteJSON.error("queue wait timeout: queued write \(number) is not written yet and may still be", code: .outcomeUnknown),
                                           outcomeUnknown: true)
                    }
                }
            }
            let queued = queuedWrites.enqueue(tenant, statements, waitMs: options.timeoutMs ?? Self.queueWaitMsDefault, waited: options.wait ? answer : nil)
            switch queued {
            case .success(let number):
                if !options.wait { answer(number, .finished(.yes)) }
            case .failure(let refusal):
                let which = refusal == .tenantFull ? "tenant \(tenant)'s write queue is full" : "this node's write queues are full"
                throw APIError(.notExecuted, "\(which): not queued; send it again after Retry-After, or without ?queue", retryAfterSeconds: 1)
            }
        } catch {
            done { sqlResponse(.failure(error), started: started, format: format) }
        }
    }

    /// Whether a body is a JSON array with nothing in it (`[]`, blanks around).
    static func isEmptyArray(_ body: [UInt8]) -> Bool {
        body.filter { ![0x20, 0x09, 0x0A, 0x0D].contains($0) } == Array("[]".utf8)
    }

    /// How long a queued write's `wait` lasts without `timeout` (rqlite's default).
    static let queueWaitMsDefault: Int64 = 30_000

    static func seconds(since started: ContinuousClock.Instant) -> Double {
        let elapsed = ContinuousClock.now - started
        return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    }

    /// `GET` takes the statement from `q`; `POST` from its body, or from `q` when it has none.
    private func query(_ request: APIRequest, _ tenantInPath: Substring?, _ options: RqliteQuery) async throws -> [StatementResult] {
        let principal = try await self.principal(request)
        let tenant = try Access.tenant(for: principal, named: Self.tenantName(request, tenantInPath))
        try Access.check(principal, may: .read)
        try admit(tenant)
        let statements = try queryStatements(request, options)
        return try await service.query(tenant: tenant, statements, level: options.level, transaction: options.transaction)
    }

    private func queryStatements(_ request: APIRequest, _ options: RqliteQuery) throws -> [SQLStatement] {
        if request.method == .GET || (request.body.isEmpty && options.q != nil && !request.bodyTooLarge && !request.memoryShort) {
            guard let q = options.q else { throw APIError(.badRequest, "GET /db/query needs ?q=SQL") }
            return Self.bounded([SQLStatement(q)], options)
        }
        return try statements(request, options)
    }

    /// rqlite's unified endpoint, reads and writes together. A request of reads only (each
    /// entry one `SELECT`, `VALUES` or `EXPLAIN`, ``isRead(_:)``) is served like `/db/query`,
    /// at the requested level, and needs the right to read; any other goes to the tenant's
    /// writer like `/db/execute` (its reads see the latest commit, and its own writes) and
    /// needs the right to write. Either way each result is rows when its statement returned
    /// columns, else a write's counts.
    private func unified(_ request: APIRequest, _ tenantInPath: Substring?, _ options: RqliteQuery) async throws -> [StatementResult] {
        let principal = try await self.principal(request)
        let tenant = try Access.tenant(for: principal, named: Self.tenantName(request, tenantInPath))
        let statements = try self.statements(request, options)
        if statements.allSatisfy({ Self.isRead($0.sql) }) {
            try Access.check(principal, may: .read)
            try admit(tenant)
            return try await service.query(tenant: tenant, statements, level: options.level, transaction: options.transaction)
        }
        try Access.check(principal, may: .write)
        try admit(tenant)
        let idempotencyKey = try Self.idempotencyKey(request)
        return try await service.execute(tenant: tenant, statements, transaction: options.transaction, idempotencyKey: idempotencyKey)
    }

    /// Whether `sql` is surely one read: it starts (after blanks and comments) with `SELECT`,
    /// `VALUES` or `EXPLAIN`, and no semicolon is followed by more. A wrong "no" costs a trip
    /// through the writer; a wrong "yes" would fail on a read-only connection, so anything
    /// doubtful (`WITH`, which may write; `PRAGMA`, which may set) is no.
    static func isRead(_ sql: String) -> Bool {
        var bytes = sql.utf8[...]
        // Skip blanks and comments (bounded: each pass drops at least one byte).
        while let first = bytes.first {
            if first == 0x20 || (0x09...0x0D).contains(first) {
                bytes = bytes.dropFirst()
            } else if bytes.starts(with: "--".utf8) {
                bytes = bytes.drop(while: { $0 != UInt8(ascii: "\n") })
            } else if bytes.starts(with: "/*".utf8) {
                guard let end = bytes.dropFirst(2).firstRange(of: "*/".utf8) else { return false }
                bytes = bytes[end.upperBound...]
            } else {
                break
            }
        }
        let word = bytes.prefix(while: { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0 | 0x20) })
        guard ["select", "values", "explain"].contains(String(decoding: word, as: UTF8.self).lowercased()) else { return false }
        guard let semicolon = bytes.firstIndex(of: UInt8(ascii: ";")) else { return true }
        return bytes[bytes.index(after: semicolon)...].allSatisfy { $0 == 0x20 || (0x09...0x0D).contains($0) || $0 == UInt8(ascii: ";") }
    }

    /// The request's statements: its body as rqlite's JSON, or (`Content-Type: text/plain`, as
    /// rqlite takes it) the whole body as one entry of SQL; each bounded by `db_timeout`.
    private func statements(_ request: APIRequest, _ options: RqliteQuery) throws -> [SQLStatement] {
        let body = try body(request)
        if let type = request.headers.first(name: "content-type"), Self.isPlainText(type) {
            guard let sql = String(validating: body, as: UTF8.self), !sql.isEmpty else { throw APIError(.badRequest, "a text/plain body must be SQL in UTF-8") }
            return Self.bounded([SQLStatement(sql)], options)
        }
        return Self.bounded(try parse(body), options)
    }

    /// `statements`, each to run at most `db_timeout` when the request gives one.
    static func bounded(_ statements: [SQLStatement], _ options: RqliteQuery) -> [SQLStatement] {
        guard let ms = options.dbTimeoutMs else { return statements }
        return statements.map { var s = $0; s.timeMsMax = ms; return s }
    }

    /// Whether a Content-Type is `text/plain` (any case, any parameters), without making a
    /// lower-cased copy: every write asks.
    static func isPlainText(_ contentType: String) -> Bool {
        let prefix = "text/plain".utf8
        var value = contentType.utf8.makeIterator()
        for expected in prefix {
            guard let byte = value.next(),
                  byte == expected || ((UInt8(ascii: "a")...UInt8(ascii: "z")).contains(expected) && byte | 0x20 == expected) else { return false }
        }
        return true
    }

    private func body(_ request: APIRequest) throws -> [UInt8] {
        guard !request.bodyTooLarge else { throw APIError(.tooLarge, "request body larger than \(limits.bodyBytesMax) bytes") }
        guard !request.memoryShort else { throw APIError(.notExecuted, "not executed: the node is short of memory for request bodies; retry later") }
        return request.body
    }

    private func parse(_ body: [UInt8]) throws -> [SQLStatement] {
        do { return try RqliteJSON.statements(fromBody: body, statementsMax: limits.statementsMax) } catch let e as RqliteRequestError { throw APIError(.badRequest, e.description) }
    }

    /// Runs an SQL request and answers in rqlite's format (as its query parameters ask), with
    /// a status that says what the client may do (retry, or not: DESIGN §7).
    /// - Parameter allRows: `/db/query`: every result is rows, even without columns.
    private func sql(_ request: APIRequest, allRows: Bool = false, _ body: (RqliteQuery) async throws -> [StatementResult]) async -> APIResponse {
        let started = ContinuousClock.now
        do {
            var options = try RqliteQuery.parse(request.query)
            options.format.allRows = allRows
            let format = options.format
            do {
                return sqlResponse(.success(try await body(options)), started: started, format: format)
            } catch {
                return sqlResponse(.failure(error), started: started, format: format)
            }
        } catch {
            return sqlResponse(.failure(error), started: started)
        }
    }

    private func sqlResponse(_ result: Result<[StatementResult], any Error>, started: ContinuousClock.Instant,
                             format: RqliteJSON.Format = RqliteJSON.Format()) -> APIResponse {
        do {
            let results = try result.get()
            return APIResponse(status: .ok, body: RqliteJSON.response(results, format: format, timeSeconds: Self.seconds(since: started)))
        } catch let error as APIError {
            return Self.response(error)
        } catch {
            logger.error("request failed unexpectedly", metadata: ["error": "\(error)"])
            return APIResponse(status: .internalServerError, body: RqliteJSON.error("outcome unknown: internal error (details in the node's log)", code: .outcomeUnknown), outcomeUnknown: true)
        }
    }

    // MARK: rqlite's node endpoints

    /// The node's summary, asked of the service at most once a second.
    private func summary() async -> NodeSummary? {
        let service = self.service
        return await summaryCache.summary { await service.summary() }
    }

    /// `/status` and `/nodes` for an application: any user of any tenant who signs in (they
    /// tell about the node, never about a tenant), or an operator.
    private func nodeEndpoint(_ request: APIRequest, _ answer: (NodeSummary?, RqliteQuery, Principal) -> APIResponse) async -> APIResponse {
        do {
            let principal = try await principal(request)
            return answer(await summary(), try RqliteQuery.parse(request.query), principal)
        } catch let error as APIError {
            return Self.response(error)
        } catch {
            return Self.response(APIError(.badRequest, "\(error)"))
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

    /// rqlite's answer on a node that is not the leader: 301 to the same request on the writer
    /// (`Location` absolute, the query kept), which rqlite's clients follow. For applications
    /// only: the cluster's own (gateways, operators) follow the monitor's topology and get
    /// 503 `not_executed`, which a gateway acts on. Only for a request that carries credentials
    /// (checked by the writer): one without is 401 here, as anywhere.
    static func redirect(_ request: APIRequest, to writer: String) -> APIResponse {
        guard request.headers.contains(name: "authorization") else {
            return response(APIError(.unauthorized, "credentials needed: HTTP basic auth with a user name and password"))
        }
        let location = "https://" + writer + request.path + (request.query.map { "?" + $0 } ?? "")
        // Not to be cached: after a failover the redirect goes the other way.
        return APIResponse(status: .movedPermanently,
                           body: RqliteJSON.error("not primary: this node is not the writer; the request goes to \(location)", code: .notExecuted),
                           headers: [("Location", location), ("Cache-Control", "no-store")])
    }

    static func response(_ error: APIError) -> APIResponse {
        var response = APIResponse(status: error.status, body: RqliteJSON.error(error.message, code: error.code), outcomeUnknown: error.kind == .outcomeUnknown,
                                   asksForCredentials: error.kind == .unauthorized)
        if let seconds = error.retryAfterSeconds { response.headers.append(("Retry-After", String(seconds))) }
        return response
    }

    // MARK: Authentication

    /// Who sent `request`: its credentials (an application), else an operator certificate.
    /// - Throws: `APIError(.unauthorized)` for none or wrong ones.
    func principal(_ request: APIRequest) async throws -> Principal {
        guard let accounts else { return .clusterOperator("tests") }
        if let header = Credentials.header(request.headers), let credentials = try Credentials.from(request.headers) {
            let found: UserPrincipal?
            do {
                found = try await accounts.authenticate(credentials, header: header)
            } catch let error as APIError {
                throw error
            } catch {
                // Sign-in failed before the request ran: never "outcome unknown".
                logger.error("sign-in failed unexpectedly", metadata: ["error": "\(error)"])
                throw APIError(.notExecuted, "sign-in unavailable (details in the node's log); retry later")
            }
            guard let user = found else { throw APIError(.unauthorized, "wrong user name or password") }
            return .user(user)
        }
        return try Self.certificatePrincipal(request)
    }

    /// ``principal(_:)`` without waiting: nil when the credentials were not verified lately.
    func cachedPrincipal(_ request: APIRequest) throws -> Principal? {
        guard let accounts else { return .clusterOperator("tests") }
        // Not cached (or malformed): nil, and the slow path parses it.
        if let header = Credentials.header(request.headers) { return accounts.cachedAuthentication(header: header).map { .user($0) } }
        return try Self.certificatePrincipal(request)
    }

    /// Set by a gateway on a request whose client presented an operator certificate (the
    /// gateway checked it against the cluster CA): the operator's name. Believed only from a
    /// gateway's own connection; a gateway removes it from what its clients send.
    static let operatorHeader = "X-Apiary-Operator"

    /// Who a request comes from as certificates tell: the connection's own peer or, on a
    /// gateway's connection, the operator it vouches for (``operatorHeader``; only where the
    /// node believes gateways: `apiary node --operators-via-gateways`). A name no certificate
    /// could carry (``PeerIdentity/isValidName(_:)``), or a header sent twice, is not believed.
    static func peer(connection: PeerIdentity?, headers: HTTPHeaders) -> PeerIdentity? {
        guard let connection, connection.role == .gateway else { return connection }
        let names = headers[operatorHeader]
        guard names.count == 1, let name = names.first, PeerIdentity.isValidName(name) else { return connection }
        return PeerIdentity(role: .operator, name: name)
    }

    static func certificatePrincipal(_ request: APIRequest) throws -> Principal {
        guard let peer = request.peer, peer.role == .operator else {
            throw APIError(.unauthorized, "credentials needed: HTTP basic auth with a user name and password")
        }
        return .clusterOperator(peer.name)
    }

    // MARK: Accounts

    /// `/admin/tenants[/{tenant}[/users[/{user}/tokens]]]`, `/admin/tenants/{tenant}/tokens/{id}`.
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
            case (4, .POST) where path[1] == "users" && path[3] == "tokens":
                let tenant = try Self.tenant(path[0])
                try Access.check(principal, may: .manageUsers(tenant))
                let fields = request.body.isEmpty ? [:] : (try? JSONSerialization.jsonObject(with: Data(try body(request))) as? [String: Any]) ?? nil
                guard let fields else { throw APIError(.badRequest, "the body must be a JSON object (or empty)") }
                let ttl = fields["ttl_seconds"].map { ($0 as? NSNumber)?.intValue ?? -1 } ?? Tokens.ttlSecondsDefault
                let made = try await accounts.createToken(user: String(path[2]), tenant: tenant, ttlSeconds: ttl)
                return APIResponse(status: .created, body: Self.json(["token": made.token, "id": made.id, "user": String(path[2]),
                                                                      "tenant": tenant.rawValue, "expires_ms": made.expiresMs]))
            case (4, .GET) where path[1] == "users" && path[3] == "tokens":
                let tenant = try Self.tenant(path[0])
                try Access.check(principal, may: .manageUsers(tenant))
                let tokens = try await accounts.listTokens(user: String(path[2]), tenant: tenant).map { ["id": $0.id, "expires_ms": $0.expiresMs] as [String: Any] }
                return APIResponse(status: .ok, body: Self.json(["tokens": tokens]))
            case (3, .DELETE) where path[1] == "tokens":
                let tenant = try Self.tenant(path[0])
                try Access.check(principal, may: .manageUsers(tenant))
                try await accounts.revokeToken(id: String(path[2]), tenant: tenant)
                return APIResponse(status: .ok, body: Self.json(["revoked": String(path[2])]))
            case (0, _): return Self.methodNotAllowed(request, allow: "GET, POST")
            case (1, _): return Self.methodNotAllowed(request, allow: "DELETE")
            case (3, .DELETE) where path[1] == "users":
                let tenant = try Self.tenant(path[0])
                try Access.check(principal, may: .manageUsers(tenant))
                try await accounts.dropUser(String(path[2]), tenant: tenant)
                return APIResponse(status: .ok, body: Self.json(["dropped": String(path[2]), "tenant": tenant.rawValue]))
            case (2, _) where path[1] == "users": return Self.methodNotAllowed(request, allow: "GET, POST")
            default: throw APIError(.notFound, "no such endpoint: \(request.path.prefix(200))")
            }
        } catch let error as APIError {
            return Self.response(error)
        } catch {
            logger.error("account request failed unexpectedly", metadata: ["error": "\(error)"])
            return APIResponse(status: .internalServerError, body: RqliteJSON.error("outcome unknown: internal error (details in the node's log)", code: .outcomeUnknown), outcomeUnknown: true)
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
        APIResponse(status: .methodNotAllowed, body: RqliteJSON.error("\(request.method) is not allowed on \(request.path): use \(allow)", code: .methodNotAllowed), allow: allow)
    }

    static func allowed(_ peer: ApiaryTLS.PeerIdentity?, _ roles: Set<ClusterRole>) -> Bool {
        guard let peer else { return false }
        return roles.contains(peer.role)
    }

    static func forbidden(_ roles: Set<ClusterRole>) -> APIResponse {
        APIResponse(status: .forbidden, body: RqliteJSON.error("this endpoint needs a cluster certificate with role \(roles.map(\.rawValue).sorted().joined(separator: " or "))", code: .forbidden))
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
            guard let value = RqliteQuery.formDecoded(parts[1]) else {
                throw APIError(.badRequest, "query parameter '\(name)' is not valid %-encoding")
            }
            return value
        }
        return nil
    }
}
