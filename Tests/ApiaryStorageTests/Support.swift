import ApiaryCore
import CSQLite
import Foundation
import XCTest
@testable import ApiaryStorage

/// A sink that keeps every captured commit and applies it to a replica file, the way a
/// standby does, checking the rolling checksum on the way.
final class ReplicaSink: CommitSink, @unchecked Sendable {
    let replicaPath: String
    private let lock = NSLock()
    private(set) var commits: [CapturedCommit] = []
    private var replicaHashes = PageHashes()
    /// When set, the next commits fail with this message.
    var failure: String?

    init(replicaPath: String) { self.replicaPath = replicaPath }

    let isDurableOnCommit = false

    /// Positions are the count of commits kept.
    func commit(tenant: TenantID, _ commit: CapturedCommit) throws -> UInt64 {
        lock.lock()
        defer { lock.unlock() }
        if let failure { throw CaptureError.rejected(failure) }
        try DatabaseFile.writePages(commit.pages, dbSizePages: commit.dbSizePages, to: replicaPath)
        replicaHashes.apply(pages: commit.pages, dbSizePages: commit.dbSizePages)
        guard replicaHashes.checksum == commit.checksum else {
            throw CaptureError.rejected("replica checksum \(replicaHashes.checksum) != record checksum \(commit.checksum)")
        }
        commits.append(commit)
        return UInt64(commits.count)
    }

    var commitCount: Int { lock.lock(); defer { lock.unlock() }; return commits.count }
    var lastCommit: CapturedCommit? { lock.lock(); defer { lock.unlock() }; return commits.last }
}

final class TemporaryDirectory {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "apiary-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Reads a replica file with plain SQLite (not through Apiary), as proof it is a valid database.
func readWithPlainSQLite(_ path: String, _ sql: String) throws -> [[SQLValue]] {
    // Copy first: opening the file in WAL mode would create -wal/-shm beside the replica.
    let copy = path + ".inspect"
    try? FileManager.default.removeItem(atPath: copy)
    try FileManager.default.copyItem(atPath: path, toPath: copy)
    defer {
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: copy + suffix) }
    }
    let connection = try SQLiteConnection(path: copy, readOnly: false)
    return try connection.run(sql).rows
}

extension TenantDatabase {
    func mustExecute(_ sql: String, _ parameters: [SQLValue] = [], file: StaticString = #filePath, line: UInt = #line) async throws {
        let results = try await execute([SQLStatement(sql, parameters)])
        guard case .success = results.first else {
            XCTFail("statement failed: \(results)", file: file, line: line)
            return
        }
    }

    func rows(_ sql: String) async throws -> [[SQLValue]] {
        let results = try await query([SQLStatement(sql)])
        guard case .success(let outcome) = results.first else { throw StorageError(.badRequest, "query failed: \(results)") }
        return outcome.rows
    }

    var writerChecksum: UInt64 { get async throws { try await withWriter { $0.checksum } } }
}

// MARK: - Latches instead of sleeps

/// Named gates that tenant SQL passes through: `SELECT test_gate('busy')` reports that the
/// statement got there, then blocks its thread until the test opens that gate (once open, a
/// gate stays open and returns 1 at once). A test waits for facts ("the writer is inside the
/// busy request's statement") instead of sleeping and hoping that a statement is slow enough.
final class SQLGates: @unchecked Sendable {
    static let function = "test_gate"
    private let condition = NSCondition()
    private var opened: Set<String> = []
    private var allOpen = false
    private var arrivals: [String: Int] = [:]

    /// Registers `test_gate` on every connection the database opens and lets tenant SQL call it.
    func install(on options: inout TenantDatabase.Options) {
        options.extraAllowedFunctions.insert(Self.function)
        let context = Unmanaged.passUnretained(self).toOpaque()
        options.onConnectionOpened = { [self] handle in
            // Kept alive by the closure, which the database's options hold.
            _ = self
            let rc = sqlite3_create_function_v2(handle, Self.function, 1, SQLITE_UTF8, context, { sqlContext, _, arguments in
                let gates = Unmanaged<SQLGates>.fromOpaque(sqlite3_user_data(sqlContext)!).takeUnretainedValue()
                let name = sqlite3_value_text(arguments![0]!).map { String(cString: $0) } ?? ""
                gates.pass(name)
                sqlite3_result_int(sqlContext, 1)
            }, nil, nil, nil)
            precondition(rc == SQLITE_OK, "cannot register \(Self.function): \(rc)")
        }
    }

    private func pass(_ name: String) {
        condition.lock()
        arrivals[name, default: 0] += 1
        condition.broadcast()
        while !allOpen && !opened.contains(name) { condition.wait() }
        condition.unlock()
    }

    /// Lets every statement waiting at `name`, and every later one, through.
    func open(_ name: String) {
        condition.lock()
        opened.insert(name)
        condition.broadcast()
        condition.unlock()
    }

    /// Opens every gate, so that no statement stays blocked after a test (call it in a `defer`
    /// that runs before the database closes: closing waits for the writer).
    func openAll() {
        condition.lock()
        allOpen = true
        condition.broadcast()
        condition.unlock()
    }

    /// Waits (on a thread of its own, not the test's executor) until a statement has reached
    /// `name` `times` times in all; throws after `seconds` (a hang is a failure, not a stall).
    func reached(_ name: String, times: Int = 1, seconds: Double = 30) async throws {
        let arrived: Bool = await withCheckedContinuation { continuation in
            Thread.detachNewThread { [self] in
                let deadline = Date().addingTimeInterval(seconds)
                condition.lock()
                var ok = true
                while arrivals[name, default: 0] < times && ok { ok = condition.wait(until: deadline) }
                let done = arrivals[name, default: 0] >= times
                condition.unlock()
                continuation.resume(returning: done)
            }
        }
        guard arrived else { throw StorageError(.badRequest, "no statement reached gate \(name) within \(seconds) s") }
    }
}

/// The answer to a write submitted with the callback form of `execute`: the request is in the
/// writer's queue when `submit` returns (the async form only puts it there once its task runs).
final class Submitted: @unchecked Sendable {
    private let lock = NSLock()
    private var result: Result<[StatementResult], any Error>?
    private var waiter: CheckedContinuation<[StatementResult], any Error>?

    /// Submits one request; `onAnswer` runs on the writer thread as the answer is given, in the
    /// order the writer answers.
    convenience init(_ db: TenantDatabase, _ sql: String, onAnswer: @escaping @Sendable () -> Void = {}) {
        self.init(db, [SQLStatement(sql)], onAnswer: onAnswer)
    }

    init(_ db: TenantDatabase, _ statements: [SQLStatement], onAnswer: @escaping @Sendable () -> Void = {}) {
        db.execute(statements) { [self] result in
            onAnswer()
            let waiter = lock.withLock { () -> CheckedContinuation<[StatementResult], any Error>? in
                self.result = result
                defer { self.waiter = nil }
                return self.waiter
            }
            waiter?.resume(with: result)
        }
    }

    var value: [StatementResult] {
        get async throws {
            try await withCheckedThrowingContinuation { continuation in
                let ready = lock.withLock { () -> Result<[StatementResult], any Error>? in
                    if result == nil { waiter = continuation }
                    return result
                }
                if let ready { continuation.resume(with: ready) }
            }
        }
    }
}
