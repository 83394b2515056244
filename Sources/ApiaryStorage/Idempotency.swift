import CSQLite
import Foundation

/// Idempotency keys of one tenant (DESIGN §3): each key with its request's results, in the
/// tenant's own database, written in the same transaction as the request's writes, so the
/// two are durable, replicated and visible together: a retry after a timeout or a failover
/// finds the key exactly when the first try's writes exist.
///
/// The table is Apiary's, not the tenant's: tenant SQL may not touch it (the sandbox refuses
/// it by name). Keys expire after `lifetimeMs`; past `keysMax` the oldest go first. Writer
/// thread only.
struct Idempotency {
    static let table = "_apiary_idempotency"
    static let keyBytesMax = 256

    let lifetimeMs: Int64
    let keysMax: Int
    private var storedSinceTrim = 0

    init(lifetimeMs: Int64, keysMax: Int) {
        self.lifetimeMs = lifetimeMs
        self.keysMax = keysMax
    }

    /// What the key's first request was (its fingerprint) and what it got, as stored. Keys
    /// stored before fingerprints were kept decode as a bare array and have none.
    struct Stored: Codable {
        var fingerprint: UInt64?
        var results: [StatementResult]
    }

    /// What a key's lookup found.
    enum Found {
        /// The same request ran before: answer with its results.
        case repeated([StatementResult])
        /// The key came with another request: refuse it, run nothing (a client reusing a key
        /// for new work would otherwise get an old answer for work never done).
        case otherRequest
    }

    /// The key's first request, if the key is kept and unexpired.
    mutating func lookUp(_ key: String, fingerprint: UInt64, on connection: SQLiteConnection) throws -> Found? {
        try ensureTable(connection)
        let rows = try connection.run("SELECT results FROM \(Self.table) WHERE key = ? AND expires_ms > ?",
                                      [.text(key), .integer(Self.nowMs())]).rows
        guard case .blob(let bytes)? = rows.first?.first else { return nil }
        let data = Data(bytes)
        let stored: Stored
        if let current = try? Self.decoder.decode(Stored.self, from: data) {
            stored = current
        } else {
            stored = Stored(fingerprint: nil, results: try Self.decoder.decode([StatementResult].self, from: data))
        }
        if let first = stored.fingerprint, first != fingerprint { return .otherRequest }
        return .repeated(stored.results)
    }

    /// A request's identity for its key: its statements, parameters and transaction flag
    /// (FNV-1a, 64 bits: an accidental collision is out of reach; the key already names the
    /// request, this only catches a client reusing it for other work).
    static func fingerprint(_ statements: [SQLStatement], transaction: Bool) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ bytes: some Sequence<UInt8>) { for b in bytes { hash = (hash ^ UInt64(b)) &* 0x100_0000_01b3 } }
        func mix(_ text: String) { mix(text.utf8); mix([0]) }
        mix(transaction ? "t" : "-")
        for s in statements {
            mix(s.sql)
            for (i, p) in s.parameters.enumerated() {
                mix(s.parameterNames?[i] ?? "")
                switch p {
                case .null: mix("n")
                case .integer(let v): mix("i\(v)")
                case .real(let v): mix("r\(v.bitPattern)")
                case .text(let v): mix("s"); mix(v)
                case .blob(let v): mix("b\(v.count)"); mix(v)
                }
            }
            mix([1])
        }
        return hash
    }

    /// Stores the key with `results` (in the caller's transaction), and now and then drops
    /// expired keys and the oldest past `keysMax`.
    mutating func remember(_ key: String, fingerprint: UInt64, results: [StatementResult], on connection: SQLiteConnection) throws {
        try ensureTable(connection)
        let encoded = try Self.encoder.encode(Stored(fingerprint: fingerprint, results: results))
        let now = Self.nowMs()
        _ = try connection.run("INSERT OR REPLACE INTO \(Self.table) (key, results, expires_ms) VALUES (?, ?, ?)",
                               [.text(key), .blob(Array(encoded)), .integer(now + lifetimeMs)])
        // Expired keys go a few at a time with each new one: bounded work per request.
        _ = try connection.run("DELETE FROM \(Self.table) WHERE key IN (SELECT key FROM \(Self.table) WHERE expires_ms <= ? LIMIT 16)",
                               [.integer(now)])
        storedSinceTrim += 1
        if storedSinceTrim >= max(1, keysMax / 100) {
            storedSinceTrim = 0
            let count = try connection.scalar("SELECT count(*) FROM \(Self.table)")
            if count > keysMax {
                _ = try connection.run("DELETE FROM \(Self.table) WHERE key IN (SELECT key FROM \(Self.table) ORDER BY expires_ms LIMIT ?)",
                                       [.integer(count - Int64(keysMax))])
            }
        }
    }

    /// Every time, not once: a table made in a transaction that then failed to commit is gone
    /// (the statements are prepared once and do nothing when the table exists).
    private func ensureTable(_ connection: SQLiteConnection) throws {
        _ = try connection.run("CREATE TABLE IF NOT EXISTS \(Self.table) (key TEXT PRIMARY KEY, results BLOB NOT NULL, expires_ms INTEGER NOT NULL)")
        _ = try connection.run("CREATE INDEX IF NOT EXISTS \(Self.table)_expiry ON \(Self.table) (expires_ms)")
    }

    static func nowMs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }

    // A result may hold an infinite real (SQLite's 1e999): JSON has no such number, and a key
    // whose results could not be stored made its request fail. Kept as strings instead.
    private static let floats = (positive: "+Infinity", negative: "-Infinity", nan: "NaN")
    static var encoder: JSONEncoder {
        let e = JSONEncoder()
        e.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: floats.positive, negativeInfinity: floats.negative, nan: floats.nan)
        return e
    }
    static var decoder: JSONDecoder {
        let d = JSONDecoder()
        d.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: floats.positive, negativeInfinity: floats.negative, nan: floats.nan)
        return d
    }
}
