import ApiaryMonitor
import ApiaryNode
import ApiaryTLS
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// Runs one scenario against a real local cluster (two nodes, the monitor, two gateways): the
/// workload through the gateways, the faults on schedule, then the checks, and writes the
/// report. The zones are network namespaces (``ZoneNetwork``) where this machine allows it —
/// node-a and gateway-1 in zone a, node-b and gateway-2 in b, the monitor in c, the clients
/// outside — and network faults cut them apart; elsewhere everything runs on loopback with
/// process faults only, and the report says so.
public final class ChaosRunner: @unchecked Sendable {
    public struct Settings: Sendable {
        public var executable: String
        public var directory: String
        public var reportsDirectory: String
        public var basePort: Int
        /// Run on loopback even where zones could be namespaces.
        public var loopback: Bool
        public init(executable: String, directory: String, reportsDirectory: String, basePort: Int, loopback: Bool = false) {
            self.executable = executable
            self.directory = directory
            self.reportsDirectory = reportsDirectory
            self.basePort = basePort
            self.loopback = loopback
        }
    }

    let scenario: Scenario
    let settings: Settings
    let cluster: LocalCluster
    /// The zones, when they are network namespaces; nil on loopback.
    let network: ZoneNetwork?
    /// How the run is networked, for the report.
    let networkText: String
    /// Each node's data directory on a small file system of its own, when the scenario fills
    /// disks (`fill_disk`) and this run may mount (root).
    let disks: [String: SmallDisk]
    /// Why `fill_disk` faults are skipped, if they are.
    let disksUnavailable: String?
    /// The size of a node's own file system: room for any scenario's data, in memory.
    static let diskBytes = 256 << 20
    /// The gateway clients try first; the other when it cannot be reached (as an application's
    /// client library does with two endpoints).
    private var preferredGateway = 0
    private let lock = NSLock()
    private var history: [WorkloadOperation] = []
    private var applied: [(atMs: Int64, text: String)] = []
    private var stopped = false
    private var killedNode: LocalCluster.NodeSpec?
    private var down: Set<String> = []
    private var paused: Set<Int32> = []
    /// Zones with network faults in force.
    private var cut: Set<String> = []
    /// The writer and epoch through the run (``sampleRoles()``).
    private var roleSamples: [RoleSample] = []
    private let started = Date()
    private var authorization = ""
    static let accounts = 8
    /// What an operation may take in all, its resend to the other gateway included: past it,
    /// it counts as failed (a read) or unknown (a write).
    static let operationTimeoutMs: Int64 = 10_000
    static let balance = 100

    /// Makes the zones (network namespaces where possible); the cluster starts in ``run(log:)``.
    public init(scenario: Scenario, settings: Settings) throws {
        self.scenario = scenario
        self.settings = settings
        let unavailable = settings.loopback ? "loopback chosen (--loopback)" : ZoneNetwork.unavailableReason()
        if let unavailable {
            network = nil
            networkText = "loopback, process faults only: \(unavailable)"
        } else {
            let network = try ZoneNetwork()
            self.network = network
            networkText = "zones a, b, c in network namespaces \(network.namespace("*")) on \(network.subnet).0/24, clients outside; network faults by nftables"
        }
        cluster = LocalCluster(directory: settings.directory, executable: settings.executable, basePort: settings.basePort,
                               monitorArguments: [], gateways: 2, zones: network?.placement)
        var disks: [String: SmallDisk] = [:]
        if scenario.faults.contains(where: { $0.kind == .fillDisk }), geteuid() == 0 {
            SmallDisk.removeLeftovers()
            for node in [cluster.primary, cluster.standby] {
                disks[node.name] = try SmallDisk(path: settings.directory + "/" + node.name, bytes: Self.diskBytes)
            }
        }
        self.disks = disks
        disksUnavailable = disks.isEmpty ? "a node's own small file system needs root (mount)" : nil
    }

    /// Stops every process and removes the zones at once (the run was interrupted).
    public func abort() {
        cluster.stopAll()
        for disk in disks.values { disk.unmount() }
        network?.destroy()
    }

    var nowMs: Int64 { Int64(Date().timeIntervalSince(started) * 1000) }

