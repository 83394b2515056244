import CApiaryVFS
import CSQLite
#if canImport(Glibc)
import Glibc
#endif

/// A value in or out of SQLite, with SQLite's five storage classes.
public enum SQLValue: Hashable, Sendable, Codable {
    case null
    case integer(Int64)
    case real(Double)
    case text(String)
    case blob([UInt8])
}

/// An SQLite error as the caller sees it: the result code and SQLite's message.
public struct SQLiteError: Error, CustomStringConvertible, Equatable {
    public let code: Int32
    public let message: String
    public init(code: Int32, message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { message }
}

/// Prepared statements of one connection, least recently used dropped first (bounded).
struct StatementCache {
    private struct Key: Hashable { var sql: String; var tenantSQL: Bool }
    private var entries: [Key: (statement: OpaquePointer, used: UInt64)] = [:]
    private var clock: UInt64 = 0
    static let statementsMax = 64
    /// Longer SQL is prepared each time: rarely repeated, and it would pin memory.
    static let sqlBytesMax = 4096

    /// Takes the statement out (so that a nested use prepares its own), reset and unbound.
    mutating func checkOut(sql: String, tenantSQL: Bool) -> OpaquePointer? {
        entries.removeValue(forKey: Key(sql: sql, tenantSQL: tenantSQL))?.statement
    }

    /// Resets the statement (ending any read it holds open) and keeps it, or finalizes it.
    mutating func checkIn(_ statement: OpaquePointer, sql: String, tenantSQL: Bool) {
        sqlite3_reset(statement)
        sqlite3_clear_bindings(statement)
        let key = Key(sql: sql, tenantSQL: tenantSQL)
        guard sql.utf8.count <= Self.sqlBytesMax, entries[key] == nil else { sqlite3_finalize(statement); return }
        if entries.count >= Self.statementsMax, let oldest = entries.min(by: { $0.value.used < $1.value.used }) {
            sqlite3_finalize(oldest.value.statement)
            entries.removeValue(forKey: oldest.key)
        }
        clock += 1
        entries[key] = (statement, clock)
    }

    mutating func finalizeAll() {
        for entry in entries.values { sqlite3_finalize(entry.statement) }
        entries.removeAll()
    }
}

/// One SQLite connection. Not thread-safe: exactly one thread uses it at a time
/// (a tenant's writer thread, or a reader checked out of the pool).
final class SQLiteConnection {
    let handle: OpaquePointer
    let path: String
    /// Decides what tenant SQL may do on this connection.
    let sandbox = Sandbox()
    /// Prepared statements kept for reuse: a single-row insert spends about as long in
    /// `sqlite3_prepare_v2` as in running. Keyed by the sandbox mode too, because the
    /// authorizer judges a statement when it is prepared (and SQLite re-prepares, re-judged,
    /// after a schema change).
    private var statements = StatementCache()

    /// Opens `path` through Apiary's VFS.
    init(path: String, readOnly: Bool) throws {
        try StorageVFS.registerOnce()
        var db: OpaquePointer?
        let flags = readOnly
            ? SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX
            : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX
        let rc = sqlite3_open_v2(path, &db, flags, APIARY_VFS_NAME)
        guard rc == SQLITE_OK, let db else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            if let db { sqlite3_close_v2(db) }
            throw SQLiteError(code: rc, message: "cannot open database: \(message)")
        }
        handle = db
        self.path = path
        sqlite3_extended_result_codes(db, 1)
        try sandbox.install(on: db) // on a throw, deinit closes the handle
    }

    deinit {
        statements.finalizeAll()
        sqlite3_close_v2(handle)
    }

    var lastError: SQLiteError {
        SQLiteError(code: sqlite3_extended_errcode(handle), message: String(cString: sqlite3_errmsg(handle)))
    }

