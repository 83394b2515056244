import ApiaryCore
import ApiaryNode
import ArgumentParser
import Foundation
import Logging
import NIOCore
import NIOPosix

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
    @Option(help: "Standby: the primary's replication address (host:port). Same as --peer.") var primary: Address?
    @Option(help: "The other node's replication address (host:port): the primary this node follows whenever it is the standby (not needed by the lone node of a one-node formation).") var peer: Address?
    @Option(help: "The other node's HTTPS API address (host:port): whenever this node is not the writer, rqlite clients are sent there (301 with Location). Without it they are answered 503 \"not primary\".") var peerApi: Address?
    @Option(help: "The monitor's address (host:port): the node then follows the monitor's goals (promotion, step-down, rejoin); without it only an operator's promote changes its role.") var monitor: Address?
    @Option(help: "With --monitor: how often the node heartbeats to it.") var keeperIntervalMs: Int64 = 100
    @Option(help: "The lease each standby ack grants; a promoted standby waits out its last one. Both nodes should use the same value.") var leaseMs: Int64 = 500
    @Option(help: "Primary: sync (every commit waits for the standby), wait-primary (commits alone, still streams to a standby that connects), or single (no standby).") var mode = "sync"
    @Option(help: "Primary: the only node allowed to connect as standby (by its certificate's name); required unless --mode single.") var standby: String?
    @Option(help: "Primary, sync mode: how long a commit waits for the standby before it fails.") var standbyWaitMs: Int64 = 2000
    @Option(help: "Replication heartbeat interval.") var heartbeatIntervalMs: Int64 = 100
    @Option(help: "A silent replication connection is closed after this long.") var peerTimeoutMs: Int64 = 1000
    @Option(help: "Standby: how much longer than its last granted lease it waits before a promotion (clock-rate drift between the nodes).") var leaseDriftMarginMs: Int64 = 100
    @Option(help: "Primary: tenants this node may hold; creating more is refused (507).") var tenantsMax = 10_000
    @Option(help: "Requests per second one tenant may send to this node (twice that at once); past it: 429 with Retry-After, not executed. Default: no limit.") var tenantRate: Double?
    @Flag(help: "Believe the operator a gateway names (X-Apiary-Operator): operators' certificates then work through the gateways. Off by default: whoever holds a gateway's key could act as any operator.") var operatorsViaGateways = false
    @Option(help: "The certificate (PEM, leaf first) applications see on the API, e.g. from a public CA; default: the node's cluster certificate.") var apiCertificate: String?
    @Option(help: "The private key (PEM) of --api-certificate.") var apiKey: String?
    @Option(help: "Replication log segment size.") var logSegmentBytesMax = 64 << 20
    @Option(help: "Replication log kept per tenant beyond what is applied; a standby further behind gets a snapshot.") var logRetainedBytesMax = 256 << 20
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"

    func validate() throws {
        guard ["primary", "standby"].contains(role) else { throw ValidationError("--role must be primary or standby") }
        guard ["sync", "wait-primary", "single"].contains(mode) else { throw ValidationError("--mode must be sync, wait-primary or single") }
        if role == "standby" && primary == nil && peer == nil { throw ValidationError("a standby needs --peer (or --primary) host:port") }
        guard keeperIntervalMs > 0, leaseMs > 0 else { throw ValidationError("--keeper-interval-ms and --lease-ms must be positive") }
        if role == "primary" && mode != "single" && standby == nil {
            throw ValidationError("a primary in --mode \(mode) needs --standby NAME: the only node allowed to replicate from it")
        }
        guard tenantsMax > 0 else { throw ValidationError("--tenants-max must be positive") }
        if let tenantRate, !(tenantRate > 0) { throw ValidationError("--tenant-rate must be positive") }
        guard (apiCertificate == nil) == (apiKey == nil) else { throw ValidationError("--api-certificate and --api-key go together") }
        guard standbyWaitMs > 0, heartbeatIntervalMs > 0, peerTimeoutMs > heartbeatIntervalMs, leaseDriftMarginMs >= 0 else {
            throw ValidationError("timers must be positive, and --peer-timeout-ms larger than --heartbeat-interval-ms")
        }
        guard logSegmentBytesMax >= 64 << 10, logRetainedBytesMax >= logSegmentBytesMax else {
            throw ValidationError("--log-segment-bytes-max must be at least 64 KiB and --log-retained-bytes-max at least one segment")
        }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level \(logLevel)") }
    }

    func run() async throws {
        NodeServer.rememberInheritedDescriptors()
        // Swift concurrency's jobs run on the node's event loops instead of a separate pool: a
        // request's handler then continues on the loop that read it, saving a thread wake-up
        // (and two threads competing for the cores) per request. Nothing blocks in async code
        // here: SQLite and fsync run on the storage threads (DESIGN §4).
        NIOSingletons.groupLoopCountSuggestion = max(2, System.coreCount)
        NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
        var config = NodeConfiguration(name: name, role: role == "primary" ? .primary : .standby, dataDirectory: data, certificatesDirectory: certs)
        config.apiHost = api.host
        config.apiPort = api.port
        config.replicationHost = replication.host
        config.replicationPort = replication.port
        if let followed = primary ?? peer {
            config.primaryHost = followed.host
            config.primaryPort = followed.port
        }
        config.peerAPI = peerApi.map { "\($0.host):\($0.port)" }
        if let monitor {
            config.monitorHost = monitor.host
            config.monitorPort = monitor.port
        }
        config.keeperIntervalMs = keeperIntervalMs
        config.replication.leaseMs = leaseMs
        config.mode = mode == "sync" ? .sync : mode == "wait-primary" ? .waitPrimary : .single
        config.standbyName = standby
        config.replication.standbyWaitMs = standbyWaitMs
        config.replication.heartbeatIntervalMs = heartbeatIntervalMs
        config.replication.peerTimeoutMs = peerTimeoutMs
        config.replication.leaseDriftMarginMs = leaseDriftMarginMs
        config.tenantsMax = tenantsMax
        config.tenantRate = tenantRate
        config.operatorsViaGateways = operatorsViaGateways
        config.apiCertificatePath = apiCertificate
        config.apiKeyPath = apiKey
        config.log.segmentBytesMax = logSegmentBytesMax
        config.log.retainedBytesMax = logRetainedBytesMax
        var logger = Logger(label: "apiary.node.\(name)")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        try await NodeServer.run(config, logger: logger)
    }
}
