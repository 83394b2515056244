import ApiaryMonitor
import ApiaryMonitorService
import ArgumentParser
import Foundation
import Logging

/// `NAME` or `NAME@ZONE`, as the formation's nodes are given.
struct FormationNodeArgument: ExpressibleByArgument {
    var node: FormationNode
    init?(argument: String) {
        let parts = argument.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        guard let name = parts.first, !name.isEmpty, parts.count == 1 || !parts[1].isEmpty else { return nil }
        node = FormationNode(id: name, zone: parts.count == 2 ? parts[1] : "default")
    }
}

struct Monitor: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the health monitor of a formation (a third zone): assigns goals, promotes, keeps the history.",
        discussion: "The first start creates the formation from --formation, --primary and --standby; later starts load it from <data>/monitor.db."
    )

    @Option(help: "The monitor's certificate name in --certs (a monitor certificate).") var name = "monitor"
    @Option(help: "Directory with ca.pem and the monitor's certificate and key.") var certs = "certs"
    @Option(help: "Directory for monitor.db.") var data: String
    @Option(help: "HTTPS address nodes and operators connect to (host:port).") var listen = Address(argument: "127.0.0.1:4100")!
    @Option(help: "The formation's name (to create it; checked against the store otherwise).") var formation: String?
    @Option(help: "To create the formation: its first writer, NAME or NAME@ZONE.") var primary: FormationNodeArgument?
    @Option(help: "To create the formation: its standby, NAME or NAME@ZONE (omit for a lone node).") var standby: FormationNodeArgument?
    @Option(help: "To create the formation: its first epoch (the nodes' epoch).") var epoch: UInt64 = 1
    @Option(help: "A writer silent this long is lost (with its standby's confirmation).") var primaryTimeoutMs: Int64 = 500
    @Option(help: "A standby's confirmation counts for this long.") var standbyTimeoutMs: Int64 = 500
    @Option(help: "After a start, decide nothing until every node is heard or this long has passed.") var startupGraceMs: Int64 = 2_000
    @Option(help: "A switchover not completed in this long is abandoned.") var switchoverTimeoutMs: Int64 = 10_000
    @Option(help: "How often the monitor checks for silent nodes.") var tickIntervalMs: Int64 = 100
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"

    func validate() throws {
        guard epoch > 0 else { throw ValidationError("--epoch must be positive") }
        guard primaryTimeoutMs > 0, standbyTimeoutMs > 0, startupGraceMs >= 0, switchoverTimeoutMs > 0, tickIntervalMs > 0 else {
            throw ValidationError("timeouts and --tick-interval-ms must be positive (--startup-grace-ms may be 0)")
        }
        guard tickIntervalMs < primaryTimeoutMs else { throw ValidationError("--tick-interval-ms must be below --primary-timeout-ms") }
        if standby != nil && primary == nil { throw ValidationError("--standby needs --primary") }
        if primary != nil && formation == nil { throw ValidationError("--primary needs --formation") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level \(logLevel)") }
    }

    func run() async throws {
        var config = MonitorProcessConfiguration(name: name, certificatesDirectory: certs, dataDirectory: data)
        config.host = listen.host
        config.port = listen.port
        config.formation = formation
        config.primary = primary?.node
        config.standby = standby?.node
        config.initialEpoch = .init(epoch)
        config.core.primaryTimeoutMs = primaryTimeoutMs
        config.core.standbyTimeoutMs = standbyTimeoutMs
        config.core.startupGraceMs = startupGraceMs
        config.core.switchoverTimeoutMs = switchoverTimeoutMs
        config.tickIntervalMs = tickIntervalMs
        var logger = Logger(label: "apiary.monitor.\(name)")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        do {
            try await MonitorProcess.run(config, logger: logger)
        } catch let error as MonitorSetupError {
            throw ValidationError(error.description)
        }
    }
}
