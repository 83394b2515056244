import ApiaryCore
import ApiaryMonitor
import CSQLite
import Foundation

/// The monitor's durable state in its own SQLite file (DESIGN §6): the formation, the epoch,
/// the nodes and the whole event history, each event stamped with the wall-clock time it was
/// persisted. One transaction per ``StateChange``, `synchronous=FULL`: `save` returns only once
/// the change is on disk, as ``MonitorStore`` requires.
///
/// Not thread-safe: the service calls it from one place at a time (``MonitorService``).
public final class SQLiteMonitorStore: MonitorStore {
    /// `PRAGMA application_id`: marks the file as a monitor store, so that another SQLite file
    /// (a tenant database given by mistake) is refused rather than read.
    static let applicationID: Int32 = 0x4170_4D6E // "ApMn"
    static let schemaVersion: Int32 = 1

    public let path: String
    private var db: OpaquePointer?
    /// The wall clock stamped on events; a seam for tests.
    private let wallClock: () -> Date

    /// One event with the time the store persisted it.
    public struct StampedEvent: Hashable, Sendable {
        public var event: MonitorEvent
        public var at: Date
    }

    /// Opens (creating if absent) the store at `path`.
    /// - Throws: ``MonitorStoreError`` when the file cannot be opened or is not a monitor store
    ///   (damaged, another SQLite file, a newer schema).
    public init(path: String, wallClock: @escaping () -> Date = Date.init) throws {
        self.path = path
        self.wallClock = wallClock
        var handle: OpaquePointer?
        let rc = sqlite3_open_v2(path, &handle, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nil)
        db = handle
        guard rc == SQLITE_OK else {
            let message = handle.map { String(cString: sqlite3_errmsg($0)) } ?? "code \(rc)"
            close()
            throw MonitorStoreError("cannot open the monitor store \(path): \(message)")
        }
        do {
            try setUp()
        } catch let error as MonitorStoreError {
            close()
            throw MonitorStoreError("the monitor store \(path) cannot be used: \(error.description). If the file is damaged, restore it from a backup; the monitor will not decide from it.")
        }
    }

    deinit { close() }

    public func close() {
        if let db { sqlite3_close_v2(db) }
        db = nil
    }

    private func setUp() throws {
        // A file that is not a database fails on its first read, here.
        let appID = try queryInt("PRAGMA application_id")
        let version = try queryInt("PRAGMA user_version")
        let tables = try queryInt("SELECT count(*) FROM sqlite_master")
        if tables == 0 && appID == 0 {
            try exec("PRAGMA journal_mode=WAL")
            try exec("PRAGMA synchronous=FULL")
            try transaction {
                try exec("""
                    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
                    CREATE TABLE nodes (position INTEGER NOT NULL UNIQUE, id TEXT PRIMARY KEY, zone TEXT NOT NULL, goal TEXT NOT NULL,
                        goal_sequence INTEGER NOT NULL, reported TEXT, promotable INTEGER NOT NULL, maintenance INTEGER NOT NULL,
                        lsns TEXT NOT NULL) STRICT;
                    CREATE TABLE events (sequence INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, epoch INTEGER NOT NULL, kind TEXT NOT NULL,
                        node TEXT, text TEXT NOT NULL) STRICT;
                    PRAGMA application_id=\(Self.applicationID);
                    PRAGMA user_version=\(Self.schemaVersion);
                    """)
            }
            return
        }
        guard appID == Int64(Self.applicationID) else {
            throw MonitorStoreError("it is an SQLite file but not a monitor store (application_id \(appID))")
        }
        guard version == Int64(Self.schemaVersion) else {
            throw MonitorStoreError("its schema version is \(version); this monitor reads version \(Self.schemaVersion)")
        }
        let check = try queryText("PRAGMA quick_check") ?? "no answer"
        guard check == "ok" else { throw MonitorStoreError("integrity check failed: \(check)") }
        try exec("PRAGMA journal_mode=WAL")
        try exec("PRAGMA synchronous=FULL")
    }

    // MARK: MonitorStore

