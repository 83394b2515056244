import ApiaryNode
import ArgumentParser
import Foundation

struct Up: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a local demo cluster (a primary and a standby on loopback, and the monitor that fails them over) and print how to connect."
    )

    @Option(help: "Directory for certificates, data and logs (kept between runs).") var dir = "apiary-demo"
    @Option(help: "The primary's API port; the standby's is 10 higher, replication 1 higher each, the monitor's 20 higher.") var basePort = 4001

    func run() async throws {
        let directory = URL(fileURLWithPath: dir).standardizedFileURL.path
        let cluster = LocalCluster(directory: directory, executable: "/proc/self/exe".resolvedLink, basePort: basePort, monitorArguments: [])
        try cluster.startBoth()
        let ca = cluster.certificates + "/ca.pem"
        let p = cluster.primary.apiPort, s = cluster.standby.apiPort, m = cluster.monitor!.apiPort
        // A tenant and its first user, made as the cluster operator (a new password each run).
        let accounts = try AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: p)
        try await accounts.createTenant("demo")
        let user = "demo-\(Int.random(in: 1000...9999))", password = AccountsClient.randomPassword()
        try await accounts.createUser(user, tenant: "demo", role: "admin", password: password)
        print("""

        Apiary demo cluster is up (data, certificates and logs in \(directory)):
          primary node-a  https://127.0.0.1:\(p)   (zone a)
          standby node-b  https://127.0.0.1:\(s)  (zone b, synchronous replica)
          monitor         https://127.0.0.1:\(m)  (zone c: promotes node-b within a second if node-a dies)

        Tenant "demo", user \(user) (role admin), password \(password)
        Write and read (the user's credentials name its tenant):
          curl --cacert \(ca) -u '\(user):\(password)' -H 'Content-Type: application/json' \\
               https://localhost:\(p)/db/execute -d '["CREATE TABLE IF NOT EXISTS hello (id INTEGER PRIMARY KEY, msg TEXT)", ["INSERT INTO hello(msg) VALUES(?)", "hi from zone A"]]'
          curl --cacert \(ca) -u '\(user):\(password)' -G https://localhost:\(p)/db/query --data-urlencode 'q=SELECT * FROM hello'

        More tenants and users (as the cluster operator):
          \(CommandLine.arguments[0]) ctl tenant create acme --node 127.0.0.1:\(p) --certs \(cluster.certificates)
          \(CommandLine.arguments[0]) ctl user create alice --tenant acme --role writer --node 127.0.0.1:\(p) --certs \(cluster.certificates)

        Roles, epoch and history, as the monitor sees them; a failover drill (the nodes swap roles):
          \(CommandLine.arguments[0]) ctl status --monitor 127.0.0.1:\(m) --certs \(cluster.certificates)
          \(CommandLine.arguments[0]) ctl events --monitor 127.0.0.1:\(m) --certs \(cluster.certificates)
          \(CommandLine.arguments[0]) ctl failover --monitor 127.0.0.1:\(m) --certs \(cluster.certificates)
        (After a failover the other node is the primary: send requests to it.)

        Prove both replicas are identical:
          \(CommandLine.arguments[0]) ctl verify --certs \(cluster.certificates) --primary 127.0.0.1:\(p) --standby 127.0.0.1:\(s)

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

extension String {
    var resolvedLink: String { (try? FileManager.default.destinationOfSymbolicLink(atPath: self)) ?? CommandLine.arguments[0] }
}
