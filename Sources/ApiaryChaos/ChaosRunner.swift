import ApiaryMonitor
import ApiaryNode
import ApiaryTLS
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// Runs one scenario against a real local cluster (two nodes, the monitor, two gateways) on
/// loopback: the workload through the gateways, the faults on schedule, then the checks, and
/// writes the report. Process faults only for now: zones in network namespaces (partitions,
/// delay, loss) are not built yet, and the report says so.
public final class ChaosRunner: @unchecked Sendable {
    public struct Settings: Sendable {
        public var executable: String
        public var directory: String
        public var reportsDirectory: String
        public var basePort: Int
        public init(executable: String, directory: String, reportsDirectory: String, basePort: Int) {
            self.executable = executable
            self.directory = directory
            self.reportsDirectory = reportsDirectory
            self.basePort = basePort
        }
    }

    let scenario: Scenario
    let settings: Settings
    let cluster: LocalCluster
    private let lock = NSLock()
    private var history: [WorkloadOperation] = []
    private var applied: [(atMs: Int64, text: String)] = []
    private var stopped = false
    private var killedNode: LocalCluster.NodeSpec?
    private var down: Set<String> = []
    private var paused: Set<Int32> = []
    private let started = Date()
    private var authorization = ""
    static let accounts = 8
    static let balance = 100

    public init(scenario: Scenario, settings: Settings) {
        self.scenario = scenario
        self.settings = settings
        cluster = LocalCluster(directory: settings.directory, executable: settings.executable, basePort: settings.basePort,
                               monitorArguments: [], gateways: 2)
    }

    var nowMs: Int64 { Int64(Date().timeIntervalSince(started) * 1000) }

