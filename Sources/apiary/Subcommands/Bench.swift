import ApiaryNode
import ApiaryTLS
import ArgumentParser
import Foundation
import NIOCore
import NIOPosix
import NIOSSL

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks: inserts (the default) and failover. See docs/benchmarks.md.",
        subcommands: [Inserts.self, Failover.self],
        defaultSubcommand: Inserts.self
    )
}

extension Bench {
struct Inserts: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure single-row inserts through the HTTPS API: replicated (sync standby) and single-node, side by side.",
        discussion: "Prints one line per setup and client count: `apiary-<setup> clients=N tps=X p50_ms=Y p99_ms=Z errors=E cpu_us_per_insert=primary:A,standby:B,client:C` (CPU time of each process per insert, steadier than throughput on a shared machine). See docs/benchmarks.md."
    )

    @Option(help: "Client counts, comma-separated.") var clients = "1,8,32,64"
    @Option(help: "Seconds per client count.") var seconds = 10
    @Option(help: "Setups to run: replicated, single, or both.") var setups = "replicated,single"
    @Option(help: "Working directory (removed afterwards unless --keep).") var dir: String?
    @Flag(help: "Keep the working directory.") var keep = false
    @Option(help: "API base port for the benchmark clusters.") var basePort = 24001
    @Option(help: "Event loop threads driving the clients: 2 by default, as bench/'s pgbench runs (-j min(clients, 2)); one thread made the load generator the bottleneck at 8 clients (docs/benchmarks.md).") var clientThreads = 2
    @Option(help: "inserts (one INSERT per request) or reads (one SELECT by primary key per request, level weak).") var workload = "inserts"
    @Option(help: "Give the gateway this CPU of its own, and every other process of the run (nodes, monitor, load) the other CPUs: a gateway tier on hosts of its own, on a machine with few cores.") var gatewayCPU: Int?
    @Option(help: "The gateway's event loop threads (apiary gateway --event-loops).") var gatewayEventLoops: Int?
    @Option(help: "How the load signs in: password (HTTP basic auth, as applications do) or certificate (the operator's, in the TLS handshake: no per-request authentication, for measuring what it costs; not through a gateway).") var signIn = "password"

    func validate() throws {
        guard clientThreads > 0, clientThreads <= 64 else { throw ValidationError("--client-threads must be 1...64") }
        guard seconds > 0, seconds <= 3600 else { throw ValidationError("--seconds must be 1...3600") }
        guard !clientCounts.isEmpty, clientCounts.allSatisfy({ $0 > 0 && $0 <= 1024 }) else { throw ValidationError("--clients must list counts of 1...1024") }
        guard setupList.allSatisfy({ ["replicated", "single", "gateway"].contains($0) }) else { throw ValidationError("--setups takes replicated, single and/or gateway") }
        guard ["inserts", "reads"].contains(workload) else { throw ValidationError("--workload takes inserts or reads") }
        guard ["password", "certificate"].contains(signIn) else { throw ValidationError("--sign-in takes password or certificate") }
        guard signIn == "password" || !setupList.contains("gateway") else { throw ValidationError("--sign-in certificate does not go through a gateway") }
        let cpus = ProcessInfo.processInfo.activeProcessorCount
        if let gatewayCPU, cpus < 2 || gatewayCPU < 0 || gatewayCPU >= cpus { throw ValidationError("--gateway-cpu needs a CPU 0...\(cpus - 1) and at least one other") }
    }

    var clientCounts: [Int] { clients.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) } }
    var setupList: [String] { setups.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }

    func run() async throws {
        let root = dir ?? (NSTemporaryDirectory() + "apiary-bench-\(getpid())")
        defer { if !keep { try? FileManager.default.removeItem(atPath: root) } }
        print("# machine: nproc=\(ProcessInfo.processInfo.activeProcessorCount) \(cpuModel()) fs=\(root)")
        let what = workload == "reads" ? "one SELECT of a 100-byte row by primary key per request (GET /db/query, level weak; 1,000 rows)"
            : "one INSERT of a 100-byte payload per request"
        print("# workload: \(what), HTTPS keep-alive, \(signIn == "password" ? "HTTP basic auth" : "the operator's certificate (no per-request authentication)"), \(seconds)s per client count, \(clientThreads) client thread(s)")
        if let gatewayCPU {
            // Before any process of the run starts: they inherit this process's CPUs.
            let others = (0..<ProcessInfo.processInfo.activeProcessorCount).filter { $0 != gatewayCPU }
            try CPUAffinity.pin(getpid(), to: others)
            print("# cpus: the gateway on CPU \(gatewayCPU); nodes, monitor and load on CPU \(others.map(String.init).joined(separator: ","))")
        }
        let load = MultiThreadedEventLoopGroup(numberOfThreads: clientThreads)
        for (index, setup) in setupList.enumerated() {
            // `gateway`: the replicated pair under its monitor, the load through one gateway.
            let primaryArgs = setup == "single" ? ["--mode", "single"] : []
            let quiet = ["--log-level", "warning"]
            let cluster = LocalCluster(directory: root + "/" + setup, executable: "/proc/self/exe".resolvedLink,
                                       basePort: basePort + index * 100, primaryArguments: primaryArgs + quiet, standbyArguments: quiet,
                                       monitorArguments: setup == "gateway" ? quiet : nil, gateways: setup == "gateway" ? 1 : 0,
                                       gatewayArguments: quiet + (gatewayEventLoops.map { ["--event-loops", String($0)] } ?? []))
            try cluster.prepareCertificates()
            if setup == "gateway" {
                try cluster.startBoth()
                _ = try await Up.writer(monitor: Address(argument: "127.0.0.1:\(cluster.monitor!.apiPort)")!, certificates: cluster.certificates)
            } else {
                try cluster.start(cluster.primary)
                if setup == "replicated" { try cluster.start(cluster.standby) }
            }
            defer { cluster.stopAll() }
            if setup == "gateway", let gatewayCPU, let pid = cluster.processID(of: cluster.gateways[0]) { try CPUAffinity.pin(pid, to: [gatewayCPU]) }
            var target = BenchTarget(port: setup == "gateway" ? cluster.gateways[0].apiPort : cluster.primary.apiPort,
                                     accountsPort: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem")
            target.byCertificate = signIn == "certificate"
            try await target.prepare(rows: workload == "reads" ? 1_000 : 0)
            // CPU per insert is steadier than throughput on a shared VM: it shows what a change
            // costs or saves even when the run's throughput moves with the machine's mood.
            var measured: [(String, Int32)] = [("primary", cluster.processID(of: cluster.primary) ?? -1)]
            if setup != "single" { measured.append(("standby", cluster.processID(of: cluster.standby) ?? -1)) }
            if setup == "gateway" { measured.append(("gateway", cluster.processID(of: cluster.gateways[0]) ?? -1)) }
            measured.append(("client", getpid()))
            for count in clientCounts {
                let commitsBefore = workload == "reads" ? nil : await target.commits()
                let before = measured.map { CPUTime.ticks(of: $0.1) }
                let result = try await target.measure(clients: count, seconds: seconds, group: load, reads: workload == "reads")
                let inserts = result.tps * result.wallSeconds
                // Inserts per group commit: what a path that delivers requests more thinly costs.
                var perCommit = ""
                if let commitsBefore, let commitsAfter = await target.commits(), commitsAfter > commitsBefore {
                    perCommit = " inserts_per_commit=" + String(format: "%.2f", inserts / Double(commitsAfter - commitsBefore))
                }
                let cpu = zip(measured, before).map { process, start -> String in
                    guard let start, let end = CPUTime.ticks(of: process.1), inserts > 0 else { return "\(process.0):?" }
                    return "\(process.0):" + String(format: "%.1f", Double(end - start) * CPUTime.microsecondsPerTick / inserts)
                }
                print("apiary-\(setup) clients=\(count) tps=\(String(format: "%.1f", result.tps)) p50_ms=\(String(format: "%.3f", result.p50Ms)) p99_ms=\(String(format: "%.3f", result.p99Ms)) errors=\(result.errors) cpu_us_per_\(workload == "reads" ? "read" : "insert")=\(cpu.joined(separator: ","))\(perCommit)")
                fflush(stdout)
            }
        }
        try await load.shutdownGracefully()
    }

    func cpuModel() -> String {
        let info = ProcFile.read("/proc/cpuinfo") ?? ""
        let line = info.split(separator: "\n").first { $0.hasPrefix("model name") }
        return "model=\"\(line?.split(separator: ":", maxSplits: 1).last?.trimmingCharacters(in: .whitespaces) ?? "?")\""
    }
}

}

