import CApiaryVFS
import CSQLite
#if canImport(Glibc)
import Glibc
#endif

/// The sandbox for tenant SQL (DESIGN §4): tenant statements MUST NOT escape their database,
/// reach into the process, or break the writer's transaction structure. Apiary's own SQL
/// (savepoints, pragmas, checkpoints) runs with `tenantSQL` off.
///
/// Three layers, so that one mistake does not open everything:
/// - the connection is hardened once (`harden`): defensive mode, untrusted schema, no FTS3
///   tokenizer interface, no extension loading, `sqlite3_limit`s (no ATTACH at all);
/// - the authorizer allows only listed functions, pragmas and virtual-table modules, and no
///   TEMP objects, transaction control, ATTACH or DETACH (deny-lists miss what the next
///   SQLite build turns on; Debian's turns on the FTS3 tokenizer interface, whose
///   `fts3_tokenizer()` hands out and accepts raw function pointers);
/// - a deadline per statement, checked by SQLite's progress handler.
final class Sandbox {
    /// True while a tenant's statement is being prepared or run on the connection.
    var tenantSQL = false
    /// Monotonic deadline (ns) of the running statement; 0 = none. Checked by SQLite's
    /// progress handler, which interrupts the statement past it (a runaway query must not
    /// hold a writer or a reader forever, invariant 8).
    var deadlineNs: UInt64 = 0
    /// Interrupt past this much of the thread's CPU time (`threadCPUNs`); 0: never. For reads
    /// on an event loop.
    var cpuDeadlineNs: UInt64 = 0
    /// The monotonic clock before which the CPU deadline cannot have passed (the thread's CPU
    /// clock is a system call; the monotonic clock is not).
    var cpuClockFromNs: UInt64 = 0
    /// Functions allowed beyond `allowedFunctions` (lower-case names): a test seam for SQL
    /// functions that tests register on a connection (latches); empty in production.
    var extraAllowedFunctions: Set<String> = []

    // MARK: What tenant SQL may use

    /// Pragmas a tenant may use: schema introspection only. Everything else (journal_mode,
    /// synchronous, writable_schema, …) could break durability or capture.
    static let allowedPragmas: Set<String> = [
        "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
        "foreign_key_list", "foreign_key_check", "user_version", "application_id", "integrity_check", "quick_check",
    ]

    /// Pragmas a tenant may read but not set. SQLite's own modules read some of them while a
    /// tenant creates a virtual table (R*Tree and FTS3 read `page_size`, FTS5 `data_version`),
    /// under the tenant's authorizer; ORMs read others when they connect.
    static let readablePragmas: Set<String> = [
        "page_size", "data_version", "encoding", "foreign_keys", "read_uncommitted", "page_count", "freelist_count",
        "schema_version",
    ]

    /// SQL functions a tenant may call: SQLite's core, date, math, JSON, window and full-text
    /// functions, which compute from their arguments alone. Left out on purpose:
    /// `load_extension`, `fts3_tokenizer` and `fts5` (pointers into the process),
    /// `sqlite_compileoption_*` (the build's options), `sqlite_log` (writes the process's log),
    /// `rtreenode`/`rtreedepth` (debugging aids that parse raw node blobs), and anything a
    /// future SQLite build adds until it is listed here.
    static let allowedFunctions: Set<String> = [
        // Core scalar functions.
        "abs", "changes", "char", "coalesce", "format", "glob", "hex", "ifnull", "iif", "instr",
        "last_insert_rowid", "length", "like", "likelihood", "likely", "lower", "ltrim", "max",
        "min", "nullif", "printf", "quote", "random", "randomblob", "replace", "round", "rtrim",
        "sign", "soundex", "sqlite_source_id", "sqlite_version", "substr", "substring",
        "total_changes", "trim", "typeof", "unhex", "unicode", "unlikely", "upper", "zeroblob",
        // Date and time.
        "date", "time", "datetime", "julianday", "strftime", "unixepoch", "timediff",
        "current_date", "current_time", "current_timestamp",
        // Aggregates and window functions.
        "avg", "count", "group_concat", "string_agg", "sum", "total",
        "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead",
        "first_value", "last_value", "nth_value",
        // Math.
        "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "ceil", "ceiling", "cos",
        "cosh", "degrees", "exp", "floor", "ln", "log", "log10", "log2", "mod", "pi", "pow",
        "power", "radians", "sin", "sinh", "sqrt", "tan", "tanh", "trunc",
        // JSON (the operators -> and ->> are functions by those names).
        "json", "json_array", "json_array_length", "json_extract", "json_insert", "json_object",
        "json_patch", "json_quote", "json_remove", "json_replace", "json_set", "json_type",
        "json_valid", "json_group_array", "json_group_object", "->", "->>",
        // Full-text search and R*Tree auxiliary functions.
        "match", "snippet", "offsets", "matchinfo", "optimize", "highlight", "bm25", "rtreecheck",
        // What ALTER TABLE runs inside its own nested SQL (RENAME TO, RENAME COLUMN, DROP
        // COLUMN). They are SQLite-internal: a tenant calling one gets "no such function".
        "sqlite_rename_table", "sqlite_rename_column", "sqlite_rename_test", "sqlite_rename_quotefix", "sqlite_drop_column",
    ]

