import ApiaryMonitor
import ApiaryNode
import ApiaryTLS
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// How a drill takes a zone away and gives it back.
public enum ZoneCut: Sendable, CustomStringConvertible {
    /// SIGSTOP every process of the zone that runs on this machine, SIGCONT to restore (the
    /// local cluster, on loopback). A stopped process is as silent as a zone cut off from the
    /// network: no FIN, no RST; its peers find out only by their timeouts.
    case pause
    /// Everything the zone's network namespace sends or receives dropped (nftables), but its
    /// loopback; the rules removed to restore (the local cluster with its zones in namespaces,
    /// `apiary up --zones`). The zone's processes run on and see their peers fall silent, as
    /// in a real partition: no FIN, no RST.
    case network
    /// The operator's own commands (`/bin/sh -c`, with `APIARY_DRILL_ZONE` set): for a real
    /// cluster, whatever cuts the zone there (a firewall rule, stopping its machines).
    case hooks(cut: String, restore: String)

    public var description: String {
        switch self {
        case .pause: return "SIGSTOP of the zone's processes on this machine, SIGCONT to restore"
        case .network: return "the zone's network namespace cut off (nftables: everything it sends or receives dropped), the rules removed to restore"
        case .hooks(let cut, let restore): return "the operator's hooks: cut `\(cut)`, restore `\(restore)`"
        }
    }
}

/// `apiary drill zone-loss`: takes one zone away from a running cluster under a steady stream
/// of writes through the gateways (each with an idempotency key, retried until acknowledged),
/// measures RTO (from the cut to the first acknowledged write begun after it) and RPO
/// (acknowledged writes missing afterwards), gives the zone back, waits for the formation to
/// converge and for equal checksums, and returns the evidence (docs/chaos.md, "Zone-loss drill").
public final class ZoneLossDrill: @unchecked Sendable {
    public struct Settings: Sendable {
        /// `a`, `b`, `c` (as the cluster names its zones), or `primary` / `standby`: the zone of
        /// the node in that role when the repetition starts.
        public var zone: String
        public var cut: ZoneCut
        public var repetitions = 1
        /// Steady writes before the cut and after the formation converged again.
        public var steadyMs: Int64 = 2_000
        /// How long the zone stays away after writes resumed.
        public var holdMs: Int64 = 2_000
        /// A new write begins this often, whether earlier ones finished or not (open loop: a
        /// stall does not slow the clock of the measurement).
        public var writeIntervalMs: Int64 = 25
        /// Bound on every wait (writes resuming, convergence, checksums).
        public var timeoutMs: Int64 = 90_000
        /// Start even if the cluster is not healthy (no sync primary with a promotable standby):
        /// the first repetition cuts the zone at once instead of refusing.
        public var force = false

        public init(zone: String, cut: ZoneCut) {
            self.zone = zone
            self.cut = cut
        }
    }

    let cluster: ClusterDescription
    let settings: Settings
    private let operatorTLS: TLSConfiguration
    private let clientTLS: TLSConfiguration
    private let lock = NSLock()
    private var authorization = ""
    /// The drill's own user, dropped when the drill ends.
    private var drillUser: String?
    private var gatewayTurn = 0
    /// Keep-alive connections per gateway, as an application's client pool keeps them (a new
    /// TLS handshake per write would measure the drill's own CPU, not the cluster).
    private var idle: [Int: [HTTPSConnection]] = [:]
    private let started = Date()

    public init(cluster: ClusterDescription, settings: Settings) throws {
        guard cluster.monitor != nil else { throw ChaosError("the cluster description names no monitor") }
        guard !cluster.gateways.isEmpty else { throw ChaosError("the cluster description names no gateway: the drill writes through them") }
        guard cluster.nodes.count == 2 else { throw ChaosError("the cluster description names \(cluster.nodes.count) nodes; a formation has 2") }
        self.cluster = cluster
        self.settings = settings
        operatorTLS = try ClusterCredentials(directory: cluster.certificates, name: "operator").clusterClient()
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(cluster.certificates + "/ca.pem")
        clientTLS = tls
    }

    var nowMs: Int64 { Int64(Date().timeIntervalSince(started) * 1000) }

