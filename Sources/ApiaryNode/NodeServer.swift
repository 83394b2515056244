import ApiaryCore
import ApiaryGateway
import ApiaryLifecycle
import ApiaryKeeper
import ApiaryLog
import ApiaryMonitor
import ApiaryReplication
import ApiaryStorage
import ApiaryTLS
import Foundation

import Logging
import NIOCore
import NIOPosix

/// Everything `apiary node` needs to run.
public struct NodeConfiguration: Sendable {
    public enum Role: String, Sendable { case primary, standby }

    public var name: String
    public var role: Role
    public var dataDirectory: String
    public var certificatesDirectory: String
    public var apiHost = "127.0.0.1"
    public var apiPort = 4001
    /// Primary: where standbys connect. Standby: unused.
    public var replicationHost = "127.0.0.1"
    public var replicationPort = 4002
    /// Standby: the primary's replication address.
    public var primaryHost = "127.0.0.1"
    public var primaryPort = 4002
    /// Primary: `sync` waits for the standby on every commit; `single` commits alone.
    public var mode: ReplicationMode = .sync
    /// Primary: the only node allowed to connect as standby (nil: any node certificate).
    public var standbyName: String?
    /// The epoch a node starts in when its data directory has none yet.
    public var initialEpoch = Epoch(1)
    /// Tenants a primary may hold (its system database not counted).
    public var tenantsMax = 10_000
    /// Requests per second per tenant at this node (twice that at once); nil: no limit.
    public var tenantRate: Double?
    /// Believe the operator a gateway vouches for (``APIServer/Limits/operatorsViaGateways``).
    public var operatorsViaGateways = false
    /// The certificate and key (PEM) applications see on the API; the node's cluster
    /// certificate when nil.
    public var apiCertificatePath: String?
    public var apiKeyPath: String?
    /// `role`, `mode` and `initialEpoch` only bootstrap a node whose data directory holds no
    /// state yet: after that its durable state decides (`NodeState`).
    public var replication = ReplicationConfig()
    /// Segment size and retention of every tenant's replication log.
    public var log = ReplicationLog.Options()
    /// The monitor's address: with one, the node's keeper heartbeats to it and follows its
    /// goals (docs/monitor.md); without, the role changes only by an operator's promote.
    public var monitorHost: String?
    public var monitorPort = 4100
    /// How often the keeper heartbeats to the monitor (well under its primary timeout).
    public var keeperIntervalMs: Int64 = 100
    /// The other node's HTTPS API (`host:port`): where this node, whenever it is not the
    /// writer, sends rqlite clients (301 with `Location`), as an rqlite follower sends them to
    /// its leader. Nil: it answers 503 "not primary".
    public var peerAPI: String?

    public init(name: String, role: Role, dataDirectory: String, certificatesDirectory: String) {
        self.name = name
        self.role = role
        self.dataDirectory = dataDirectory
        self.certificatesDirectory = certificatesDirectory
    }
}