    /// Runs the scenario; the report says whether every check passed.
    public func run(log: @escaping @Sendable (String) -> Void) async throws -> ChaosReport {
        defer { abort() }
        log("network: \(networkText)")
        do {
            try cluster.startBoth()
            try await waitForSync(timeoutSeconds: 60)
            try await prepare()
        } catch {
            // Fail fast, with what each process said: the report is the evidence.
            log("the cluster did not start: \(error)")
            return ChaosReport(scenario: scenario.name, startedAt: ISO8601DateFormatter().string(from: started), durationMs: 0, network: networkText,
                               checks: [CheckResult(name: "cluster started", passed: false, detail: "\(error)\n" + processLogs())],
                               availability: Availability(history: [], durationMs: 0), faults: [], operations: [])
        }
        log("cluster up and in sync; workload for \(scenario.seconds) s with \(scenario.faults.count) faults")
        let workloadStart = nowMs
        var clients: [Task<Void, Never>] = []
        for c in 0..<scenario.setClients { clients.append(Task { await self.setClient(c) }) }
        for c in 0..<scenario.bankClients { clients.append(Task { await self.bankClient(scenario.setClients + c) }) }
        for c in 0..<scenario.registerClients { clients.append(Task { await self.registerClient(scenario.setClients + scenario.bankClients + c) }) }
        let sampler = Task { await self.sampleRoles() }
        for fault in scenario.faults.sorted(by: { $0.at < $1.at }) {
            let due = workloadStart + Int64(fault.at * 1000)
            if due > nowMs { try await Task.sleep(for: .milliseconds(due - nowMs)) } // the schedule is wall-clock time
            let text = await apply(fault)
            log("t=\(String(format: "%.1f", Double(nowMs - workloadStart) / 1000)) s: \(text)")
        }
        let end = workloadStart + Int64(scenario.seconds * 1000)
        if end > nowMs { try await Task.sleep(for: .milliseconds(end - nowMs)) }
        lock.withLock { stopped = true }
        for client in clients { await client.value }
        await sampler.value
        let durationMs = nowMs - workloadStart

        // Heal: everything back up, then the formation must converge.
        await healAll()
        log("healed; waiting for the formation to converge")
        var checks: [CheckResult] = []
        do {
            try await waitForSync(timeoutSeconds: 90)
            checks.append(CheckResult(name: "converged: a sync primary and a promotable standby", passed: true, detail: "after healing"))
        } catch {
            checks.append(CheckResult(name: "converged: a sync primary and a promotable standby", passed: false, detail: "\(error)"))
        }
        let ops = lock.withLock { history }.map { op -> WorkloadOperation in var o = op; o.invokedMs -= workloadStart; o.completedMs -= workloadStart; return o }
        do {
            checks.append(Checkers.set(history: ops, finalValues: try await setValues()))
        } catch {
            checks.append(CheckResult(name: "set: acknowledged inserts present exactly once", passed: false, detail: "the final read failed: \(error)"))
        }
        let total = try await query("SELECT sum(bal) FROM b").first?.first ?? -1
        checks.append(Checkers.bank(history: ops, total: Self.accounts * Self.balance, finalTotal: total))
        var finalReads: [WorkloadOperation] = []
        if scenario.registerClients > 0 {
            // Every register read once more after healing: an acknowledged write lost in a
            // failover shows as a read the history cannot explain.
            let invoked = nowMs
            let finalRegisters = try await query("SELECT k, v FROM registers", level: "linearizable")
            let completed = nowMs
            for row in finalRegisters where row.count == 2 {
                finalReads.append(.registerRead(client: -1, key: row[0], value: row[1], invokedMs: invoked - workloadStart, completedMs: completed - workloadStart,
                                         outcome: .ok, detail: "final read after healing"))
            }
            let clock = ContinuousClock()
            var check = CheckResult(name: "", passed: false, detail: "")
            let took = clock.measure {
                check = Checkers.registers(history: ops + finalReads, statesMax: scenario.linearizabilityStatesMax ?? Linearizability.statesMaxDefault)
            }
            check.detail += "; \(took)"
            checks.append(check)
            checks.append(Checkers.registerReadsMonotonic(history: ops + finalReads))
        }
        checks.append(Checkers.oneWriterPerEpoch(claims: writerClaims()))
        checks.append(await verifyReplicas())
        let availability = Availability(history: ops, durationMs: durationMs)
        if let min = scenario.availabilityMin {
            checks.append(CheckResult(name: "availability at least \(min) both ways", passed: availability.byRequests >= min && availability.byTime >= min,
                                      detail: String(format: "requests %.5f, time %.5f", availability.byRequests, availability.byTime)))
        }
        let faults = lock.withLock { applied }.map { FaultRecord(atMs: $0.atMs - workloadStart, text: $0.text) }
        let roles = lock.withLock { roleSamples }.map { sample -> RoleSample in var s = sample; s.atMs -= workloadStart; return s }
        var report = ChaosReport(scenario: scenario.name, startedAt: ISO8601DateFormatter().string(from: started), durationMs: durationMs,
                                 network: networkText,
                                 checks: checks, availability: availability, faults: faults, operations: ops + finalReads)
        report.roles = roles
        return report
    }

