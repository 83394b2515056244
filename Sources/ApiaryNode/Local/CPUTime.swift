#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation

/// A process's CPU time (user + system), as Linux counts it in /proc, for benchmarks: CPU per
/// insert is steadier than throughput on a shared machine.
public enum CPUTime {
    public static let microsecondsPerTick = 1e6 / Double(sysconf(Int32(_SC_CLK_TCK)))

    /// Clock ticks used so far by process `pid`; nil if it is gone (or not Linux).
    public static func ticks(of pid: Int32) -> UInt64? {
        guard pid > 0, let stat = ProcFile.read("/proc/\(pid)/stat"),
              let close = stat.lastIndex(of: ")") else { return nil }
        // After "pid (comm)" come state (field 3) … utime and stime (fields 14 and 15).
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = UInt64(fields[11]), let system = UInt64(fields[12]) else { return nil }
        return user + system
    }
}