    /// Runs Apiary's own SQL that returns no rows we need (pragmas, checkpoints, VACUUM).
    /// The sandbox allows no attached database (`Sandbox.connectionLimits`), but VACUUM attaches
    /// a temporary one internally: Apiary's own SQL may, for as long as it runs.
    func exec(_ sql: String) throws {
        let lifted = !sandbox.tenantSQL
        if lifted { sqlite3_limit(handle, SQLITE_LIMIT_ATTACHED, 1) }
        defer { if lifted { sqlite3_limit(handle, SQLITE_LIMIT_ATTACHED, 0) } }
        let rc = sqlite3_exec(handle, sql, nil, nil, nil)
        guard rc == SQLITE_OK else { throw lastError }
    }

    /// Runs one fixed statement that returns no rows (savepoints), prepared once.
    func execPrepared(_ sql: String) throws {
        let mode = sandbox.tenantSQL
        let statement = try prepare(sql)
        defer { statements.checkIn(statement, sql: sql, tenantSQL: mode) }
        let rc = sqlite3_step(statement)
        guard rc == SQLITE_DONE || rc == SQLITE_ROW else { throw lastError }
    }

    /// A prepared statement for `sql`, from the cache or new; the caller MUST check it back in.
    private func prepare(_ sql: String) throws -> OpaquePointer {
        if let cached = statements.checkOut(sql: sql, tenantSQL: sandbox.tenantSQL) { return cached }
        var statement: OpaquePointer?
        var tail: UnsafePointer<CChar>?
        let rc = sqlite3_prepare_v2(handle, sql, -1, &statement, &tail)
        guard rc == SQLITE_OK else { throw lastError }
        guard let statement else { throw EmptyStatement() }
        if let tail, tail.pointee != 0, !String(cString: tail).allSatisfy({ $0.isWhitespace || $0 == ";" }) {
            sqlite3_finalize(statement)
            throw SQLiteError(code: SQLITE_ERROR, message: "one statement per entry: found more SQL after the first statement")
        }
        return statement
    }

    private struct EmptyStatement: Error {}

    /// Runs one statement with positional parameters; returns its rows and effects, within `limits`.
    func run(_ sql: String, _ parameters: [SQLValue] = [], limits: StatementLimits = .none) throws -> StatementOutcome {
        if limits.timeMs > 0 {
            sandbox.deadlineNs = monotonicNs() + UInt64(limits.timeMs) * 1_000_000
        }
        defer { sandbox.deadlineNs = 0 }
        do {
            return try runUnlimitedTime(sql, parameters, limits: limits)
        } catch let error as SQLiteError where error.code == SQLITE_INTERRUPT {
            throw SQLiteError(code: SQLITE_INTERRUPT, message: "statement stopped: it ran longer than the limit of \(limits.timeMs) ms")
        }
    }

    private func runUnlimitedTime(_ sql: String, _ parameters: [SQLValue], limits: StatementLimits) throws -> StatementOutcome {
        let mode = sandbox.tenantSQL
        let statement: OpaquePointer
        do { statement = try prepare(sql) } catch is EmptyStatement { return StatementOutcome() } // empty SQL or only a comment
        defer { statements.checkIn(statement, sql: sql, tenantSQL: mode) }
        let expected = Int(sqlite3_bind_parameter_count(statement))
        guard expected == parameters.count else {
            throw SQLiteError(code: SQLITE_RANGE, message: "statement has \(expected) parameters, \(parameters.count) given")
        }
        for (i, value) in parameters.enumerated() { try bind(value, at: Int32(i + 1), in: statement) }

        var outcome = StatementOutcome()
        var resultBytes = 0
        var columns = 0
        var first = true
        while true {
            let step = sqlite3_step(statement)
            if first, step == SQLITE_ROW || step == SQLITE_DONE {
                // After the first step: a cached statement that SQLite re-prepared for a changed
                // schema describes its columns correctly only from then on.
                first = false
                columns = Int(sqlite3_column_count(statement))
                outcome.columns = (0..<columns).map { sqlite3_column_name(statement, Int32($0)).map { String(cString: $0) } ?? "" }
                outcome.declaredTypes = (0..<columns).map { sqlite3_column_decltype(statement, Int32($0)).map { String(cString: $0).lowercased() } ?? "" }
            }
            if step == SQLITE_DONE { break }
            guard step == SQLITE_ROW else { throw lastError }
            guard outcome.rows.count < limits.rowsMax else {
                throw SQLiteError(code: SQLITE_TOOBIG, message: "result has more than \(limits.rowsMax) rows; add a LIMIT")
            }
            let row = (0..<columns).map { column(Int32($0), of: statement) }
            resultBytes += row.reduce(8) { total, value in
                switch value {
                case .text(let s): return total + s.utf8.count
                case .blob(let b): return total + b.count
                default: return total + 8
                }
            }
            guard resultBytes <= limits.resultBytesMax else {
                throw SQLiteError(code: SQLITE_TOOBIG, message: "result larger than \(limits.resultBytesMax) bytes; add a LIMIT")
            }
            outcome.rows.append(row)
        }
        outcome.rowsAffected = Int(sqlite3_changes64(handle))
        outcome.lastInsertID = sqlite3_last_insert_rowid(handle)
        outcome.isReadOnly = sqlite3_stmt_readonly(statement) != 0
        return outcome
    }

