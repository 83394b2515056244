import ApiaryCore
import ApiaryGateway
import ApiaryStorage
import ApiaryTLS
import Foundation
import NIOHTTP1
import XCTest
@testable import ApiaryNode

/// An `SQLService` that records what the HTTP layer asked of it and answers with canned
/// results: an execute reports one row affected per statement, a query returns each
/// statement's SQL as its single value (so a response shows which request it answers).
final class RecordingSQLService: SQLService, @unchecked Sendable {
    struct Call: Equatable, Sendable {
        enum Kind: Equatable, Sendable {
            case execute(transaction: Bool)
            case query(ReadLevel)
            /// Answered on the caller's thread (`queryInline`).
            case inlineQuery(ReadLevel)
        }
        var kind: Kind
        var tenant: String
        var statements: [SQLStatement]
    }

    /// Thrown by every SQL call and by `promote()` when set.
    let error: (any Error)?
    /// A call whose first statement is this SQL waits at `slowGate` until the test opens it.
    let slowSQL: String?
    let slowGate = Gate()
    private let lock = NSLock()
    private var recorded: [Call] = []
    private var promotions = 0
    /// Queries whose first statement is this SQL are answered by `queryInline`; others are not.
    let inlineSQL: String?

    init(error: (any Error)? = nil, slowSQL: String? = nil, inlineSQL: String? = nil) {
        self.error = error
        self.slowSQL = slowSQL
        self.inlineSQL = inlineSQL
    }