    /// What the drill would do, without doing it.
    public func plan() async throws -> String {
        let status = try await monitorStatus()
        let zone = try resolveZone(status)
        let members = cluster.members(inZone: zone).map { "\($0.name) (\($0.kind)\($0.pid.map { ", pid \($0)" } ?? ""))" }
        let writer = status.nodes.first { $0.goal.hasPrefix("primary") || $0.goal.hasPrefix("wait_primary") }?.id ?? "none"
        let health = Self.unhealthy(status).map {
            "\n  the cluster is NOT healthy now (\($0)): the drill would refuse to start" + (settings.force ? ", but --force is given" : " unless --force")
        } ?? ""
        return """
        zone-loss drill on cluster \(cluster.name) (formation \(status.formation), epoch \(status.epoch), writer \(writer)):
          1. write steadily through the gateways (\(cluster.gateways.map(\.address).joined(separator: ", "))), a new write every \(settings.writeIntervalMs) ms, each with an idempotency key
          2. cut zone \(zone) off: \(members.isEmpty ? "(no member of this cluster is listed in it)" : members.joined(separator: ", ")), by \(settings.cut)
          3. measure RTO: from the cut to the first acknowledged write begun after it
          4. keep the zone away \(settings.holdMs) ms more, then restore it
          5. wait for the formation to converge (a sync primary, a promotable standby) and for equal checksums on both nodes
          6. measure RPO: acknowledged writes missing from the cluster (must be 0)\(health)
          repeated \(settings.repetitions) time(s); nothing is changed by --dry-run
        """
    }

    /// Runs every repetition; a repetition that cannot finish (the formation does not recover
    /// in time) ends the drill with what it found.
    public func run(log: @escaping @Sendable (String) -> Void) async throws -> DrillReport {
        let startedAt = ISO8601DateFormatter().string(from: started)
        let status = try await monitorStatus()
        _ = try resolveZone(status) // a zone the cluster lacks: refused before anything is done
        // A cluster that cannot fail over now would make the drill measure that, and cost its
        // users an outage: refused, unless the operator insists.
        if let problem = Self.unhealthy(status), !settings.force {
            throw ChaosError("the cluster is not healthy: \(problem). A zone-loss drill needs a sync primary with a promotable standby; wait until the standby is in sync (apiary ctl status), or give --force")
        }
        try await prepare()
        var results: [DrillRepetition] = []
        var failure: String?
        for repetition in 1...settings.repetitions {
            do {
                let result = try await runOnce(repetition, log: log)
                results.append(result)
                log("repetition \(repetition): zone \(result.zone) (\(result.membersCut.joined(separator: ", "))) cut; RTO \(result.rtoMs.map { "\($0) ms" } ?? "-"), RPO \(result.missing.count), checksums \(result.checksumsEqual ? "equal" : "DIFFER")")
            } catch {
                failure = "repetition \(repetition): \(error)"
                log(failure!)
                break
            }
        }
        await dropDrillUser(log: log)
        return DrillReport(cluster: cluster.name, startedAt: startedAt, version: Self.version, zoneArgument: settings.zone,
                           method: settings.cut.description, repetitions: results, failure: failure)
    }

