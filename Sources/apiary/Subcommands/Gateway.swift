import ApiaryNode
import ArgumentParser
import Foundation
import Logging
import NIOCore
import NIOPosix

/// `NAME=HOST:PORT`: a node's API address by its certificate name.
struct NodeAddressArgument: ExpressibleByArgument {
    var name: String
    var address: Address
    init?(argument: String) {
        let parts = argument.split(separator: "=", maxSplits: 1).map(String.init)
        guard parts.count == 2, !parts[0].isEmpty, let address = Address(argument: parts[1]) else { return nil }
        name = parts[0]
        self.address = address
    }
}

struct Gateway: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a gateway: one HTTPS endpoint for applications that follows the primary through failover.",
        discussion: "Stateless: run any number, anywhere. It learns the writer from the monitor's topology watch, forwards each request to it over mutual TLS, holds requests while there is none (--hold-ms), and sends a request again only when that cannot apply it twice (docs/gateway.md)."
    )

    @Option(help: "The gateway's certificate name in --certs (a gateway certificate).") var name = "gateway"
    @Option(help: "Directory with ca.pem and the gateway's certificate and key.") var certs = "certs"
    @Option(help: "The HTTPS address applications connect to (host:port).") var listen = Address(argument: "127.0.0.1:4000")!
    @Option(help: "A plain-HTTP address (host:port) that only redirects to the HTTPS one (308); none by default.") var httpListen: Address?
    @Option(help: "The monitor's address (host:port).") var monitor: Address
    @Option(help: "A node's API address by its certificate name, NAME=HOST:PORT; once per node.") var node: [NodeAddressArgument] = []
    @Option(help: "How long a request may be held through a failover before the client is answered.") var holdMs: Int64 = 5_000
    @Option(help: "Requests per second per client address (twice as many at once); past it: 429. A guard against a runaway client, not a quota.") var clientRate: Double = 50_000
    @Option(help: "Open connections per client address at most.") var clientConnectionsMax = 256
    @Option(help: "Open connections in total at most.") var connectionsMax = 4_096
    @Option(help: "The certificate (PEM, leaf first) applications see; default: the gateway's cluster certificate.") var apiCertificate: String?
    @Option(help: "The private key (PEM) of --api-certificate.") var apiKey: String?
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"
    @Option(help: "Event loop threads (default: one per core, at least 2).") var eventLoops: Int?

    func validate() throws {
        guard !node.isEmpty else { throw ValidationError("give each node's API address: --node NAME=HOST:PORT") }
        guard Set(node.map(\.name)).count == node.count else { throw ValidationError("a node is given twice") }
        guard holdMs > 0 else { throw ValidationError("--hold-ms must be positive") }
        guard clientRate > 0, clientConnectionsMax > 0, connectionsMax >= clientConnectionsMax else {
            throw ValidationError("rates and connection limits must be positive, --connections-max at least --client-connections-max")
        }
        guard (apiCertificate == nil) == (apiKey == nil) else { throw ValidationError("--api-certificate and --api-key go together") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level \(logLevel)") }
        if let eventLoops, !(1...256).contains(eventLoops) { throw ValidationError("--event-loops must be 1...256") }
    }

    func run() async throws {
        NIOSingletons.groupLoopCountSuggestion = eventLoops ?? max(2, System.coreCount)
        NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
        var config = GatewayConfiguration(name: name, certificatesDirectory: certs)
        config.host = listen.host
        config.port = listen.port
        config.monitorHost = monitor.host
        config.monitorPort = monitor.port
        config.nodes = Dictionary(uniqueKeysWithValues: node.map { ($0.name, (host: $0.address.host, port: $0.address.port)) })
        config.core.holdMs = holdMs
        config.redirectHost = httpListen?.host
        config.redirectPort = httpListen?.port ?? 0
        config.perAddressRate = .init(perSecond: clientRate, burst: max(1, clientRate * 2))
        config.limits.connectionsPerAddressMax = clientConnectionsMax
        config.limits.connectionsMax = connectionsMax
        config.apiCertificatePath = apiCertificate
        config.apiKeyPath = apiKey
        var logger = Logger(label: "apiary.gateway.\(name)")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        try await GatewayServer.run(config, logger: logger)
    }
}