    private func bind(_ value: SQLValue, at index: Int32, in statement: OpaquePointer) throws {
        let rc: Int32
        switch value {
        case .null: rc = sqlite3_bind_null(statement, index)
        case .integer(let v): rc = sqlite3_bind_int64(statement, index, v)
        case .real(let v): rc = sqlite3_bind_double(statement, index, v)
        case .text(let s):
            let count = Int32(s.utf8.count)
            rc = s.withCString { apiary_bind_text(statement, index, $0, count) }
        case .blob(let bytes):
            rc = bytes.withUnsafeBytes { apiary_bind_blob(statement, index, $0.baseAddress ?? UnsafeRawPointer(bitPattern: 1), Int32(bytes.count)) }
        }
        guard rc == SQLITE_OK else { throw lastError }
    }

    private func column(_ i: Int32, of statement: OpaquePointer) -> SQLValue {
        switch sqlite3_column_type(statement, i) {
        case SQLITE_INTEGER: return .integer(sqlite3_column_int64(statement, i))
        case SQLITE_FLOAT: return .real(sqlite3_column_double(statement, i))
        case SQLITE_TEXT:
            let count = Int(sqlite3_column_bytes(statement, i))
            guard let p = sqlite3_column_text(statement, i) else { return .text("") }
            return .text(String(decoding: UnsafeBufferPointer(start: p, count: count), as: UTF8.self))
        case SQLITE_BLOB:
            let count = Int(sqlite3_column_bytes(statement, i))
            guard count > 0, let p = sqlite3_column_blob(statement, i) else { return .blob([]) }
            return .blob(Array(UnsafeRawBufferPointer(start: p, count: count)))
        default: return .null
        }
    }

    /// A single integer from a pragma or query.
    func scalar(_ sql: String) throws -> Int64 {
        let outcome = try run(sql)
        guard let first = outcome.rows.first?.first, case .integer(let v) = first else {
            throw SQLiteError(code: SQLITE_ERROR, message: "expected an integer from \(sql)")
        }
        return v
    }
}

/// The monotonic clock, in nanoseconds.
func monotonicNs() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Bounds on one tenant statement (invariant 8).
public struct StatementLimits: Sendable, Equatable {
    public var rowsMax: Int
    public var resultBytesMax: Int
    /// Run time at most, in milliseconds; 0 = unlimited (Apiary's own statements).
    public var timeMs: Int
    public init(rowsMax: Int, resultBytesMax: Int, timeMs: Int) {
        self.rowsMax = rowsMax
        self.resultBytesMax = resultBytesMax
        self.timeMs = timeMs
    }
    public static let none = StatementLimits(rowsMax: .max, resultBytesMax: .max, timeMs: 0)
}

/// What one statement did.
public struct StatementOutcome: Sendable, Equatable, Codable {
    public var columns: [String] = []
    /// Declared column types, lower-cased ("" for expressions), as rqlite reports `types`.
    public var declaredTypes: [String] = []
    public var rows: [[SQLValue]] = []
    public var rowsAffected = 0
    public var lastInsertID: Int64 = 0
    public var isReadOnly = true
    public init() {}
}