    /// Runs the scenario; the report says whether every check passed.
    public func run(log: @escaping @Sendable (String) -> Void) async throws -> ChaosReport {
        defer { cluster.stopAll() }
        try cluster.startBoth()
        try await waitForSync(timeoutSeconds: 60)
        try await prepare()
        log("cluster up and in sync; workload for \(scenario.seconds) s with \(scenario.faults.count) faults")
        let workloadStart = nowMs
        var clients: [Task<Void, Never>] = []
        for c in 0..<scenario.setClients { clients.append(Task { await self.setClient(c) }) }
        for c in 0..<scenario.bankClients { clients.append(Task { await self.bankClient(scenario.setClients + c) }) }
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
        let values = try await query("SELECT v FROM s").map { $0[0] }
        checks.append(Checkers.set(history: ops, finalValues: values))
        let total = try await query("SELECT sum(bal) FROM b").first?.first ?? -1
        checks.append(Checkers.bank(history: ops, total: Self.accounts * Self.balance, finalTotal: total))
        checks.append(Checkers.oneWriterPerEpoch(claims: writerClaims()))
        checks.append(await verifyReplicas())
        let availability = Availability(history: ops, durationMs: durationMs)
        if let min = scenario.availabilityMin {
            checks.append(CheckResult(name: "availability at least \(min) both ways", passed: availability.byRequests >= min && availability.byTime >= min,
                                      detail: String(format: "requests %.5f, time %.5f", availability.byRequests, availability.byTime)))
        }
        let faults = lock.withLock { applied }.map { FaultRecord(atMs: $0.atMs - workloadStart, text: $0.text) }
        return ChaosReport(scenario: scenario.name, startedAt: ISO8601DateFormatter().string(from: started), durationMs: durationMs,
                           network: "loopback, process faults only (zones in network namespaces are not built yet)",
                           checks: checks, availability: availability, faults: faults, operations: ops)
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

    private func healAll() async {
        for pid in lock.withLock({ paused }) { kill(pid, SIGCONT) }
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

    // MARK: The workload

    private func setClient(_ id: Int) async {
        var value = id
        while !lock.withLock({ stopped }) {
            let body = Array("[[\"INSERT INTO s(v) VALUES(?)\", \(value)]]".utf8)
            let (outcome, detail, _, invoked, completed) = await send(.POST, "/db/execute", body: body, key: "set-\(value)")
            lock.withLock { history.append(WorkloadOperation(kind: .add, client: id, value: value, invokedMs: invoked, completedMs: completed, outcome: outcome, detail: detail)) }
            value += 64
        }
    }

    private func bankClient(_ id: Int) async {
        var n = 0
        var rng = SystemRandomNumberGenerator()
        while !lock.withLock({ stopped }) {
            n += 1
            if n % 4 == 0 {
                let (outcome, detail, rows, invoked, completed) = await send(.GET, "/db/query?level=strong&q=SELECT%20sum(bal)%20FROM%20b", body: nil, key: nil)
                var op = WorkloadOperation(kind: .readTotal, client: id, value: n, invokedMs: invoked, completedMs: completed, outcome: outcome, detail: detail)
                op.readValue = rows.first?.first
                lock.withLock { history.append(op) }
                continue
            }
            let from = Int.random(in: 0..<Self.accounts, using: &rng)
            let to = (from + Int.random(in: 1..<Self.accounts, using: &rng)) % Self.accounts
            let amount = Int.random(in: 1...5, using: &rng)
            // One statement: both sides or neither, and never below zero.
            let sql = "UPDATE b SET bal = bal + (CASE id WHEN \(from) THEN -\(amount) ELSE \(amount) END) WHERE id IN (\(from), \(to)) AND (SELECT bal FROM b WHERE id = \(from)) >= \(amount)"
            let (outcome, detail, _, invoked, completed) = await send(.POST, "/db/execute", body: Array("[\"\(sql)\"]".utf8), key: "bank-\(id)-\(n)")
            var op = WorkloadOperation(kind: .transfer, client: id, value: n, invokedMs: invoked, completedMs: completed, outcome: outcome, detail: detail)
            op.from = from
            op.to = to
            op.amount = amount
            lock.withLock { history.append(op) }
        }
    }

    /// One request through a gateway (the second if the first cannot be reached), as an
    /// application: its outcome, a short detail, the rows of a query, when it was invoked and
    /// completed.
    private func send(_ method: HTTPMethod, _ path: String, body: [UInt8]?, key: String?) async -> (Outcome, String, [[Int]], Int64, Int64) {
        let invoked = nowMs
        var headers = [("Authorization", authorization)]
        if let key { headers.append(("Idempotency-Key", key)) }
        for gateway in cluster.gateways {
            do {
                let c = try await connect(port: gateway.apiPort, asOperator: false)
                defer { Task { await c.close() } }
                let r: HTTPSConnection.Response
                do {
                    r = try await c.request(method, path, headers: headers, body: body, timeoutMs: 10_000)
                } catch {
                    // Sent, no answer: a read is just failed; a write may or may not be applied.
                    return (method == .GET ? .failed : .unknown, "no answer: \(error)", [], invoked, nowMs)
                }
                if r.status == 200, let rows = r.integerRows { return (.ok, "200", rows, invoked, nowMs) }
                let code = r.errorCode ?? "-"
                let unknown = r.header("x-apiary-outcome") == "unknown"
                return (unknown ? .unknown : .failed, "\(r.status) \(code)", [], invoked, nowMs)
            } catch {
                continue // could not connect: nothing was sent; try the other gateway
            }
        }
        return (.failed, "no gateway reachable", [], invoked, nowMs)
    }

    // MARK: Setup and checks

    private func connect(port: Int, asOperator: Bool) async throws -> HTTPSConnection {
        var tls: TLSConfiguration
        if asOperator {
            tls = try ClusterCredentials(directory: cluster.certificates, name: "operator").clusterClient()
        } else {
            tls = TLSConfiguration.makeClientConfiguration()
            tls.trustRoots = .file(cluster.certificates + "/ca.pem")
        }
        return try await HTTPSConnection.connect(host: "127.0.0.1", port: port, tls: tls, group: MultiThreadedEventLoopGroup.singleton, timeoutMs: 2_000)
    }

    private func topology() async throws -> TopologyBody {
        let c = try await connect(port: cluster.monitor!.apiPort, asOperator: true)
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
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: writer.apiPort)
        try await accounts.createTenant("chaos")
        let password = AccountsClient.randomPassword()
        try await accounts.createUser("chaos", tenant: "chaos", role: "writer", password: password)
        authorization = "Basic " + Data("chaos:\(password)".utf8).base64EncodedString()
        let rows = (0..<Self.accounts).map { "(\($0), \(Self.balance))" }.joined(separator: ", ")
        let body = Array("[\"CREATE TABLE s (v INTEGER)\", \"CREATE TABLE b (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)\", \"INSERT INTO b VALUES \(rows)\"]".utf8)
        let (outcome, detail, _, _, _) = await send(.POST, "/db/execute?transaction", body: body, key: nil)
        guard outcome == .ok else { throw ChaosError("cannot create the workload's tables: \(detail)") }
    }

    /// A query through a gateway at level strong, held until it is answered (after healing).
    private func query(_ sql: String) async throws -> [[Int]] {
        let path = "/db/query?level=strong&q=" + sql.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        for _ in 0..<50 {
            let (outcome, _, rows, _, _) = await send(.GET, path, body: nil, key: nil)
            if outcome == .ok { return rows }
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
                .verify(primary: ("127.0.0.1", writer.apiPort), standby: ("127.0.0.1", cluster.peer(of: writer).apiPort), waitMs: 30_000)
            return CheckResult(name: "replicas identical (ctl verify)", passed: report.consistent, detail: report.text)
        } catch {
            return CheckResult(name: "replicas identical (ctl verify)", passed: false, detail: "\(error)")
        }
    }
}
