import ApiaryCore
import ApiaryLog
import ApiaryStorage
import Foundation
import Logging

// MARK: - Crash-safe snapshot install (issue 8)
//
// Installing a snapshot changes three things that cannot change together: the database file
// (the scratch file is renamed over it), the log (reset to start after the snapshot) and the
// `applied` state. A standby that died between them used to refuse to start: its database
// and its applied state disagreed ("resync this standby").
//
// So the install commits to itself first. Once the scratch file holds the whole snapshot,
// fsynced and verified against the primary's checksum, a durable marker
// (`<tenant>/snapshot.install`: epoch, lsn, checksum) is written atomically, before anything
// else changes. From then on the install only moves forward: one function,
// `completeSnapshotInstall`, takes it from whichever step it had reached to the end, both on
// the live path and at start (`StandbyTenant.init`, before the applied state is read). Without
// a marker, a scratch file is an install that never happened and is removed at start (rolled
// back). Rolling forward is always allowed: the snapshot is a state the primary committed, and
// the install had already been decided when the marker became durable.
//
// Each step may run again after a crash and must give the same result:
// 1. rename the scratch over the database: only if the scratch is still there. Nothing but
//    this rename removes the scratch while a marker exists (`discardSnapshotScratch` refuses),
//    so a missing scratch means it was renamed already (a rename is atomic);
// 2. check that the database's checksum is the marker's (catches a file changed behind the
//    standby's back; then it needs a resync, as before);
// 3. reset the log to start after the snapshot: a reset of a log that was reset already gives
//    the same log (it holds nothing past its base: no record is taken for a tenant while its
//    install runs, the core refuses them and the shell holds both of its queues);
// 4. write the applied state (a whole-file atomic replace);
// 5. remove the marker, durably (the directory is fsynced), before the tenant takes any record:
//    a marker that came back after the log had grown would reset it again.

/// The durable record that a verified snapshot is being installed: `epoch lsn checksum`.
struct SnapshotInstallMarker: Equatable {
    /// The epoch the log is reset in (the standby's at the install).
    var epoch: Epoch
    /// The snapshot's lsn.
    var lsn: LSN
    /// The primary's database checksum at `lsn`, which the scratch file matched.
    var checksum: UInt64

    /// The marker at `path`, or nil when there is none.
    static func read(from path: String) throws -> SnapshotInstallMarker? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        let parts = String(decoding: data, as: UTF8.self).split(whereSeparator: \.isWhitespace).compactMap { UInt64($0) }
        guard parts.count == 3 else { throw NodeError("\(path) is damaged: expected 'epoch lsn checksum'; resync this standby") }
        return SnapshotInstallMarker(epoch: Epoch(parts[0]), lsn: parts[1], checksum: parts[2])
    }

    /// Atomically and durably (the directory entry too: the rename that follows relies on it).
    func write(to path: String) throws {
        try DurableFile.replace(path, with: Array("\(epoch.rawValue) \(lsn) \(checksum)\n".utf8))
    }
}

extension StandbyTenant {
    /// Finishes the install that `marker` commits to, from whichever step it had reached (see
    /// the steps above; each is idempotent). Runs on `applyQueue` with the tenant's `ioQueue`
    /// held (the live path), or in `init` before the tenant is used. Sets `applied` and
    /// `hashes` to the snapshot's.
    ///
    /// - Parameters:
    ///   - marker: MUST already be durable at `installMarkerPath`.
    ///   - verified: the scratch file's page hashes, when the caller just computed them from
    ///     the scratch (the live path): they are the database's after the rename.
    /// - Throws: a storage error, or a database whose checksum is not the snapshot's (the
    ///   marker stays: a restart tries again, and a resync replaces the tenant).
    func completeSnapshotInstall(_ marker: SnapshotInstallMarker, verified: PageHashes? = nil) throws {
        var hashes = verified
        if FileManager.default.fileExists(atPath: scratchPath) {
            try DurableFile.rename(scratchPath, to: databasePath)
        } else {
            hashes = nil // renamed before a crash: read what the database holds
        }
        TestExitPoint.reached(.snapshotRenamed, tenant: id, lsn: marker.lsn)
        let database = try hashes ?? DatabaseFile.pageHashes(of: databasePath)
        guard database.checksum == marker.checksum else {
            throw NodeError("tenant \(id): installing the snapshot at lsn \(marker.lsn): the database checksum is \(database.checksum), the snapshot's \(marker.checksum); resync this standby")
        }
        try withLog { try $0.reset(base: marker.epoch, lsn: marker.lsn, checksum: marker.checksum) }
        TestExitPoint.reached(.snapshotLogReset, tenant: id, lsn: marker.lsn)
        let state = AppliedState(lsn: marker.lsn, checksum: marker.checksum, applyingThroughLSN: marker.lsn)
        try state.write(to: appliedPath)
        TestExitPoint.reached(.snapshotAppliedWritten, tenant: id, lsn: marker.lsn)
        try DurableFile.remove(installMarkerPath)
        self.hashes = database
        applied = state
    }

    /// At start: finishes an install that has a marker (roll forward), or removes a scratch
    /// file without one (roll back: the install never happened; it may also be a primary's
    /// snapshot copy left by a crash).
    /// - Returns: whether an install was finished (then `applied` and `hashes` are set).
    func finishOrUndoInterruptedSnapshotInstall(logger: Logger) throws -> Bool {
        if let marker = try SnapshotInstallMarker.read(from: installMarkerPath) {
            try completeSnapshotInstall(marker)
            logger.notice("finished an interrupted snapshot install", metadata: ["tenant": "\(id)", "lsn": "\(marker.lsn)"])
            return true
        }
        if FileManager.default.fileExists(atPath: scratchPath) {
            try discardSnapshotScratch()
            logger.notice("removed the scratch file of an unfinished snapshot install", metadata: ["tenant": "\(id)"])
        }
        return false
    }

    /// Removes the scratch file, if any (a snapshot begins or is abandoned).
    /// - Throws: while an install marker exists: the scratch may then be the only copy of the
    ///   snapshot the marker commits to (only `completeSnapshotInstall` may take it away).
    func discardSnapshotScratch() throws {
        guard !FileManager.default.fileExists(atPath: installMarkerPath) else {
            throw NodeError("tenant \(id): a snapshot install is unfinished (\(installMarkerPath)); restart the node to finish it")
        }
        guard unlink(scratchPath) == 0 || errno == ENOENT else {
            throw NodeError("tenant \(id): cannot remove \(scratchPath): \(String(cString: strerror(errno)))")
        }
    }
}
