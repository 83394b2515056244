import ApiaryCore
import ApiaryLog
import ApiaryStorage
import Foundation
import Logging

/// Makes a former primary's data directory a standby's, for the keeper's `follow` step (rejoin).
///
/// A primary keeps each tenant as SQLite left it (a database and its WAL) with its log; a
/// standby keeps a database file that holds exactly the records it applied, and says so in its
/// applied state. Per tenant, the database is first made to agree with the log as a primary's
/// open does (WAL commits the log lacks discarded, the WAL folded into the file, logged commits
/// missing from the file redone), then recorded as applied through the log's last record. The
/// standby's hello then offers that point, and the new primary compares it with its own history:
/// the same record there, and the stream goes on from it; a record the new primary does not
/// hold (this node committed it, its standby never acknowledged it, so no client was told it
/// succeeded in sync mode), and the new primary sends a snapshot that replaces it.
///
/// Every step can be repeated: a crash part-way leaves a node that is still `demoted` and
/// prepares again at its next start.
enum StandbyPreparation {
    struct Prepared: CustomStringConvertible {
        var tenant: TenantID
        /// The last record this node held, and its epoch.
        var lsn: LSN
        var epoch: Epoch
        var description: String { "\(tenant) through lsn \(lsn) (epoch \(epoch))" }
    }

    static func prepare(layout: DataLayout, logOptions: ReplicationLog.Options, logger: Logger) throws -> [Prepared] {
        var prepared: [Prepared] = []
        for id in try layout.existingTenants() {
            let tenant = try PrimaryNode.openTenantLog(id, layout: layout, options: logOptions)
            defer { tenant.withLog { $0.close() } }
            let path = layout.database(id)
            let last = tenant.withLog { $0.last }
            let exists = FileManager.default.fileExists(atPath: path)
            if last.lsn == 0 || !exists {
                guard last.lsn == 0 else {
                    throw NodeError("tenant \(id): the log reaches lsn \(last.lsn) but the database file is missing")
                }
                // Nothing was ever committed: the standby starts the tenant from nothing.
                for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + suffix) }
                try? FileManager.default.removeItem(atPath: layout.applied(id))
                continue
            }
            do {
                try PrimaryNode.discardWALCommitsTheLogLacks(tenant, path: path, logger: logger)
                try TenantDatabase.checkpointAndCheckFormat(path: path)
                let checksum = try DatabaseFile.pageHashes(of: path).checksum
                if checksum != last.checksum {
                    try PrimaryNode.redo(tenant, from: checksum, path: path, logger: logger)
                }
                for suffix in ["-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + suffix) }
                try AppliedState(lsn: last.lsn, checksum: last.checksum, applyingThroughLSN: last.lsn).write(to: layout.applied(id))
                prepared.append(Prepared(tenant: id, lsn: last.lsn, epoch: last.epoch))
            } catch {
                // The database cannot be brought to agree with the log (damaged, or a redo that
                // cannot finish): the new primary has the tenant; a snapshot brings it here.
                logger.warning("tenant cannot be prepared as a standby's; its database is dropped for a snapshot from the primary",
                               metadata: ["tenant": "\(id)", "error": "\(error)"])
                for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + suffix) }
                try? FileManager.default.removeItem(atPath: layout.applied(id))
            }
        }
        return prepared
    }
}