struct BenchTarget {
    /// Where the load goes (a node, or a gateway).
    let port: Int
    /// The primary, where the operator makes the tenant and the user.
    var accountsPort: Int? = nil
    let caPath: String
    /// The bench user's `Authorization` header: the load signs in as an application does.
    var authorization = ""
    /// Sign in with the operator's certificate instead (measuring what authentication costs).
    var byCertificate = false

    func connect() async throws -> HTTPSConnection {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(caPath)
        return try await HTTPSConnection.connect(host: "127.0.0.1", port: port, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
    }

    /// Creates the tenant and a writer (as the operator), then the table (as that writer), with
    /// `rows` rows in it for a read workload.
    mutating func prepare(rows: Int = 0) async throws {
        let accounts = try AccountsClient(certificatesDirectory: (caPath as NSString).deletingLastPathComponent, host: "127.0.0.1", port: accountsPort ?? port)
        try await accounts.createTenant("bench")
        let password = AccountsClient.randomPassword()
        try await accounts.createUser("bench-writer", tenant: "bench", role: "writer", password: password)
        authorization = AccountsClient.basicAuthorization(user: "bench-writer", password: password)
        let c = try await connect()
        let fill = rows > 0 ? ", \"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < \(rows)) INSERT OR IGNORE INTO bench(id, payload) SELECT i, printf('%.100c', 'x') FROM n\"" : ""
        let r = try await c.request(.POST, "/db/execute", headers: [("Authorization", authorization)],
                                    body: Array("[\"CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)\"\(fill)]".utf8))
        await c.close()
        guard r.status == 200, !r.text.contains("\"error\"") else { throw ValidationError("cannot create the bench table: \(r.status) \(r.text)") }
    }

    /// The bench tenant's commits so far on the primary (its log's last lsn, from the operator's
    /// `/status`): with the inserts counted, how many each group commit took on average.
    func commits() async -> UInt64? {
        guard let accounts = try? AccountsClient(certificatesDirectory: (caPath as NSString).deletingLastPathComponent, host: "127.0.0.1",
                                                 port: accountsPort ?? port),
              let response = try? await accounts.request(.GET, "/status"),
              let status = try? JSONDecoder().decode(NodeStatus.self, from: Data(response.body)) else { return nil }
        return status.tenants.first { $0.tenant == "bench" }?.lsn
    }

    struct Result { var tps: Double; var p50Ms: Double; var p99Ms: Double; var errors: Int; var wallSeconds: Double }

    /// - Parameter reads: one `SELECT` by primary key per request (the same row: the request is
    ///   encoded once, as the inserts' is) instead of an `INSERT`.
    func measure(clients: Int, seconds: Int, group: any EventLoopGroup, reads: Bool = false) async throws -> Result {
        let body = reads ? [] : Array(#"[["INSERT INTO bench(payload) VALUES(?)", "\#(String(repeating: "x", count: 100))"]]"#.utf8)
        let signIn = byCertificate ? "X-Apiary-Tenant: bench" : "Authorization: \(authorization)"
        let head = reads
            ? "GET /db/query?q=SELECT%20payload%20FROM%20bench%20WHERE%20id%3D500 HTTP/1.1\r\nHost: 127.0.0.1\r\n\(signIn)\r\n\r\n"
            : "POST /db/execute HTTP/1.1\r\nHost: 127.0.0.1\r\n\(signIn)\r\nContent-Type: application/json\r\nContent-Length: \(body.count)\r\n\r\n"
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(caPath)
        if byCertificate {
            let credentials = try ClusterCredentials(directory: (caPath as NSString).deletingLastPathComponent, name: "operator")
            tls.certificateChain = credentials.certificateChain.map { .certificate($0) }
            tls.privateKey = .privateKey(credentials.privateKey)
        }
        let start = ContinuousClock.now
        let outcomes = try await BenchLoad.run(clients: clients, port: port, tls: tls, request: Array(head.utf8) + body,
                                               until: NIODeadline.now() + TimeAmount.seconds(Int64(seconds)), group: group)
        let perClient = outcomes.map { ($0.latenciesNs.map { Double($0) / 1e6 }, $0.errors) }
        let elapsed = ContinuousClock.now - start
        let wall = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let latencies = perClient.flatMap { $0.0 }.sorted()
        func percentile(_ p: Double) -> Double {
            guard !latencies.isEmpty else { return .nan }
            return latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]
        }
        return Result(tps: Double(latencies.count) / wall, p50Ms: percentile(0.5), p99Ms: percentile(0.99), errors: perClient.reduce(0) { $0 + $1.1 },
                      wallSeconds: wall)
    }
}