    /// Virtual-table modules a tenant may create tables with: full-text search and R*Trees.
    /// (Not `fts3tokenize`, the tokenizer interface's window, nor any module a build adds.)
    static let allowedModules: Set<String> = ["fts3", "fts4", "fts4aux", "fts5", "fts5vocab", "rtree", "rtree_i32"]

    // MARK: Connection limits (sqlite3_limit)

    /// Per-connection limits, each far below the distribution build's (which allows, for
    /// example, 1 GB strings and 250,000 parameters). `attached` is 0: no ATTACH, and with
    /// it no VACUUM (both VACUUM and VACUUM INTO attach a database), so no statement can
    /// open or write another file.
    static let connectionLimits: [(id: Int32, value: Int32)] = [
        (SQLITE_LIMIT_LENGTH, 32 << 20),            // a string, blob or row: 32 MiB
        (SQLITE_LIMIT_SQL_LENGTH, 1 << 20),         // one statement's text: 1 MiB
        (SQLITE_LIMIT_COLUMN, 1_000),
        (SQLITE_LIMIT_EXPR_DEPTH, 500),             // parser and walkers recurse per level
        (SQLITE_LIMIT_COMPOUND_SELECT, 50),         // multi-row VALUES is not counted
        (SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1_000),
        (SQLITE_LIMIT_VARIABLE_NUMBER, 32_766),     // SQLite's own default since 3.32
        (SQLITE_LIMIT_TRIGGER_DEPTH, 32),           // recursive triggers are on in Debian's build
        (SQLITE_LIMIT_ATTACHED, 0),
    ]

    /// VM instructions between two looks at the deadline.
    static let progressInterval: Int32 = 1000

    /// Has SQLite interrupt a statement on `db` past ``deadlineNs``, looking every `instructions`.
    func checkDeadline(every instructions: Int32, on db: OpaquePointer) {
        sqlite3_progress_handler(db, instructions, { context in
            guard let context else { return 0 }
            let sandbox = Unmanaged<Sandbox>.fromOpaque(context).takeUnretainedValue()
            if sandbox.deadlineNs != 0 && monotonicNs() > sandbox.deadlineNs { return 1 }
            guard sandbox.cpuDeadlineNs != 0, monotonicNs() > sandbox.cpuClockFromNs else { return 0 }
            return threadCPUNs() > sandbox.cpuDeadlineNs ? 1 : 0
        }, Unmanaged.passUnretained(self).toOpaque())
    }

    /// Hardens `db` and installs the progress handler and the authorizer.
    /// - Throws: `SQLiteError` when SQLite refuses a hardening setting; the connection MUST
    ///   then not be used for tenant SQL.
    func install(on db: OpaquePointer) throws {
        let rc = apiary_harden_connection(db)
        guard rc == SQLITE_OK else {
            throw SQLiteError(code: rc, message: "cannot harden the connection (SQLite refused a defensive setting)")
        }
        for limit in Self.connectionLimits {
            sqlite3_limit(db, limit.id, limit.value)
            guard sqlite3_limit(db, limit.id, -1) <= limit.value else {
                throw SQLiteError(code: SQLITE_ERROR, message: "cannot limit the connection (limit \(limit.id))")
            }
        }
        checkDeadline(every: Self.progressInterval, on: db)
        let context = Unmanaged.passUnretained(self).toOpaque()
        sqlite3_set_authorizer(db, { context, action, arg1, arg2, database, _ in
            guard let context else { return SQLITE_DENY }
            let sandbox = Unmanaged<Sandbox>.fromOpaque(context).takeUnretainedValue()
            return sandbox.decide(action: action, arg1: arg1, arg2: arg2, database: database)
        }, context)
    }

