import ApiaryMonitor
import ApiaryNode
import ApiaryTLS
import ArgumentParser
import Foundation
import NIOHTTP1
import NIOPosix
import NIOSSL

extension Bench {
    /// `apiary bench failover`: failover and switchover as a client sees them.
    struct Failover: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Measure failover as a client sees it: kill -9 of the primary to the first successful write, and the write pause of a planned switchover.",
            discussion: """
            Starts a local cluster with its monitor (default settings), a client writing every --write-interval-ms (retrying a failed \
            write on the other node after 10 ms, with an idempotency key), then --repetitions kills of the primary (the killed node \
            restarts and rejoins before the next) and as many switchovers. Prints one line per repetition and a summary: \
            `apiary-failover reps=N p50_ms=… p99_ms=… max_ms=… errors=… lost=…` (lost: acknowledged writes missing at the end). \
            See docs/benchmarks.md.
            """
        )

        @Option(help: "Kills of the primary, and switchovers.") var repetitions = 20
        @Option(help: "The client writes once per this interval (pg_auto_failover's comparison uses 50).") var writeIntervalMs = 50
        @Option(help: "Working directory (removed afterwards unless --keep).") var dir: String?
        @Flag(help: "Keep the working directory.") var keep = false
        @Option(help: "API base port of the cluster (the monitor listens 20 higher).") var basePort = 25001
        @Option(help: "The nodes' and the monitor's log level (their logs are in --dir/logs).") var logLevel = "warning"
        @Option(help: "How the client reaches the cluster: direct (it tries the other node after a failure, as a client of pg_auto_failover's multi-host connection string does) or gateway (one endpoint).") var client = "direct"

        func validate() throws {
            guard (1...1000).contains(repetitions) else { throw ValidationError("--repetitions must be 1...1000") }
            guard (1...10_000).contains(writeIntervalMs) else { throw ValidationError("--write-interval-ms must be 1...10000") }
            guard ["direct", "gateway"].contains(client) else { throw ValidationError("--client is direct or gateway") }
        }

        func run() async throws {
            let root = dir ?? (NSTemporaryDirectory() + "apiary-bench-failover-\(getpid())")
            defer { if !keep { try? FileManager.default.removeItem(atPath: root) } }
            let quiet = ["--log-level", logLevel]
            let cluster = LocalCluster(directory: root, executable: "/proc/self/exe".resolvedLink, basePort: basePort,
                                       primaryArguments: quiet, standbyArguments: quiet, monitorArguments: quiet,
                                       gateways: client == "gateway" ? 1 : 0, gatewayArguments: quiet)
            try cluster.startBoth()
            defer { cluster.stopAll() }
            print("# machine: nproc=\(ProcessInfo.processInfo.activeProcessorCount) fs=\(root)")
            print("# apiary defaults: monitor primary timeout 500 ms, heartbeats every 100 ms, lease 500 ms + 100 ms drift margin; client writes every \(writeIntervalMs) ms")
            let credentials = try ClusterCredentials(directory: cluster.certificates, name: "operator")
            let monitor = Address(argument: "127.0.0.1:\(cluster.monitor!.apiPort)")!
            try await waitInSync(monitor: monitor, credentials: credentials)
            let client: FailoverClient
            if self.client == "gateway" {
                // An application: basic auth through the gateway, the cluster CA trusted, no certificate.
                let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.primary.apiPort)
                try await accounts.createTenant(FailoverClient.tenant)
                let password = AccountsClient.randomPassword()
                try await accounts.createUser("bench", tenant: FailoverClient.tenant, role: "writer", password: password)
                var tls = TLSConfiguration.makeClientConfiguration()
                tls.trustRoots = .file(cluster.certificates + "/ca.pem")
                client = FailoverClient(nodes: [cluster.gateways[0].apiPort], tls: tls, intervalMs: writeIntervalMs,
                                        headers: [("Authorization", "Basic " + Data("bench:\(password)".utf8).base64EncodedString())])
            } else {
                client = FailoverClient(nodes: [cluster.primary.apiPort, cluster.standby.apiPort], tls: credentials.clusterClient(), intervalMs: writeIntervalMs,
                                        headers: [("X-Apiary-Tenant", FailoverClient.tenant)])
            }
            print("# client: \(self.client) (\(self.client == "gateway" ? "one endpoint, basic auth" : "alternates between the nodes after a failure, operator certificate"))")
            try await client.prepare()
            let writer = Task { await client.run() }

            var rtos: [Double] = []
            var primary = cluster.primary
            for rep in 1...repetitions {
                try await waitInSync(monitor: monitor, credentials: credentials)
                let errorsBefore = client.errors
                let killedAt = Date()
                cluster.kill(primary)
                let resumed = try await client.firstSuccess(after: killedAt, timeoutSeconds: 60)
                let ms = resumed.timeIntervalSince(killedAt) * 1000
                rtos.append(ms)
                print("apiary-failover rep=\(rep) killed=\(primary.name) rto_ms=\(String(format: "%.0f", ms)) errors=\(client.errors - errorsBefore)")
                fflush(stdout)
                try cluster.start(primary)
                primary = cluster.peer(of: primary)
            }
            var pauses: [Double] = []
            for rep in 1...repetitions {
                try await waitInSync(monitor: monitor, credentials: credentials)
                let errorsBefore = client.errors
                let start = Date()
                let answer = try await MonitorCtl.post("/commands/switchover", monitor: monitor, credentials: credentials)
                guard answer.status == 200 else { throw ValidationError("switchover refused: \(answer.text)") }
                try await waitSwitched(from: primary, monitor: monitor, credentials: credentials)
                _ = try await client.firstSuccess(after: Date(), timeoutSeconds: 60) // the pause has ended
                let pause = client.longestGap(since: start) * 1000
                pauses.append(pause)
                print("apiary-switchover rep=\(rep) from=\(primary.name) pause_ms=\(String(format: "%.0f", pause)) errors=\(client.errors - errorsBefore)")
                fflush(stdout)
                primary = cluster.peer(of: primary)
            }
            client.stop()
            await writer.value
            let lost = try await client.missing(on: (primary.name == cluster.primary.name ? cluster.primary : cluster.standby).apiPort,
                                                 tls: credentials.clusterClient())
            print(summary("apiary-failover-\(self.client)", rtos, errors: client.errors, lost: lost))
            print(summary("apiary-switchover-\(self.client)", pauses, errors: client.errors, lost: lost))
        }

        func summary(_ label: String, _ samples: [Double], errors: Int, lost: Int) -> String {
            let sorted = samples.sorted()
            func pct(_ p: Double) -> Double { sorted[min(sorted.count - 1, Int((p * Double(sorted.count)).rounded(.up)) - 1)] }
            return "\(label) reps=\(samples.count) p50_ms=\(String(format: "%.0f", pct(0.5))) p99_ms=\(String(format: "%.0f", pct(0.99))) max_ms=\(String(format: "%.0f", sorted.last ?? 0)) client_errors_total=\(errors) lost=\(lost)"
        }

        /// Until the writer commits in sync mode and its standby is promotable.
        func waitInSync(monitor: Address, credentials: ClusterCredentials) async throws {
            try await waitFor("the formation in sync", monitor: monitor, credentials: credentials) { s in
                s.nodes.contains { $0.goal == "primary" && $0.reported == "primary" } && s.nodes.contains { $0.promotable && $0.reported == "secondary" }
            }
        }

        func waitSwitched(from old: LocalCluster.NodeSpec, monitor: Address, credentials: ClusterCredentials) async throws {
            try await waitFor("the switchover from \(old.name)", monitor: monitor, credentials: credentials) { s in
                s.nodes.contains { $0.id != old.name && $0.goal.hasSuffix("primary") && $0.reported == $0.goal }
            }
        }

        func waitFor(_ what: String, monitor: Address, credentials: ClusterCredentials, _ done: (StatusBody) -> Bool) async throws {
            let deadline = Date().addingTimeInterval(120)
            while Date() < deadline {
                if let r = try? await MonitorCtl.get("/status", monitor: monitor, credentials: credentials), r.status == 200,
                   let s = try? JSONDecoder().decode(StatusBody.self, from: Data(r.body)), done(s) { return }
                try await Task.sleep(for: .milliseconds(20))
            }
            throw ValidationError("timed out waiting for \(what)")
        }
    }
}

