import ApiaryChaos
import ArgumentParser
import Foundation
import NIOCore
import NIOPosix

struct Chaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Chaos tests: a real local cluster, a workload through the gateways, faults on schedule, history checks and a report.",
        subcommands: [Run.self, DelayPackets.self]
    )

    /// Started by the runner inside a zone's namespace for a `delay` fault (`PacketDelayer`).
    struct DelayPackets: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "delay-packets",
            abstract: "Hold the packets an NFQUEUE rule sends to --queue (delay, jitter, reordering), until SIGTERM.",
            shouldDisplay: false
        )
        @Option(help: "The NFQUEUE queue number.") var queue: UInt16
        @Option(help: "How long each packet is held, ms.") var delayMs: Int
        @Option(help: "Plus or minus up to this, uniformly, ms (at most the delay).") var jitterMs = 0
        @Option(help: "This share of packets goes at once, overtaking those held.") var reorderPercent = 0
        @Option(help: "Seed of the random delays.") var seed: UInt64 = 1

        func validate() throws {
            guard delayMs >= 0, delayMs <= 60_000, jitterMs >= 0, jitterMs <= delayMs, (0...100).contains(reorderPercent) else {
                throw ValidationError("--delay-ms 0...60000, --jitter-ms at most the delay, --reorder-percent 0...100")
            }
        }

        func run() throws {
            let stopping = LockedFlag()
            signal(SIGTERM, SIG_IGN)
            signal(SIGINT, SIG_IGN)
            let sources = [SIGTERM, SIGINT].map { sig -> any DispatchSourceSignal in
                let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
                source.setEventHandler { stopping.set() }
                source.resume()
                return source
            }
            defer { withExtendedLifetime(sources) {} }
            let delayer = try PacketDelayer(queue: queue, schedule: DelaySchedule(delayMs: delayMs, jitterMs: jitterMs, reorderPercent: reorderPercent))
            print("holding packets of queue \(queue): \(delayMs) ms ± \(jitterMs) ms, \(reorderPercent)% reordered")
            fflush(stdout)
            // Ends with the run that started it too, even one killed outright.
            let parent = getppid()
            try delayer.run(seed: seed) { stopping.isSet || getppid() != parent }
        }
    }

    final class LockedFlag: @unchecked Sendable {
        private let lock = NSLock()
        private var value = false
        func set() { lock.withLock { value = true } }
        var isSet: Bool { lock.withLock { value } }
    }

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a scenario (chaos/scenarios/NAME.json, or a path); exit 1 when a check fails.",
            discussion: "Writes a JSON report and an HTML page with a timeline to --reports. As root, the three zones are Linux network namespaces and network faults (isolate, cut, cut_one_way, loss) are nftables rules in them and delay an NFQUEUE packet delayer; otherwise everything runs on loopback with process faults only (kill -9, SIGSTOP/SIGCONT, restarts), and the report says so (docs/chaos.md). Ctrl-C stops the cluster and removes the namespaces."
        )
        @Argument(help: "The scenario: a name in --scenarios, or a path to a JSON file.") var scenario: String
        @Option(help: "Where scenarios are.") var scenarios = "chaos/scenarios"
        @Option(help: "Where reports go.") var reports = "chaos/reports"
        @Option(help: "Working directory of the cluster (removed afterwards unless --keep).") var dir: String?
        @Flag(help: "Keep the working directory (logs, data).") var keep = false
        @Option(help: "The cluster's base port (nodes, monitor 20 higher, gateways 30 higher).") var basePort = 30001
        @Flag(help: "Run on loopback (process faults only) even where zones could be network namespaces.") var loopback = false

        func run() async throws {
            NIOSingletons.groupLoopCountSuggestion = max(2, System.coreCount)
            let loaded: Scenario
            do { loaded = try Scenario.load(scenario, directory: scenarios) } catch { throw ValidationError("\(error)") }
            let directory = dir ?? (NSTemporaryDirectory() + "apiary-chaos-\(getpid())")
            defer { if !keep { try? FileManager.default.removeItem(atPath: directory) } }
            let runner = try ChaosRunner(scenario: loaded, settings: .init(executable: "/proc/self/exe".resolvedLink, directory: directory,
                                                                            reportsDirectory: reports, basePort: basePort, loopback: loopback))
            // Interrupted: the cluster stopped and the namespaces removed before exiting.
            signal(SIGINT, SIG_IGN)
            signal(SIGTERM, SIG_IGN)
            let sources = [SIGINT, SIGTERM].map { sig -> any DispatchSourceSignal in
                let source = DispatchSource.makeSignalSource(signal: sig)
                source.setEventHandler {
                    print("interrupted: stopping the cluster and removing its zones")
                    runner.abort()
                    if !keep { try? FileManager.default.removeItem(atPath: directory) }
                    Glibc.exit(130)
                }
                source.resume()
                return source
            }
            defer { withExtendedLifetime(sources) {} }
            let report = try await runner.run { line in
                print(line)
                fflush(stdout)
            }
            let written = try report.write(to: reports)
            print(report.summary)
            print("report: \(written.json) and \(written.html)")
            if !report.passed { throw ExitCode(1) }
        }
    }
}
