import Foundation

/// A node's data directory on a file system of its own, small and in memory (tmpfs), so that a
/// chaos run can fill it (`fill_disk`) without touching the machine's disk: the node then meets
/// ENOSPC on every write it makes, as on a real full disk. Needs root (mount).
public final class SmallDisk: @unchecked Sendable {
    static let filler = "chaos-filler"
    public let path: String
    private var mounted = false
    private let lock = NSLock()

    /// Mounts a tmpfs of `bytes` on `path` (made if missing).
    public init(path: String, bytes: Int) throws {
        self.path = path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        try ZoneNetwork.run("/bin/mount", ["-t", "tmpfs", "-o", "size=\(bytes)", "apiary-chaos", path])
        mounted = true
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
