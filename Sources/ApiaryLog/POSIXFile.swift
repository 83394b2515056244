#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Thin wrappers over the system calls the log needs. Each turns `errno` into a ``LogError``
/// naming the path and `strerror`; `ENOSPC`/`EDQUOT` become ``LogError/Code/diskFull``.
///
/// Raw POSIX rather than Foundation's `FileHandle`: the log needs positioned writes, real
/// `fsync` of files and directories, `ftruncate` and the exact `errno`, which Foundation hides.
enum POSIX {
    // MARK: Fault injection (tests only)

    enum Operation: Sendable { case write, fsync, truncate }

    /// Test seam, nil in production: consulted before each file write, fsync and truncate; an
    /// errno it returns fails the call as the kernel would. A failed write first lets half its
    /// bytes through, like a short write followed by an error. Tests that set it MUST reset it.
    nonisolated(unsafe) static var faultInjector: ((_ operation: Operation, _ path: String) -> Int32?)?

    // MARK: Errors

    static func error(_ operation: String, path: String, errno code: Int32 = errno) -> LogError {
        let reason = String(cString: strerror(code))
        let kind: LogError.Code = (code == ENOSPC || code == EDQUOT) ? .diskFull : .io
        return LogError(kind, "\(operation) failed: \(reason) (errno \(code))", path: path, errno: code)
    }

    // MARK: Files

    static func open(_ path: String, flags: Int32, mode: mode_t = 0o644) throws -> Int32 {
        while true {
            let fd = path.withCString { sys_open($0, flags | O_CLOEXEC, mode) }
            if fd >= 0 { return fd }
            if errno != EINTR { throw error("open", path: path) }
        }
    }

    static func close(_ fd: Int32) {
        // Linux closes the descriptor even when close reports EINTR; retrying could close
        // another thread's descriptor. Durability comes from fsync, never from close.
        _ = sys_close(fd)
    }