/// Runs one node until SIGTERM/SIGINT: storage, replication and the HTTPS API.
public enum NodeServer {
    public static func run(_ config: NodeConfiguration, logger: Logger) async throws {
        exitWithParentIfAsked()
        if let (before, after) = raiseOpenFileLimit() {
            logger.info("raised the open-file limit", metadata: ["from": "\(before)", "to": "\(after)"])
        }
        let credentials = try ClusterCredentials(directory: config.certificatesDirectory, name: config.name)
        guard credentials.identity.role == .node else {
            throw NodeError("\(config.name)'s certificate is for role \(credentials.identity.role.rawValue); a node needs a node certificate")
        }
        let layout = DataLayout(root: config.dataDirectory)
        try FileManager.default.createDirectory(atPath: layout.tenantsDirectory, withIntermediateDirectories: true)
        let stateFile = NodeStateFile(path: layout.nodeState)
        let configured = NodeState(role: config.role == .primary ? .primary : .standby, epoch: config.initialEpoch, mode: config.mode)
        var state = NodeState.atStartup(durable: try stateFile.read(), configured: configured)
        if config.monitorHost != nil, state.role == .primary, state.mode != .sync {
            // Under a monitor a primary starts in sync mode, whatever mode it last had: while
            // it was down the monitor may have promoted its standby (an operator's forced
            // promotion), and a primary committing alone before it hears of that would take
            // writes that the new epoch does not have. In sync mode a commit needs the standby,
            // which follows only the cluster's primary. The keeper's first answer sets the mode.
            state.mode = .sync
        }
        try stateFile.write(state)
        if state.role != configured.role || (state.role == .primary && state.mode != configured.mode) {
            logger.notice("starting as the node's durable state says, not as configured", metadata: ["state": "\(state)", "configured": "\(configured)"])
        }

        // An unknown user's first sign-in must cost one scrypt, not two (no timing tells who
        // exists); the dummy hash is made now, off the event loops, on every node: a standby's
        // promotion must not pay for it.
        Thread.detachNewThread { Passwords.prepareDummy() }
        // The singleton, which `apiary node` also makes Swift concurrency's executor.
        let group = MultiThreadedEventLoopGroup.singleton
        let roles = NodeRoles(config: config, state: state, layout: layout, group: group, credentials: credentials, logger: logger)
        switch state.role {
        case .primary: try await roles.startPrimary(epoch: state.epoch, mode: state.mode, standby: config.standbyName, leaseConfirmed: config.monitorHost == nil)
        case .standby: try roles.startStandby(epoch: state.epoch)
        case .demoted: roles.startDemoted(epoch: state.epoch)
        }

        defer { roles.stop() }
        if let host = config.monitorHost {
            roles.keeper = NodeKeeper(roles: roles, state: state, monitorHost: host, monitorPort: config.monitorPort,
                                      tls: credentials.clusterClient(), group: group, intervalMs: config.keeperIntervalMs, logger: logger)
        }
        let apiCertificate = try config.apiCertificatePath.map { try ServerCertificate(certificatePath: $0, keyPath: config.apiKeyPath ?? "") }
        var limits = APIServer.Limits()
        limits.tenantRate = config.tenantRate.map { RateLimiter.Config(perSecond: $0, burst: max(1, $0 * 2)) }
        limits.operatorsViaGateways = config.operatorsViaGateways
        let server = try await APIServer.start(service: roles, accounts: roles, credentials: credentials, certificate: apiCertificate,
                                               host: config.apiHost, port: config.apiPort,
                                               group: group, logger: logger, limits: limits, identity: { [name = config.name] in (name, roles.epoch.rawValue) })
        // Scripts and tests wait for this line; systemd (Type=notify) for READY=1.
        print("apiary node \(config.name) ready: role=\(state.role.rawValue) epoch=\(state.epoch.rawValue) api=https://\(config.apiHost):\(server.port)")
        fflush(stdout)
        ServiceManager.ready(status: roles.statusLine)
        roles.keeper?.start()
        var watchdog: Watchdog?
        if let intervalMs = ServiceManager.watchdogIntervalMs() {
            watchdog = Watchdog(intervalMs: intervalMs) { await roles.isHealthy(withinMs: intervalMs / 2) }
            watchdog?.start()
            logger.info("systemd watchdog on", metadata: ["intervalMs": "\(intervalMs)"])
            if let pings = TestHang.pingsBeforeHang, let watchdog {
                let loop = roles.replicationGroup.next()
                Thread.detachNewThread {
                    while watchdog.waitForRounds(Int.max, until: Date().addingTimeInterval(0.05)).pings < pings {}
                    loop.execute { TestHang.hangForever("the replication event loop") }
                }
            }
        }
        let signal = await terminationSignal()
        logger.notice("shutting down", metadata: ["signal": "\(signal)"])
        ServiceManager.stopping()
        watchdog?.stop()
        roles.keeper?.stop()
        await server.close()
    }

