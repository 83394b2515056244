import ApiaryCore
import ApiaryReplication
import Foundation

/// Where a node keeps things: `<data>/tenants/<tenant>/{db.sqlite,log/,applied}` (and, while a
/// snapshot is received or installed, `snapshot.tmp` and `snapshot.install`) and
/// `<data>/node-state` (the node's durable role and epoch).
struct DataLayout {
    let root: String

    var tenantsDirectory: String { root + "/tenants" }
    func tenantDirectory(_ t: TenantID) -> String { tenantsDirectory + "/" + t.rawValue }
    func database(_ t: TenantID) -> String { tenantDirectory(t) + "/db.sqlite" }
    func log(_ t: TenantID) -> String { tenantDirectory(t) + "/log" }
    func applied(_ t: TenantID) -> String { tenantDirectory(t) + "/applied" }
    func snapshotScratch(_ t: TenantID) -> String { tenantDirectory(t) + "/snapshot.tmp" }
    /// A standby's snapshot install in progress (`SnapshotInstall.swift`).
    func snapshotInstallMarker(_ t: TenantID) -> String { tenantDirectory(t) + "/snapshot.install" }
    var nodeState: String { root + "/node-state" }
    /// A dropped tenant's directory while it is deleted: no tenant name starts with a dot.
    static let droppedPrefix = ".dropped-"

    /// Removes what deleting dropped tenants left when the node stopped part-way.
    func removeDroppedLeftovers() {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: tenantsDirectory)) ?? []
        for name in names where name.hasPrefix(Self.droppedPrefix) {
            try? FileManager.default.removeItem(atPath: tenantsDirectory + "/" + name)
        }
    }

    /// Tenants that exist on disk (directories with a valid tenant name).
    func existingTenants() throws -> [TenantID] {
        guard FileManager.default.fileExists(atPath: tenantsDirectory) else { return [] }
        return try FileManager.default.contentsOfDirectory(atPath: tenantsDirectory)
            .compactMap { try? TenantID(stored: $0) }.sorted()
    }

    func createTenantDirectory(_ t: TenantID) throws {
        try FileManager.default.createDirectory(atPath: log(t), withIntermediateDirectories: true)
    }
}

/// The node's epoch, kept durably (write to a temp file, fsync, rename, fsync the directory):
/// a node must never go back to an older epoch after a restart (invariant 3).
struct NodeStateFile {
    let path: String

    func read() throws -> DurableNodeState? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        do {
            return try DurableNodeState(text: String(decoding: data, as: UTF8.self))
        } catch {
            throw NodeError("\(path) is damaged (\(error)); the node will not guess its role")
        }
    }

    func write(_ state: NodeState) throws {
        try DurableFile.replace(path, with: Array(state.text.utf8))
    }
}

enum DurableFile {
    /// Atomically and durably replaces `path` with `bytes`.
    static func replace(_ path: String, with bytes: [UInt8]) throws {
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw NodeError("cannot write \(tmp): \(String(cString: strerror(errno)))") }
        let written = write(fd, bytes, bytes.count)
        let synced = fsync(fd)
        close(fd)
        guard written == bytes.count, synced == 0 else { throw NodeError("cannot write \(tmp): \(String(cString: strerror(errno)))") }
        try rename(tmp, to: path)
    }

    /// Renames durably: the directory entry is fsynced too, or the rename may not survive a crash.
    static func rename(_ from: String, to: String) throws {
        guard Glibc.rename(from, to) == 0 else { throw NodeError("cannot rename \(from) to \(to): \(String(cString: strerror(errno)))") }
        try syncDirectory(of: to)
    }

    /// Removes `path` durably (its directory is fsynced); a file that is gone already is not an
    /// error, so a step that removes a file can run again after a crash.
    static func remove(_ path: String) throws {
        guard unlink(path) == 0 || errno == ENOENT else { throw NodeError("cannot remove \(path): \(String(cString: strerror(errno)))") }
        try syncDirectory(of: path)
    }

    private static func syncDirectory(of path: String) throws {
        let directory = (path as NSString).deletingLastPathComponent
        let dir = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dir >= 0 else { throw NodeError("cannot open \(directory): \(String(cString: strerror(errno)))") }
        defer { close(dir) }
        guard fsync(dir) == 0 else { throw NodeError("cannot fsync \(directory): \(String(cString: strerror(errno)))") }
    }
}

/// A node-level operational error (bad configuration, damaged state): stops the node with a clear message.
public struct NodeError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
