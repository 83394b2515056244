import ApiaryCore
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// TEST SEAM for the crash tests (`Tests/ApiaryIntegrationTests/CrashWindowTests.swift`), not
/// an operator's setting. A node started with `APIARY_TEST_EXIT_AT=<point>` or
/// `APIARY_TEST_EXIT_AT=<point>@<lsn>` ends itself with `_exit` when a commit or a snapshot
/// install (of any tenant; at that lsn, if given) reaches the point: no cleanup and no flush, the page cache kept, as a
/// `kill -9` there would. It lets a test stop the process exactly inside a window that no
/// amount of killing under load reliably hits. Inert unless the variable is set: the check is
/// one comparison of a value read once at start.
enum TestExitPoint: String {
    /// A commit's WAL frames are written and its record appended to the log, but the log has
    /// not made it durable yet (`PrimaryNode.commit`, just before the log's sync).
    case commitBeforeLogSync = "commit-before-log-sync"
    /// A failed commit is half undone (`PrimaryNode.commit`, between the two steps): its WAL
    /// frames are invalidated, its record is still in the log.
    case failedCommitHalfUndone = "failed-commit-half-undone"
    /// A commit's record is durable in the log (the seam makes it so) and was never handed to
    /// replication: the state a kill leaves when the local fsync wins its race with the event
    /// loop that sends the record (`PrimaryNode.commit`). The standby never sees it, so after
    /// a failover the rejoining node holds a record the new primary lacks (`RejoinTests`).
    case commitLoggedBeforeSend = "commit-logged-before-send"

    // The steps of a snapshot install on a standby (`StandbyNode.installSnapshot`,
    // `StandbyTenant.completeSnapshotInstall`; `SnapshotInstallTests`), at the snapshot's lsn.
    /// The scratch file holds the whole snapshot, cut to size, fsynced and verified; no marker yet.
    case snapshotScratchVerified = "snapshot-scratch-verified"
    /// The install marker is durable; the database is still the old one.
    case snapshotMarkerWritten = "snapshot-marker-written"
    /// The scratch file has replaced the database; the log and the applied state are the old ones.
    case snapshotRenamed = "snapshot-renamed"
    /// The log is reset to start after the snapshot; the applied state is the old one.
    case snapshotLogReset = "snapshot-log-reset"
    /// The applied state is the snapshot's; the marker is not removed yet.
    case snapshotAppliedWritten = "snapshot-applied-written"

    static let armed: (point: TestExitPoint, lsn: LSN?)? = {
        guard let text = ProcessInfo.processInfo.environment["APIARY_TEST_EXIT_AT"] else { return nil }
        let parts = text.split(separator: "@", maxSplits: 1).map(String.init)
        guard let point = TestExitPoint(rawValue: parts[0]) else {
            preconditionFailure("APIARY_TEST_EXIT_AT=\(text): unknown point (a test seam; see TestExitPoint.swift)")
        }
        guard parts.count == 2 else { return (point, nil) }
        guard let lsn = LSN(parts[1]) else { preconditionFailure("APIARY_TEST_EXIT_AT=\(text): bad lsn") }
        return (point, lsn)
    }()

    /// Whether the seam is armed for this point (and lsn).
    static func isArmed(_ point: TestExitPoint, lsn: LSN) -> Bool {
        guard let armed else { return false }
        return armed.point == point && (armed.lsn == nil || armed.lsn == lsn)
    }

    /// Ends the process if the seam is armed for this point (and lsn).
    static func reached(_ point: TestExitPoint, tenant: TenantID, lsn: LSN) {
        guard isArmed(point, lsn: lsn) else { return }
        // stderr is unbuffered: the line is in the node's log before the process is gone.
        fputs("test seam APIARY_TEST_EXIT_AT: exiting at \(point.rawValue), tenant \(tenant), lsn \(lsn)\n", stderr)
        _exit(86)
    }
}

/// TEST SEAM for the watchdog test (`SystemdNotifyTests`), not an operator's setting: a node
/// started with `APIARY_TEST_HANG_REPLICATION_LOOP_AFTER_PINGS=<n>` blocks its replication event
/// loop for good once its watchdog has sent `n` pings, as a deadlock there would. The pings must
/// stop (and systemd restart the process). Inert unless the variable is set.
enum TestHang {
    static var pingsBeforeHang: Int? {
        ProcessInfo.processInfo.environment["APIARY_TEST_HANG_REPLICATION_LOOP_AFTER_PINGS"].flatMap(Int.init)
    }

    static func hangForever(_ what: String) -> Never {
        fputs("test seam APIARY_TEST_HANG_REPLICATION_LOOP_AFTER_PINGS: \(what) hangs now\n", stderr)
        while true { sleep(3_600) }
    }
}
