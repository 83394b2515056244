/// An operational failure of a ``ReplicationLog``: what went wrong, where, and what to do.
///
/// The message names the file (and the byte offset, for corruption) so that an operator can
/// find the damage; it never contains record contents.
public struct LogError: Error, CustomStringConvertible, Equatable {
    public enum Code: String, Sendable, Equatable {
        /// Bytes on disk are not a valid log: a bad header, a bad record that is not a torn
        /// tail, or a gap in lsn or base continuity. The log refuses to open; it needs repair
        /// (or a fresh log and a snapshot).
        case corrupt
        /// A system call failed (other than for lack of space).
        case io
        /// The file system is out of space (`ENOSPC`) or quota (`EDQUOT`). Retry after freeing
        /// space; the log is as it was before the failed call.
        case diskFull
        /// An append whose lsn does not follow `last.lsn` or whose epoch is older than `last.epoch`.
        case outOfOrder
        /// A record larger than ``ReplicationLog/Options/recordBytesMax`` or beyond the record
        /// codec's limits (pages per record, bytes per page).
        case tooLarge
        /// The lsn asked for lies below the first lsn the log still holds (removed by retention
        /// or before the base of a reset). A reader this far behind needs a snapshot.
        case notRetained
        /// Another open log (in this or another process) holds the directory's lock.
        case locked
        /// The log was closed, or an earlier failure left it in an unknown state; open it again.
        case unusable
    }

    public let code: Code
    /// The file or directory concerned, when there is one.
    public let path: String?
    /// The byte offset in `path` where the problem lies (corruption), when known.
    public let offset: Int?
    public let message: String
    /// The system's error number, when a system call failed.
    public let errno: Int32?

    public init(_ code: Code, _ message: String, path: String? = nil, offset: Int? = nil, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.path = path
        self.offset = offset
        self.errno = errno
    }

    public var description: String {
        var s = "log \(code.rawValue): \(message)"
        if let path { s += " [\(path)" + (offset.map { " @ byte \($0)" } ?? "") + "]" }
        return s
    }
}
