#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Names the seeds being simulated when the process dies of a failed precondition in a core:
/// a crash cannot be caught as an error, so without this a failing seed would go unnamed.
///
/// The handler uses only `write(2)` and preallocated memory, then re-raises the signal with
/// the default action so that the crash itself is still reported.
enum CrashReporter {
    static let slots = 16
    private static let seeds: UnsafeMutablePointer<UInt64> = {
        let p = UnsafeMutablePointer<UInt64>.allocate(capacity: slots)
        p.initialize(repeating: UInt64.max, count: slots)
        return p
    }()

    static func install() {
        _ = seeds
        for sig in [SIGILL, SIGTRAP, SIGABRT, SIGSEGV, SIGBUS] {
            signal(sig) { received in
                CrashReporter.report()
                signal(received, SIG_DFL)
                raise(received)
            }
        }
    }

    static func running(_ seed: UInt64, worker: Int) { seeds[worker % slots] = seed }
    static func finished(worker: Int) { seeds[worker % slots] = UInt64.max }

    private static func report() {
        writeText("\n*** replication simulation crashed; seeds running: ")
        for i in 0..<slots where seeds[i] != UInt64.max {
            writeNumber(seeds[i])
            writeText(" ")
        }
        writeText("(replay one with APIARY_SIM_SEED=<seed> swift test --filter ReplicationSimulationTests)\n")
    }

    private static func writeText(_ s: StaticString) {
        _ = write(2, s.utf8Start, s.utf8CodeUnitCount)
    }

    private static func writeNumber(_ n: UInt64) {
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                     UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
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