    // MARK: Faults

    private func apply(_ fault: Scenario.Fault) async -> String {
        var text = "\(fault.kind.rawValue) \(fault.target.rawValue)"
        do {
            switch (fault.kind, fault.target) {
            case (.kill, .primary), (.kill, .standby):
                let node = try await node(fault.target)
                cluster.kill(node)
                lock.withLock { killedNode = node; _ = down.insert(node.name) }
                text += " (\(node.name))"
            case (.kill, .monitor), (.kill, .gateway):
                let spec = fault.target == .monitor ? cluster.monitor! : cluster.gateways[0]
                cluster.kill(spec)
                lock.withLock { _ = down.insert(spec.name) }
            case (.restart, .killedNode):
                guard let node = lock.withLock({ killedNode }) else { return text + ": nothing killed" }
                try cluster.start(node)
                lock.withLock { _ = down.remove(node.name) }
                text += " (\(node.name))"
            case (.restart, .monitor), (.restart, .gateway):
                let spec = fault.target == .monitor ? cluster.monitor! : cluster.gateways[0]
                try cluster.start(spec)
                lock.withLock { _ = down.remove(spec.name) }
            case (.pause, _):
                let spec: LocalCluster.NodeSpec
                switch fault.target {
                case .primary, .standby: spec = try await node(fault.target)
                case .monitor: spec = cluster.monitor!
                default: spec = cluster.gateways[0]
                }
                guard let pid = cluster.processID(of: spec) else { return text + ": not running" }
                kill(pid, SIGSTOP)
                lock.withLock { _ = paused.insert(pid) }
                text += " (\(spec.name)) for \(fault.seconds ?? 0) s"
                Task {
                    try? await Task.sleep(for: .milliseconds(Int64((fault.seconds ?? 0) * 1000)))
                    kill(pid, SIGCONT)
                    self.lock.withLock { _ = self.paused.remove(pid) }
                    self.note("resume \(spec.name)")
                }
            case (.fillDisk, _):
                guard disksUnavailable == nil else { return skipped(text, disksUnavailable!) }
                let node = try await node(fault.target)
                guard let disk = disks[node.name] else { return skipped(text, "\(node.name) has no file system of its own") }
                let taken = try disk.fill()
                let seconds = fault.seconds ?? 0
                text += " (\(node.name): the last \(taken / 1024) KiB of its file system taken) for \(seconds) s"
                Task {
                    try? await Task.sleep(for: .milliseconds(Int64(seconds * 1000)))
                    disk.free()
                    self.note("free the disk of \(node.name)")
                }
            case (.isolate, _), (.cut, _), (.cutOneWay, _), (.loss, _), (.delay, _):
                guard let network else { return skipped(text, "network faults need zones in network namespaces; this run is on loopback") }
                let seconds = fault.seconds ?? 0
                let zone: String
                switch fault.target {
                case .primary, .standby: zone = cluster.zone(of: try await node(fault.target))
                case .monitor: zone = cluster.zone(of: cluster.monitor!)
                default: zone = cluster.zone(of: cluster.gateways[0])
                }
                let other = zone == "a" ? "b" : "a"
                switch fault.kind {
                case .isolate:
                    try network.isolate(zone)
                    text += " (zone \(zone): \(cluster.all.filter { cluster.zone(of: $0) == zone }.map(\.name).joined(separator: ", ")))"
                case .cut:
                    try network.cut(zone, from: other)
                    text += " (zone \(zone) ↔ zone \(other))"
                case .loss:
                    try network.lose(zone, from: other, percent: fault.percent ?? 0)
                    text += " (\(fault.percent ?? 0)% of zone \(zone) ↔ zone \(other))"
                case .delay:
                    let schedule = DelaySchedule(delayMs: fault.delayMs ?? 0, jitterMs: fault.jitterMs ?? 0, reorderPercent: fault.reorderPercent ?? 0)
                    try network.delay(zone, from: other, schedule, executable: settings.executable, seed: UInt64(fault.at * 1000))
                    text += " (zone \(zone) ↔ zone \(other): \(schedule.delayMs) ms ± \(schedule.jitterMs) ms each way, \(schedule.reorderPercent)% reordered)"
                default:
                    try network.cut(zone, from: other, oneWay: true)
                    text += " (zone \(zone) → zone \(other) dropped)"
                }
                text += " for \(seconds) s"
                lock.withLock { _ = cut.insert(zone) }
                Task {
                    try? await Task.sleep(for: .milliseconds(Int64(seconds * 1000)))
                    // A delayer that ended before its fault did is a fault not applied in full: said.
                    var healed = "reconnect zone \(zone)"
                    do { try network.heal(zone) } catch { healed += ": failed (\(error))" }
                    self.lock.withLock { _ = self.cut.remove(zone) }
                    self.note(healed)
                }
            default:
                text += ": not a fault this harness knows"
            }
        } catch {
            text += ": failed (\(error))"
        }
        note(text)
        return text
    }

