#if os(Linux)
import Glibc

/// Names the seeds being simulated when the process dies of a failed precondition in a core:
/// a crash cannot be caught as an error, so without this a failing seed would go unnamed.
///
/// Active only between `install(replay:)` and `uninstall()` (every test target shares the
/// process). Shared by the replication and monitor simulations.
/// The handler uses only `write(2)` and preallocated memory, then puts the previous handler
/// back and re-raises, so the runtime's own crash report (with its backtrace) still follows.
public enum CrashReporter {
    public static let slots = 16
    private static let signals: [Int32] = [SIGILL, SIGTRAP, SIGABRT, SIGSEGV, SIGBUS]
    private static let seeds: UnsafeMutablePointer<UInt64> = {
        let p = UnsafeMutablePointer<UInt64>.allocate(capacity: slots)
        p.initialize(repeating: UInt64.max, count: slots)
        return p
    }()
    /// The handlers that were in place, by signal number.
    private static let previous: UnsafeMutablePointer<sigaction> = {
        let p = UnsafeMutablePointer<sigaction>.allocate(capacity: 64)
        p.initialize(repeating: sigaction(), count: 64)
        return p
    }()

    /// How to replay a seed, printed after the seeds (set by `install`, read by the handler).
    nonisolated(unsafe) private static var replayHint: StaticString = ""

    /// - Parameter replay: the command that replays one seed, e.g. "APIARY_SIM_SEED=<seed> swift test --filter X".
    public static func install(replay: StaticString) {
        _ = seeds
        replayHint = replay
        for sig in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { received in
                CrashReporter.report()
                sigaction(received, CrashReporter.previous + Int(received), nil)
                raise(received)
            }
            sigemptyset(&action.sa_mask)
            sigaction(sig, &action, previous + Int(sig))
        }
    }

    public static func uninstall() {
        for sig in signals { sigaction(sig, previous + Int(sig), nil) }
    }

    public static func running(_ seed: UInt64, worker: Int) { seeds[worker % slots] = seed }
    public static func finished(worker: Int) { seeds[worker % slots] = UInt64.max }

    private static func report() {
        writeText("\n*** simulation crashed; seeds running: ")
        for i in 0..<slots where seeds[i] != UInt64.max {
            writeNumber(seeds[i])
            writeText(" ")
        }
        writeText("(replay one with ")
        writeText(replayHint)
        writeText(")\n")
    }

    private static func writeText(_ s: StaticString) {
        _ = write(2, s.utf8Start, s.utf8CodeUnitCount)
    }

    private static func writeNumber(_ n: UInt64) {
        var digits = (UInt64(0), UInt64(0), UInt64(0)) // 24 bytes: room for 20 digits
        withUnsafeMutableBytes(of: &digits) { buffer in
            var value = n
            var i = buffer.count
            repeat {
                i -= 1
                buffer[i] = UInt8(48 + value % 10)
                value /= 10
            } while value > 0
            _ = write(2, buffer.baseAddress! + i, buffer.count - i)
        }
    }
}
#else
/// Seeds of a crashing run are named on Linux only; elsewhere a crash shows the backtrace alone.
public enum CrashReporter {
    public static func install(replay: StaticString) {}
    public static func uninstall() {}
    public static func running(_ seed: UInt64, worker: Int) {}
    public static func finished(worker: Int) {}
}
#endif
