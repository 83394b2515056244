import ApiaryCore
import ApiaryStorage
import Crypto
import Foundation

/// Users, and dropped tenants, in the system database (`TenantID.system`): stored, captured
/// and replicated like a tenant's data, so accounts survive a failover. Lives on the primary.
///
/// A tenant exists when its database does (made by `createTenant` only: no write makes one).
/// Dropping one refuses every request to it from then on and deletes its files on the primary
/// (``PrimaryNode/drop(_:commitDrop:)``); a standby deletes them once it applied the drop.
final class AccountStore: AccountService, @unchecked Sendable {
    private let node: PrimaryNode
    private let cache = CredentialCache()
    /// scrypt runs here: two at a time (32 MiB each), never on event loops or the SQL pools.
    private static let kdf = BlockingPool(threads: 2, name: "apiary-kdf")
    private let kdfWaiting = LockedValue(0)
    static let kdfWaitingMax = 256
    private let schemaReady = LockedValue(false)

    static let schema = [
        "CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, tenant TEXT NOT NULL, role TEXT NOT NULL, password TEXT NOT NULL, created_ms INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS dropped_tenants (name TEXT PRIMARY KEY, dropped_ms INTEGER NOT NULL)",
        // Bearer tokens: the SHA-256 of the secret only (Tokens.swift).
        // A token names its user's tenant too: user names are free again after their tenant is
        // dropped, and a token must never sign in as a later user of the same name.
        "CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, user TEXT NOT NULL, tenant TEXT NOT NULL, hash TEXT NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL)",
    ]

    init(node: PrimaryNode) {
        self.node = node
    }

    // MARK: The system database