    private func note(_ text: String) { lock.withLock { applied.append((nowMs, text)) } }

    private func skipped(_ text: String, _ reason: String) -> String {
        let line = text + ": skipped (\(reason))"
        note(line)
        return line
    }

    private func healAll() async {
        for pid in lock.withLock({ paused }) { kill(pid, SIGCONT) }
        network?.healAll()
        for disk in disks.values { disk.free() }
        let specs = [cluster.primary, cluster.standby, cluster.monitor!] + cluster.gateways
        for spec in specs where lock.withLock({ down.contains(spec.name) }) || !cluster.isRunning(spec) {
            try? cluster.start(spec)
        }
    }

    /// The node the monitor names as the writer (`primary`), or the other one.
    private func node(_ target: Scenario.Fault.Target) async throws -> LocalCluster.NodeSpec {
        let topology = try await self.topology()
        guard let writer = topology.writer else { throw ChaosError("the monitor names no writer") }
        let primary = writer == cluster.primary.name ? cluster.primary : cluster.standby
        return target == .primary ? primary : cluster.peer(of: primary)
    }

    /// The last lines of every process's log, for a report of a run that could not start.
    private func processLogs(lines: Int = 40) -> String {
        cluster.all.map { spec in
            let text = (try? String(contentsOfFile: cluster.directory + "/logs/\(spec.name).log", encoding: .utf8)) ?? "(no log)"
            return "---- \(spec.name) (last \(lines) lines) ----\n" + text.split(separator: "\n").suffix(lines).joined(separator: "\n")
        }.joined(separator: "\n")
    }

    /// Asks the monitor for the writer and the epoch twice a second until the workload stops,
    /// for the report's timeline (a monitor that cannot be reached leaves a gap).
    private func sampleRoles() async {
        while !lock.withLock({ stopped }) {
            if let t = try? await topology() {
                let sample = RoleSample(atMs: nowMs, epoch: t.epoch, writer: t.writer, writerReady: t.writerReady)
                lock.withLock { roleSamples.append(sample) }
            }
            try? await Task.sleep(for: .milliseconds(500)) // a sampling period, not an ordering of events
        }
    }

    // MARK: The workload

    private func setClient(_ id: Int) async {
        var value = id
        while !lock.withLock({ stopped }) {
            let body = Array("[[\"INSERT INTO s(v) VALUES(?)\", \(value)]]".utf8)
            let r = await send(.POST, "/db/execute", body: body, key: "set-\(value)")
            lock.withLock { history.append(WorkloadOperation(kind: .add, client: id, value: value, invokedMs: r.invokedMs, completedMs: r.completedMs, outcome: r.outcome, detail: r.detail)) }
            value += 64
        }
    }

