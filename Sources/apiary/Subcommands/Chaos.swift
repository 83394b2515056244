import ApiaryChaos
import ArgumentParser
import Foundation
import NIOCore
import NIOPosix

struct Chaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Chaos tests: a real local cluster, a workload through the gateways, faults on schedule, history checks and a report.",
        subcommands: [Run.self]
    )

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a scenario (chaos/scenarios/NAME.json, or a path); exit 1 when a check fails.",
            discussion: "Writes a JSON report and an HTML page with a timeline to --reports. Process faults on loopback for now (kill -9, SIGSTOP/SIGCONT, restarts); zones in network namespaces are a later step (docs/chaos.md)."
        )
        @Argument(help: "The scenario: a name in --scenarios, or a path to a JSON file.") var scenario: String
        @Option(help: "Where scenarios are.") var scenarios = "chaos/scenarios"
        @Option(help: "Where reports go.") var reports = "chaos/reports"
        @Option(help: "Working directory of the cluster (removed afterwards unless --keep).") var dir: String?
        @Flag(help: "Keep the working directory (logs, data).") var keep = false
        @Option(help: "The cluster's base port (nodes, monitor 20 higher, gateways 30 higher).") var basePort = 30001

        func run() async throws {
            NIOSingletons.groupLoopCountSuggestion = max(2, System.coreCount)
            let loaded: Scenario
            do { loaded = try Scenario.load(scenario, directory: scenarios) } catch { throw ValidationError("\(error)") }
            let directory = dir ?? (NSTemporaryDirectory() + "apiary-chaos-\(getpid())")
            defer { if !keep { try? FileManager.default.removeItem(atPath: directory) } }
            let runner = ChaosRunner(scenario: loaded, settings: .init(executable: "/proc/self/exe".resolvedLink, directory: directory,
                                                                        reportsDirectory: reports, basePort: basePort))
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