    /// The build this drill ran with, for the evidence.
    static var version: String {
        let path = "/proc/self/exe"
        let modified = (try? FileManager.default.attributesOfItem(atPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: path)) ?? path))?[.modificationDate] as? Date
        return "apiary (binary built \(modified.map { ISO8601DateFormatter().string(from: $0) } ?? "?"))"
    }

    // MARK: One repetition

    private func runOnce(_ repetition: Int, log: @escaping @Sendable (String) -> Void) async throws -> DrillRepetition {
        // Forced: the first repetition takes the cluster as it is.
        let before = repetition == 1 && settings.force ? try await monitorStatus() : try await waitForHealth(since: nowMs)
        let zone = try resolveZone(before)
        let cutMembers = cluster.members(inZone: zone)
        let writerBefore = writer(before) ?? "?"
        let load = WriteLoad(drill: self, repetition: repetition)
        let loadTask = Task { await load.run() }
        defer { load.stop() }
        try await Task.sleep(for: .milliseconds(settings.steadyMs))

        var restored = false
        defer { if !restored { try? restore(zone, members: cutMembers) } }
        try cut(zone, members: cutMembers)
        // Once the cut is in place: a cut that takes a command (nftables, an operator's hook)
        // takes milliseconds, and writes begun meanwhile may still be served by the zone.
        let cutAt = nowMs
        log("repetition \(repetition): zone \(zone) cut at \(cutAt) ms (writer was \(writerBefore))")
        let resumedAt = await load.firstAcknowledgement(begunAfter: cutAt, timeoutMs: settings.timeoutMs)
        try await Task.sleep(for: .milliseconds(settings.holdMs))
        let restoredAt = nowMs
        try restore(zone, members: cutMembers)
        restored = true
        let after = try await waitForHealth(since: restoredAt)
        let convergedAt = nowMs
        try await Task.sleep(for: .milliseconds(settings.steadyMs))
        load.stop()
        await loadTask.value

        let acknowledged = load.acknowledged
        let present = try await presentIDs(repetition: repetition)
        let missing = acknowledged.subtracting(present).sorted()
        let verification = try await verifyChecksums(after)
        return DrillRepetition(
            repetition: repetition, zone: zone, membersCut: cutMembers.map(\.name), writerBefore: writerBefore, writerAfter: writer(after) ?? "?",
            epochBefore: before.epoch, epochAfter: after.epoch, cutAtMs: cutAt, resumedAtMs: resumedAt, restoredAtMs: restoredAt,
            convergedAtMs: convergedAt, acknowledged: acknowledged.count, missing: missing, attempts: load.attempts,
            failedAttempts: load.failedAttempts, errors: load.errors, unacknowledgedAttempts: load.attemptLog, checksumsEqual: verification.consistent, verification: verification.text,
            acknowledgements: load.acknowledgementTimes)
    }

    private func resolveZone(_ status: StatusBody) throws -> String {
        switch settings.zone {
        case "primary":
            guard let w = writer(status), let node = status.nodes.first(where: { $0.id == w }) else { throw ChaosError("the formation has no writer now") }
            return node.zone
        case "standby":
            guard let w = writer(status), let node = status.nodes.first(where: { $0.id != w }) else { throw ChaosError("the formation has no standby now") }
            return node.zone
        default:
            guard status.nodes.contains(where: { $0.zone == settings.zone }) || cluster.members.contains(where: { $0.zone == settings.zone }) else {
                throw ChaosError("no member of cluster \(cluster.name) is in zone \(settings.zone) (zones: \(Set(cluster.members.map(\.zone) + status.nodes.map(\.zone)).sorted().joined(separator: ", ")))")
            }
            return settings.zone
        }
    }

    private func writer(_ status: StatusBody) -> String? { Self.writer(status) }

    static func writer(_ status: StatusBody) -> String? {
        status.nodes.first { $0.goal == "primary" || $0.goal == "wait_primary" }?.id
    }

    /// What keeps the formation from failing over now, or nil when it is healthy: a writer that
    /// is primary in sync mode, and a promotable standby that reports itself secondary.
    static func unhealthy(_ status: StatusBody) -> String? {
        guard let w = writer(status), let writer = status.nodes.first(where: { $0.id == w }) else { return "no node is the writer" }
        guard let standby = status.nodes.first(where: { $0.id != w }) else { return "there is no standby" }
        // The standby first: a writer in `wait_primary` is the consequence of a standby out of sync.
        guard standby.promotable, standby.reported == "secondary" else {
            return "the standby \(standby.id) is not in sync (\(standby.reported ?? "silent"), \(standby.promotable ? "promotable" : "not promotable"))"
        }
        guard writer.goal == "primary", writer.reported == "primary" else {
            return "the writer \(w) is \(writer.reported ?? "silent") (goal \(writer.goal)), not a primary in sync mode"
        }
        return nil
    }

    // MARK: Cutting and restoring

    private func cut(_ zone: String, members: [ClusterDescription.Member]) throws {
        switch settings.cut {
        case .pause:
            let pids = members.compactMap(\.pid)
            guard !pids.isEmpty else { throw ChaosError("zone \(zone) has no process on this machine to pause; give --cut-command and --restore-command") }
            for pid in pids where kill(pid, SIGSTOP) != 0 { throw ChaosError("cannot stop process \(pid) of zone \(zone): errno \(errno)") }
        case .network:
            try ZoneNetwork.isolate(namespace: try Self.namespace(of: zone, members))
        case .hooks(let command, _):
            try Self.shell(command, zone: zone)
        }
    }

    private func restore(_ zone: String, members: [ClusterDescription.Member]) throws {
        switch settings.cut {
        case .pause:
            for pid in members.compactMap(\.pid) { _ = kill(pid, SIGCONT) }
        case .network:
            try ZoneNetwork.removeRules(namespace: try Self.namespace(of: zone, members))
        case .hooks(_, let command):
            try Self.shell(command, zone: zone)
        }
    }

    /// The network namespace the zone's members run in.
    static func namespace(of zone: String, _ members: [ClusterDescription.Member]) throws -> String {
        guard let namespace = members.lazy.compactMap(\.namespace).first else {
            throw ChaosError("zone \(zone) is not a network namespace here (start the cluster with `apiary up --zones`, as root)")
        }
        return namespace
    }

    static func shell(_ command: String, zone: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        process.environment = ProcessInfo.processInfo.environment.merging(["APIARY_DRILL_ZONE": zone]) { _, new in new }
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else { throw ChaosError("`\(command)` exited with status \(process.terminationStatus)") }
    }

    // MARK: The cluster, as its operator and as a client

    private func monitorStatus() async throws -> StatusBody {
        let monitor = try Self.split(cluster.monitor!.address)
        let c = try await HTTPSConnection.connect(host: monitor.host, port: monitor.port, tls: operatorTLS, group: MultiThreadedEventLoopGroup.singleton, timeoutMs: 1_000)
        defer { Task { await c.close() } }
        let r = try await c.request(.GET, "/status", timeoutMs: 2_000)
        guard r.status == 200 else { throw ChaosError("the monitor answered \(r.status): \(r.text)") }
        return try JSONDecoder().decode(StatusBody.self, from: Data(r.body))
    }

    /// Waits (bounded) for a writer in sync with a promotable standby, both reporting.
    private func waitForHealth(since: Int64) async throws -> StatusBody {
        var last: StatusBody?
        while nowMs - since < settings.timeoutMs {
            if let s = try? await monitorStatus() {
                last = s
                if Self.unhealthy(s) == nil { return s }
            }
            try await Task.sleep(for: .milliseconds(50)) // polling a condition, bounded above
        }
        throw ChaosError("the formation did not reach a sync primary with a promotable standby within \(settings.timeoutMs) ms; last status: \(last.map { "\($0.nodes.map { "\($0.id) \($0.goal)/\($0.reported ?? "-")" })" } ?? "none")")
    }

    /// Drops the drill's user on the writer: a drill leaves no credentials behind. (Its tenant
    /// and table stay: the next drill uses them again.)
    private func dropDrillUser(log: @escaping @Sendable (String) -> Void) async {
        guard let user = lock.withLock({ drillUser }) else { return }
        do {
            guard let w = writer(try await monitorStatus()), let node = cluster.nodes.first(where: { $0.name == w }) else { throw ChaosError("no writer") }
            let address = try Self.split(node.address)
            let r = try await AccountsClient(certificatesDirectory: cluster.certificates, host: address.host, port: address.port)
                .request(.DELETE, "/admin/tenants/drill/users/\(user)")
            guard r.status == 200 else { throw ChaosError("\(r.status) \(r.text)") }
        } catch {
            log("the drill's user \(user) was not dropped (\(error)); drop it with apiary ctl user drop \(user) --tenant drill")
        }
    }

    /// The drill's tenant, table and user (a new password each run; never printed).
    private func prepare() async throws {
        let status = settings.force ? try await monitorStatus() : try await waitForHealth(since: nowMs)
        guard let w = writer(status) else { throw ChaosError("no node is the writer now: the drill's writes need one, even with --force") }
        guard let node = cluster.nodes.first(where: { $0.name == w }) else { throw ChaosError("the writer \(w) is not among the cluster's nodes") }
        let address = try Self.split(node.address)
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: address.host, port: address.port)
        do { try await accounts.createTenant("drill") } catch where "\(error)".contains("409") {}
        let user = "drill-\(UUID().uuidString.prefix(8).lowercased())", password = AccountsClient.randomPassword()
        try await accounts.createUser(user, tenant: "drill", role: "writer", password: password)
        lock.withLock {
            authorization = "Basic " + Data("\(user):\(password)".utf8).base64EncodedString()
            drillUser = user
        }
        let create = Array("[\"CREATE TABLE IF NOT EXISTS writes (rep INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (rep, id))\", \"DELETE FROM writes\"]".utf8)
        for _ in 0..<100 {
            switch await write(body: create, key: nil, path: "/db/execute?transaction") {
            case .acknowledged: return
            case .failed(let why): throw ChaosError("cannot create the drill's table: \(why)")
            case .refused, .unknown: break
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw ChaosError("cannot create the drill's table through the gateways")
    }

    enum WriteOutcome {
        case acknowledged
        /// Not applied, or not known to be: retried with the same key.
        case refused(String), unknown(String)
        /// Answered with an error in its result: final (with its key, every retry gets the same).
        case failed(String)
    }

    /// One request through a gateway, the gateways taken in turn (as a client behind a load
    /// balancer would): an unreachable one is skipped at once; one that does not answer in time
    /// counts as "outcome unknown".
    func write(body: [UInt8], key: String?, path: String = "/db/execute") async -> WriteOutcome {
        let gateways = cluster.gateways
        let first = lock.withLock { () -> Int in gatewayTurn += 1; return gatewayTurn }
        var headers = [("Authorization", lock.withLock { authorization })]
        if let key { headers.append(("Idempotency-Key", key)) }
        for i in 0..<gateways.count {
            let index = (first + i) % gateways.count
            guard let address = try? Self.split(gateways[index].address) else { continue }
            let c: HTTPSConnection
            if let reused = lock.withLock({ idle[index]?.popLast() }), reused.isOpen {
                c = reused
            } else {
                do {
                    c = try await HTTPSConnection.connect(host: address.host, port: address.port, tls: clientTLS, group: MultiThreadedEventLoopGroup.singleton, timeoutMs: 300)
                } catch {
                    continue // nothing sent: the next gateway
                }
            }
            let r: HTTPSConnection.Response
            do {
                r = try await c.request(.POST, path, headers: headers, body: body, timeoutMs: 1_000)
            } catch {
                Task { await c.close() }
                return .unknown("no answer from \(gateways[index].name) within 1 s")
            }
            if r.header("connection")?.lowercased() == "close" { Task { await c.close() } } else { lock.withLock { idle[index, default: []].append(c) } }
            if r.status == 200, r.errorCode == nil { return r.text.contains("\"error\"") ? .failed(String(r.text.prefix(200))) : .acknowledged }
            if r.header("x-apiary-outcome") == "unknown" { return .unknown("\(r.status) \(r.errorCode ?? "")") }
            return .refused("\(r.status) \(r.errorCode ?? r.text.prefix(80).description)")
        }
        return .refused("no gateway reachable")
    }

    private func presentIDs(repetition: Int) async throws -> Set<Int> {
        let q = "SELECT id FROM writes WHERE rep = \(repetition)".addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        let headers = [("Authorization", lock.withLock { authorization })]
        for _ in 0..<100 {
            for gateway in cluster.gateways {
                guard let address = try? Self.split(gateway.address),
                      let c = try? await HTTPSConnection.connect(host: address.host, port: address.port, tls: clientTLS, group: MultiThreadedEventLoopGroup.singleton, timeoutMs: 1_000) else { continue }
                defer { Task { await c.close() } }
                if let r = try? await c.request(.GET, "/db/query?level=strong&q=" + q, headers: headers, timeoutMs: 5_000), r.status == 200, let rows = r.integerRows {
                    return Set(rows.compactMap(\.first))
                }
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw ChaosError("cannot read the drill's writes back through the gateways")
    }

    private func verifyChecksums(_ status: StatusBody) async throws -> ClusterVerifier.Report {
        guard let w = writer(status), let primary = cluster.nodes.first(where: { $0.name == w }), let standby = cluster.nodes.first(where: { $0.name != w }) else {
            throw ChaosError("cannot tell the writer from the standby among \(cluster.nodes.map(\.name))")
        }
        let p = try Self.split(primary.address), s = try Self.split(standby.address)
        return try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
            .verify(primary: (p.host, p.port), standby: (s.host, s.port), waitMs: Int(settings.timeoutMs))
    }

    static func split(_ address: String) throws -> (host: String, port: Int) {
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else {
            throw ChaosError("'\(address)' is not host:port")
        }
        return (String(address[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port)
    }
}

/// The drill's writers: a new write every `writeIntervalMs`, each retried with its key until
/// acknowledged (or the drill ends).
final class WriteLoad: @unchecked Sendable {
    let drill: ZoneLossDrill
    let repetition: Int
    private let lock = NSLock()
    private var stopped = false
    private var acked: [Int: (begunMs: Int64, ackedMs: Int64)] = [:]
    private(set) var attempts = 0
    private(set) var failedAttempts = 0
    /// Attempts that did not end acknowledged: when, and how (bounded).
    private(set) var attemptLog: [String] = []
    /// Writes answered with an error (none expected: each inserts a new row).
    private(set) var errors: [String] = []

    init(drill: ZoneLossDrill, repetition: Int) {
        self.drill = drill
        self.repetition = repetition
    }

    func stop() { lock.withLock { stopped = true } }
    var isStopped: Bool { lock.withLock { stopped } }
    var acknowledged: Set<Int> { lock.withLock { Set(acked.keys) } }
    var acknowledgementTimes: [Int64] { lock.withLock { acked.values.map(\.ackedMs).sorted() } }

    func run() async {
        await withTaskGroup(of: Void.self) { group in
            var id = 0
            var next = drill.nowMs
            while !isStopped {
                id += 1
                let write = id
                group.addTask { await self.write(write) }
                next += drill.settings.writeIntervalMs
                let wait = next - drill.nowMs
                if wait > 0 { try? await Task.sleep(for: .milliseconds(wait)) }
            }
        }
    }

    private func write(_ id: Int) async {
        let begun = drill.nowMs
        let key = "drill-\(repetition)-\(id)-\(UUID().uuidString)"
        let body = Array("[[\"INSERT INTO writes (rep, id) VALUES (?, ?)\", \(repetition), \(id)]]".utf8)
        // Until acknowledged: the same key every time, so a retry never applies it twice.
        // Once the load stops, a write not yet acknowledged is given a bounded last chance.
        var deadline: Int64?
        while true {
            let attemptBegun = drill.nowMs
            let outcome = await drill.write(body: body, key: key)
            let attemptEnded = drill.nowMs
            lock.withLock {
                attempts += 1
                if case .acknowledged = outcome {} else if attemptLog.count < 2_000 {
                    attemptLog.append("\(attemptBegun)–\(attemptEnded) ms write \(id): \(outcome)")
                }
            }
            if case .acknowledged = outcome {
                let now = drill.nowMs
                lock.withLock { acked[id] = (begun, now) }
                return
            }
            if case .failed(let why) = outcome {
                lock.withLock { failedAttempts += 1; errors.append("write \(id): \(why)") }
                return
            }
            lock.withLock { failedAttempts += 1 }
            if isStopped {
                if deadline == nil { deadline = drill.nowMs + drill.settings.timeoutMs }
                if drill.nowMs > deadline! { return }
            }
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    /// When the first write begun at or after `cutMs` was acknowledged (nil: none in time).
    func firstAcknowledgement(begunAfter cutMs: Int64, timeoutMs: Int64) async -> Int64? {
        let deadline = drill.nowMs + timeoutMs
        while drill.nowMs < deadline {
            let first = lock.withLock { acked.values.filter { $0.begunMs >= cutMs }.map(\.ackedMs).min() }
            if let first { return first }
            try? await Task.sleep(for: .milliseconds(5)) // polling a count of work, bounded above
        }
        return nil
    }
}
