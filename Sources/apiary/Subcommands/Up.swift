import ApiaryChaos
import ApiaryMonitor
import ApiaryNode
import ApiaryTLS
import ArgumentParser
import Foundation

struct Up: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a local demo cluster (a primary and a standby, the monitor that fails them over, two gateways; on loopback, or with --zones each zone in a network namespace) and print how to connect."
    )

    @Option(help: "Directory for certificates, data and logs (kept between runs).") var dir = "apiary-demo"
    @Option(help: "The primary's API port; the standby's is 10 higher, replication 1 higher each, the monitor's 20 higher, the gateways' 30 and 31 higher.") var basePort = 4001
    @Flag(help: "Put each zone in a Linux network namespace of its own (needs root), so that `apiary drill zone-loss` cuts a zone's network off rather than pausing its processes.") var zones = false

    func validate() throws {
        if zones, let reason = ZoneNetwork.unavailableReason() { throw ValidationError("--zones: \(reason)") }
    }

    func run() async throws {
        let directory = URL(fileURLWithPath: dir).standardizedFileURL.path
        // Zones as namespaces: made now, removed when the cluster stops (and by the next run of
        // anything that makes zones, should this process die without cleaning up).
        let network = zones ? try ZoneNetwork() : nil
        defer { network?.destroy() }
        let cluster = LocalCluster(directory: directory, executable: "/proc/self/exe".resolvedLink, basePort: basePort, monitorArguments: [], gateways: 2,
                                   zones: network?.placement)
        // Before the network goes (defers run last first), whatever ended the run.
        defer { cluster.stopAll() }
        // A process that dies (a crash, a `kill -9` to see a failover) is started again, as
        // systemd does on a real cluster (deploy/: Restart=on-failure): a killed primary comes
        // back and rejoins as the standby, and the demo keeps two nodes.
        let descriptionPath = directory + "/cluster.json"
        cluster.onUnexpectedExit = { spec in
            Self.startAgain(spec, in: cluster) {
                // The drill finds processes by the pids there.
                if FileManager.default.fileExists(atPath: descriptionPath) {
                    try? cluster.describe(name: "local (\(directory))").write(to: descriptionPath)
                }
            }
        }
        try cluster.startBoth()
        let ca = cluster.certificates + "/ca.pem"
        let primary = cluster.primary.apiAddress, standby = cluster.standby.apiAddress, monitor = cluster.monitor!.apiAddress
        // On loopback the friendlier name; in zones the first gateway's address in zone a.
        let endpointHost = network == nil ? "localhost" : cluster.gateways[0].host
        let endpoint = "\(endpointHost):\(cluster.gateways[0].apiPort)", gateway2 = cluster.gateways[1].apiAddress
        // The writer: node-a at the first start; after failovers in earlier runs, maybe node-b.
        let writer = try await Self.writer(monitor: Address(argument: monitor)!, certificates: cluster.certificates)
        let writerSpec = writer == cluster.standby.name ? cluster.standby : cluster.primary
        let w = writerSpec.apiAddress, notWriter = writer == cluster.standby.name ? primary : standby
        // A tenant and its first user, made as the cluster operator (a new password each run).
        // For operators' tools on this cluster (`apiary drill zone-loss`): where everything
        // listens, which process is in which zone. Removed when the cluster stops.
        try cluster.describe(name: "local (\(directory))").write(to: descriptionPath)
        defer { try? FileManager.default.removeItem(atPath: descriptionPath) }
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: writerSpec.host, port: writerSpec.apiPort)
        do { try await accounts.createTenant("demo") } catch where "\(error)".contains("409") || "\(error)".contains("exists") {}
        let user = "demo-\(Int.random(in: 1000...9999))", password = AccountsClient.randomPassword()
        try await accounts.createUser(user, tenant: "demo", role: "admin", password: password)
        let me = CommandLine.arguments[0], certs = cluster.certificates
        let zonesLine = network.map { n in
            "  zones           network namespaces \(ZoneNetwork.zones.map { n.namespace($0) }.joined(separator: ", ")) on a bridge; this host is \(n.outside)\n"
        } ?? ""
        let cutHow = network == nil ? "the zone's processes are paused, then resumed" : "the zone's network namespace is cut off, then connected again"
        print("""

        Apiary demo cluster is up (data, certificates and logs in \(directory)):
          endpoint        https://\(endpoint)   (gateway-1, zone a; gateway-2 on \(gateway2), zone b: either follows the primary through failover)
          node-a          https://\(primary)   (zone a)
          node-b          https://\(standby)  (zone b; synchronous replica of node-a, or the other way round)
          monitor         https://\(monitor)  (zone c: promotes the standby within a second if the primary dies)
        \(zonesLine)  the primary now: \(writer)

        Tenant "demo", user \(user) (role admin), password \(password)
        Write and read through the endpoint (the user's credentials name its tenant):
          curl --cacert \(ca) -u '\(user):\(password)' -H 'Content-Type: application/json' \\
               https://\(endpoint)/db/execute -d '["CREATE TABLE IF NOT EXISTS hello (id INTEGER PRIMARY KEY, msg TEXT)", ["INSERT INTO hello(msg) VALUES(?)", "hello"]]'
          curl --cacert \(ca) -u '\(user):\(password)' -G https://\(endpoint)/db/query --data-urlencode 'q=SELECT * FROM hello'
        An rqlite client library, unchanged (pip install pyrqlite):
          SSL_CERT_FILE=\(ca) python3 -c 'import pyrqlite.dbapi2 as d; c = d.connect(scheme="https", host="\(endpointHost)", port=\(cluster.gateways[0].apiPort), user="\(user)", password="\(password)").cursor(); c.execute("SELECT * FROM hello"); print(c.fetchall())'

        More tenants and users (as the cluster operator, on the primary):
          \(me) ctl tenant create acme --node \(w) --certs \(certs)
          \(me) ctl user create alice --tenant acme --role writer --node \(w) --certs \(certs)

        Roles, epoch and history, as the monitor sees them; a failover drill (the nodes swap roles, the endpoint stays):
          \(me) ctl status --monitor \(monitor) --certs \(certs)
          \(me) ctl events --monitor \(monitor) --certs \(certs)
          \(me) ctl failover --monitor \(monitor) --certs \(certs)

        Lose a zone under writes, with RTO, RPO and an evidence report (\(cutHow)):
          \(me) drill zone-loss --zone primary --cluster \(descriptionPath) --dry-run

        Prove both replicas are identical:
          \(me) ctl verify --certs \(certs) --primary \(w) --standby \(notWriter)

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
    /// Starts `spec` again after it ended by itself: after 1 s (systemd's RestartSec=1 in
    /// deploy/), then, while it cannot start, after twice as long each time, at most 30 s, and
    /// at most `attemptsMax` times in a row (then it stays down, and says so). Stops trying
    /// once the cluster stops. `started` runs before "running again" is printed.
    static func startAgain(_ spec: LocalCluster.NodeSpec, in cluster: LocalCluster, attemptsMax: Int = 10, then started: () -> Void) {
        var delaySeconds = 1.0
        for _ in 0..<attemptsMax where !cluster.isStopping {
            print("\(spec.name) exited by itself; starting it again in \(Int(delaySeconds)) s, as systemd would (its log: \(cluster.directory)/logs/\(spec.name).log)")
            fflush(stdout)
            Thread.sleep(forTimeInterval: delaySeconds) // a backoff, as systemd's: nothing waits on it
            do {
                try cluster.start(spec)
                started()
                print("\(spec.name) is running again")
                fflush(stdout)
                return
            } catch {
                if cluster.isStopping { return }
                print("\(spec.name) did not start: \(error)")
                delaySeconds = min(delaySeconds * 2, 30)
            }
        }
        if !cluster.isStopping {
            print("\(spec.name) did not start in \(attemptsMax) tries; it stays down (its log: \(cluster.directory)/logs/\(spec.name).log)")
            fflush(stdout)
        }
    }

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