    /// The authorizer's verdict. The callback's string arguments depend on the action
    /// (SQLite's "Authorizer Action Codes" table): for `SQLITE_FUNCTION` the name is the
    /// SECOND string (the first is NULL); for `SQLITE_PRAGMA` the pragma is the first; for
    /// `SQLITE_CREATE_VTABLE` the module is the second; for `SQLITE_READ` the table is the first;
    /// the third is the database (`main`, `temp`) where the action has one.
    func decide(action: Int32, arg1: UnsafePointer<CChar>?, arg2: UnsafePointer<CChar>?, database: UnsafePointer<CChar>?) -> Int32 {
        guard tenantSQL else { return SQLITE_OK }
        // `CREATE TABLE temp.x` is authorized as SQLITE_CREATE_TABLE in database "temp". Only
        // reading introspection pragmas of it is allowed (ORMs such as SQLAlchemy look there
        // for a table that main lacks): it is always empty, no TEMP object can be made.
        // ALTER TABLE reads and updates temp's schema table too (to fix up temp triggers that
        // name the table; there are none, and defensive mode keeps tenants' own UPDATEs of a
        // schema table out anyway).
        if let database, strcmp(database, "temp") == 0 {
            let readsTempSchema = (action == SQLITE_READ || action == SQLITE_UPDATE)
                && arg1.map { strcmp($0, "sqlite_temp_master") == 0 || strcmp($0, "sqlite_temp_schema") == 0 } == true
            let introspects = action == SQLITE_PRAGMA && (arg2 == nil || Self.allowedPragmas.contains(Self.lowercased(arg1)))
            guard readsTempSchema || introspects else { return SQLITE_DENY }
        }
        // Apiary's own tables (idempotency keys, `Idempotency`): only Apiary reads, writes,
        // drops, alters, indexes or hangs triggers on them. The table is the callback's first
        // string for reads, writes, CREATE and DROP TABLE; its second for indexes, triggers and
        // ALTER TABLE (whose first is the database).
        switch action {
        case SQLITE_CREATE_INDEX, SQLITE_DROP_INDEX, SQLITE_CREATE_TRIGGER, SQLITE_DROP_TRIGGER, SQLITE_ALTER_TABLE:
            if Self.isApiaryTable(arg2) { return SQLITE_DENY }
        default:
            if Self.isApiaryTable(arg1) { return SQLITE_DENY }
        }
        switch action {
        case SQLITE_TRANSACTION, SQLITE_SAVEPOINT, SQLITE_ATTACH, SQLITE_DETACH:
            return SQLITE_DENY
        case SQLITE_CREATE_TEMP_TABLE, SQLITE_CREATE_TEMP_INDEX, SQLITE_CREATE_TEMP_TRIGGER, SQLITE_CREATE_TEMP_VIEW,
             SQLITE_DROP_TEMP_TABLE, SQLITE_DROP_TEMP_INDEX, SQLITE_DROP_TEMP_TRIGGER, SQLITE_DROP_TEMP_VIEW:
            // TEMP objects live on one connection only: not replicated, gone after a failover,
            // and on a reader they would leak from one request into the next.
            return SQLITE_DENY
        case SQLITE_PRAGMA:
            // The second argument is the value being set, NULL for a read.
            let pragma = Self.lowercased(arg1)
            if Self.allowedPragmas.contains(pragma) { return SQLITE_OK }
            return arg2 == nil && Self.readablePragmas.contains(pragma) ? SQLITE_OK : SQLITE_DENY
        case SQLITE_FUNCTION:
            let name = Self.lowercased(arg2)
            return Self.allowedFunctions.contains(name) || extraAllowedFunctions.contains(name) ? SQLITE_OK : SQLITE_DENY
        case SQLITE_CREATE_VTABLE, SQLITE_DROP_VTABLE:
            return Self.allowedModules.contains(Self.lowercased(arg2)) ? SQLITE_OK : SQLITE_DENY
        case SQLITE_READ:
            guard let arg1 else { return SQLITE_OK }
            // The statement virtual table lists the connection's prepared statements.
            if strcmp(arg1, "sqlite_stmt") == 0 { return SQLITE_DENY }
            // Table-valued pragmas (`SELECT * FROM pragma_compile_options`) follow the pragma
            // list. The authorizer cannot tell them from a tenant table named `pragma_…`
            // (such a table would be unreadable unless its suffix is a listed pragma): a rare
            // name, and the mistake refuses, never allows.
            if strncmp(arg1, "pragma_", 7) == 0 {
                return Self.allowedPragmas.contains(String(cString: arg1 + 7).lowercased()) ? SQLITE_OK : SQLITE_DENY
            }
            return SQLITE_OK
        default:
            return SQLITE_OK
        }
    }

    /// Tables named `_apiary…` (case-insensitive, as SQLite's names are) belong to Apiary.
    private static func isApiaryTable(_ name: UnsafePointer<CChar>?) -> Bool {
        guard let name else { return false }
        return strncasecmp(name, "_apiary", 7) == 0
    }

    private static func lowercased(_ string: UnsafePointer<CChar>?) -> String {
        string.map { String(cString: $0).lowercased() } ?? ""
    }
}
