import ApiaryCore
import ApiaryLifecycle
import ApiaryMonitor
import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOPosix

/// What `apiary monitor` runs with.
public struct MonitorProcessConfiguration: Sendable {
    /// Its certificate `<certificatesDirectory>/<name>.pem` MUST be a monitor certificate.
    public var name: String
    public var certificatesDirectory: String
    /// Holds `monitor.db`.
    public var dataDirectory: String
    public var host = "127.0.0.1"
    public var port = 4100
    /// The formation to create when the store holds none; when it holds one, a given name
    /// MUST match it.
    public var formation: String?
    public var primary: FormationNode?
    public var standby: FormationNode?
    public var initialEpoch = Epoch(1)
    public var core = MonitorConfig()
    /// How often the core's `onTick` runs.
    public var tickIntervalMs: Int64 = 100
    public var limits = MonitorHTTPServer.Limits()

    public init(name: String, certificatesDirectory: String, dataDirectory: String) {
        self.name = name
        self.certificatesDirectory = certificatesDirectory
        self.dataDirectory = dataDirectory
    }
}

public struct MonitorSetupError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Runs the monitor until SIGTERM/SIGINT: the store, the core, the tick, the HTTPS endpoint.
public enum MonitorProcess {
    public static func run(_ config: MonitorProcessConfiguration, logger: Logger) async throws {
        let credentials = try ClusterCredentials(directory: config.certificatesDirectory, name: config.name)
        guard credentials.identity.role == .monitor else {
            throw MonitorSetupError("\(config.name)'s certificate is for role \(credentials.identity.role.rawValue); the monitor needs a monitor certificate (apiary certs issue --role monitor)")
        }
        try FileManager.default.createDirectory(atPath: config.dataDirectory, withIntermediateDirectories: true)
        let store = try SQLiteMonitorStore(path: config.dataDirectory + "/monitor.db")
        let state: MonitorState
        if let loaded = try store.load() {
            if let formation = config.formation, formation != loaded.formation {
                throw MonitorSetupError("the store holds formation \(loaded.formation), not \(formation)")
            }
            state = loaded
            logger.notice("loaded formation \(loaded.formation) in epoch \(loaded.epoch); deciding nothing until every node is heard or \(config.core.startupGraceMs) ms passed")
        } else {
            guard let formation = config.formation, let primary = config.primary else {
                throw MonitorSetupError("the store is empty: give --formation and --primary (and --standby) to create the formation")
            }
            state = try MonitorState.bootstrap(formation: formation, primary: primary, standby: config.standby, epoch: config.initialEpoch)
            try store.create(state)
            logger.notice("created formation \(formation) in epoch \(config.initialEpoch)")
        }
        let service = MonitorService(store: store, state: state, config: config.core, logger: logger)
        let group = MultiThreadedEventLoopGroup.singleton
        let server = try await MonitorHTTPServer.start(service: service, credentials: credentials, host: config.host, port: config.port,
                                                       group: group, logger: logger, limits: config.limits)
        let ticker = Ticker(service: service, intervalMs: config.tickIntervalMs)
        ticker.start()
        var watchdog: Watchdog?
        if let intervalMs = ServiceManager.watchdogIntervalMs() {
            // Proves the tick path (the lock, the core, the store) is not stuck.
            let w = Watchdog(intervalMs: intervalMs) { ticker.tickedWithin(ms: max(1_000, intervalMs / 2)) }
            w.start()
            watchdog = w
        }
        let statusLine = "monitor of formation \(state.formation), epoch \(service.epoch), https://\(config.host):\(server.port)"
        print("apiary monitor \(config.name) ready: formation=\(state.formation) epoch=\(service.epoch.rawValue) listen=https://\(config.host):\(server.port)")
        fflush(stdout)
        ServiceManager.ready(status: statusLine)

        let signal = await terminationSignal()
        logger.notice("shutting down", metadata: ["signal": "\(signal)"])
        ServiceManager.stopping()
        watchdog?.stop()
        ticker.stop()
        await server.close()
        store.close()
    }

    static func terminationSignal() async -> Int32 {
        await withCheckedContinuation { continuation in
            let queue = DispatchQueue(label: "apiary.monitor.signals")
            let once = NSLock()
            var fired = false
            var sources: [any DispatchSourceSignal] = []
            for number in [SIGTERM, SIGINT] {
                signal(number, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
                source.setEventHandler {
                    let first = once.withLock { () -> Bool in defer { fired = true }; return !fired }
                    guard first else { return }
                    for s in sources { s.cancel() }
                    continuation.resume(returning: number)
                }
                sources.append(source)
            }
            for s in sources { s.resume() }
        }
    }
}

/// Drives ``MonitorService/tick()`` from a thread of its own (a tick may fsync), one at a time.
final class Ticker: @unchecked Sendable {
    private let service: MonitorService
    private let intervalMs: Int64
    private let lock = NSLock()
    private var running = true
    private var lastTickMs: Int64 = MonitorService.monotonicMs()
    private var thread: Thread?

    init(service: MonitorService, intervalMs: Int64) {
        precondition(intervalMs > 0, "tick interval \(intervalMs) ms")
        self.service = service
        self.intervalMs = intervalMs
    }

    func start() {
        let t = Thread { [self] in
            while lock.withLock({ running }) {
                service.tick()
                lock.withLock { lastTickMs = MonitorService.monotonicMs() }
                Thread.sleep(forTimeInterval: Double(intervalMs) / 1000)
            }
        }
        t.name = "apiary.monitor.tick"
        t.start()
        thread = t
    }

    func stop() { lock.withLock { running = false } }

    /// For the watchdog: a tick completed within the last `ms`.
    func tickedWithin(ms: Int64) -> Bool {
        lock.withLock { MonitorService.monotonicMs() - lastTickMs <= ms }
    }
}