    private func bankClient(_ id: Int) async {
        var n = 0
        var rng = SystemRandomNumberGenerator()
        while !lock.withLock({ stopped }) {
            n += 1
            if n % 4 == 0 {
                let r = await send(.GET, "/db/query?level=strong&q=SELECT%20sum(bal)%20FROM%20b", body: nil, key: nil)
                var op = WorkloadOperation(kind: .readTotal, client: id, value: n, invokedMs: r.invokedMs, completedMs: r.completedMs, outcome: r.outcome, detail: r.detail)
                op.readValue = r.rows.first?.first
                lock.withLock { history.append(op) }
                continue
            }
            let from = Int.random(in: 0..<Self.accounts, using: &rng)
            let to = (from + Int.random(in: 1..<Self.accounts, using: &rng)) % Self.accounts
            let amount = Int.random(in: 1...5, using: &rng)
            // One statement: both sides or neither, and never below zero.
            let sql = "UPDATE b SET bal = bal + (CASE id WHEN \(from) THEN -\(amount) ELSE \(amount) END) WHERE id IN (\(from), \(to)) AND (SELECT bal FROM b WHERE id = \(from)) >= \(amount)"
            let r = await send(.POST, "/db/execute", body: Array("[\"\(sql)\"]".utf8), key: "bank-\(id)-\(n)")
            var op = WorkloadOperation(kind: .transfer, client: id, value: n, invokedMs: r.invokedMs, completedMs: r.completedMs, outcome: r.outcome, detail: r.detail)
            op.from = from
            op.to = to
            op.amount = amount
            lock.withLock { history.append(op) }
        }
    }

    /// Reads, writes and compare-and-sets on `registerKeys` registers. Every value written is
    /// unique (`id * 1_000_000 + n`, never the initial 0), which keeps the linearizability
    /// search small; a compare-and-set expects the value this client last saw in that register.
    private func registerClient(_ id: Int) async {
        var n = 0
        var rng = SystemRandomNumberGenerator()
        var lastSeen = [Int](repeating: 0, count: scenario.registerKeys)
        // Bounded: values stay unique per client up to a million operations.
        while !lock.withLock({ stopped }), n < 999_999 {
            n += 1
            let key = Int.random(in: 0..<scenario.registerKeys, using: &rng)
            let value = id * 1_000_000 + n
            let op: WorkloadOperation
            switch Int.random(in: 0..<10, using: &rng) {
            case 0..<4:
                let sql = "SELECT v FROM registers WHERE k = \(key)"
                let r = await send(.GET, "/db/query?level=linearizable&q=" + sql.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!, body: nil, key: nil)
                op = .registerRead(client: id, key: key, value: r.rows.first?.first, invokedMs: r.invokedMs, completedMs: r.completedMs, outcome: r.outcome, detail: r.detail)
                if r.outcome == .ok, let v = r.rows.first?.first { lastSeen[key] = v }
            case 4..<7:
                let body = Array("[[\"UPDATE registers SET v = ? WHERE k = ?\", \(value), \(key)]]".utf8)
                let r = await send(.POST, "/db/execute", body: body, key: "reg-\(id)-\(n)")
                op = .registerWrite(client: id, key: key, value: value, invokedMs: r.invokedMs, completedMs: r.completedMs, outcome: r.outcome,
                                    detail: r.detail + (r.outcome == .ok && r.rowsAffected != 1 ? " rows_affected \(r.rowsAffected.map(String.init) ?? "?")" : ""))
                if r.outcome == .ok { lastSeen[key] = value }
            default:
                let expected = lastSeen[key]
                let body = Array("[[\"UPDATE registers SET v = ? WHERE k = ? AND v = ?\", \(value), \(key), \(expected)]]".utf8)
                let r = await send(.POST, "/db/execute", body: body, key: "reg-\(id)-\(n)")
                // rows_affected 1: it found `expected` and wrote; 0: it found another value.
                let swapped = r.rowsAffected.flatMap { $0 == 1 ? true : $0 == 0 ? false : nil }
                op = .registerCAS(client: id, key: key, expected: expected, value: value, swapped: r.outcome == .ok ? swapped : nil,
                                  invokedMs: r.invokedMs, completedMs: r.completedMs, outcome: r.outcome, detail: r.detail)
                if swapped == true { lastSeen[key] = value }
            }
            var recorded = op
            recorded.value = n
            lock.withLock { history.append(recorded) }
        }
    }