    /// Waits for SIGTERM or SIGINT (graceful shutdown; SIGKILL needs no handling: the log and
    /// the redo at start cover it).
    static func terminationSignal() async -> Int32 {
        await withCheckedContinuation { continuation in
            let queue = DispatchQueue(label: "apiary.signals")
            let once = LockedValue(false)
            var sources: [any DispatchSourceSignal] = []
            for number in [SIGTERM, SIGINT] {
                signal(number, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
                source.setEventHandler {
                    guard once.withLock({ fired in defer { fired = true }; return !fired }) else { return }
                    for s in sources { s.cancel() }
                    continuation.resume(returning: number)
                }
                sources.append(source)
            }
            for s in sources { s.resume() }
        }
    }

    /// Raises the soft limit on open files to the hard limit (as Go's runtime does): each open
    /// tenant holds about 20 descriptors (its log segment and directory; SQLite's database, WAL
    /// and shared-memory files for the writer and each reader connection), and shells often
    /// start with a soft limit of 1,024. The systemd unit sets both (deploy/).
    /// - Returns: the limits before and after, or nil when nothing changed.
    public static func raiseOpenFileLimit() -> (UInt64, UInt64)? {
        var limit = rlimit()
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        guard getrlimit(resource, &limit) == 0, limit.rlim_cur < limit.rlim_max else { return nil }
        let before = UInt64(limit.rlim_cur)
        limit.rlim_cur = limit.rlim_max
        guard setrlimit(resource, &limit) == 0 else { return nil }
        return (before, UInt64(limit.rlim_max))
    }

    /// `APIARY_EXIT_WITH_PARENT=<pid>` (set by `LocalCluster`): exit once that process is gone,
    /// so that a killed test run or demo leaves no node behind. Polls, to stay portable.
    static func exitWithParentIfAsked() {
        guard let text = ProcessInfo.processInfo.environment["APIARY_EXIT_WITH_PARENT"], let parent = pid_t(text) else { return }
        let thread = Thread {
            while getppid() == parent { usleep(200_000) }
            exit(1)
        }
        thread.name = "apiary-parent-watch"
        thread.start()
    }

    /// Replaces this process with a fresh start of the same command (same pid, arguments and
    /// environment): the node's durable state decides what it starts as. A primary that stepped
    /// down under a monitor does this to let go of every tenant it held open, so that it can
    /// rejoin as a standby: a restart is the one path that is already proven to leave nothing
    /// half-closed.
    static func restartInPlace(logger: Logger) -> Never {
        logger.notice("restarting in place to take up the node's new role")
        fflush(stdout)
        fflush(stderr)
        // Only what the process inherited survives into the new image: its sockets, logs and
        // databases do not. An inherited descriptor may be how the parent watches the process
        // (Foundation's `Process` takes the end of a socket pair closing for the child's exit).
        let inherited = inheritedDescriptors.withLock { $0 }
        // Twice: a connection the loops accepted during the first pass is caught by the second
        // (NIO's accepted sockets are not close-on-exec by themselves).
        for _ in 0..<2 {
            for fd in openDescriptors() where !inherited.contains(fd) { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        }
        // Ignored signals stay ignored across exec: the new image must hear SIGTERM again.
        signal(SIGTERM, SIG_DFL)
        signal(SIGINT, SIG_DFL)
        var argv = CommandLine.arguments.map { strdup($0) }
        argv.append(nil)
        execv("/proc/self/exe", &argv)
        logger.critical("cannot restart in place", metadata: ["error": "\(String(cString: strerror(errno)))"])
        exit(75)
    }

    /// The descriptors open when the process started (``rememberInheritedDescriptors()``).
    private static let inheritedDescriptors = LockedValue<Set<Int32>>([0, 1, 2])

    /// Call first thing in `main`, before anything opens a descriptor: what is open then came
    /// from the parent and is kept across ``restartInPlace(logger:)``.
    public static func rememberInheritedDescriptors() {
        let open = Set(openDescriptors())
        inheritedDescriptors.withLock { $0 = open }
    }

    private static func openDescriptors() -> [Int32] {
        // The directory listing's own descriptor shows up too; it is closed by then.
        let listed = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return listed.compactMap(Int32.init).filter { fcntl($0, F_GETFD) >= 0 }
    }

    /// The cores want a tick at least every heartbeatIntervalMs / 2.
    static func tickMs(_ config: NodeConfiguration) -> Int64 { max(5, config.replication.heartbeatIntervalMs / 4) }
}

/// The node's current role behind the API; a standby becomes a primary by promotion.
final class NodeRoles: SQLService, AccountService, @unchecked Sendable {
    let config: NodeConfiguration
    let layout: DataLayout
    let group: any EventLoopGroup
    let credentials: ClusterCredentials
    let logger: Logger
    let ids = ConnectionIDs()
    /// Replication gets a loop of its own: a commit's path (record out, ack back) must not
    /// queue behind the HTTPS work on the API loops, or every commit waits for their backlog.
    let replicationGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let lock = NSLock()
    private var current: (any SQLService)?
    private var standby: StandbyNode?
    private var primary: PrimaryNode?
    /// Set before the API starts when the node runs under a monitor.
    var keeper: NodeKeeper?
    private var resources: [() -> Void] = []
    /// The node's role and epoch, as its state file holds them (written before each change).
    private var state: NodeState
    /// Accounts, served by the primary only (from the replicated system database).
    private var accountStore: AccountStore?

    init(config: NodeConfiguration, state: NodeState, layout: DataLayout, group: any EventLoopGroup, credentials: ClusterCredentials, logger: Logger) {
        self.config = config
        self.state = state
        self.layout = layout
        self.group = group
        self.credentials = credentials
        self.logger = logger
    }

    /// A standby's writer is its peer, the only other node of the formation — known to be
    /// the writer while the standby streams from it. Otherwise (its peer lost, a promotion
    /// under way, a demoted node) applications get 503 "not primary", safe to retry.
    var redirectTarget: String? {
        guard let peerAPI = config.peerAPI else { return nil }
        guard let standby = lock.withLock({ current }) as? StandbySQLService, standby.node.isStreaming else { return nil }
        return peerAPI
    }

    var isWriter: Bool { lock.withLock { current } is PrimarySQLService }

    private var service: any SQLService {
        get throws {
            guard let s = lock.withLock({ current }) else { throw APIError(.notExecuted, "node is changing roles; retry") }
            return s
        }
    }

    /// - Parameter leaseConfirmed: false for a primary started under a monitor: it uses no lease
    ///   until its keeper set it up for a writer goal that is not draining.
    func startPrimary(epoch: Epoch, mode: ReplicationMode, standby: NodeID?, leaseConfirmed: Bool = true) async throws {
        let loop = replicationGroup.next()
        // Opening every tenant (logs, databases, a redo) reads files: off the event loops, which
        // keep serving meanwhile (a promotion's heartbeats among them).
        let (config, layout, logger) = (self.config, self.layout, self.logger)
        let primary = try await BlockingPool.writers.run {
            try PrimaryNode(name: config.name, epoch: epoch, mode: mode, config: config.replication,
                            standby: standby, layout: layout, logOptions: config.log, loop: loop, logger: logger, leaseConfirmed: leaseConfirmed)
        }
        // Before a standby can connect: it is never sent a tenant that was dropped.
        try await AccountStore.removeDroppedTenants(on: primary)
        let channel = try await ClusterTransport.listen(host: config.replicationHost, port: config.replicationPort, group: replicationGroup,
                                                        credentials: credentials, ids: ids, events: primary, driverLoop: loop)
        let ticker = loop.scheduleRepeatedTask(initialDelay: .milliseconds(10), delay: .milliseconds(NodeServer.tickMs(config))) { _ in primary.tick() }
        primary.onSteppedDown = { [weak self] newer in self?.demote(primary, seenEpoch: newer) }
        primary.tenantsMax = config.tenantsMax
        logger.notice("primary", metadata: ["epoch": "\(epoch)", "mode": "\(mode)", "replication": "\(channel.localAddress.map { "\($0)" } ?? "?")"])
        lock.withLock {
            current = PrimarySQLService(node: primary, epoch: epoch)
            self.primary = primary
            accountStore = AccountStore(node: primary)
            resources.append { ticker.cancel(); channel.close(promise: nil) }
        }
    }

    func startStandby(epoch: Epoch) throws {
        let loop = replicationGroup.next()
        let node = try StandbyNode(name: config.name, epoch: epoch, config: config.replication, layout: layout, logOptions: config.log,
                                   primaryHost: config.primaryHost, primaryPort: config.primaryPort, group: replicationGroup,
                                   loop: loop, credentials: credentials, ids: ids, logger: logger)
        let ticker = loop.scheduleRepeatedTask(initialDelay: .milliseconds(10), delay: .milliseconds(NodeServer.tickMs(config))) { _ in node.tick() }
        let (root, logger) = (layout.root, logger)
        let layout = self.layout
        node.onStoppedForFullDisk = {
            // A thread of its own: it waits, and the loops keep answering meanwhile.
            Thread.detachNewThread {
                logger.critical("the data directory's file system is full: waiting for free space, then restarting in place to resume from what is durable",
                                metadata: ["data": "\(root)", "free_bytes_needed": "\(DiskSpace.roomNeeded(root))"])
                // A snapshot being received holds space only a restart would give back: it is
                // removed now (one whose install began, with its marker, is kept: the restart
                // finishes it). The primary sends a new one.
                for tenant in (try? layout.existingTenants()) ?? [] where !FileManager.default.fileExists(atPath: layout.snapshotInstallMarker(tenant)) {
                    try? FileManager.default.removeItem(atPath: layout.snapshotScratch(tenant))
                }
                sleep(DiskSpace.nextRestartDelaySeconds())
                DiskSpace.waitForRoom(root)
                NodeServer.restartInPlace(logger: logger)
            }
        }
        lock.withLock {
            current = StandbySQLService(node: node)
            standby = node
            resources.append { ticker.cancel() }
        }
    }

    /// A node that stepped down before a restart: it serves nothing until the monitor makes it
    /// a standby of the new primary.
    func startDemoted(epoch: Epoch) {
        logger.warning("demoted: this node stepped down as primary of epoch \(epoch); it serves nothing until it rejoins as a standby")
        lock.withLock { current = DemotedSQLService(name: config.name, epoch: epoch, node: nil) }
    }

    /// The primary's core saw a newer epoch and stopped committing and serving strong reads:
    /// the node is demoted durably and its API refuses everything from now on. It keeps its
    /// own epoch (a peer's word does not move it; the monitor tells it the new topology).
    /// Runs on the replication loop; one fsync, once.
    private func demote(_ primary: PrimaryNode, seenEpoch newer: Epoch) {
        let demoted: NodeState? = lock.withLock {
            guard state.role == .primary else { return nil }
            return state.steppedDown()
        }
        guard let demoted else { return }
        do {
            try NodeStateFile(path: layout.nodeState).write(demoted)
        } catch {
            // The core has stopped committing either way; a restart would come back as
            // primary and step down again when it meets the newer epoch.
            logger.critical("cannot record the demotion", metadata: ["error": "\(error)"])
        }
        lock.withLock {
            state = demoted
            current = DemotedSQLService(name: config.name, epoch: demoted.epoch, node: primary)
            self.primary = nil
            accountStore = nil
        }
        ServiceManager.status(statusLine)
        logger.warning("demoted: epoch \(newer) or later exists, newer than this primary's \(demoted.epoch); no more commits or reads here")
        // Under a monitor the node rejoins as a standby: it starts afresh as `demoted`, its
        // tenants closed, and its keeper takes it from there.
        if keeper != nil { NodeServer.restartInPlace(logger: logger) }
    }

    func stop() {
        for release in lock.withLock({ resources }) { release() }
    }

    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] {
        try await service.execute(tenant: tenant, statements, transaction: transaction, idempotencyKey: idempotencyKey)
    }

    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?,
                 then done: @escaping @Sendable (Result<[StatementResult], any Error>) -> Void) {
        do { try service.execute(tenant: tenant, statements, transaction: transaction, idempotencyKey: idempotencyKey, then: done) } catch { done(.failure(error)) }
    }

