import ApiaryMonitor
import ApiaryNode
import ApiaryTLS
import ArgumentParser
import Foundation

struct Up: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a local demo cluster (a primary and a standby on loopback, the monitor that fails them over, two gateways) and print how to connect."
    )

    @Option(help: "Directory for certificates, data and logs (kept between runs).") var dir = "apiary-demo"
    @Option(help: "The primary's API port; the standby's is 10 higher, replication 1 higher each, the monitor's 20 higher, the gateways' 30 and 31 higher.") var basePort = 4001

    func run() async throws {
        let directory = URL(fileURLWithPath: dir).standardizedFileURL.path
        let cluster = LocalCluster(directory: directory, executable: "/proc/self/exe".resolvedLink, basePort: basePort, monitorArguments: [], gateways: 2)
        try cluster.startBoth()
        let ca = cluster.certificates + "/ca.pem"
        let p = cluster.primary.apiPort, s = cluster.standby.apiPort, m = cluster.monitor!.apiPort
        let g = cluster.gateways[0].apiPort, g2 = cluster.gateways[1].apiPort
        // The writer: node-a at the first start; after failovers in earlier runs, maybe node-b.
        let writer = try await Self.writer(monitor: Address(argument: "127.0.0.1:\(m)")!, certificates: cluster.certificates)
        let w = writer == cluster.standby.name ? s : p
        // A tenant and its first user, made as the cluster operator (a new password each run).
        // For operators' tools on this cluster (`apiary drill zone-loss`): where everything
        // listens, which process is in which zone. Removed when the cluster stops.
        let descriptionPath = directory + "/cluster.json"
        try cluster.describe(name: "local (\(directory))").write(to: descriptionPath)
        defer { try? FileManager.default.removeItem(atPath: descriptionPath) }
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: w)
        do { try await accounts.createTenant("demo") } catch where "\(error)".contains("409") || "\(error)".contains("exists") {}
        let user = "demo-\(Int.random(in: 1000...9999))", password = AccountsClient.randomPassword()
        try await accounts.createUser(user, tenant: "demo", role: "admin", password: password)
        print("""

        Apiary demo cluster is up (data, certificates and logs in \(directory)):
          endpoint        https://localhost:\(g)   (gateway-1, zone a; gateway-2 on \(g2), zone b: either follows the primary through failover)
          node-a          https://127.0.0.1:\(p)   (zone a)
          node-b          https://127.0.0.1:\(s)  (zone b; synchronous replica of node-a, or the other way round)
          monitor         https://127.0.0.1:\(m)  (zone c: promotes the standby within a second if the primary dies)
          the primary now: \(writer)

        Tenant "demo", user \(user) (role admin), password \(password)
        Write and read through the endpoint (the user's credentials name its tenant):
          curl --cacert \(ca) -u '\(user):\(password)' -H 'Content-Type: application/json' \\
               https://localhost:\(g)/db/execute -d '["CREATE TABLE IF NOT EXISTS hello (id INTEGER PRIMARY KEY, msg TEXT)", ["INSERT INTO hello(msg) VALUES(?)", "hello"]]'
          curl --cacert \(ca) -u '\(user):\(password)' -G https://localhost:\(g)/db/query --data-urlencode 'q=SELECT * FROM hello'
        An rqlite client library, unchanged (pip install pyrqlite):
          SSL_CERT_FILE=\(ca) python3 -c 'import pyrqlite.dbapi2 as d; c = d.connect(scheme="https", host="localhost", port=\(g), user="\(user)", password="\(password)").cursor(); c.execute("SELECT * FROM hello"); print(c.fetchall())'

        More tenants and users (as the cluster operator, on the primary):
          \(CommandLine.arguments[0]) ctl tenant create acme --node 127.0.0.1:\(w) --certs \(cluster.certificates)
          \(CommandLine.arguments[0]) ctl user create alice --tenant acme --role writer --node 127.0.0.1:\(w) --certs \(cluster.certificates)

        Roles, epoch and history, as the monitor sees them; a failover drill (the nodes swap roles, the endpoint stays):
          \(CommandLine.arguments[0]) ctl status --monitor 127.0.0.1:\(m) --certs \(cluster.certificates)
          \(CommandLine.arguments[0]) ctl events --monitor 127.0.0.1:\(m) --certs \(cluster.certificates)
          \(CommandLine.arguments[0]) ctl failover --monitor 127.0.0.1:\(m) --certs \(cluster.certificates)

        Lose a zone under writes, with RTO, RPO and an evidence report (the zone's processes are paused, then resumed):
          \(CommandLine.arguments[0]) drill zone-loss --zone primary --cluster \(descriptionPath) --dry-run

        Prove both replicas are identical:
          \(CommandLine.arguments[0]) ctl verify --certs \(cluster.certificates) --primary 127.0.0.1:\(w) --standby 127.0.0.1:\(w == p ? s : p)

        Press Ctrl-C to stop the cluster.
        """)
        fflush(stdout)
        let stop = DispatchSemaphore(value: 0)
        signal(SIGINT, SIG_IGN)
        signal(SIGTERM, SIG_IGN)
        let sources = [SIGINT, SIGTERM].map { sig -> any DispatchSourceSignal in
            let source = DispatchSource.makeSignalSource(signal: sig)
            source.setEventHandler { stop.signal() }
            source.resume()
            return source
        }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async {
                stop.wait()
                c.resume()
            }
        }
        // The sources must outlive the wait (an optimised build released them early).
        withExtendedLifetime(sources) {}
        print("stopping the cluster…")
        cluster.stopAll()
    }
}

extension Up {
    /// The node the monitor names as the writer, once it takes writes (bounded wait).
    static func writer(monitor: Address, certificates: String) async throws -> String {
        let credentials = try ClusterCredentials(directory: certificates, name: "operator")
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            if let r = try? await MonitorCtl.get("/topology", monitor: monitor, credentials: credentials), r.status == 200,
               let t = try? JSONDecoder().decode(TopologyBody.self, from: Data(r.body)), t.writerReady, let writer = t.writer {
                return writer
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw ValidationError("the monitor named no writer within 60 s; see the logs in the cluster's directory")
    }
}

extension String {
    var resolvedLink: String { (try? FileManager.default.destinationOfSymbolicLink(atPath: self)) ?? CommandLine.arguments[0] }
}
