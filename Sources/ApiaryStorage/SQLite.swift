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

    /// Runs a client's statement: judged by the sandbox as tenant SQL, within `limits`.
    func runTenantSQL(_ statement: SQLStatement, limits: StatementLimits) throws -> StatementOutcome {
        sandbox.tenantSQL = true
        defer { sandbox.tenantSQL = false }
        return try run(statement.sql, statement.parameters, names: statement.parameterNames, limits: limits)
    }

    /// Runs `body` with tighter bounds for work on an event loop: at most `cpuNs` of this
    /// thread's CPU time from `started` (statements past it are interrupted), checked every
    /// `instructions`; strings and blobs of at most `lengthMax` bytes (one SQL function over a
    /// large value is one VM instruction, which no check interrupts).
    /// - Parameter started: this thread's CPU clock (``threadCPUNs()``, a system call) and the
    ///   monotonic clock, read together: a thread uses no more CPU than time passes, so the
    ///   checks read the CPU clock only once `cpuNs` of time has passed.
    func withInlineBounds<T>(cpuNs: UInt64, started: (cpu: UInt64, clock: UInt64), lengthMax: Int32, checkEvery instructions: Int32,
                             _ body: () throws -> T) rethrows -> T {
        let length = sqlite3_limit(handle, SQLITE_LIMIT_LENGTH, lengthMax)
        sandbox.checkDeadline(every: instructions, on: handle)
        sandbox.cpuDeadlineNs = started.cpu + cpuNs
        sandbox.cpuClockFromNs = started.clock + cpuNs
        defer {
            sandbox.cpuDeadlineNs = 0
            sqlite3_limit(handle, SQLITE_LIMIT_LENGTH, length)
            sandbox.checkDeadline(every: Sandbox.progressInterval, on: handle)
        }
        return try body()
    }
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
        let (statement, rest) = try prepare(sql)
        precondition(rest == nil, "execPrepared takes one statement: \(sql)")
        defer { statements.checkIn(statement, sql: sql, tenantSQL: mode) }
        let rc = sqlite3_step(statement)
        guard rc == SQLITE_DONE || rc == SQLITE_ROW else { throw lastError }
    }

    /// The first statement of `sql`, from the cache or new, and the byte offset of the SQL
    /// that follows it when there is more than whitespace and semicolons (nil otherwise). The
    /// caller MUST check a statement with no `rest` back in and finalize one with a `rest`:
    /// only SQL of a single statement is cached (its key is the whole text).
    /// - Throws: `EmptyStatement` when `sql` holds no statement at all (empty, or comments).
    private func prepare(_ sql: String) throws -> (statement: OpaquePointer, rest: Int?) {
        if let cached = statements.checkOut(sql: sql, tenantSQL: sandbox.tenantSQL) { return (cached, nil) }
        var statement: OpaquePointer?
        let rest: Int? = try sql.withCString { base in
            var tail: UnsafePointer<CChar>?
            let rc = sqlite3_prepare_v2(handle, base, -1, &statement, &tail)
            guard rc == SQLITE_OK else { throw lastError }
            guard var p = tail else { return nil }
            // Bounded by the C string's end; SQLite's tail never points before `base`.
            while p.pointee != 0 {
                switch UInt8(bitPattern: p.pointee) {
                case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\n"), UInt8(ascii: "\r"), 0x0B, 0x0C, UInt8(ascii: ";"): p += 1
                default: return base.distance(to: tail!)
                }
            }
            return nil
        }
        guard let statement else {
            // Nothing but comments or empty statements (";") before `rest`, if any.
            guard let rest, rest > 0 else { throw EmptyStatement() }
            return try prepare(String(decoding: sql.utf8.dropFirst(rest), as: UTF8.self))
        }
        return (statement, rest)
    }

    private struct EmptyStatement: Error {}

    /// Runs one entry of SQL, usually one statement, with its parameters; returns its rows and
    /// effects, within `limits`.
    ///
    /// An entry may hold several statements separated by semicolons, as rqlite's SQLite driver
    /// runs them: in order, each taking its positional parameters from where the one before
    /// stopped; the outcome is the last statement's (its rows, its changes), the time the
    /// whole entry's. Statements after the first are judged by the same authorizer.
    /// - Parameters:
    ///   - parameters: the values, in order.
    ///   - names: nil when every value is positional; otherwise one per value, "" for a
    ///     positional one, else the name the client gave it (bound to `:name`, `@name` or
    ///     `$name` in whichever statements use it; a name no statement uses is ignored).
    /// - Throws: `SQLiteError`; a statement given fewer or more positional values than it has
    ///   parameters is refused (`SQLITE_RANGE`) before it runs.
    func run(_ sql: String, _ parameters: [SQLValue] = [], names: [String]? = nil, limits: StatementLimits = .none) throws -> StatementOutcome {
        if limits.timeMs > 0 {
            sandbox.deadlineNs = monotonicNs() + UInt64(limits.timeMs) * 1_000_000
        }
        defer { sandbox.deadlineNs = 0 }
        do {
            return try runUnlimitedTime(sql, ParameterValues(values: parameters, names: names), limits: limits)
        } catch let error as SQLiteError where error.code == SQLITE_INTERRUPT {
            throw SQLiteError(code: SQLITE_INTERRUPT, message: "statement stopped: it ran longer than the limit of \(limits.timeMs) ms")
        }
    }

    private func runUnlimitedTime(_ sql: String, _ parameters: ParameterValues, limits: StatementLimits) throws -> StatementOutcome {
        let started = monotonicNs()
        let mode = sandbox.tenantSQL
        var parameters = parameters
        var outcome = StatementOutcome()
        var readOnly = true
        var text = sql
        // Each pass consumes at least one byte of `text` (`rest` > 0), so this ends.
        while true {
            let prepared: (statement: OpaquePointer, rest: Int?)
            do { prepared = try prepare(text) } catch is EmptyStatement { break } // empty SQL or only a comment
            let statement = prepared.statement
            defer {
                if prepared.rest == nil { statements.checkIn(statement, sql: text, tenantSQL: mode) } else { sqlite3_finalize(statement) }
            }
            try parameters.bind(statement, with: bind)
            outcome = try step(statement, limits: limits)
            readOnly = readOnly && outcome.isReadOnly
            guard let rest = prepared.rest, rest > 0 else { break }
            text = String(decoding: text.utf8.dropFirst(rest), as: UTF8.self)
        }
        try parameters.checkAllUsed()
        outcome.isReadOnly = readOnly
        outcome.timeNs = monotonicNs() - started
        return outcome
    }

    /// Runs one bound statement to its end, keeping its rows within `limits`.
    private func step(_ statement: OpaquePointer, limits: StatementLimits) throws -> StatementOutcome {
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
                outcome.columnTables = (0..<columns).map { sqlite3_column_table_name(statement, Int32($0)).map { String(cString: $0) } ?? "" }
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

/// The values of one entry's parameters and which of them each statement takes: the values
/// the client named go to `:name`, `@name` or `$name` wherever those appear, the others in
/// order (each statement takes as many as it has parameters left, from where the previous
/// one stopped).
struct ParameterValues {
    let values: [SQLValue]
    let names: [String]?
    /// Index in `values` of the next positional value to hand out.
    private var next = 0
    /// Parameters of the statements so far, for the error message.
    private var parameterCount = 0
    /// Named values by name (the last of a repeated name wins), built on first use.
    private var byName: [String: SQLValue]?

    init(values: [SQLValue], names: [String]?) {
        precondition(names == nil || names!.count == values.count, "one name per value: \(names!.count) for \(values.count)")
        self.values = values
        self.names = names
    }

    private var positionalCount: Int { names.map { $0.reduce(0) { $1.isEmpty ? $0 + 1 : $0 } } ?? values.count }

    /// Binds `statement`'s parameters with `bind(value, index, statement)`.
    /// - Throws: `SQLiteError(SQLITE_RANGE)` when a parameter has no value.
    mutating func bind(_ statement: OpaquePointer, with bind: (SQLValue, Int32, OpaquePointer) throws -> Void) throws {
        let count = Int(sqlite3_bind_parameter_count(statement))
        parameterCount += count
        guard count > 0 else { return }
        guard let names else {
            // All positional: the insert path's case.
            guard values.count - next >= count else { throw tooFew() }
            for i in 0..<count { try bind(values[next + i], Int32(i + 1), statement) }
            next += count
            return
        }
        if byName == nil {
            var map: [String: SQLValue] = [:]
            for (name, value) in zip(names, values) where !name.isEmpty { map[name] = value }
            byName = map
        }
        for index in 1...count {
            if let cName = sqlite3_bind_parameter_name(statement, Int32(index)),
               [UInt8(ascii: ":"), UInt8(ascii: "@"), UInt8(ascii: "$")].contains(UInt8(bitPattern: cName.pointee)),
               let value = byName?[String(cString: cName + 1)] {
                try bind(value, Int32(index), statement)
                continue
            }
            while next < values.count, !names[next].isEmpty { next += 1 }
            guard next < values.count else {
                let label = sqlite3_bind_parameter_name(statement, Int32(index)).map { String(cString: $0) } ?? "?"
                throw SQLiteError(code: SQLITE_RANGE, message: "no value for parameter \(index) (\(label)): \(positionalCount) positional values given, named ones: \(names.filter { !$0.isEmpty }.joined(separator: ", "))")
            }
            try bind(values[next], Int32(index), statement)
            next += 1
        }
    }

    /// - Throws: `SQLiteError(SQLITE_RANGE)` when positional values are left over: a client
    ///   that sends more values than parameters has a bug that running would hide.
    func checkAllUsed() throws {
        var left = next
        if let names { while left < values.count, !names[left].isEmpty { left += 1 } }
        guard left >= values.count else { throw tooFew() }
    }

    private func tooFew() -> SQLiteError {
        SQLiteError(code: SQLITE_RANGE, message: "statement has \(parameterCount) parameters, \(positionalCount) given")
    }
}

/// The monotonic clock, in nanoseconds.
func monotonicNs() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// The CPU time this thread has used: unlike the clock, it does not run while the thread
/// waits for a core (on a busy machine a read by key can take a millisecond of wall time).
func threadCPUNs() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
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
    /// Bytes of the values returned, as the result limits count them (8 a row and a number).
    public var resultBytes: Int {
        rows.reduce(0) { total, row in
            row.reduce(total + 8) { bytes, value in
                switch value {
                case .text(let s): return bytes + s.utf8.count
                case .blob(let b): return bytes + b.count
                default: return bytes + 8
                }
            }
        }
    }

    public var columns: [String] = []
    /// Declared column types, lower-cased ("" for expressions), as rqlite reports `types`.
    public var declaredTypes: [String] = []
    /// The table each column comes from ("" for expressions), for rqlite's `qualify_columns`;
    /// nil in results stored before it was kept (idempotency keys).
    public var columnTables: [String]?
    public var rows: [[SQLValue]] = []
    public var rowsAffected = 0
    public var lastInsertID: Int64 = 0
    public var isReadOnly = true
    /// How long the statement ran, in nanoseconds (rqlite's per-result `time`). Not part of
    /// what the statement did: outcomes compare equal whatever it is.
    public var timeNs: UInt64 = 0
    /// The position of the commit that holds the statement's write, as the commit's sink gave
    /// it (the tenant's lsn on a primary: rqlite's `raft_index`); nil for a statement that
    /// committed nothing, and in results kept with an idempotency key (stored before the
    /// commit has a position). Not part of what the statement did, as `timeNs`.
    public var commitPosition: UInt64?
    public init() {}

    public static func == (a: StatementOutcome, b: StatementOutcome) -> Bool {
        a.columns == b.columns && a.declaredTypes == b.declaredTypes && a.rows == b.rows
            && a.rowsAffected == b.rowsAffected && a.lastInsertID == b.lastInsertID && a.isReadOnly == b.isReadOnly
    }
}

