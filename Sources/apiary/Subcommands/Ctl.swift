import ApiaryMonitorService
import ApiaryMonitor
import ApiaryNode
import ApiaryTLS
import ArgumentParser
import Foundation
import NIOHTTP1
import NIOPosix

struct Ctl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Operate a cluster (with an operator certificate).",
        subcommands: [Verify.self, Status.self, Events.self, Switchover.self, Failover.self, Maintenance.self, Promote.self, Tenant.self, User.self, Token.self]
    )

    /// Where the operator's certificate is: shared by every `ctl` subcommand.
    struct OperatorOptions: ParsableArguments {
        @Option(help: "Directory with ca.pem and the operator certificate.") var certs = "certs"
        @Option(help: "Operator certificate name in --certs.") var `operator` = "operator"

        func credentials() throws -> ClusterCredentials {
            let credentials = try ClusterCredentials(directory: certs, name: `operator`)
            guard credentials.identity.role == .operator else {
                throw ValidationError("\(`operator`)'s certificate is for role \(credentials.identity.role.rawValue); ctl needs an operator certificate")
            }
            return credentials
        }
    }

    struct Verify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Compare every tenant's (epoch, lsn, checksum) on the primary and the standby.",
            discussion: "Exits non-zero when the two nodes hold different checksums at the same lsn, or a node is unreachable."
        )
        @Option(help: "The primary's HTTPS API (host:port).") var primary: Address
        @Option(help: "The standby's HTTPS API (host:port).") var standby: Address
        @OptionGroup var options: OperatorOptions
        @Option(help: "Wait up to this long for the standby to reach the primary's lsns before comparing.") var waitMs = 10_000

        func run() async throws {
            let report = try await ClusterVerifier(certificatesDirectory: options.certs, operatorName: options.operator)
                .verify(primary: (primary.host, primary.port), standby: (standby.host, standby.port), waitMs: waitMs)
            print(report.text)
            if !report.consistent { throw ExitCode(1) }
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The formation as the monitor sees it (--monitor: a table, or --json), or one node's role, epoch and per-tenant positions (--node, JSON)."
        )
        @Option(help: "The node's HTTPS API (host:port).") var node: Address?
        @Option(help: "The monitor's HTTPS address (host:port).") var monitor: Address?
        @Flag(help: "With --monitor: print the monitor's JSON.") var json = false
        @OptionGroup var options: OperatorOptions

        func validate() throws {
            guard (node == nil) != (monitor == nil) else { throw ValidationError("give exactly one of --node and --monitor") }
        }

        func run() async throws {
            if let monitor {
                let response = try await MonitorCtl.get("/status", monitor: monitor, credentials: options.credentials())
                try MonitorCtl.check(response)
                if json { return print(response.text) }
                return print(MonitorCtl.statusTable(try JSONDecoder().decode(StatusBody.self, from: Data(response.body))))
            }
            guard let node else { return }
            let response = try await Ctl.request(.GET, "/status", node: node, credentials: options.credentials())
            print(response.text)
            if response.status != 200 { throw ExitCode(1) }
        }
    }

    struct Promote: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Promote a node to primary of a new epoch: through the monitor (NODE --monitor), or a node that runs without one (--node).",
            discussion: """
            Through the monitor: refused unless NODE is a promotable standby, or, for a disaster where the primary is lost and             the standby was not promotable, with --force --accept-data-loss: the answer lists exactly which lsns are lost.             Without a monitor (--node): the standby waits out its lease, applies every record it holds and commits alone.
            """
        )
        @Argument(help: "With --monitor: the node to promote.") var name: String?
        @Option(help: "The monitor's HTTPS address (host:port).") var monitor: Address?
        @Option(help: "Without a monitor: the standby's HTTPS API (host:port).") var node: Address?
        @Flag(help: "With --monitor: promote a node that is not promotable or not heard (a lost primary's standby).") var force = false
        @Flag(help: "With --force: accept losing the commits the monitor lists.") var acceptDataLoss = false
        @Flag(help: "With --monitor: print the monitor's JSON.") var json = false
        @OptionGroup var options: OperatorOptions

        func validate() throws {
            guard (node == nil) != (monitor == nil) else { throw ValidationError("give exactly one of --monitor (with NODE) and --node") }
            if monitor != nil && name == nil { throw ValidationError("--monitor needs the node to promote: ctl promote NODE --monitor HOST:PORT") }
            if node != nil && (name != nil || force || acceptDataLoss) { throw ValidationError("--node promotes that node; NODE, --force and --accept-data-loss go with --monitor") }
        }

        func run() async throws {
            if let monitor, let name {
                let body = CommandBody(node: name, force: force, acceptDataLoss: acceptDataLoss)
                return try await MonitorCtl.command("promote", body, monitor: monitor, credentials: options.credentials(), json: json)
            }
            guard let node else { return }
            let response = try await Ctl.request(.POST, "/admin/promote", node: node, credentials: options.credentials())
            print(response.text)
            if response.status != 200 { throw ExitCode(1) }
        }
    }

    static func request(_ method: HTTPMethod, _ path: String, node: Address, credentials: ClusterCredentials) async throws -> HTTPSConnection.Response {
        let connection = try await HTTPSConnection.connect(host: node.host, port: node.port, tls: credentials.clusterClient(),
                                                           group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await connection.close() } }
        return try await connection.request(method, path)
    }
}