    var calls: [Call] { lock.withLock { recorded } }
    var promoteCount: Int { lock.withLock { promotions } }

    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] {
        try await record(Call(kind: .execute(transaction: transaction), tenant: tenant.rawValue, statements: statements))
        return statements.indices.map { i in
            var outcome = StatementOutcome()
            outcome.isReadOnly = false
            outcome.rowsAffected = 1
            outcome.lastInsertID = Int64(i + 1)
            return .success(outcome)
        }
    }

    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] {
        try await record(Call(kind: .query(level), tenant: tenant.rawValue, statements: statements))
        return statements.map { statement in
            var outcome = StatementOutcome()
            outcome.columns = ["sql"]
            outcome.declaredTypes = ["text"]
            outcome.rows = [[.text(statement.sql)]]
            return .success(outcome)
        }
    }

    func queryInline(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel, transaction: Bool) -> [StatementResult]? {
        guard let inlineSQL, statements.first?.sql == inlineSQL else { return nil }
        lock.withLock { recorded.append(Call(kind: .inlineQuery(level), tenant: tenant.rawValue, statements: statements)) }
        var outcome = StatementOutcome()
        outcome.columns = ["answered"]
        outcome.declaredTypes = ["text"]
        outcome.rows = [[.text("inline")]]
        return [.success(outcome)]
    }

    func statusJSON() async -> [UInt8] { Array(#"{"role":"primary"}"#.utf8) }

    func promote() async throws -> [UInt8] {
        lock.withLock { promotions += 1 }
        if let error { throw error }
        return Array(#"{"promoted":true}"#.utf8)
    }

    private func record(_ call: Call) async throws {
        lock.withLock { recorded.append(call) }
        if let slowSQL, call.statements.first?.sql == slowSQL { await slowGate.pass() }
        if let error { throw error }
    }
}

/// Not an `APIError`: the routes must treat it as an unknown outcome.
struct UnexpectedServiceError: Error, CustomStringConvertible {
    var description: String { "disk on fire" }
}

/// `APIRoutes` without a socket: routing, tenants, query flags, errors → statuses, roles.
final class APIRoutesTests: XCTestCase {
    var service: RecordingSQLService!

    override func setUp() {
        service = RecordingSQLService()
    }

    func respond(_ method: HTTPMethod, _ uri: String, tenant: String? = nil, body: String = "",
                 peer: ApiaryTLS.PeerIdentity? = nil, bodyTooLarge: Bool = false,
                 service: RecordingSQLService? = nil, limits: APIRoutes.Limits = .init()) async -> APIResponse {
        var headers = HTTPHeaders()
        if let tenant { headers.add(name: "X-Apiary-Tenant", value: tenant) }
        let request = APIRequest(method: method, uri: uri, headers: headers, body: Array(body.utf8),
                                 bodyTooLarge: bodyTooLarge, peer: peer)
        // The server's entry point: writes answered by callback, the rest through a task.
        let routes = APIRoutes(service: service ?? self.service!, accounts: nil, limits: limits)
        return await withCheckedContinuation { done in routes.respond(to: request) { make in done.resume(returning: make()) } }
    }

    func json(_ response: APIResponse, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        let object = try JSONSerialization.jsonObject(with: Data(response.body))
        return try XCTUnwrap(object as? [String: Any], "not a JSON object: \(String(decoding: response.body, as: UTF8.self))", file: file, line: line)
    }

    func results(_ response: APIResponse, file: StaticString = #filePath, line: UInt = #line) throws -> [[String: Any]] {
        let object = try json(response, file: file, line: line)
        XCTAssertNil(object["time"], "rqlite responses carry a time only with ?timings", file: file, line: line)
        return try XCTUnwrap(object["results"] as? [[String: Any]], "no results in \(object)", file: file, line: line)
    }

    /// The `{"error": ...}` message of a request that failed as a whole.
    func errorMessage(_ response: APIResponse, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let object = try json(response, file: file, line: line)
        // Every failed request: rqlite's message, Apiary's stable code, and whether a retry is safe.
        XCTAssertEqual(Set(object.keys), ["error", "code", "retry_safe"], file: file, line: line)
        let code = try XCTUnwrap(ErrorCode(rawValue: object["code"] as? String ?? ""), "unknown code \(object)", file: file, line: line)
        XCTAssertEqual(object["retry_safe"] as? Bool, code.retrySafe, file: file, line: line)
        return try XCTUnwrap(object["error"] as? String, file: file, line: line)
    }

    func call(_ kind: RecordingSQLService.Call.Kind, _ tenant: String, _ sql: String...) -> RecordingSQLService.Call {
        RecordingSQLService.Call(kind: kind, tenant: tenant, statements: sql.map { SQLStatement($0) })
    }

    // MARK: Limits

    /// `apiary node --tenant-rate`: one tenant past its allowance is refused (429, not executed,
    /// `Retry-After`), whichever endpoint it uses, while another tenant is served.
    func testATenantPastItsRateIsRefusedWhileAnotherTenantIsServed() async throws {
        var limits = APIRoutes.Limits()
        limits.tenantRate = RateLimiter.Config(perSecond: 0.001, burst: 2) // nothing refills during the test
        let routes = APIRoutes(service: service, accounts: nil, limits: limits)
        func send(_ method: HTTPMethod, _ uri: String, _ tenant: String, _ body: String = "") async -> APIResponse {
            var headers = HTTPHeaders()
            headers.add(name: "X-Apiary-Tenant", value: tenant)
            let request = APIRequest(method: method, uri: uri, headers: headers, body: Array(body.utf8))
            return await withCheckedContinuation { done in routes.respond(to: request) { make in done.resume(returning: make()) } }
        }
        let write = #"["INSERT INTO t VALUES (1)"]"#
        let first = await send(.POST, "/db/execute", "acme", write)
        let second = await send(.GET, "/db/query?q=SELECT%201", "acme")
        XCTAssertEqual([first.status, second.status], [.ok, .ok])
        for (method, uri, body) in [(HTTPMethod.POST, "/db/execute", write), (.GET, "/db/query?q=SELECT%201", ""), (.POST, "/db/request", write)] {
            let refused = await send(method, uri, "acme", body)
            XCTAssertEqual(refused.status, .tooManyRequests, uri)
            XCTAssertTrue(try errorMessage(refused).contains("too many requests for tenant acme"), uri)
            XCTAssertTrue(String(decoding: refused.body, as: UTF8.self).contains("\"rate_limited\""), uri)
            let retryAfter = try XCTUnwrap(refused.headers.first { $0.0 == "Retry-After" }.flatMap { Int($0.1) }, uri)
            XCTAssertTrue((1...1000).contains(retryAfter), "Retry-After \(retryAfter)")
        }
        let other = await send(.POST, "/db/execute", "globex", write)
        XCTAssertEqual(other.status, .ok)
        XCTAssertEqual(service.calls.map(\.tenant), ["acme", "acme", "globex"], "a refused request must not run")
    }

    /// A query is answered on the event loop when the service can (`queryInline`), else by
    /// its general path; either way it is admitted once (one token of the tenant's rate).
    func testAQueryIsAnsweredInlineWhenTheServiceCanElseByItsGeneralPathAdmittedOnce() async throws {
        let service = RecordingSQLService(inlineSQL: "SELECT 'fast'")
        var limits = APIRoutes.Limits()
        limits.tenantRate = RateLimiter.Config(perSecond: 0.001, burst: 2) // nothing refills during the test
        let routes = APIRoutes(service: service, accounts: nil, limits: limits)
        func send(_ sql: String) async -> APIResponse {
            var headers = HTTPHeaders()
            headers.add(name: "X-Apiary-Tenant", value: "acme")
            let request = APIRequest(method: .GET, uri: "/db/query?q=" + sql.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!,
                                     headers: headers, body: [])
            return await withCheckedContinuation { done in routes.respond(to: request) { make in done.resume(returning: make()) } }
        }
        let fast = await send("SELECT 'fast'")
        XCTAssertEqual(fast.status, .ok)
        XCTAssertTrue(String(decoding: fast.body, as: UTF8.self).contains(#""values":[["inline"]]"#), String(decoding: fast.body, as: UTF8.self))
        let slow = await send("SELECT 'slow'")
        XCTAssertEqual(slow.status, .ok)
        XCTAssertTrue(String(decoding: slow.body, as: UTF8.self).contains(#""values":[["SELECT 'slow'"]]"#), String(decoding: slow.body, as: UTF8.self))
        XCTAssertEqual(service.calls.map(\.kind), [.inlineQuery(.weak), .query(.weak)])
        let third = await send("SELECT 'fast'")
        XCTAssertEqual(third.status, .tooManyRequests, "two requests took two tokens, not more")
    }

    // MARK: /db/execute

    func testExecuteWithTenantHeader() async throws {
        let response = await respond(.POST, "/db/execute", tenant: "acme",
                                     body: #"["CREATE TABLE t (x)", ["INSERT INTO t VALUES(?)", 7]]"#)
        XCTAssertEqual(response.status, .ok)
        XCTAssertFalse(response.outcomeUnknown)
        XCTAssertEqual(service.calls, [RecordingSQLService.Call(kind: .execute(transaction: false), tenant: "acme", statements: [
            SQLStatement("CREATE TABLE t (x)"), SQLStatement("INSERT INTO t VALUES(?)", [.integer(7)]),
        ])])
        let results = try results(response)
        XCTAssertEqual(results.count, 2)
        XCTAssertEqual(results[0]["rows_affected"] as? Int, 1)
        XCTAssertEqual(results[0]["last_insert_id"] as? Int, 1)
        XCTAssertEqual(results[1]["last_insert_id"] as? Int, 2)
    }

    func testExecuteWithTenantInPath() async throws {
        let response = await respond(.POST, "/tenants/shop-2/db/execute", body: #"["DELETE FROM t"]"#)
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(service.calls, [call(.execute(transaction: false), "shop-2", "DELETE FROM t")])
    }

    func testTenantInPathWinsOverHeader() async throws {
        let response = await respond(.POST, "/tenants/from-path/db/execute", tenant: "from-header", body: #"["DELETE FROM t"]"#)
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(service.calls.map(\.tenant), ["from-path"])
    }

    func testTransactionFlag() async throws {
        for (query, expected) in [("", false), ("?transaction", true), ("?transaction=true", true),
                                  ("?pretty&transaction", true), ("?transactions", false), ("?pretty", false)] {
            let service = RecordingSQLService()
            let response = await respond(.POST, "/db/execute" + query, tenant: "acme", body: #"["DELETE FROM t"]"#, service: service)
            XCTAssertEqual(response.status, .ok, query)
            XCTAssertEqual(service.calls.map(\.kind), [.execute(transaction: expected)], query)
        }
    }

    // MARK: /db/query

    func testGetQueryDecodesPlusAndPercentEncoding() async throws {
        let response = await respond(.GET, "/db/query?q=SELECT+*+FROM+t+WHERE+name%3D%27a+b%27+AND+x%3D1%2B1", tenant: "acme")
        XCTAssertEqual(response.status, .ok)
        let sql = "SELECT * FROM t WHERE name='a b' AND x=1+1"
        XCTAssertEqual(service.calls, [call(.query(.weak), "acme", sql)])
        let results = try results(response)
        XCTAssertEqual(results.count, 1)
        XCTAssertEqual(results[0]["columns"] as? [String], ["sql"])
        XCTAssertEqual(results[0]["types"] as? [String], ["text"])
        XCTAssertEqual(results[0]["values"] as? [[String]], [[sql]])
    }

    func testGetQueryWithTenantInPath() async throws {
        let response = await respond(.GET, "/tenants/acme/db/query?q=SELECT%201")
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(service.calls, [call(.query(.weak), "acme", "SELECT 1")])
    }

    func testReadLevels() async throws {
        for (query, level) in [("", ReadLevel.weak), ("&level=none", .none), ("&level=weak", .weak),
                               ("&level=strong", .strong), ("&level=linearizable", .linearizable)] {
            let service = RecordingSQLService()
            let response = await respond(.GET, "/db/query?q=SELECT+1" + query, tenant: "acme", service: service)
            XCTAssertEqual(response.status, .ok, query)
            XCTAssertEqual(service.calls.map(\.kind), [.query(level)], query)
        }
        // The level may come before q.
        let response = await respond(.GET, "/db/query?level=strong&q=SELECT+1", tenant: "acme")
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(service.calls.map(\.kind), [.query(.strong)])
    }

    func testUnknownLevelIsRefused() async throws {
        let response = await respond(.GET, "/db/query?q=SELECT+1&level=eventual", tenant: "acme")
        XCTAssertEqual(response.status, .badRequest)
        XCTAssertFalse(response.outcomeUnknown)
        let message = try errorMessage(response)
        XCTAssertTrue(message.contains("unknown level 'eventual'"), message)
        XCTAssertTrue(service.calls.isEmpty)
    }

    func testGetQueryWithoutQIsRefused() async throws {
        let response = await respond(.GET, "/db/query?level=weak", tenant: "acme")
        XCTAssertEqual(response.status, .badRequest)
        XCTAssertTrue(try errorMessage(response).contains("?q="))
        XCTAssertTrue(service.calls.isEmpty)
    }

    func testPostQueryReadsStatementsFromBody() async throws {
        let response = await respond(.POST, "/db/query?level=strong", tenant: "acme",
                                     body: #"["SELECT 1", ["SELECT * FROM t WHERE id = ?", 42]]"#)
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(service.calls, [RecordingSQLService.Call(kind: .query(.strong), tenant: "acme", statements: [
            SQLStatement("SELECT 1"), SQLStatement("SELECT * FROM t WHERE id = ?", [.integer(42)]),
        ])])
        let results = try results(response)
        XCTAssertEqual(results.compactMap { $0["values"] as? [[String]] }, [[["SELECT 1"]], [["SELECT * FROM t WHERE id = ?"]]])
    }

    func testPostQueryIgnoresQ() async throws {
        let response = await respond(.POST, "/db/query?q=SELECT+2", tenant: "acme", body: #"["SELECT 1"]"#)
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(service.calls, [call(.query(.weak), "acme", "SELECT 1")])
    }

    // MARK: Malformed requests

    func testMissingTenantIsRefused() async throws {
        for (method, uri) in [(HTTPMethod.POST, "/db/execute"), (.POST, "/db/query"), (.GET, "/db/query?q=SELECT+1")] {
            let response = await respond(method, uri, body: #"["SELECT 1"]"#)
            XCTAssertEqual(response.status, .badRequest, uri)
            XCTAssertTrue(try errorMessage(response).contains("X-Apiary-Tenant"), uri)
        }
        XCTAssertTrue(service.calls.isEmpty)
    }

    func testInvalidTenantNameIsRefused() async throws {
        for (uri, tenant) in [("/db/execute", "Acme"), ("/db/execute", "a/b"), ("/db/execute", ""), ("/db/execute", "-x"),
                              ("/db/execute", String(repeating: "a", count: 65)),
                              ("/tenants/ACME/db/execute", nil), ("/tenants/a%2Fb/db/execute", nil), ("/tenants//db/execute", nil)] {
            let response = await respond(.POST, uri, tenant: tenant, body: #"["SELECT 1"]"#)
            XCTAssertEqual(response.status, .badRequest, "\(uri) \(tenant ?? "")")
            let message = try errorMessage(response)
            XCTAssertTrue(message.contains("invalid tenant id"), message)
            if let tenant, !tenant.isEmpty { XCTAssertFalse(message.contains(tenant), "the message echoes the name: \(message)") }
        }
        XCTAssertTrue(service.calls.isEmpty)
    }

    func testMalformedJSONIsRefusedWithMessage() async throws {
        for body in ["not json", #"{"a": 1}"#, "[]", #"["SELECT 1""#, ""] {
            let response = await respond(.POST, "/db/execute", tenant: "acme", body: body)
            XCTAssertEqual(response.status, .badRequest, body)
            XCTAssertFalse(response.outcomeUnknown, body)
            XCTAssertFalse(try errorMessage(response).isEmpty, body)
        }
        let response = await respond(.POST, "/db/query", tenant: "acme", body: "not json")
        XCTAssertEqual(response.status, .badRequest)
        XCTAssertTrue(try errorMessage(response).contains("JSON array"))
        XCTAssertTrue(service.calls.isEmpty)
    }

    func testTooManyStatementsAreRefused() async throws {
        let response = await respond(.POST, "/db/execute", tenant: "acme", body: #"["SELECT 1", "SELECT 2", "SELECT 3"]"#,
                                     limits: APIRoutes.Limits(statementsMax: 2))
        XCTAssertEqual(response.status, .badRequest)
        XCTAssertTrue(try errorMessage(response).contains("max 2"))
        XCTAssertTrue(service.calls.isEmpty)
    }

    func testBodyTooLargeIsRefused() async throws {
        for (method, uri) in [(HTTPMethod.POST, "/db/execute"), (.POST, "/db/query")] {
            let response = await respond(method, uri, tenant: "acme", body: "", bodyTooLarge: true,
                                         limits: APIRoutes.Limits(bodyBytesMax: 1024))
            XCTAssertEqual(response.status, .payloadTooLarge, uri)
            XCTAssertFalse(response.outcomeUnknown, uri)
            let message = try errorMessage(response)
            XCTAssertTrue(message.contains("larger than 1024 bytes"), message)
        }
        XCTAssertTrue(service.calls.isEmpty)
    }

    // MARK: Service errors → statuses

    func testEachAPIErrorKindHasItsStatus() async throws {
        let cases: [(APIError.Kind, HTTPResponseStatus, String, Bool)] = [
            (.badRequest, .badRequest, "bad_request", false), (.notFound, .notFound, "not_found", false),
            (.notExecuted, .serviceUnavailable, "not_executed", true), (.outcomeUnknown, .internalServerError, "outcome_unknown", false),
            (.forbidden, .forbidden, "forbidden", false), (.tooLarge, .payloadTooLarge, "too_large", false),
            (.unauthorized, .unauthorized, "unauthorized", false), (.conflict, .conflict, "conflict", false),
            (.capacity, .insufficientStorage, "capacity", false),
        ]
        for (kind, status, code, retrySafe) in cases {
            let service = RecordingSQLService(error: APIError(kind, "the \(kind) message"))
            for (method, uri, body) in [(HTTPMethod.POST, "/db/execute", #"["DELETE FROM t"]"#),
                                        (.GET, "/db/query?q=SELECT+1", ""), (.POST, "/db/query", #"["SELECT 1"]"#)] {
                let response = await respond(method, uri, tenant: "acme", body: body, service: service)
                XCTAssertEqual(response.status, status, "\(kind) \(uri)")
                XCTAssertEqual(response.outcomeUnknown, kind == .outcomeUnknown, "\(kind) \(uri)")
                XCTAssertEqual(try errorMessage(response), "the \(kind) message")
                let object = try json(response)
                XCTAssertEqual(object["code"] as? String, code, "\(kind)")
                XCTAssertEqual(object["retry_safe"] as? Bool, retrySafe, "\(kind)")
            }
            XCTAssertEqual(service.calls.count, 3)
        }
    }

    func testOtherErrorsAreUnknownOutcomes() async throws {
        let service = RecordingSQLService(error: UnexpectedServiceError())
        for (method, uri, body) in [(HTTPMethod.POST, "/db/execute", #"["DELETE FROM t"]"#), (.GET, "/db/query?q=SELECT+1", "")] {
            let response = await respond(method, uri, tenant: "acme", body: body, service: service)
            XCTAssertEqual(response.status, .internalServerError, uri)
            XCTAssertTrue(response.outcomeUnknown, uri)
            let message = try errorMessage(response)
            XCTAssertTrue(message.contains("outcome unknown"), message)
            XCTAssertFalse(message.contains("disk on fire"), "internals reach the node's log, not clients: \(message)")
        }
    }

    func testStatementFailuresAreReportedInResults() async throws {
        // A failure of one statement is not a failure of the request: 200 with an "error" entry.
        final class FailingStatement: SQLService, @unchecked Sendable {
            func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] {
                [.success(StatementOutcome()), .failure("no such table: nope")]
            }
            func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] { [] }
            func statusJSON() async -> [UInt8] { [] }
            func promote() async throws -> [UInt8] { [] }
        }
        let request = APIRequest(method: .POST, uri: "/db/execute", headers: ["X-Apiary-Tenant": "acme"],
                                 body: Array(#"["SELECT 1", "SELECT * FROM nope"]"#.utf8))
        let response = await APIRoutes(service: FailingStatement(), accounts: nil).respond(to: request)
        XCTAssertEqual(response.status, .ok)
        XCTAssertFalse(response.outcomeUnknown)
        let results = try results(response)
        XCTAssertEqual(results.count, 2)
        XCTAssertEqual(results[1]["error"] as? String, "no such table: nope")
    }

    // MARK: Paths and methods

    func testUnknownPathsAre404() async throws {
        for uri in ["/", "/db", "/db/exec", "/db/execute/", "/DB/execute", "/tenants/acme/db", "/tenants/acme/status",
                    "/tenants/acme/readyz", "/tenants/acme/x/db/execute", "/v1/db/query?q=x", "/readyz/x"] {
            let response = await respond(.POST, uri, tenant: "acme", body: #"["SELECT 1"]"#, peer: .init(role: .operator, name: "op"))
            XCTAssertEqual(response.status, .notFound, uri)
            XCTAssertTrue(try errorMessage(response).contains("no such endpoint"), uri)
        }
        XCTAssertTrue(service.calls.isEmpty)
    }

    func testWrongMethodsAre405() async throws {
        for (method, uri) in [(HTTPMethod.GET, "/db/execute"), (.PUT, "/db/execute"), (.DELETE, "/db/query"),
                              (.GET, "/tenants/acme/db/execute"), (.POST, "/readyz"), (.POST, "/status"),
                              (.GET, "/admin/promote")] {
            let response = await respond(method, uri, tenant: "acme", body: #"["SELECT 1"]"#, peer: .init(role: .operator, name: "op"))
            XCTAssertEqual(response.status, .methodNotAllowed, "\(method) \(uri)")
            XCTAssertTrue(try errorMessage(response).contains("not allowed"), uri)
        }
        XCTAssertTrue(service.calls.isEmpty)
        XCTAssertEqual(service.promoteCount, 0)
    }

    func testReadyz() async throws {
        let response = await respond(.GET, "/readyz")
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(String(decoding: response.body, as: UTF8.self), "[+]node ok\n[+]leader ok\n[+]store ok", "rqlite's form, on a primary")
        // Health checkers often ask with HEAD (the server leaves the body out on the wire).
        let head = await respond(.HEAD, "/readyz")
        XCTAssertEqual(head.status, .ok)
        let post = await respond(.POST, "/readyz")
        XCTAssertEqual(post.allow, "GET, HEAD")
    }

    // MARK: Operator endpoints

    /// The operator a gateway vouches for is believed from a gateway's connection only, and
    /// only with a name a certificate could carry.
    func testAnOperatorIsBelievedFromAGatewayOnly() {
        let header = HTTPHeaders([("X-Apiary-Operator", "alice-ops")])
        let gateway = PeerIdentity(role: .gateway, name: "gateway-1")
        XCTAssertEqual(APIRoutes.peer(connection: gateway, headers: header), PeerIdentity(role: .operator, name: "alice-ops"))
        XCTAssertEqual(APIRoutes.peer(connection: gateway, headers: [:]), gateway)
        XCTAssertNil(APIRoutes.peer(connection: nil, headers: header), "an application cannot claim it")
        for role in [ClusterRole.node, .monitor, .operator] {
            let other = PeerIdentity(role: role, name: "x")
            XCTAssertEqual(APIRoutes.peer(connection: other, headers: header), other, "\(role)")
        }
        for bad in ["", String(repeating: "a", count: 65), "a b", "a\u{0}", "ops/../x", ".", "..", "a@b"] {
            XCTAssertEqual(APIRoutes.peer(connection: gateway, headers: HTTPHeaders([("X-Apiary-Operator", bad)])), gateway, bad)
        }
        let twice = HTTPHeaders([("X-Apiary-Operator", "alice-ops"), ("x-apiary-operator", "root")])
        XCTAssertEqual(APIRoutes.peer(connection: gateway, headers: twice), gateway, "a header sent twice names no one")
    }

    func testStatusNeedsOperatorOrMonitor() async throws {
        let refused: [ApiaryTLS.PeerIdentity?] = [nil, .init(role: .node, name: "node-1"), .init(role: .gateway, name: "gw")]
        for peer in refused {
            let response = await respond(.GET, "/status", peer: peer)
            XCTAssertEqual(response.status, .forbidden, "\(String(describing: peer))")
            let message = try errorMessage(response)
            XCTAssertTrue(message.contains("monitor or operator"), message)
        }
        for peer in [ApiaryTLS.PeerIdentity(role: .operator, name: "op"), .init(role: .monitor, name: "mon")] {
            let response = await respond(.GET, "/status", peer: peer)
            XCTAssertEqual(response.status, .ok, "\(peer)")
            XCTAssertEqual(try json(response)["role"] as? String, "primary")
        }
    }

    func testPromoteNeedsOperator() async throws {
        let refused: [ApiaryTLS.PeerIdentity?] = [nil, .init(role: .node, name: "node-1"), .init(role: .monitor, name: "mon"),
                                                 .init(role: .gateway, name: "gw")]
        for peer in refused {
            let response = await respond(.POST, "/admin/promote", peer: peer)
            XCTAssertEqual(response.status, .forbidden, "\(String(describing: peer))")
            let message = try errorMessage(response)
            XCTAssertTrue(message.contains("role operator"), message)
        }
        XCTAssertEqual(service.promoteCount, 0)
        let response = await respond(.POST, "/admin/promote", peer: .init(role: .operator, name: "op"))
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(try json(response)["promoted"] as? Bool, true)
        XCTAssertEqual(service.promoteCount, 1)
    }

    func testPromoteErrors() async throws {
        let notPrimary = RecordingSQLService(error: APIError(.notExecuted, "already primary"))
        var response = await respond(.POST, "/admin/promote", peer: .init(role: .operator, name: "op"), service: notPrimary)
        XCTAssertEqual(response.status, .serviceUnavailable)
        XCTAssertEqual(try errorMessage(response), "already primary")

        let broken = RecordingSQLService(error: UnexpectedServiceError())
        response = await respond(.POST, "/admin/promote", peer: .init(role: .operator, name: "op"), service: broken)
        XCTAssertEqual(response.status, .internalServerError)
        XCTAssertTrue(try errorMessage(response).contains("promotion failed"))
    }

    // MARK: Query strings

    func testFormValue() throws {
        XCTAssertNil(try APIRoutes.formValue("q", in: nil))
        XCTAssertNil(try APIRoutes.formValue("q", in: "qq=1"))
        XCTAssertEqual(try APIRoutes.formValue("q", in: "q"), "")
        XCTAssertEqual(try APIRoutes.formValue("q", in: "q="), "")
        XCTAssertEqual(try APIRoutes.formValue("q", in: "a=1&q=x%20y+z"), "x y z")
        XCTAssertEqual(try APIRoutes.formValue("q", in: "q=a=b"), "a=b")
        XCTAssertEqual(try APIRoutes.formValue("q", in: "q=first&q=second"), "first")
        XCTAssertEqual(try APIRoutes.formValue("q", in: "q=%C3%A9t%C3%A9"), "été")
    }

    // MARK: Found in review

    /// Guessing at an undecodable value would run a query at another level or statements
    /// outside the transaction the client asked for.
    func testInvalidPercentEncodingIsRefused() async throws {
        let level = await respond(.GET, "/db/query?q=SELECT+1&level=%zz", tenant: "acme")
        XCTAssertEqual(level.status, .badRequest)
        let tx = RecordingSQLService()
        let execute = await respond(.POST, "/db/execute?transaction=%zz", tenant: "acme", body: #"["DELETE FROM t"]"#, service: tx)
        XCTAssertEqual(execute.status, .badRequest)
        XCTAssertTrue(tx.calls.isEmpty, "nothing ran")
        let q = await respond(.GET, "/db/query?q=SELECT+100%", tenant: "acme")
        XCTAssertEqual(q.status, .badRequest)
        XCTAssertTrue(String(decoding: q.body, as: UTF8.self).contains("not valid %-encoding"))
    }

    /// Only SQL lives under a tenant's path.
    func testTenantPrefixIsOnlyForSQL() async throws {
        for (method, uri) in [(HTTPMethod.POST, "/tenants/acme/admin/promote"), (.GET, "/tenants/acme/status"), (.GET, "/tenants/acme/readyz")] {
            let r = await respond(method, uri, peer: .init(role: .operator, name: "op"))
            XCTAssertEqual(r.status, .notFound, uri)
        }
    }

    func testMethodNotAllowedSaysWhatIsAllowed() async throws {
        let r = await respond(.DELETE, "/db/execute", tenant: "acme")
        XCTAssertEqual(r.status, .methodNotAllowed)
        XCTAssertEqual(r.allow, "POST")
        let query = await respond(.PUT, "/db/query", tenant: "acme")
        XCTAssertEqual(query.allow, "GET, POST")
    }

    func testPromotionWhoseOutcomeIsUnknownIsMarked() async throws {
        let s = RecordingSQLService(error: APIError(.outcomeUnknown, "x"))
        let r = await respond(.POST, "/admin/promote", peer: .init(role: .operator, name: "op"), service: s)
        XCTAssertEqual(r.status, .internalServerError)
        XCTAssertTrue(r.outcomeUnknown)
    }
}