extension DatabaseFile {
    /// The text in the first column of each row `sql` returns from the database file at
    /// `path`, which nothing writes while this runs and which has no WAL content (a standby's,
    /// as it starts: its applies write pages into the file itself). Opened immutable: no
    /// locks, no `-wal` or `-shm` files made. Not tenant SQL: the caller's own statement.
    public static func texts(_ sql: String, from path: String) throws -> [String] {
        var db: OpaquePointer?
        let uri = "file:" + (path.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? path) + "?immutable=1"
        let rc = sqlite3_open_v2(uri, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, nil)
        defer { sqlite3_close_v2(db) }
        guard rc == SQLITE_OK, let db else {
            throw SQLiteError(code: rc, message: "cannot open \(path) to read: \(db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory")")
        }
        var statement: OpaquePointer?
        guard sqlite3_prepare_v2(db, sql, -1, &statement, nil) == SQLITE_OK else {
            throw SQLiteError(code: sqlite3_errcode(db), message: String(cString: sqlite3_errmsg(db)))
        }
        defer { sqlite3_finalize(statement) }
        var texts: [String] = []
        while true {
            let step = sqlite3_step(statement)
            guard step == SQLITE_ROW else {
                guard step == SQLITE_DONE else { throw SQLiteError(code: step, message: String(cString: sqlite3_errmsg(db))) }
                return texts
            }
            if let text = sqlite3_column_text(statement, 0) { texts.append(String(cString: text)) }
        }
    }
}