    public func load() throws -> MonitorState? {
        guard let formation = try queryText("SELECT value FROM meta WHERE key = 'formation'") else { return nil }
        guard let epochText = try queryText("SELECT value FROM meta WHERE key = 'epoch'"), let epoch = UInt64(epochText) else {
            throw MonitorStoreError("the monitor store \(path) holds formation \(formation) without an epoch")
        }
        var nodes: [NodeRecord] = []
        try query("SELECT id, zone, goal, goal_sequence, reported, promotable, maintenance, lsns FROM nodes ORDER BY position") { row in
            guard let goal = KeeperState(rawValue: row.text(2) ?? "") else { throw MonitorStoreError("node \(row.text(0) ?? "?") has an unknown goal") }
            let reported: KeeperState?
            if let r = row.text(4) {
                guard let state = KeeperState(rawValue: r) else { throw MonitorStoreError("node \(row.text(0) ?? "?") reports an unknown state \(r)") }
                reported = state
            } else {
                reported = nil
            }
            nodes.append(NodeRecord(id: row.text(0) ?? "", zone: row.text(1) ?? "", goal: goal, goalSequence: UInt64(row.int(3)),
                                    reported: reported, promotable: row.int(5) != 0, maintenanceRequested: row.int(6) != 0,
                                    lsns: try Self.decodeLSNs(row.text(7) ?? "")))
        }
        let events = try events(after: 0, newest: MonitorState.recentEventsMax).map(\.event)
        let state = MonitorState(formation: formation, epoch: Epoch(epoch), nodes: nodes, events: events)
        do { try state.validate() } catch {
            throw MonitorStoreError("the monitor store \(path) holds an invalid state: \(error)")
        }
        return state
    }

    public func create(_ state: MonitorState) throws {
        try state.validate()
        try transaction {
            if try queryText("SELECT value FROM meta WHERE key = 'formation'") != nil {
                throw MonitorStoreError("the monitor store \(path) already holds a formation")
            }
            try run("INSERT INTO meta (key, value) VALUES ('formation', ?), ('epoch', ?)", [.text(state.formation), .text(String(state.epoch.rawValue))])
            for (position, node) in state.nodes.enumerated() { try upsert(node, position: position) }
            try insert(state.events)
        }
    }

    public func save(_ change: StateChange) throws {
        try transaction {
            if let epoch = change.epoch {
                try run("UPDATE meta SET value = ? WHERE key = 'epoch'", [.text(String(epoch.rawValue))])
            }
            for node in change.nodes {
                try run("""
                    UPDATE nodes SET zone = ?, goal = ?, goal_sequence = ?, reported = ?, promotable = ?, maintenance = ?, lsns = ? WHERE id = ?
                    """, [.text(node.zone), .text(node.goal.rawValue), .int(Int64(node.goalSequence)), node.reported.map { .text($0.rawValue) } ?? .null,
                          .int(node.promotable ? 1 : 0), .int(node.maintenanceRequested ? 1 : 0), .text(Self.encodeLSNs(node.lsns)), .text(node.id)])
                guard sqlite3_changes(db) == 1 else { throw MonitorStoreError("the store holds no node \(node.id)") }
            }
            try insert(change.events)
        }
    }

    // MARK: History

    /// Events with a sequence above `after`, oldest first: the first `limit` of them, or with
    /// `newest` the last `newest` of them.
    public func events(after: UInt64, limit: Int? = nil, newest: Int? = nil) throws -> [StampedEvent] {
        var out: [StampedEvent] = []
        let sql: String
        let bound: Int
        if let newest {
            sql = "SELECT * FROM (SELECT sequence, at_ms, epoch, kind, node, text FROM events WHERE sequence > ? ORDER BY sequence DESC LIMIT ?) ORDER BY sequence"
            bound = newest
        } else {
            sql = "SELECT sequence, at_ms, epoch, kind, node, text FROM events WHERE sequence > ? ORDER BY sequence LIMIT ?"
            bound = limit ?? Int(Int32.max)
        }
        try query(sql, [.int(Int64(bitPattern: after)), .int(Int64(bound))]) { row in
            guard let kind = MonitorEvent.Kind(rawValue: row.text(3) ?? "") else { throw MonitorStoreError("event #\(row.int(0)) has an unknown kind") }
            out.append(StampedEvent(event: MonitorEvent(sequence: UInt64(row.int(0)), epoch: Epoch(UInt64(row.int(2))), kind: kind, node: row.text(4),
                                                        text: row.text(5) ?? ""),
                                    at: Date(timeIntervalSince1970: Double(row.int(1)) / 1000)))
        }
        return out
    }

    // MARK: Rows