    func execute(tenant: TenantID, group requests: [[SQLStatement]], then done: @escaping @Sendable ([Result<[StatementResult], any Error>]) -> Void) {
        do { try service.execute(tenant: tenant, group: requests, then: done) } catch { done(requests.map { _ in .failure(error) }) }
    }

    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel, transaction: Bool) async throws -> [StatementResult] {
        try await service.query(tenant: tenant, statements, level: level, transaction: transaction)
    }

    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] {
        try await service.query(tenant: tenant, statements, level: level)
    }

    func queryInline(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel, transaction: Bool) -> [StatementResult]? {
        (try? service)?.queryInline(tenant: tenant, statements, level: level, transaction: transaction)
    }

    func statusJSON() async -> [UInt8] {
        guard let s = try? service else { return RqliteJSON.error("node is changing roles", code: .notExecuted) }
        return await s.statusJSON()
    }

    /// From the role's own fields: no tenant's positions (a status lists every tenant, with a
    /// hop to the replication loop; `/readyz` asks this once a second however many tenants).
    func summary() async -> NodeSummary? {
        guard let s = try? service else { return nil }
        return await s.summary()
    }

    // MARK: Health

    /// The node's epoch, as its state file holds it.
    var epoch: Epoch { lock.withLock { state.epoch } }

    /// What `systemctl status` shows: role and epoch.
    var statusLine: String {
        let state = lock.withLock { self.state }
        return "\(state.description); api \(config.apiHost):\(config.apiPort)"
    }

    /// The watchdog's check: every API event loop and the replication loop run a task, and
    /// the SQL writer pool runs a job (the commit path's threads), each within `withinMs`. A
    /// hung loop or a writer pool stuck on all its threads stops the pings, and systemd
    /// restarts the process.
    func isHealthy(withinMs: Int64) async -> Bool {
        var loops: [any EventLoop] = Array(group.makeIterator())
        loops += Array(replicationGroup.makeIterator())
        for loop in loops {
            guard (try? await loop.submit { true }.get()) == true else { return false }
        }
        return (try? await BlockingPool.writers.run { true }) == true
    }

    // MARK: Accounts (the primary's)

    private var accounts: AccountStore {
        get throws {
            guard let store = lock.withLock({ accountStore }) else {
                throw APIError(.notExecuted, "not primary: accounts and sign-in are served by the primary")
            }
            return store
        }
    }

    func cachedAuthentication(header: String) -> UserPrincipal? {
        lock.withLock { accountStore }?.cachedAuthentication(header: header)
    }

    func authenticate(_ credentials: Credentials, header: String) async throws -> UserPrincipal? {
        try await accounts.authenticate(credentials, header: header)
    }
    func createTenant(_ tenant: TenantID) async throws { try await accounts.createTenant(tenant) }
    func listTenants() async throws -> [TenantID] { try await accounts.listTenants() }
    func dropTenant(_ tenant: TenantID) async throws { try await accounts.dropTenant(tenant) }
    func createUser(_ name: String, tenant: TenantID, role: UserRole, password: String) async throws {
        try await accounts.createUser(name, tenant: tenant, role: role, password: password)
    }
    func listUsers(tenant: TenantID) async throws -> [(name: String, role: UserRole)] { try await accounts.listUsers(tenant: tenant) }
    func dropUser(_ name: String, tenant: TenantID) async throws { try await accounts.dropUser(name, tenant: tenant) }
    func createToken(user: String, tenant: TenantID, ttlSeconds: Int) async throws -> (id: String, token: String, expiresMs: Int64) {
        try await accounts.createToken(user: user, tenant: tenant, ttlSeconds: ttlSeconds)
    }
    func revokeToken(id: String, tenant: TenantID) async throws { try await accounts.revokeToken(id: id, tenant: tenant) }
    func listTokens(user: String, tenant: TenantID) async throws -> [(id: String, expiresMs: Int64)] {
        try await accounts.listTokens(user: user, tenant: tenant)
    }

    /// An operator's promotion of a node that runs without a monitor: standby → primary of
    /// epoch + 1, committing alone (`single`). Under a monitor it is refused: the monitor
    /// decides promotions (`apiary ctl promote`), and a promotion behind its back would give
    /// an epoch two writers.
    func promote() async throws -> [UInt8] {
        guard keeper == nil else {
            throw APIError(.conflict, "this node follows the monitor's goals: promote it through the monitor (apiary ctl promote NODE --monitor HOST:PORT)")
        }
        let epoch = try await promote(toEpoch: nil, setup: PrimarySetup(mode: .single, standby: nil))
        return Array("{\"promoted\":true,\"epoch\":\(epoch.rawValue)}".utf8)
    }

    /// Standby → primary of `epoch` (nil: the standby's epoch + 1) set up as `setup` says.
    /// - Returns: the new epoch.
    @discardableResult
    /// - Parameter handover: a switchover's hand-over: the former writer drained and uses no
    ///   lease, so there is none to wait out.
    func promote(toEpoch target: Epoch?, setup: PrimarySetup, handover: Bool = false) async throws -> Epoch {
        if let candidate = lock.withLock({ standby }), let refusal = await candidate.promotionRefusal(into: target) {
            throw APIError(.conflict, "not promoted: \(refusal)")
        }
        guard let node = lock.withLock({ () -> StandbyNode? in
            guard let s = standby, state.role == .standby else { return nil }
            standby = nil
            current = nil
            return s
        }) else { throw APIError(.badRequest, "this node is not a standby") }
        let promoted: NodeState
        let startedAt = monotonicNowMs()
        var stoppedAt = startedAt
        do {
            let old = try await node.stopForPromotion(waitForLease: !handover)
            stoppedAt = monotonicNowMs()
            let epoch = target ?? old.next
            precondition(epoch > old, "promotion into epoch \(epoch), not newer than the standby's \(old)")
            promoted = NodeState(role: .primary, epoch: epoch, mode: setup.mode)
            // Durable before it acts: a restart comes back as this primary, whatever --role says.
            try NodeStateFile(path: layout.nodeState).write(promoted)
        } catch {
            // The standby has stopped replicating and serves nothing: a restart (systemd's)
            // brings it back as the standby its state file still says it is.
            logger.critical("promotion failed; stopping so that a restart brings the standby back", metadata: ["error": "\(error)"])
            if keeper != nil { NodeServer.restartInPlace(logger: logger) }
            exit(75)
        }
        lock.withLock { state = promoted }
        let epoch = promoted.epoch
        for release in lock.withLock({ resources }) { release() }
        lock.withLock { resources.removeAll() }
        do {
            try await startPrimary(epoch: epoch, mode: promoted.mode, standby: setup.standby)
            if setup.draining { try await lock.withLock({ primary })?.configure(mode: setup.mode, standby: setup.standby, draining: true) }
        } catch {
            // The state file says primary already, and the standby is gone: no retry in this
            // process can finish the step. A fresh start comes up as that primary.
            logger.critical("promoted, but the primary did not start; restarting", metadata: ["error": "\(error)"])
            if keeper != nil { NodeServer.restartInPlace(logger: logger) }
            throw error
        }
        ServiceManager.status(statusLine)
        // How long it took, and how much of it was the lease wait and applying what it held:
        // what an operator reads after a failover.
        logger.notice("promoted to primary", metadata: ["epoch": "\(epoch)", "setup": "\(setup)",
                                                        "leaseWaitAndApplyMs": "\(stoppedAt - startedAt)", "totalMs": "\(monotonicNowMs() - startedAt)"])
        return epoch
    }

    // MARK: The keeper's steps

    /// What the keeper reports to the monitor, from the replication shell of the current role.
    func keeperFigures() async -> KeeperFigures {
        let (primary, standby) = lock.withLock { (self.primary, self.standby) }
        if let primary { return await primary.keeperFigures() }
        if let standby {
            let (tenants, streaming) = await standby.keeperFigures()
            return KeeperFigures(tenants: tenants, streaming: streaming, holdsLease: nil)
        }
        return KeeperFigures(tenants: [:], streaming: false, holdsLease: nil)
    }

    /// The monitor has these divergence reports (a heartbeat carrying them was answered).
    func divergencesDelivered(_ delivered: [Divergence]) {
        guard !delivered.isEmpty else { return }
        lock.withLock { primary }?.divergencesDelivered(delivered)
    }

    /// Carries out one keeper step (``KeeperStep``); throws when the node is as it was.
    func carryOut(_ step: KeeperStep) async throws {
        let stateFile = NodeStateFile(path: layout.nodeState)
        switch step {
        case .stepDown:
            guard let primary = lock.withLock({ primary }) else { throw NodeError("not a primary") }
            // The core's step-down ends in `demote`, which records it and restarts in place.
            try await primary.stepDownOrdered()
        case .adoptEpoch(let epoch):
            guard let adopted = lock.withLock({ state }).adopting(epoch, from: .monitor) else { return }
            try stateFile.write(adopted)
            lock.withLock { state = adopted }
            try await lock.withLock({ standby })?.adoptEpoch(epoch)
            ServiceManager.status(statusLine)
        case .promote(let epoch, let setup, let handover):
            try await promote(toEpoch: epoch, setup: setup, handover: handover)
        case .configurePrimary(let setup):
            guard let primary = lock.withLock({ primary }) else { throw NodeError("not a primary") }
            var next = lock.withLock { state }
            if next.mode != setup.mode {
                // Durable first: a restart must come back in the mode the monitor knows of.
                next.mode = setup.mode
                try stateFile.write(next)
                lock.withLock { state = next }
            }
            try await primary.configure(mode: setup.mode, standby: setup.standby, draining: setup.draining)
            ServiceManager.status(statusLine)
        case .follow(let primaryName):
            let now = lock.withLock { state }
            guard now.role == .demoted, lock.withLock({ primary == nil && standby == nil }) else {
                throw NodeError("only a demoted node that holds no tenant open rejoins as a standby")
            }
            let prepared = try StandbyPreparation.prepare(layout: layout, logOptions: config.log, logger: logger)
            logger.notice("rejoining as the standby of \(primaryName)", metadata: [
                "held": "\(prepared.map(\.description).joined(separator: ", "))",
                "note": "the primary keeps what it shares and replaces the rest with a snapshot",
            ])
            let standbyState = NodeState(role: .standby, epoch: now.epoch, mode: now.mode)
            try stateFile.write(standbyState)
            lock.withLock { state = standbyState }
            do { try startStandby(epoch: standbyState.epoch) } catch {
                // The state file says standby: a fresh start comes up as that standby.
                logger.critical("rejoined, but the standby did not start; restarting", metadata: ["error": "\(error)"])
                NodeServer.restartInPlace(logger: logger)
            }
            ServiceManager.status(statusLine)
        }
    }
}