/// One client writing on a fixed cadence to whichever node takes the write; each write carries
/// an idempotency key and is retried (on the other node) until acknowledged.
final class FailoverClient: @unchecked Sendable {
    private let nodes: [Int]
    private let tls: TLSConfiguration
    private let intervalMs: Int
    /// Sent with every request: the tenant (operator) or the credentials (application).
    private let headers: [(String, String)]
    private let lock = NSLock()
    private var successes: [Date] = []
    private var acked: [Int] = []
    private var errorCount = 0
    private var stopped = false
    static let tenant = "bench_failover"

    init(nodes: [Int], tls: TLSConfiguration, intervalMs: Int, headers: [(String, String)]) {
        self.nodes = nodes
        self.tls = tls
        self.intervalMs = intervalMs
        self.headers = headers
    }

    var errors: Int { lock.withLock { errorCount } }
    func stop() { lock.withLock { stopped = true } }

    func prepare() async throws {
        let c = try await HTTPSConnection.connect(host: "127.0.0.1", port: nodes[0], tls: tls, group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await c.close() } }
        let r = try await c.request(.POST, "/db/execute", headers: headers,
                                    body: Array(#"["CREATE TABLE IF NOT EXISTS w (id INTEGER PRIMARY KEY)"]"#.utf8))
        guard r.status == 200, !r.text.contains("\"error\"") else { throw ValidationError("cannot create the table: \(r.text)") }
    }

    func run() async {
        var target = 0
        var connection: HTTPSConnection?
        var id = 0
        while !lock.withLock({ stopped }) {
            let started = Date()
            var ok = false
            do {
                if connection?.isOpen != true {
                    connection = try await HTTPSConnection.connect(host: "127.0.0.1", port: nodes[target], tls: tls,
                                                                   group: MultiThreadedEventLoopGroup.singleton, timeoutMs: 1000)
                }
                let r = try await connection!.request(.POST, "/db/execute", headers: headers + [("Idempotency-Key", "w\(id)")],
                                                      body: Array("[[\"INSERT INTO w(id) VALUES(?)\", \(id)]]".utf8))
                ok = r.status == 200 && !r.text.contains("\"error\"")
            } catch {}
            if ok {
                lock.withLock {
                    successes.append(Date())
                    acked.append(id)
                }
                id += 1
                let rest = Double(intervalMs) / 1000 - Date().timeIntervalSince(started)
                if rest > 0 { try? await Task.sleep(for: .milliseconds(Int(rest * 1000))) }
            } else {
                lock.withLock { errorCount += 1 }
                await connection?.close()
                connection = nil
                target = (target + 1) % nodes.count
                try? await Task.sleep(for: .milliseconds(10))
            }
        }
        await connection?.close()
    }

    func firstSuccess(after: Date, timeoutSeconds: Double) async throws -> Date {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while Date() < deadline {
            if let first = lock.withLock({ successes.first { $0 > after } }) { return first }
            try await Task.sleep(for: .milliseconds(5))
        }
        throw ValidationError("no successful write within \(timeoutSeconds)s of the kill")
    }

    /// The longest time between two successful writes since `start` (seconds).
    func longestGap(since start: Date) -> Double {
        lock.withLock {
            let times = [successes.last { $0 <= start } ?? start] + successes.filter { $0 > start }
            return zip(times, times.dropFirst()).map { $1.timeIntervalSince($0) }.max() ?? 0
        }
    }

    /// Acknowledged ids missing on the node at `port`.
    func missing(on port: Int, tls: TLSConfiguration) async throws -> Int {
        let c = try await HTTPSConnection.connect(host: "127.0.0.1", port: port, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
        defer { Task { await c.close() } }
        let r = try await c.request(.GET, "/db/query?q=SELECT%20id%20FROM%20w", headers: [("X-Apiary-Tenant", Self.tenant)])
        guard let rows = r.integerRows else { throw ValidationError("cannot read the table: \(r.text)") }
        let held = Set(rows.compactMap(\.first))
        return lock.withLock { acked.filter { !held.contains($0) }.count }
    }
}
