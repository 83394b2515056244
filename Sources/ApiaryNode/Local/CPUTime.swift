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

/// Which CPUs a process may run on, for benchmarks that give one process a core of its own
/// (as it would have on its own host) on a machine they share.
public enum CPUAffinity {
    /// Restricts every thread of process `pid` to `cpus`, with util-linux's `taskset` (Swift's
    /// Glibc module leaves out `sched_setaffinity`). Threads it makes later inherit the mask of
    /// the thread that makes them, and processes it starts inherit it too.
    public static func pin(_ pid: Int32, to cpus: [Int]) throws {
        let taskset = Process()
        taskset.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
        taskset.arguments = ["--all-tasks", "--cpu-list", "--pid", cpus.map(String.init).joined(separator: ","), String(pid)]
        taskset.standardOutput = FileHandle.nullDevice
        try taskset.run()
        taskset.waitUntilExit()
        guard taskset.terminationStatus == 0 else { throw NodeError("taskset could not pin process \(pid) to CPUs \(cpus) (exit \(taskset.terminationStatus))") }
    }
}
