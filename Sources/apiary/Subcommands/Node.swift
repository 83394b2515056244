import ApiaryCore
import ApiaryNode
import ArgumentParser
import Foundation
import Logging

/// `host:port`, as flags take addresses.
struct Address: ExpressibleByArgument {
    var host: String
    var port: Int
    init?(argument: String) {
        guard let colon = argument.lastIndex(of: ":"), let port = Int(argument[argument.index(after: colon)...]), (0...65535).contains(port) else { return nil }
        host = String(argument[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        self.port = port
    }
}

struct Node: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a database node (primary or standby).")

    @Option(help: "This node's name; its certificate <certs>/<name>.pem must be a node certificate.") var name: String
    @Option(help: "primary or standby.") var role: String
    @Option(help: "Data directory (tenant databases and logs).") var data: String
    @Option(help: "Directory with ca.pem and this node's certificate and key.") var certs = "certs"
    @Option(help: "HTTPS API address (host:port).") var api = Address(argument: "127.0.0.1:4001")!
    @Option(help: "Primary: replication listen address (host:port).") var replication = Address(argument: "127.0.0.1:4002")!
    @Option(help: "Standby: the primary's replication address (host:port).") var primary: Address?
    @Option(help: "Primary: sync (every commit waits for the standby) or single (no standby).") var mode = "sync"
    @Option(help: "Primary: the only node name allowed to connect as standby.") var standby: String?
    @Option(help: "Primary, sync mode: how long a commit waits for the standby before it fails.") var standbyWaitMs: Int64 = 2000
    @Option(help: "Replication heartbeat interval.") var heartbeatIntervalMs: Int64 = 100
    @Option(help: "A silent replication connection is closed after this long.") var peerTimeoutMs: Int64 = 1000
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"

    func validate() throws {
        guard ["primary", "standby"].contains(role) else { throw ValidationError("--role must be primary or standby") }
        guard ["sync", "single"].contains(mode) else { throw ValidationError("--mode must be sync or single") }
        if role == "standby" && primary == nil { throw ValidationError("a standby needs --primary host:port") }
        guard standbyWaitMs > 0, heartbeatIntervalMs > 0, peerTimeoutMs > heartbeatIntervalMs else {
            throw ValidationError("timers must be positive, and --peer-timeout-ms larger than --heartbeat-interval-ms")
        }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level \(logLevel)") }
    }

    func run() async throws {
        var config = NodeConfiguration(name: name, role: role == "primary" ? .primary : .standby, dataDirectory: data, certificatesDirectory: certs)
        config.apiHost = api.host
        config.apiPort = api.port
        config.replicationHost = replication.host
        config.replicationPort = replication.port
        if let primary {
            config.primaryHost = primary.host
            config.primaryPort = primary.port
        }
        config.mode = mode == "sync" ? .sync : .single
        config.standbyName = standby
        config.replication.standbyWaitMs = standbyWaitMs
        config.replication.heartbeatIntervalMs = heartbeatIntervalMs
        config.replication.peerTimeoutMs = peerTimeoutMs
        var logger = Logger(label: "apiary.node.\(name)")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        try await NodeServer.run(config, logger: logger)
    }
}