    private func upsert(_ node: NodeRecord, position: Int) throws {
        try run("""
            INSERT INTO nodes (position, id, zone, goal, goal_sequence, reported, promotable, maintenance, lsns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
            """, [.int(Int64(position)), .text(node.id), .text(node.zone), .text(node.goal.rawValue), .int(Int64(node.goalSequence)),
                  node.reported.map { .text($0.rawValue) } ?? .null, .int(node.promotable ? 1 : 0), .int(node.maintenanceRequested ? 1 : 0),
                  .text(Self.encodeLSNs(node.lsns))])
    }

    private func insert(_ events: [MonitorEvent]) throws {
        let atMs = Int64((wallClock().timeIntervalSince1970 * 1000).rounded())
        for e in events {
            try run("INSERT INTO events (sequence, at_ms, epoch, kind, node, text) VALUES (?, ?, ?, ?, ?, ?)",
                    [.int(Int64(e.sequence)), .int(atMs), .int(Int64(e.epoch.rawValue)), .text(e.kind.rawValue), e.node.map { .text($0) } ?? .null, .text(e.text)])
        }
    }

    /// `tenant=lsn` lines, sorted: tenant ids hold no `=` or newline.
    static func encodeLSNs(_ lsns: [TenantID: LSN]) -> String {
        lsns.sorted { $0.key < $1.key }.map { "\($0.key.rawValue)=\($0.value)" }.joined(separator: "\n")
    }

    static func decodeLSNs(_ text: String) throws -> [TenantID: LSN] {
        var out: [TenantID: LSN] = [:]
        for line in text.split(separator: "\n") {
            guard let eq = line.lastIndex(of: "="), let lsn = LSN(line[line.index(after: eq)...]),
                  let tenant = try? TenantID(stored: String(line[..<eq])) else { throw MonitorStoreError("a node's lsns are malformed: \(line)") }
            out[tenant] = lsn
        }
        return out
    }

    // MARK: SQLite

    enum Value { case int(Int64), text(String), null }

    struct Row {
        let statement: OpaquePointer
        func int(_ i: Int32) -> Int64 { sqlite3_column_int64(statement, i) }
        func text(_ i: Int32) -> String? { sqlite3_column_text(statement, i).map { String(cString: $0) } }
    }

    private func error(_ what: String) -> MonitorStoreError {
        MonitorStoreError("\(what): \(db.map { String(cString: sqlite3_errmsg($0)) } ?? "closed")")
    }

    private func exec(_ sql: String) throws {
        guard let db else { throw MonitorStoreError("the monitor store is closed") }
        guard sqlite3_exec(db, sql, nil, nil, nil) == SQLITE_OK else { throw error("SQLite") }
    }

    private func transaction(_ body: () throws -> Void) throws {
        try exec("BEGIN IMMEDIATE")
        do {
            try body()
            try exec("COMMIT")
        } catch {
            try? exec("ROLLBACK")
            throw error
        }
    }

    private func run(_ sql: String, _ values: [Value]) throws {
        try query(sql, values) { _ in }
    }

    private func query(_ sql: String, _ values: [Value] = [], _ row: (Row) throws -> Void) throws {
        guard let db else { throw MonitorStoreError("the monitor store is closed") }
        var statement: OpaquePointer?
        guard sqlite3_prepare_v2(db, sql, -1, &statement, nil) == SQLITE_OK, let statement else { throw error("SQLite") }
        defer { sqlite3_finalize(statement) }
        let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
        for (i, v) in values.enumerated() {
            let index = Int32(i + 1)
            switch v {
            case .int(let n): sqlite3_bind_int64(statement, index, n)
            case .text(let s): sqlite3_bind_text(statement, index, s, -1, transient)
            case .null: sqlite3_bind_null(statement, index)
            }
        }
        while true {
            let rc = sqlite3_step(statement)
            if rc == SQLITE_DONE { return }
            guard rc == SQLITE_ROW else { throw error("SQLite") }
            try row(Row(statement: statement))
        }
    }

    private func queryInt(_ sql: String) throws -> Int64 {
        var out: Int64 = 0
        try query(sql) { out = $0.int(0) }
        return out
    }

    private func queryText(_ sql: String) throws -> String? {
        var out: String?
        try query(sql) { out = $0.text(0) }
        return out
    }
}

/// Why the monitor store cannot be opened, read or written.
public struct MonitorStoreError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
