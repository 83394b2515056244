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

    /// Free and total bytes of the file system holding `path`.
    static func space(_ path: String) -> (free: Int, total: Int)? {
        var stats = statvfs()
        guard statvfs(path, &stats) == 0 else { return nil }
        return (Int(stats.f_bavail) * Int(stats.f_frsize), Int(stats.f_blocks) * Int(stats.f_frsize))
    }

    /// True when the file system holding `path` has less room than ``roomNeeded(_:)``.
    static func isFull(_ path: String) -> Bool {
        guard let (free: free, total: _) = space(path) else { return false }
        return free < roomNeeded(path)
    }

    /// Returns once the file system holding `path` has ``roomNeeded(_:)`` free (checked every
    /// 200 ms: space comes back by an operator's hand, not an event this process can wait on).
    static func waitForRoom(_ path: String) {
        while isFull(path) { usleep(200_000) }
    }
}