/// The API on the primary: writes go through the tenant's group commit and replication.
struct PrimarySQLService: SQLService {
    let node: PrimaryNode
    let epoch: Epoch

    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] {
        // A tenant exists only once created (`apiary ctl tenant create`): a write, even an
        // operator's, never makes one (a mistyped name would otherwise become a tenant).
        guard let t = try await openTenant(tenant, create: false) else {
            throw APIError(.notFound, "no such tenant \(tenant): create it first (apiary ctl tenant create \(tenant))")
        }
        do {
            return try await t.database.execute(statements, transaction: transaction, idempotencyKey: idempotencyKey)
        } catch let error as StorageError {
            throw Self.apiError(error)
        }
    }

    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?,
                 then done: @escaping @Sendable (Result<[StatementResult], any Error>) -> Void) {
        guard let t = node.openedTenant(tenant) else {
            // First use: opening replicates the tenant's first commit; the async path does it.
            Task {
                do { done(.success(try await execute(tenant: tenant, statements, transaction: transaction, idempotencyKey: idempotencyKey))) } catch { done(.failure(error)) }
            }
            return
        }
        t.database.execute(statements, transaction: transaction, idempotencyKey: idempotencyKey) { result in
            done(result.mapError { error -> any Error in (error as? StorageError).map(Self.apiError) ?? error })
        }
    }

    /// Queued writes: the requests as one group of the tenant's writer (one transaction).
    func execute(tenant: TenantID, group requests: [[SQLStatement]], then done: @escaping @Sendable ([Result<[StatementResult], any Error>]) -> Void) {
        func run(_ t: PrimaryTenant) {
            t.database.execute(group: requests) { results in
                done(results.map { $0.mapError { error -> any Error in (error as? StorageError).map(Self.apiError) ?? error } })
            }
        }
        if let t = node.openedTenant(tenant) { return run(t) }
        Task {
            do {
                guard let t = try await openTenant(tenant, create: false) else {
                    throw APIError(.notFound, "no such tenant \(tenant): create it first (apiary ctl tenant create \(tenant))")
                }
                run(t)
            } catch {
                let failure = (error as? StorageError).map(Self.apiError) ?? error
                done(requests.map { _ in .failure(failure) })
            }
        }
    }

    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] {
        try await query(tenant: tenant, statements, level: level, transaction: false)
    }

    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel, transaction: Bool) async throws -> [StatementResult] {
        guard node.servesReads else {
            throw APIError(.notExecuted, "not serving reads yet: this primary restarted and waits for the monitor to confirm that it is still the writer (retry in a moment)")
        }
        guard let t = try await openTenant(tenant, create: false) else { throw APIError(.notFound, "no such tenant") }
        switch level {
        case .none, .weak:
            break
        case .strong, .linearizable:
            guard await node.holdsLease else {
                throw APIError(.notExecuted, "not serving \(level.rawValue) reads: no valid lease from the standby (retry later)")
            }
        }
        do {
            return try await t.database.query(statements, transaction: transaction)
        } catch let error as StorageError {
            throw Self.apiError(error)
        }
    }

    /// Weak and unconstrained reads of an open tenant, when a reader connection is idle: on
    /// the event loop (``TenantDatabase/queryInline(_:transaction:)``). Strong ones wait for
    /// the lease, which is asked of the node's loop: never inline.
    func queryInline(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel, transaction: Bool) -> [StatementResult]? {
        guard level == .none || level == .weak, node.servesReads, let t = node.openedTenant(tenant) else { return nil }
        return t.database.queryInline(statements, transaction: transaction)
    }

    func promote() async throws -> [UInt8] { throw APIError(.badRequest, "this node is already the primary") }

    func statusJSON() async -> [UInt8] {
        var status = NodeStatus(node: node.name, role: "primary", epoch: epoch.rawValue, tenants: await node.status().sorted { $0.tenant < $1.tenant })
        let undecided = node.undecidedDropNames
        status.undecidedDrops = undecided.isEmpty ? nil : undecided
        return (try? JSONEncoder().encode(status)).map(Array.init) ?? []
    }

    func summary() async -> NodeSummary? { NodeSummary(name: node.name, role: "primary", epoch: epoch.rawValue) }

    private func openTenant(_ tenant: TenantID, create: Bool) async throws -> PrimaryTenant? {
        do {
            return try await node.tenant(tenant, create: create)
        } catch let error as StorageError {
            throw Self.apiError(error)
        } catch let rejected as CommitRejected {
            // Creating the tenant replicates its first commit: its refusal says why to the client.
            throw Self.apiError(rejected)
        } catch let full as PrimaryNode.TenantLimitReached {
            throw APIError(.capacity, full.description)
        } catch let undecided as PrimaryNode.DropUndecided {
            throw APIError(.conflict, undecided.description)
        } catch {
            node.logger.error("tenant unavailable", metadata: ["tenant": "\(tenant)", "error": "\(error)"])
            throw APIError(.notExecuted, "tenant unavailable (details in the node's log); retry later")
        }
    }

    static func apiError(_ error: StorageError) -> APIError {
        switch error.code {
        case .badRequest: return APIError(.badRequest, error.message)
        case .idempotencyKeyReused: return APIError(.idempotencyKeyReused, error.message)
        case .queueFull, .closed, .io, .diskFull, .corrupt, .wrongFormat: return APIError(.notExecuted, error.message)
        case .commitFailed:
            guard let rejected = error.cause as? CommitRejected else { return APIError(.notExecuted, error.message) }
            return apiError(rejected)
        }
    }

    static func apiError(_ rejected: CommitRejected) -> APIError {
        switch rejected.failure {
        case .outcomeUnknown?: return APIError(.outcomeUnknown, rejected.message)
        case .recordTooLarge?: return APIError(.badRequest, rejected.message)
        case .standbyUnavailable?, .overloaded?, .steppedDown?, .draining?, nil: return APIError(.notExecuted, rejected.message)
        }
    }
}

