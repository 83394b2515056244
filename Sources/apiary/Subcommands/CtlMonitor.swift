import ApiaryMonitor
import ApiaryMonitorService
import ApiaryNode
import ApiaryTLS
import ArgumentParser
import Foundation
import NIOHTTP1
import NIOPosix

/// `ctl status --monitor` and `ctl events`: the monitor's view, as a table or `--json`.
enum MonitorCtl {
    static func get(_ path: String, monitor: Address, credentials: ClusterCredentials) async throws -> HTTPSConnection.Response {
        let connection = try await HTTPSConnection.connect(host: monitor.host, port: monitor.port, tls: credentials.clusterClient(),
                                                           group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await connection.close() } }
        return try await connection.request(.GET, path)
    }

    static func post(_ path: String, body: [UInt8] = Array("{}".utf8), monitor: Address, credentials: ClusterCredentials) async throws -> HTTPSConnection.Response {
        let connection = try await HTTPSConnection.connect(host: monitor.host, port: monitor.port, tls: credentials.clusterClient(),
                                                           group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await connection.close() } }
        return try await connection.request(.POST, path, body: body)
    }

    /// Prints the monitor's error and fails, for any non-200 answer.
    static func check(_ response: HTTPSConnection.Response) throws {
        guard response.status == 200 else {
            let message = (try? JSONDecoder().decode(ErrorBody.self, from: Data(response.body)))?.error ?? response.text
            FileHandle.standardError.write(Data("monitor answered \(response.status): \(message)\n".utf8))
            throw ExitCode(1)
        }
    }

    /// Sends an operator command; prints the monitor's message (and any data-loss report) and
    /// fails when it was refused.
    static func command(_ name: String, _ body: CommandBody, monitor: Address, credentials: ClusterCredentials, json: Bool) async throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let response = try await post("/commands/" + name, body: Array(try encoder.encode(body)), monitor: monitor, credentials: credentials)
        guard response.status == 200 || response.status == 409,
              let answer = try? JSONDecoder().decode(CommandAnswerBody.self, from: Data(response.body)) else {
            return try check(response)
        }
        if json {
            print(response.text)
        } else {
            print(answer.message)
            if let loss = answer.dataLoss {
                print("data loss: " + loss.text)
                for t in loss.tenants {
                    print("  \(t.tenant): lsns \(t.promotedLSN + 1)...\(t.primaryLSN) (\(t.primaryLSN - t.promotedLSN) commits)")
                }
            }
        }
        if !answer.accepted { throw ExitCode(1) }
    }

    static func statusTable(_ s: StatusBody) -> String {
        var lines = ["formation \(s.formation), epoch \(s.epoch)" + (s.deciding ? "" : " (startup grace: deciding nothing yet)")]
        let header = ["NODE", "ZONE", "GOAL", "REPORTED", "PROMOTABLE", "LEASE", "HEARD", "LAG (records behind, per tenant)", "LSNS"]
        func perTenant(_ values: [String: UInt64]?) -> String {
            guard let values, !values.isEmpty else { return "-" }
            return values.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        }
        let rows = s.nodes.map { n -> [String] in
            let goal = n.goal + (n.maintenance ? " (maintenance asked)" : "")
            let lease: String = n.lease.map { $0 ? "held" : "not held" } ?? "-"
            let heard: String = n.heardMsAgo.map { "\($0) ms ago" } ?? "not since start"
            return [n.id, n.zone, goal, n.reported ?? "-", n.promotable ? "yes" : "no", lease, heard, perTenant(n.lag), perTenant(n.lsns)]
        }
        lines += table(header: header, rows: rows)
        return lines.joined(separator: "\n")
    }

    static func eventsTable(_ e: EventsBody) -> String {
        let rows = e.events.map { ["#\($0.sequence)", $0.at, String($0.epoch), $0.kind, $0.node ?? "-", $0.text] }
        return table(header: ["SEQ", "AT", "EPOCH", "KIND", "NODE", "TEXT"], rows: rows).joined(separator: "\n")
    }

    static func table(header: [String], rows: [[String]]) -> [String] {
        let all = [header] + rows
        // The last column is not padded: it may be long (an event's text).
        let widths = header.indices.map { i in all.map { $0[i].count }.max() ?? 0 }
        return all.map { row in
            row.indices.map { i in i == row.count - 1 ? row[i] : row[i].padding(toLength: widths[i], withPad: " ", startingAt: 0) }.joined(separator: "  ")
        }
    }
}

extension Ctl {
    struct Events: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the monitor's history: every decision and refusal with its reason.")
        @Option(help: "The monitor's HTTPS address (host:port).") var monitor: Address
        @Option(help: "Only events after this sequence number.") var after: UInt64 = 0
        @Option(help: "At most this many events (the monitor caps it at 1000).") var limit = 100
        @Flag(help: "Print the monitor's JSON.") var json = false
        @OptionGroup var options: OperatorOptions

        func run() async throws {
            let response = try await MonitorCtl.get("/events?after=\(after)&limit=\(limit)", monitor: monitor, credentials: options.credentials())
            try MonitorCtl.check(response)
            if json { return print(response.text) }
            print(MonitorCtl.eventsTable(try JSONDecoder().decode(EventsBody.self, from: Data(response.body))))
        }
    }
}

extension Ctl {
    struct Switchover: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Planned switchover: the primary drains, the in-sync standby takes over in a new epoch, the former primary rejoins as the standby.",
            discussion: "Refused (exit 1, with the reason) unless the standby is in sync and both nodes are heard."
        )
        @Option(help: "The monitor's HTTPS address (host:port).") var monitor: Address
        @Flag(help: "Print the monitor's JSON.") var json = false
        @OptionGroup var options: OperatorOptions

        func run() async throws {
            try await MonitorCtl.command("switchover", CommandBody(), monitor: monitor, credentials: options.credentials(), json: json)
        }
    }

    struct Failover: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Failover drill: the unplanned path at once (epoch raised, standby promoted, primary demoted and rejoining).",
            discussion: "Refused unless the standby is promotable and heard: a drill never loses an acknowledged write."
        )
        @Option(help: "The monitor's HTTPS address (host:port).") var monitor: Address
        @Flag(help: "Print the monitor's JSON.") var json = false
        @OptionGroup var options: OperatorOptions

        func run() async throws {
            try await MonitorCtl.command("failover", CommandBody(), monitor: monitor, credentials: options.credentials(), json: json)
        }
    }

    struct Maintenance: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Take a node out for maintenance (on) or bring it back (off).",
            discussion: "On the standby: it is marked not promotable and the primary commits alone. On the primary: a switchover first. Refused when it would leave no healthy node."
        )
        @Argument(help: "on or off.") var state: String
        @Argument(help: "The node.") var name: String
        @Option(help: "The monitor's HTTPS address (host:port).") var monitor: Address
        @Flag(help: "Print the monitor's JSON.") var json = false
        @OptionGroup var options: OperatorOptions

        func validate() throws {
            guard ["on", "off"].contains(state) else { throw ValidationError("maintenance takes on or off, then the node") }
        }

        func run() async throws {
            try await MonitorCtl.command("maintenance", CommandBody(node: name, enabled: state == "on"), monitor: monitor,
                                         credentials: options.credentials(), json: json)
        }
    }
}
