import ApiaryNode
import Foundation

/// A node's data directory on a file system of its own, small and in memory (tmpfs), so that a
/// chaos run can fill it (`fill_disk`) without touching the machine's disk: the node then meets
/// ENOSPC on every write it makes, as on a real full disk. Needs root (mount).
public final class SmallDisk: @unchecked Sendable {
    static let filler = "chaos-filler"
    public let path: String
    private var mounted = false
    private let lock = NSLock()

    /// The mount's source names the run's process, so that what a run killed outright left
    /// is found by the next (``removeLeftovers()``).
    static func source(of owner: Int32) -> String { "apiary-chaos-\(owner)" }

    /// Mounts a tmpfs of `bytes` on `path` (made if missing).
    public init(path: String, bytes: Int) throws {
        self.path = path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        try ZoneNetwork.run("/bin/mount", ["-t", "tmpfs", "-o", "size=\(bytes)", Self.source(of: getpid()), path])
        mounted = true
    }

    /// Unmounts the file systems of runs whose process is gone (a run killed with -9 cannot).
    public static func removeLeftovers() {
        guard let mounts = ProcFile.read("/proc/mounts") else { return }
        for line in mounts.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 2, fields[0].hasPrefix("apiary-chaos-"), let pid = Int32(fields[0].dropFirst("apiary-chaos-".count)),
                  kill(pid, 0) != 0, errno == ESRCH else { continue }
            // /proc/mounts escapes spaces in paths as \040.
            _ = try? ZoneNetwork.run("/bin/umount", ["-l", String(fields[1]).replacingOccurrences(of: "\\040", with: " ")])
        }
    }

    /// Takes every free byte with one file.
    /// - Returns: how many bytes it took.
    @discardableResult
    public func fill() throws -> Int {
        var stats = statvfs()
        guard statvfs(path, &stats) == 0 else { throw ChaosError("statvfs \(path): \(String(cString: strerror(errno)))") }
        let free = Int(stats.f_bavail) * Int(stats.f_frsize)
        let fd = open(path + "/" + Self.filler, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        guard fd >= 0 else { throw ChaosError("cannot create the filler in \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        // tmpfs allocates with fallocate at once; what is left (block rounding) goes by writes
        // until the file system says it is full.
        _ = posix_fallocate(fd, 0, off_t(free))
        let chunk = [UInt8](repeating: 0, count: 4096)
        while chunk.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) > 0 {}
        var after = stat()
        fstat(fd, &after)
        return Int(after.st_size)
    }

    /// Frees what ``fill()`` took.
    public func free() { unlink(path + "/" + Self.filler) }

    /// Unmounts (lazily: a process that still has a file open there keeps it until it exits).
    public func unmount() {
        guard lock.withLock({ defer { mounted = false }; return mounted }) else { return }
        _ = try? ZoneNetwork.run("/bin/umount", ["-l", path])
    }

    deinit { unmount() }
}