/// The API on a demoted node: it serves nothing (another node is primary in a newer epoch).
struct DemotedSQLService: SQLService {
    var isWriter: Bool { false }
    let name: String
    let epoch: Epoch
    /// The primary it was, for status (nil when it started demoted).
    let node: PrimaryNode?

    static let refusal = "not primary: this node was demoted (a newer epoch exists); send requests to the current primary"

    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] {
        throw APIError(.notExecuted, Self.refusal)
    }

    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] {
        throw APIError(.notExecuted, Self.refusal)
    }

    func promote() async throws -> [UInt8] { throw APIError(.badRequest, "a demoted node is not promotable: it may lack acknowledged writes") }

    func statusJSON() async -> [UInt8] {
        let tenants = await node?.status().sorted { $0.tenant < $1.tenant } ?? []
        let status = NodeStatus(node: name, role: "demoted", epoch: epoch.rawValue, tenants: tenants)
        return (try? JSONEncoder().encode(status)).map(Array.init) ?? []
    }

    func summary() async -> NodeSummary? { NodeSummary(name: name, role: "demoted", epoch: epoch.rawValue) }
}

/// The API on a standby: it serves no reads or writes (DESIGN §3), only status.
struct StandbySQLService: SQLService {
    var isWriter: Bool { false }
    let node: StandbyNode

    func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] {
        throw APIError(.notExecuted, "not primary: this node is a standby; send writes to the primary")
    }

    func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] {
        throw APIError(.notExecuted, "not primary: this node is a standby and serves no reads")
    }

    func promote() async throws -> [UInt8] { throw APIError(.badRequest, "promote through the node, not its standby service") }

    func statusJSON() async -> [UInt8] {
        let status = NodeStatus(node: node.name, role: "standby", epoch: await node.epoch.rawValue, tenants: await node.status().sorted { $0.tenant < $1.tenant },
                                error: await node.fatalError?.description)
        return (try? JSONEncoder().encode(status)).map(Array.init) ?? []
    }

    func summary() async -> NodeSummary? {
        NodeSummary(name: node.name, role: "standby", epoch: await node.epoch.rawValue, error: await node.fatalError?.description)
    }
}

/// `/status`, for operators and `apiary ctl verify`.
public struct NodeStatus: Codable, Sendable {
    public var node: String
    public var role: String
    public var epoch: UInt64
    public var tenants: [TenantStatus]
    public var error: String?
    /// Tenants a drop of unknown outcome left closed: each serves nothing until dropped again.
    public var undecidedDrops: [String]?
}
