import ApiaryCore
import Foundation
import NIOHTTP1

/// A user's role within its tenant (DESIGN §8; the whitepaper's finer roles come later).
public enum UserRole: String, Sendable, CaseIterable, Codable {
    /// Reads, writes, and manages the tenant's users.
    case admin
    /// Reads and writes.
    case writer
    /// Reads only.
    case reader

    var mayWrite: Bool { self != .reader }
    var mayManageUsers: Bool { self == .admin }
}

/// What a client presented to prove who it is.
public enum Credentials: Hashable, Sendable {
    /// HTTP basic auth, as rqlite clients send it (`http://user:pass@host`).
    case basic(user: String, password: String)
    /// `Authorization: Bearer apiary_<id>_<secret>`: a token made for a user (``Tokens``).
    case bearer(id: String, secret: String)

    /// The `Authorization` header as sent, unparsed: what verified credentials are remembered
    /// by, so that a request whose credentials were verified lately costs one hash of it.
    static func header(_ headers: HTTPHeaders) -> String? { headers.first(name: "authorization") }

    /// Reads the `Authorization` header; nil when there is none.
    /// - Throws: `APIError(.unauthorized)` for a header that is present but malformed.
    static func from(_ headers: HTTPHeaders) throws -> Credentials? {
        guard let value = headers.first(name: "authorization") else { return nil }
        let parts = value.split(separator: " ", maxSplits: 1)
        if parts.count == 2, parts[0].lowercased() == "bearer" {
            guard let token = Tokens.parse(parts[1]) else { throw APIError(.unauthorized, "wrong token") }
            return .bearer(id: token.id, secret: token.secret)
        }
        guard parts.count == 2, parts[0].lowercased() == "basic", parts[1].utf8.count <= 4096,
              let decoded = Data(base64Encoded: String(parts[1])), let text = String(data: decoded, encoding: .utf8),
              let colon = text.firstIndex(of: ":") else {
            throw APIError(.unauthorized, "malformed Authorization header: use HTTP basic auth or a bearer token")
        }
        let user = String(text[..<colon]), password = String(text[text.index(after: colon)...])
        guard !user.isEmpty, user.utf8.count <= UserName.lengthMax, password.utf8.count <= Passwords.lengthMax else {
            throw APIError(.unauthorized, "wrong user name or password")
        }
        return .basic(user: user, password: password)
    }
}

/// A user name: 1...64 characters of `[a-z0-9._@-]`, unique in the cluster (so that it alone
/// names its tenant: a rqlite client sends only a user name and a password).
enum UserName {
    static let lengthMax = 64
    static func isValid(_ s: String) -> Bool {
        let bytes = Array(s.utf8)
        guard !bytes.isEmpty, bytes.count <= lengthMax else { return false }
        return bytes.allSatisfy { b in
            (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x2E || b == 0x5F || b == 0x40 || b == 0x2D
        }
    }
}

/// An authenticated application user.
public struct UserPrincipal: Hashable, Sendable {
    public var name: String
    public var tenant: TenantID
    public var role: UserRole
    /// Signed in with a bearer token, not the password: it may use the tenant as its role
    /// allows, but not manage users or tokens (a leaked token must not mint more).
    public var byToken = false
}

/// Who a request is from.
enum Principal: Sendable {
    /// A cluster operator, by its certificate: may name any tenant (scripts, drills, tests).
    case clusterOperator(String)
    case user(UserPrincipal)
}

/// What a request wants to do, for the access decision.
enum Intent: Sendable {
    case read, write, manageUsers(TenantID), manageTenants
}

/// The access decisions (invariant 7): pure, so that each rule is tested alone.
enum Access {
    /// The tenant a request acts on: a user's own tenant (a header or path naming another is
    /// refused, never followed); an operator's named one.
    static func tenant(for principal: Principal, named: String?) throws -> TenantID {
        switch principal {
        case .clusterOperator:
            guard let named else { throw APIError(.badRequest, "no tenant: send the X-Apiary-Tenant header or use /tenants/{tenant}/db/...") }
            do { return try TenantID(named) } catch { throw APIError(.badRequest, String(describing: error)) }
        case .user(let user):
            if let named, named != user.tenant.rawValue {
                throw APIError(.forbidden, "these credentials are not for the tenant named in the request")
            }
            return user.tenant
        }
    }

    /// Throws `APIError(.forbidden)` unless `principal` may do `intent`.
    static func check(_ principal: Principal, may intent: Intent) throws {
        guard case .user(let user) = principal else { return } // operators may do everything
        switch intent {
        case .read: return
        case .write:
            guard user.role.mayWrite else { throw APIError(.forbidden, "role \(user.role.rawValue) may not write") }
        case .manageUsers(let tenant):
            guard user.role.mayManageUsers, user.tenant == tenant else {
                throw APIError(.forbidden, "only an admin of the tenant (or a cluster operator) manages its users")
            }
            guard !user.byToken else { throw APIError(.forbidden, "users and tokens are managed with a password, not a bearer token") }
        case .manageTenants:
            throw APIError(.forbidden, "only a cluster operator (its certificate) manages tenants")
        }
    }
}

/// Accounts as the API needs them: authentication and administration. The primary serves
/// them from the replicated system database; other roles refuse (not primary).
public protocol AccountService: Sendable {
    /// The user `credentials` prove, or nil when they are wrong (an unknown user and a wrong
    /// password get the same answer after the same work).
    /// - Throws: `APIError(.notExecuted)` when this node cannot tell (not the primary, busy).
    /// `header` is the `Authorization` header they came in (``Credentials/header(_:)``).
    func authenticate(_ credentials: Credentials, header: String) async throws -> UserPrincipal?
    /// A recent successful ``authenticate(_:header:)`` with the same `Authorization` header,
    /// from memory (no I/O, no parsing: for the event loop's hot path); nil: call
    /// ``authenticate(_:header:)``.
    func cachedAuthentication(header: String) -> UserPrincipal?
    func createTenant(_ tenant: TenantID) async throws
    func listTenants() async throws -> [TenantID]
    func dropTenant(_ tenant: TenantID) async throws
    func createUser(_ name: String, tenant: TenantID, role: UserRole, password: String) async throws
    func listUsers(tenant: TenantID) async throws -> [(name: String, role: UserRole)]
    /// Removes `name` of `tenant`, and its tokens: its credentials stop working at once.
    func dropUser(_ name: String, tenant: TenantID) async throws
    /// A new bearer token for `user` of `tenant`, valid `ttlSeconds`: the token (shown once),
    /// its id (to revoke it) and when it expires (ms since 1970).
    func createToken(user: String, tenant: TenantID, ttlSeconds: Int) async throws -> (id: String, token: String, expiresMs: Int64)
    /// The unexpired tokens of `user` of `tenant`: ids and expiry (never the tokens).
    func listTokens(user: String, tenant: TenantID) async throws -> [(id: String, expiresMs: Int64)]
    /// Revokes the token `id` of a user of `tenant`.
    func revokeToken(id: String, tenant: TenantID) async throws
}
