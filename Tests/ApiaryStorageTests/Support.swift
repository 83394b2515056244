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

    func commit(tenant: TenantID, _ commit: CapturedCommit) throws {
        lock.lock()
        defer { lock.unlock() }
        if let failure { throw CaptureError.rejected(failure) }
        try DatabaseFile.writePages(commit.pages, dbSizePages: commit.dbSizePages, to: replicaPath)
        replicaHashes.apply(pages: commit.pages, dbSizePages: commit.dbSizePages)
        guard replicaHashes.checksum == commit.checksum else {
            throw CaptureError.rejected("replica checksum \(replicaHashes.checksum) != record checksum \(commit.checksum)")
        }
        commits.append(commit)
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