    /// What one request came to, as its client saw it.
    struct Reply {
        var outcome: Outcome
        var detail: String
        /// The integer rows of a query's answer.
        var rows: [[Int]] = []
        /// An acknowledged execute's `rows_affected` (of its first statement; rqlite leaves
        /// out 0); nil when the answer does not say.
        var rowsAffected: Int?
        var invokedMs: Int64
        var completedMs: Int64
    }

    /// One request through a gateway (the second if the first cannot be reached), as an
    /// application: its outcome, a short detail, the rows of a query or the rows an execute
    /// changed, when it was invoked and completed.
    private func send(_ method: HTTPMethod, _ path: String, body: [UInt8]?, key: String?) async -> Reply {
        let invoked = nowMs
        var headers = [("Authorization", authorization)]
        if let key { headers.append(("Idempotency-Key", key)) }
        let first = lock.withLock { preferredGateway }
        let deadline = invoked + Self.operationTimeoutMs
        var dropped: String?
        for index in [first, 1 - first] {
            let gateway = cluster.gateways[index]
            do {
                let c = try await connect(to: gateway, asOperator: false)
                if index != first { lock.withLock { preferredGateway = index } }
                defer { Task { await c.close() } }
                let r: HTTPSConnection.Response
                do {
                    r = try await c.request(method, path, headers: headers, body: body, timeoutMs: max(1, deadline - nowMs))
                } catch {
                    // Sent, no answer. A gateway that dropped the connection before the time was
                    // up (it crashed): a request that may be sent again — a read, or a write with
                    // an idempotency key — goes to the other gateway, as an application's client
                    // library with two endpoints sends it. Otherwise a read is just failed, and a
                    // write may or may not have been applied.
                    if index == first, method == .GET || key != nil, nowMs < deadline - 100 {
                        dropped = "\(gateway.name) gave no answer (\(error))"
                        lock.withLock { preferredGateway = 1 - index }
                        continue
                    }
                    return Reply(outcome: method == .GET ? .failed : .unknown, detail: "no answer: \(error)" + (dropped.map { "; before: \($0)" } ?? ""),
                                 invokedMs: invoked, completedMs: nowMs)
                }
                let resent = dropped.map { " (sent again after \($0))" } ?? ""
                if r.status == 200, let rows = r.integerRows {
                    return Reply(outcome: .ok, detail: "200" + resent, rows: rows, rowsAffected: method == .GET ? nil : Self.rowsAffected(r.body),
                                 invokedMs: invoked, completedMs: nowMs)
                }
                let code = r.errorCode ?? "-"
                let unknown = r.header("x-apiary-outcome") == "unknown"
                return Reply(outcome: unknown ? .unknown : .failed, detail: "\(r.status) \(code)" + resent, invokedMs: invoked, completedMs: nowMs)
            } catch {
                continue // could not connect: nothing was sent; try the other gateway
            }
        }
        if let dropped { return Reply(outcome: method == .GET ? .failed : .unknown, detail: dropped, invokedMs: invoked, completedMs: nowMs) }
        return Reply(outcome: .failed, detail: "no gateway reachable", invokedMs: invoked, completedMs: nowMs)
    }

