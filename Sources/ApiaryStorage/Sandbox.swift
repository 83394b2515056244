import CSQLite

/// The sandbox for tenant SQL (DESIGN §4): tenant statements MUST NOT escape their database
/// or the writer's transaction structure. Apiary's own SQL (savepoints, pragmas) runs with
/// `tenantSQL` off.
final class Sandbox {
    /// True while a tenant's statement is being prepared or run on the connection.
    var tenantSQL = false
    /// Monotonic deadline (ns) of the running statement; 0 = none. Checked by SQLite's
    /// progress handler, which interrupts the statement past it (a runaway query must not
    /// hold a writer or a reader forever, invariant 8).
    var deadlineNs: UInt64 = 0

    /// Pragmas a tenant may use: schema introspection only. Everything else (journal_mode,
    /// synchronous, writable_schema, …) could break durability or capture.
    static let allowedPragmas: Set<String> = [
        "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
        "foreign_key_list", "foreign_key_check", "user_version", "application_id", "integrity_check", "quick_check",
    ]

    func install(on db: OpaquePointer) {
        let context = Unmanaged.passUnretained(self).toOpaque()
        sqlite3_progress_handler(db, 1000, { context in
            guard let context else { return 0 }
            let sandbox = Unmanaged<Sandbox>.fromOpaque(context).takeUnretainedValue()
            return sandbox.deadlineNs != 0 && monotonicNs() > sandbox.deadlineNs ? 1 : 0
        }, context)
        sqlite3_set_authorizer(db, { context, action, arg1, _, _, _ in
            guard let context else { return SQLITE_OK }
            let authorizer = Unmanaged<Sandbox>.fromOpaque(context).takeUnretainedValue()
            return authorizer.decide(action: action, arg1: arg1.map { String(cString: $0) })
        }, context)
    }

    private func decide(action: Int32, arg1: String?) -> Int32 {
        guard tenantSQL else { return SQLITE_OK }
        switch action {
        case SQLITE_TRANSACTION, SQLITE_SAVEPOINT, SQLITE_ATTACH, SQLITE_DETACH:
            return SQLITE_DENY
        case SQLITE_PRAGMA:
            return Self.allowedPragmas.contains(arg1?.lowercased() ?? "") ? SQLITE_OK : SQLITE_DENY
        case SQLITE_FUNCTION:
            return arg1?.lowercased() == "load_extension" ? SQLITE_DENY : SQLITE_OK
        default:
            return SQLITE_OK
        }
    }
}