    /// Storage failures of the system database mean "not executed", never "outcome unknown":
    /// sign-in and account reads change nothing.
    private func mapped<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as APIError {
            throw error
        } catch let error as StorageError {
            throw PrimarySQLService.apiError(error)
        } catch let rejected as CommitRejected {
            throw PrimarySQLService.apiError(rejected)
        } catch {
            node.logger.error("accounts unavailable", metadata: ["error": "\(error)"])
            throw APIError(.notExecuted, "accounts unavailable (details in the node's log); retry later")
        }
    }

    private func database() async throws -> TenantDatabase {
        try await mapped { try await systemDatabase() }
    }

    private func systemDatabase() async throws -> TenantDatabase {
        guard let system = try await node.tenant(.system, create: true) else { throw APIError(.notExecuted, "accounts unavailable; retry later") }
        if !schemaReady.withLock({ $0 }) {
            let results = try await system.database.execute(Self.schema.map { SQLStatement($0) }, transaction: true)
            for case .failure(let message) in results { throw APIError(.notExecuted, "accounts unavailable (\(message)); retry later") }
            schemaReady.withLock { $0 = true }
        }
        return system.database
    }

    private func rows(_ sql: String, _ parameters: [SQLValue]) async throws -> [[SQLValue]] {
        let database = try await database()
        let results = try await mapped { try await database.query([SQLStatement(sql, parameters)]) }
        guard case .success(let outcome) = results.first else { throw APIError(.notExecuted, "accounts unavailable; retry later") }
        return outcome.rows
    }

    private func write(_ statements: [SQLStatement]) async throws -> [StatementResult] {
        do {
            return try await database().execute(statements, transaction: true)
        } catch let error as StorageError {
            throw PrimarySQLService.apiError(error)
        }
    }

    func isDropped(_ tenant: TenantID) async throws -> Bool {
        try await !rows("SELECT 1 FROM dropped_tenants WHERE name = ?", [.text(tenant.rawValue)]).isEmpty
    }

    // MARK: Authentication

    func cachedAuthentication(header: String) -> UserPrincipal? { cache[header] }

    func authenticate(_ credentials: Credentials, header: String) async throws -> UserPrincipal? {
        if let known = cache[header] { return known }
        // An account change while this runs must not be undone by caching what it read before.
        let generation = cache.generation
        if case .bearer(let id, let secret) = credentials {
            return try await authenticateToken(id: id, secret: secret, header: header, generation: generation)
        }
        guard case .basic(let user, let password) = credentials else { return nil }
        let found = try await rows("SELECT tenant, role, password FROM users WHERE name = ?", [.text(user)]).first
        let verified = try await checkPassword(password, against: found.flatMap { row in
            if case .text(let stored) = row[2] { return stored } else { return nil }
        })
        guard verified, let row = found, case .text(let tenantName) = row[0], case .text(let roleName) = row[1],
              let tenant = try? TenantID(tenantName), let role = UserRole(rawValue: roleName) else { return nil }
        guard try await !isDropped(tenant) else { return nil }
        let principal = UserPrincipal(name: user, tenant: tenant, role: role)
        cache.store(principal, for: header, ifStill: generation)
        return principal
    }

    private func authenticateToken(id: String, secret: String, header: String, generation: Int) async throws -> UserPrincipal? {
        let found = try await rows("""
            SELECT t.hash, t.expires_ms, u.name, u.tenant, u.role FROM tokens t JOIN users u ON u.name = t.user AND u.tenant = t.tenant WHERE t.id = ?
            """, [.text(id)]).first
        guard let row = found, case .text(let stored) = row[0], Tokens.verify(secret, against: stored),
              case .integer(let expiresMs) = row[1], expiresMs > Self.nowMs(),
              case .text(let user) = row[2], case .text(let tenantName) = row[3], case .text(let roleName) = row[4],
              let tenant = try? TenantID(tenantName), let role = UserRole(rawValue: roleName) else { return nil }
        guard try await !isDropped(tenant) else { return nil }
        let principal = UserPrincipal(name: user, tenant: tenant, role: role, byToken: true)
        // Not cached past its expiry: a token near its end is checked each time.
        if expiresMs - Self.nowMs() > Int64(CredentialCache.lifetimeNs / 1_000_000) {
            cache.store(principal, for: header, ifStill: generation)
        }
        return principal
    }

    /// Runs scrypt on its own small pool, bounded in what may wait for it.
    private func checkPassword(_ password: String, against stored: String?) async throws -> Bool {
        guard kdfWaiting.withLock({ waiting -> Bool in
            guard waiting < Self.kdfWaitingMax else { return false }
            waiting += 1
            return true
        }) else { throw APIError(.notExecuted, "too many logins at once; retry later") }
        defer { kdfWaiting.withLock { $0 -= 1 } }
        return try await Self.kdf.run {
            guard let stored else {
                Passwords.verifyAgainstNothing(password)
                return false
            }
            return Passwords.verify(password, against: stored)
        }
    }

    // MARK: Administration

    func createTenant(_ tenant: TenantID) async throws {
        guard try await !isDropped(tenant) else { throw APIError(.conflict, "tenant \(tenant) was dropped; its name is not reused") }
        do {
            // Nil only for a tenant being dropped on this node: it is not created, nor there.
            guard try await node.tenant(tenant, create: true) != nil else {
                throw APIError(.conflict, "tenant \(tenant) is being dropped; its name is not reused")
            }
        } catch let error as StorageError {
            throw PrimarySQLService.apiError(error)
        } catch let rejected as CommitRejected {
            throw PrimarySQLService.apiError(rejected)
        } catch let full as PrimaryNode.TenantLimitReached {
            throw APIError(.capacity, full.description)
        } catch let undecided as PrimaryNode.DropUndecided {
            throw APIError(.conflict, undecided.description)
        }
    }

    func listTenants() async throws -> [TenantID] {
        let dropped = Set(try await rows("SELECT name FROM dropped_tenants", []).compactMap { row -> String? in
            if case .text(let name) = row[0] { return name } else { return nil }
        })
        return try node.layout.existingTenants().filter { $0 != .system && !dropped.contains($0.rawValue) }
    }

    /// Drops `tenant`: its users and tokens go, its name is never used again, and its files
    /// are deleted. A tenant whose drop committed but whose files are still here (the drop's
    /// outcome was unknown, or the node stopped part-way) has them deleted now.
    func dropTenant(_ tenant: TenantID) async throws {
        guard try node.layout.existingTenants().contains(tenant) else { throw APIError(.notFound, "no such tenant") }
        let committed = try await isDropped(tenant)
        defer { cache.removeAll() }
        do {
            try await node.drop(tenant, commitDrop: committed ? nil : { try await self.commitDrop(tenant) })
        } catch let busy as NodeError {
            throw APIError(.conflict, "tenant \(tenant) cannot be dropped now: \(busy.description)")
        } catch let error as StorageError {
            throw PrimarySQLService.apiError(error)
        } catch let rejected as CommitRejected {
            throw PrimarySQLService.apiError(rejected)
        }
    }

    private func commitDrop(_ tenant: TenantID) async throws {
        let results = try await write([
            SQLStatement("INSERT OR IGNORE INTO dropped_tenants (name, dropped_ms) VALUES (?, ?)", [.text(tenant.rawValue), .integer(Self.nowMs())]),
            SQLStatement("DELETE FROM tokens WHERE tenant = ?", [.text(tenant.rawValue)]),
            SQLStatement("DELETE FROM users WHERE tenant = ?", [.text(tenant.rawValue)]),
        ])
        for case .failure(let message) in results { throw APIError(.notExecuted, "not dropped (\(message)); retry") }
    }

    /// Deletes the files of tenants whose drop committed but which are still on disk (the
    /// node stopped between the drop and the deletion, or this node was a standby when the
    /// tenant was dropped). Called when a node becomes primary, before a standby connects.
    static func removeDroppedTenants(on node: PrimaryNode) async throws {
        guard let system = node.openedTenant(.system) else { return }
        // Read only: a node that only starts has no standby to commit with. No table yet: none
        // dropped. A read that fails never keeps the node from serving: the files stay.
        let read: [StatementResult]
        do { read = try await system.database.query([SQLStatement("SELECT name FROM dropped_tenants")]) } catch {
            node.logger.error("cannot read which tenants were dropped; their files stay until the next start", metadata: ["error": "\(error)"])
            return
        }
        guard case .success(let outcome)? = read.first else { return }
        let dropped = Set(outcome.rows.compactMap { row -> TenantID? in
            guard case .text(let name) = row.first else { return nil }
            return try? TenantID(name)
        })
        for tenant in node.allTenants.map(\.id) where dropped.contains(tenant) {
            // Files that cannot be deleted now never keep the node from serving as the primary.
            do { try await node.drop(tenant, commitDrop: nil) } catch {
                node.logger.error("a dropped tenant's files could not be deleted; they stay until the next start",
                                  metadata: ["tenant": "\(tenant)", "error": "\(error)"])
            }
        }
    }

    func createUser(_ name: String, tenant: TenantID, role: UserRole, password: String) async throws {
        guard UserName.isValid(name) else { throw APIError(.badRequest, "a user name is 1...64 characters of a-z, 0-9, '.', '_', '@' or '-'") }
        guard password.utf8.count >= 12, password.utf8.count <= Passwords.lengthMax else {
            throw APIError(.badRequest, "a password has 12...\(Passwords.lengthMax) bytes")
        }
        guard try node.layout.existingTenants().contains(tenant), try await !isDropped(tenant) else { throw APIError(.notFound, "no such tenant") }
        let hashed = try await Self.kdf.run { try Passwords.hash(password) }
        let results = try await write([SQLStatement("INSERT INTO users (name, tenant, role, password, created_ms) VALUES (?, ?, ?, ?, ?)",
                                                    [.text(name), .text(tenant.rawValue), .text(role.rawValue), .text(hashed), .integer(Self.nowMs())])])
        if case .failure(let message)? = results.first {
            throw message.contains("UNIQUE") ? APIError(.conflict, "user \(name) exists") : APIError(.notExecuted, "user not created (\(message)); retry")
        }
        cache.removeAll()
    }

    func dropUser(_ name: String, tenant: TenantID) async throws {
        guard try await !rows("SELECT 1 FROM users WHERE name = ? AND tenant = ?", [.text(name), .text(tenant.rawValue)]).isEmpty else {
            throw APIError(.notFound, "no such user in tenant \(tenant)")
        }
        let results = try await write([
            SQLStatement("DELETE FROM tokens WHERE user = ? AND tenant = ?", [.text(name), .text(tenant.rawValue)]),
            SQLStatement("DELETE FROM users WHERE name = ? AND tenant = ?", [.text(name), .text(tenant.rawValue)]),
        ])
        for case .failure(let message) in results { throw APIError(.notExecuted, "user not dropped (\(message)); retry") }
        cache.removeAll()
    }

    func listUsers(tenant: TenantID) async throws -> [(name: String, role: UserRole)] {
        try await rows("SELECT name, role FROM users WHERE tenant = ? ORDER BY name", [.text(tenant.rawValue)]).compactMap { row in
            guard case .text(let name) = row[0], case .text(let role) = row[1], let r = UserRole(rawValue: role) else { return nil }
            return (name, r)
        }
    }

    func createToken(user: String, tenant: TenantID, ttlSeconds: Int) async throws -> (id: String, token: String, expiresMs: Int64) {
        guard (1...Tokens.ttlSecondsMax).contains(ttlSeconds) else {
            throw APIError(.badRequest, "ttl_seconds must be 1...\(Tokens.ttlSecondsMax) (a year)")
        }
        let made = Tokens.make()
        let now = Self.nowMs(), expiresMs = now + Int64(ttlSeconds) * 1000
        // One transaction: expired tokens go; the new one goes in only if its user exists in a
        // tenant that is not dropped (checked in the insert itself, so a drop cannot come
        // between the check and the write) and has fewer than the cap.
        let results = try await write([
            SQLStatement("DELETE FROM tokens WHERE expires_ms <= ?", [.integer(now)]),
            SQLStatement("""
                INSERT INTO tokens (id, user, tenant, hash, created_ms, expires_ms)
                SELECT ?, name, tenant, ?, ?, ? FROM users WHERE name = ? AND tenant = ?
                  AND NOT EXISTS (SELECT 1 FROM dropped_tenants WHERE name = ?)
                  AND (SELECT count(*) FROM tokens WHERE user = ? AND tenant = ?) < ?
                """, [.text(made.id), .text(made.hash), .integer(now), .integer(expiresMs), .text(user), .text(tenant.rawValue),
                      .text(tenant.rawValue), .text(user), .text(tenant.rawValue), .integer(Int64(Tokens.perUserMax))]),
        ])
        for case .failure(let message) in results { throw APIError(.notExecuted, "token not created (\(message)); retry") }
        guard case .success(let inserted)? = results.last, inserted.rowsAffected == 1 else {
            guard try await !isDropped(tenant),
                  try await !rows("SELECT 1 FROM users WHERE name = ? AND tenant = ?", [.text(user), .text(tenant.rawValue)]).isEmpty else {
                throw APIError(.notFound, "no such user in tenant \(tenant)")
            }
            throw APIError(.conflict, "user \(user) has \(Tokens.perUserMax) tokens: revoke one first")
        }
        return (made.id, made.token, expiresMs)
    }

    func listTokens(user: String, tenant: TenantID) async throws -> [(id: String, expiresMs: Int64)] {
        try await rows("SELECT id, expires_ms FROM tokens WHERE user = ? AND tenant = ? AND expires_ms > ? ORDER BY expires_ms",
                       [.text(user), .text(tenant.rawValue), .integer(Self.nowMs())]).compactMap { row in
            guard case .text(let id) = row[0], case .integer(let expires) = row[1] else { return nil }
            return (id, expires)
        }
    }

    func revokeToken(id: String, tenant: TenantID) async throws {
        let owned = "SELECT 1 FROM tokens WHERE id = ? AND tenant = ?"
        guard try await !rows(owned, [.text(id), .text(tenant.rawValue)]).isEmpty else { throw APIError(.notFound, "no such token in tenant \(tenant)") }
        let results = try await write([SQLStatement("DELETE FROM tokens WHERE id = ?", [.text(id)])])
        if case .failure(let message)? = results.first { throw APIError(.notExecuted, "token not revoked (\(message)); retry") }
        cache.removeAll()
    }

    private static func nowMs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }
}