    /// `rows_affected` of the first result in an rqlite answer to an execute (absent means 0).
    static func rowsAffected(_ body: [UInt8]) -> Int? {
        guard let json = try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any],
              let first = (json["results"] as? [[String: Any]])?.first else { return nil }
        return (first["rows_affected"] as? NSNumber)?.intValue ?? 0
    }

    // MARK: Setup and checks

    private func connect(to spec: LocalCluster.NodeSpec, asOperator: Bool) async throws -> HTTPSConnection {
        var tls: TLSConfiguration
        if asOperator {
            tls = try ClusterCredentials(directory: cluster.certificates, name: "operator").clusterClient()
        } else {
            tls = TLSConfiguration.makeClientConfiguration()
            tls.trustRoots = .file(cluster.certificates + "/ca.pem")
        }
        return try await HTTPSConnection.connect(host: spec.host, port: spec.apiPort, tls: tls, group: MultiThreadedEventLoopGroup.singleton, timeoutMs: 2_000)
    }

    private func topology() async throws -> TopologyBody {
        let c = try await connect(to: cluster.monitor!, asOperator: true)
        defer { Task { await c.close() } }
        let r = try await c.request(.GET, "/topology", timeoutMs: 5_000)
        return try JSONDecoder().decode(TopologyBody.self, from: Data(r.body))
    }

    private func waitForSync(timeoutSeconds: Double) async throws {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while Date() < deadline {
            if let t = try? await topology(), t.writerReady,
               t.nodes.contains(where: { $0.goal == "primary" && $0.reported == "primary" }), t.nodes.contains(where: { $0.promotable }) { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw ChaosError("the formation did not reach a sync primary with a promotable standby within \(Int(timeoutSeconds)) s")
    }

    private func prepare() async throws {
        let writer = try await node(.primary)
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: writer.host, port: writer.apiPort)
        try await accounts.createTenant("chaos")
        let password = AccountsClient.randomPassword()
        try await accounts.createUser("chaos", tenant: "chaos", role: "writer", password: password)
        authorization = "Basic " + Data("chaos:\(password)".utf8).base64EncodedString()
        let rows = (0..<Self.accounts).map { "(\($0), \(Self.balance))" }.joined(separator: ", ")
        let registers = (0..<scenario.registerKeys).map { "(\($0), 0)" }.joined(separator: ", ")
        let body = Array(("[\"CREATE TABLE s (v INTEGER)\", \"CREATE TABLE b (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)\", \"INSERT INTO b VALUES \(rows)\", "
            + "\"CREATE TABLE registers (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)\", \"INSERT INTO registers VALUES \(registers)\"]").utf8)
        let r = await send(.POST, "/db/execute?transaction", body: body, key: nil)
        guard r.outcome == .ok else { throw ChaosError("cannot create the workload's tables: \(r.detail)") }
    }

    /// Every value of the set, read in pages: a long run's set is larger than one answer may be
    /// (100,000 rows a statement).
    private func setValues() async throws -> [Int] {
        var values: [Int] = []
        var after = 0
        while true {
            let page = try await query("SELECT rowid, v FROM s WHERE rowid > \(after) ORDER BY rowid LIMIT 20000")
            values += page.map { $0[1] }
            guard let last = page.last?.first, page.count == 20_000 else { return values }
            after = last
        }
    }

    /// A query through a gateway at `level`, held until it is answered (after healing).
    private func query(_ sql: String, level: String = "strong") async throws -> [[Int]] {
        let path = "/db/query?level=\(level)&q=" + sql.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        for _ in 0..<50 {
            let r = await send(.GET, path, body: nil, key: nil)
            if r.outcome == .ok { return r.rows }
            try await Task.sleep(for: .milliseconds(200))
        }
        throw ChaosError("the final read '\(sql)' never succeeded")
    }

    /// Who became the writer in which epoch, from each node's own output.
    private func writerClaims() -> [(node: String, epoch: UInt64)] {
        var claims: [(String, UInt64)] = []
        for spec in [cluster.primary, cluster.standby] {
            let text = (try? String(contentsOfFile: cluster.directory + "/logs/\(spec.name).log", encoding: .utf8)) ?? ""
            for line in text.split(separator: "\n") {
                if line.contains("ready: role=primary"), let e = Self.number(after: "epoch=", in: line) { claims.append((spec.name, e)) }
                if line.contains("promoted to primary"), let e = Self.number(after: "epoch=", in: line) { claims.append((spec.name, e)) }
            }
        }
        return claims
    }

    static func number(after key: String, in line: Substring) -> UInt64? {
        guard let range = line.range(of: key) else { return nil }
        return UInt64(line[range.upperBound...].prefix { $0.isNumber })
    }

    private func verifyReplicas() async -> CheckResult {
        do {
            let writer = try await node(.primary)
            let report = try await ClusterVerifier(certificatesDirectory: cluster.certificates, operatorName: "operator")
                .verify(primary: (writer.host, writer.apiPort), standby: (cluster.peer(of: writer).host, cluster.peer(of: writer).apiPort), waitMs: 30_000)
            return CheckResult(name: "replicas identical (ctl verify)", passed: report.consistent, detail: report.text)
        } catch {
            return CheckResult(name: "replicas identical (ctl verify)", passed: false, detail: "\(error)")
        }
    }
}
