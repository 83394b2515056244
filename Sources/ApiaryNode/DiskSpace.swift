import Foundation

/// Free space of a node's file system, for a standby that stopped on a full disk and resumes
/// once there is room again.
enum DiskSpace {
    /// Room a resumed standby needs before it starts again: enough for a segment of its log
    /// (64 MiB by default), or a tenth of a small file system.
    static func roomNeeded(_ path: String) -> Int {
        guard let (free: _, total: total) = space(path) else { return 64 << 20 }
        return min(64 << 20, total / 10)
    }

    /// Free and total bytes of the file system holding `path`, and whether it is out of
    /// inodes (fewer than 100 free, or under 1%: files cannot be made whatever the bytes).
    static func space(_ path: String) -> (free: Int, total: Int)? {
        var stats = statvfs()
        guard statvfs(path, &stats) == 0 else { return nil }
        let inodesShort = stats.f_files > 0 && (stats.f_favail < 100 || stats.f_favail < stats.f_files / 100)
        return (inodesShort ? 0 : Int(stats.f_bavail) * Int(stats.f_frsize), Int(stats.f_blocks) * Int(stats.f_frsize))
    }

    /// True when the file system holding `path` has less room than ``roomNeeded(_:)``.
    static func isFull(_ path: String) -> Bool {
        guard let (free: free, total: _) = space(path) else { return false }
        return free < roomNeeded(path)
    }

    /// The environment variable that counts restarts for a full disk in a row, across the
    /// in-place restarts (exec keeps the environment).
    static let restartsVariable = "APIARY_FULL_DISK_RESTARTS"

    /// How long to wait before the next restart: 1, 2, 4 … 60 s with the restarts in a row, so
    /// that a disk that looks roomy but is not (a quota, a file larger than the room asked for)
    /// costs a restart a minute, not a spin. Counts this one.
    static func nextRestartDelaySeconds() -> UInt32 {
        let restarts = ProcessInfo.processInfo.environment[restartsVariable].flatMap(Int.init) ?? 0
        setenv(restartsVariable, String(restarts + 1), 1)
        return UInt32(min(60, 1 << min(restarts, 6)))
    }

    /// Returns once the file system holding `path` has ``roomNeeded(_:)`` free (checked every
    /// 200 ms: space comes back by an operator's hand, not an event this process can wait on).
    static func waitForRoom(_ path: String) {
        while isFull(path) { usleep(200_000) }
    }
}
