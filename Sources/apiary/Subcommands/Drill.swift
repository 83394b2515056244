import ApiaryChaos
import ApiaryNode
import ArgumentParser
import Foundation
import NIOCore
import NIOPosix

struct Drill: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Disaster-recovery drills on a running cluster, with an evidence report.",
        subcommands: [ZoneLoss.self]
    )

    struct ZoneLoss: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "zone-loss",
            abstract: "Cut one zone off under writes; measure RTO and RPO; restore it; wait for the rejoin and equal checksums; write the evidence.",
            discussion: """
            On the local cluster (`apiary up`; `--cluster` names the description it writes), the zone is cut off: \
            with `apiary up --zones` (as root) its network namespace drops everything it sends or receives (nftables) \
            until restored; on loopback its processes are stopped (SIGSTOP) and continued (SIGCONT). On a real cluster, name its parts with --monitor, \
            --gateway (repeat), --node NAME=HOST:PORT (both), --certs, and give --cut-command and --restore-command \
            (run with /bin/sh -c and APIARY_DRILL_ZONE set to the zone). Exit status 1 when RPO is not 0, writes did not \
            resume, or the checksums differ.
            """
        )

        @Option(help: "The zone to lose: a, b, c, or primary / standby (the zone of the node in that role at each repetition's start).") var zone: String
        @Option(help: "The local cluster's description (written by `apiary up`).") var cluster = "apiary-demo/cluster.json"
        @Option(help: "A real cluster: the monitor's HOST:PORT.") var monitor: String?
        @Option(help: "A real cluster: a gateway's HOST:PORT (repeat).") var gateway: [String] = []
        @Option(help: "A real cluster: a node, NAME=HOST:PORT (repeat; both nodes).") var node: [String] = []
        @Option(help: "A real cluster: the directory with ca.pem and the operator's certificate.") var certs: String?
        @Option(help: "A real cluster: the command that cuts the zone off.") var cutCommand: String?
        @Option(help: "A real cluster: the command that restores it.") var restoreCommand: String?
        @Option(help: "Repetitions.") var repetitions = 1
        @Option(help: "How long the zone stays away after writes resumed (ms).") var holdMs: Int64 = 2_000
        @Option(help: "Bound on every wait (ms).") var timeoutMs: Int64 = 90_000
        @Option(help: "Where the evidence goes.") var reports = "drill-reports"
        @Flag(help: "Say what the drill would do, and do nothing.") var dryRun = false
        @Flag(help: "Start even if the cluster is not healthy (no sync primary with a promotable standby); refused otherwise.") var force = false

        func validate() throws {
            guard repetitions >= 1 else { throw ValidationError("--repetitions must be at least 1") }
            guard (cutCommand == nil) == (restoreCommand == nil) else { throw ValidationError("--cut-command and --restore-command go together") }
            if monitor != nil {
                guard certs != nil, !gateway.isEmpty, node.count == 2, cutCommand != nil else {
                    throw ValidationError("a real cluster needs --certs, at least one --gateway, two --node NAME=HOST:PORT, --cut-command and --restore-command")
                }
            }
        }

        func run() async throws {
            NIOSingletons.groupLoopCountSuggestion = max(2, System.coreCount)
            let description: ClusterDescription
            if let monitor, let certs {
                var members = [ClusterDescription.Member(name: "monitor", kind: "monitor", zone: "?", address: monitor)]
                for (i, g) in gateway.enumerated() { members.append(.init(name: "gateway-\(i + 1)", kind: "gateway", zone: "?", address: g)) }
                for n in node {
                    let parts = n.split(separator: "=", maxSplits: 1).map(String.init)
                    guard parts.count == 2 else { throw ValidationError("--node \(n): expected NAME=HOST:PORT") }
                    members.append(.init(name: parts[0], kind: "node", zone: "?", address: parts[1]))
                }
                description = ClusterDescription(name: monitor, certificates: certs, members: members)
            } else {
                do { description = try ClusterDescription.load(cluster) } catch { throw ValidationError("\(error)") }
            }
            let cut: ZoneCut = cutCommand.map { .hooks(cut: $0, restore: restoreCommand!) }
                ?? (description.members.contains { $0.namespace != nil } ? .network : .pause)
            var settings = ZoneLossDrill.Settings(zone: zone, cut: cut)
            settings.repetitions = repetitions
            settings.holdMs = holdMs
            settings.timeoutMs = timeoutMs
            settings.force = force
            let drill: ZoneLossDrill
            do { drill = try ZoneLossDrill(cluster: description, settings: settings) } catch { throw ValidationError("\(error)") }
            if dryRun {
                print(try await drill.plan())
                return
            }
            let report = try await drill.run { line in
                print(line)
                fflush(stdout)
            }
            let paths = try report.write(to: reports)
            print(report.summary)
            print("evidence: " + paths.joined(separator: ", "))
            if !report.passed { throw ExitCode(1) }
        }
    }
}