    /// Reads up to `count` bytes at `offset`; fewer only at end of file.
    static func pread(_ fd: Int32, count: Int, offset: Int, path: String) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        try bytes.withUnsafeMutableBytes { raw in
            while done < count {
                let n = sys_pread(fd, raw.baseAddress! + done, count - done, off_t(offset + done))
                if n > 0 { done += n; continue }
                if n == 0 { break }
                if errno == EINTR { continue }
                throw error("read at byte \(offset + done)", path: path)
            }
        }
        if done < count { bytes.removeSubrange(done...) }
        return bytes
    }

    /// Writes all of `bytes` at `offset`, looping over short writes.
    static func pwrite(_ fd: Int32, _ bytes: [UInt8], offset: Int, path: String) throws {
        guard !bytes.isEmpty else { return }
        try bytes.withUnsafeBytes { try pwrite(fd, $0, offset: offset, path: path) }
    }

    /// Writes all of `raw` at `offset`, looping over short writes. `durable`: the descriptor
    /// syncs as it writes (`O_DSYNC`), so an injected fsync fault applies too.
    static func pwrite(_ fd: Int32, _ raw: UnsafeRawBufferPointer, offset: Int, path: String, durable: Bool = false) throws {
        guard raw.count > 0 else { return }
        if durable, let code = faultInjector?(.fsync, path) { throw error("write (synced)", path: path, errno: code) }
        let fault = faultInjector?(.write, path)
        let limit = fault == nil ? raw.count : raw.count / 2
        var done = 0
        while done < limit {
            let n = sys_pwrite(fd, raw.baseAddress! + done, limit - done, off_t(offset + done))
            if n > 0 { done += n; continue }
            // A zero-byte write of a non-empty buffer makes no progress: treat it as full.
            if n == 0 { throw error("write at byte \(offset + done)", path: path, errno: ENOSPC) }
            if errno == EINTR { continue }
            throw error("write at byte \(offset + done)", path: path)
        }
        if let fault { throw error("write at byte \(offset + done)", path: path, errno: fault) }
    }

    /// Makes the file's data and size durable. On Darwin plain `fsync` stops at the drive's
    /// cache, so `F_FULLFSYNC` is used there.
    static func fsync(_ fd: Int32, path: String) throws {
        try flush(fd, path: path, name: "fsync") { sys_fsync($0) }
    }

    /// Makes the file's data durable, and its size when that changed, but not its timestamps:
    /// on a file whose size stays put (a preallocated log segment) that saves the inode write
    /// `fsync` adds to every call (fdatasync(2): "a change to the file size ... would require
    /// a metadata flush"). Darwin has no cheaper full flush than `F_FULLFSYNC`.
    static func fdatasync(_ fd: Int32, path: String) throws {
        try flush(fd, path: path, name: "fdatasync") { sys_fdatasync($0) }
    }

    /// Runs `call` (retried on EINTR), or `F_FULLFSYNC` on Darwin, with fault injection.
    private static func flush(_ fd: Int32, path: String, name: String, _ call: (Int32) -> Int32) throws {
        if let code = faultInjector?(.fsync, path) { throw error(name, path: path, errno: code) }
        while true {
            #if canImport(Darwin)
            let rc = fcntl(fd, F_FULLFSYNC)
            #else
            let rc = call(fd)
            #endif
            if rc == 0 { return }
            if errno != EINTR { throw error(name, path: path) }
        }
    }

    static func ftruncate(_ fd: Int32, size: Int, path: String) throws {
        if let code = faultInjector?(.truncate, path) { throw error("truncate to \(size) bytes", path: path, errno: code) }
        while true {
            if sys_ftruncate(fd, off_t(size)) == 0 { return }
            if errno != EINTR { throw error("truncate to \(size) bytes", path: path) }
        }
    }

    static func fileSize(_ fd: Int32, path: String) throws -> Int {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw error("stat", path: path) }
        return Int(st.st_size)
    }

    // MARK: Directories

    static func unlink(_ path: String) throws {
        guard sys_unlink(path) == 0 else { throw error("remove", path: path) }
    }

    static func rename(_ from: String, to: String) throws {
        guard sys_rename(from, to) == 0 else { throw error("rename to \(to)", path: from) }
    }

    /// Creates `path` (not its parents). Returns false if it already existed.
    static func makeDirectory(_ path: String) throws -> Bool {
        if sys_mkdir(path, 0o755) == 0 { return true }
        if errno == EEXIST { return false }
        throw error("create directory", path: path)
    }

    /// The names in a directory, without `.` and `..`.
    static func listDirectory(_ path: String) throws -> [String] {
        guard let dir = opendir(path) else { throw error("list directory", path: path) }
        defer { closedir(dir) }
        var names: [String] = []
        while true {
            errno = 0
            guard let entry = readdir(dir) else {
                if errno != 0 { throw error("list directory", path: path) }
                return names
            }
            let name = withUnsafePointer(to: &entry.pointee.d_name) {
                String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self))
            }
            if name != "." && name != ".." { names.append(name) }
        }
    }

    /// Takes an exclusive advisory lock on an open descriptor, without waiting.
    static func lockExclusive(_ fd: Int32, path: String) throws {
        while true {
            if flock(fd, LOCK_EX | LOCK_NB) == 0 { return }
            if errno == EINTR { continue }
            if errno == EWOULDBLOCK {
                throw LogError(.locked, "the log directory is already open (locked by another log instance)", path: path)
            }
            throw error("lock", path: path)
        }
    }
}

// MARK: - Unambiguous names for the C functions (the enum's own methods shadow them)

private func sys_open(_ path: UnsafePointer<CChar>, _ flags: Int32, _ mode: mode_t) -> Int32 { open(path, flags, mode) }
private func sys_close(_ fd: Int32) -> Int32 { close(fd) }
private func sys_pread(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ n: Int, _ off: off_t) -> Int { pread(fd, buf, n, off) }
private func sys_pwrite(_ fd: Int32, _ buf: UnsafeRawPointer, _ n: Int, _ off: off_t) -> Int { pwrite(fd, buf, n, off) }
private func sys_fsync(_ fd: Int32) -> Int32 { fsync(fd) }
#if !canImport(Darwin)
private func sys_fdatasync(_ fd: Int32) -> Int32 { fdatasync(fd) }
#endif
private func sys_ftruncate(_ fd: Int32, _ size: off_t) -> Int32 { ftruncate(fd, size) }
private func sys_unlink(_ path: String) -> Int32 { unlink(path) }
private func sys_rename(_ from: String, _ to: String) -> Int32 { rename(from, to) }
private func sys_mkdir(_ path: String, _ mode: mode_t) -> Int32 { mkdir(path, mode) }
