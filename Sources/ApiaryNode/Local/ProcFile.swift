import Foundation

/// The whole of a file under /proc. `String(contentsOfFile:)` reads as much as the file's size
/// says, and /proc files say 0: it returned only the first 4 KiB of /proc/net/tcp and
/// /proc/mounts, and what came after was missed.
public enum ProcFile {
    public static func read(_ path: String) -> String? {
        guard let file = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? file.close() }
        return String(decoding: file.readDataToEndOfFile(), as: UTF8.self)
    }
}
