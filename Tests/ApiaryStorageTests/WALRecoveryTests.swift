import ApiaryCore
import Foundation
import XCTest
@testable import ApiaryStorage

/// `WALRecovery` reads a WAL as SQLite's recovery will replay it, and cuts it back (issue 8).
/// The files are taken from inside the sink's `commit`: the commit's frames are in the WAL but
/// the sink has not accepted it, the window in which a process that dies leaves a commit the
/// replication log lacks.
final class WALRecoveryTests: XCTestCase {
    /// Records each commit's checksum; copies the database and its WAL, as they are on disk, from
    /// inside the `imageAt`-th commit (counting from 1, the bootstrap).
    final class CrashImageSink: CommitSink, @unchecked Sendable {
        let databasePath: String
        let imagePath: String
        var imageAt: Int?
        private(set) var checksums: [UInt64] = []
        /// Like the primary's: the WAL fsync is skipped.
        let isDurableOnCommit = true

        init(databasePath: String, imagePath: String) {
            self.databasePath = databasePath
            self.imagePath = imagePath
        }

        func commit(tenant: TenantID, _ commit: CapturedCommit) throws -> UInt64 {
            checksums.append(commit.checksum)
            guard checksums.count == imageAt else { return 0 }
            for suffix in ["", "-wal"] {
                try FileManager.default.copyItem(atPath: databasePath + suffix, toPath: imagePath + suffix)
            }
            return 0
        }
    }

    func testTheStatesAreWhatRecoveryReplaysAndTheUnacceptedCommitCanBeCutOff() async throws {
        let dir = TemporaryDirectory()
        let sink = CrashImageSink(databasePath: dir.path + "/acme.db", imagePath: dir.path + "/image.db")
        let db = try TenantDatabase(tenant: try TenantID("acme"), path: sink.databasePath, sink: sink)
        defer { db.close() }
        // No checkpoint: the database file stays as created, so every state is a commit's.
        try await db.withWriter { try $0.exec("PRAGMA wal_autocheckpoint=0"); try $0.exec("PRAGMA cache_size=20") }
        try await db.mustExecute("CREATE TABLE t (x)")
        for i in 0..<10 { try await db.mustExecute("INSERT INTO t VALUES (?)", [.integer(Int64(i))]) }
        // A transaction that spills frames before its commit frame.
        _ = try await db.execute((0..<300).map { _ in SQLStatement("INSERT INTO t VALUES (zeroblob(2000))") }, transaction: true)
        sink.imageAt = sink.checksums.count + 1
        try await db.mustExecute("INSERT INTO t VALUES (999)")
        let checksums = sink.checksums

        // The files as a process dying inside that last commit leaves them.
        let image = sink.imagePath
        let states = try WALRecovery.states(ofDatabase: image)
        XCTAssertEqual(states.map(\.checksum), checksums, "the file as created, then each commit, the unaccepted one last")
        XCTAssertEqual(states.map(\.commits), Array(0..<checksums.count))
        XCTAssertEqual(try DatabaseFile.query(copyOf: image, "SELECT count(*) FROM t WHERE x = 999"), [[.integer(1)]],
                       "SQLite's recovery brings back the commit the sink never accepted")

        let accepted = states[states.count - 2]
        try WALRecovery.discardCommits(after: accepted, ofDatabase: image)
        XCTAssertEqual(try WALRecovery.states(ofDatabase: image).last, accepted)
        XCTAssertEqual(try DatabaseFile.query(copyOf: image, "SELECT count(*) FROM t WHERE x = 999"), [[.integer(0)]])
        // What SQLite recovers and checkpoints is exactly the accepted state.
        do {
            let connection = try SQLiteConnection(path: image, readOnly: false)
            try connection.exec("PRAGMA wal_checkpoint(TRUNCATE)")
        }
        XCTAssertEqual(try DatabaseFile.pageHashes(of: image).checksum, accepted.checksum)
    }

    func testNoWALOrAnIgnoredOneHasNoStates() throws {
        let dir = TemporaryDirectory()
        let path = dir.path + "/plain.db"
        XCTAssertEqual(try WALRecovery.states(ofDatabase: path), [])
        FileManager.default.createFile(atPath: path + "-wal", contents: Data(repeating: 0xAB, count: 32 + 24 + 4096))
        XCTAssertEqual(try WALRecovery.states(ofDatabase: path), [], "a bad magic: recovery ignores the WAL")
    }
}