/// Credentials verified lately, so that a client's requests cost one scrypt per minute, not one
/// each (authentication must not cost throughput). Keyed by a SHA-256 of the `Authorization`
/// header as sent, so a hit needs no parsing (no base64, no strings made; it cost 8% of
/// throughput at 32 clients when it did), and the cache holds no password. Bounded; cleared
/// whenever an account changes on this node.
final class CredentialCache: @unchecked Sendable {
    static let entriesMax = 10_000
    static let lifetimeNs: UInt64 = 60 * 1_000_000_000
    private let lock = NSLock()
    private var entries: [SHA256Digest: (principal: UserPrincipal, expiresNs: UInt64)] = [:]
    private var changes = 0

    /// Grows with every ``removeAll()`` (an account changed).
    var generation: Int { lock.withLock { changes } }

    /// Caches `principal` unless an account changed since `generation` was read.
    func store(_ principal: UserPrincipal, for header: String, ifStill generation: Int) {
        let key = Self.key(header)
        let expires = DispatchTime.now().uptimeNanoseconds + Self.lifetimeNs
        lock.withLock {
            guard changes == generation else { return }
            if entries.count >= Self.entriesMax { entries.removeAll() }
            entries[key] = (principal, expires)
        }
    }

    private static func key(_ header: String) -> SHA256Digest {
        var header = header
        return header.withUTF8 { SHA256.hash(data: $0) }
    }

    subscript(header: String) -> UserPrincipal? {
        let key = Self.key(header)
        let now = DispatchTime.now().uptimeNanoseconds
        return lock.withLock {
            guard let entry = entries[key] else { return nil }
            guard entry.expiresNs > now else { entries[key] = nil; return nil }
            return entry.principal
        }
    }

    func removeAll() {
        lock.withLock {
            entries.removeAll()
            changes += 1
        }
    }
}
