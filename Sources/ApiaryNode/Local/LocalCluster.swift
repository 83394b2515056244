import ApiaryTLS
import Foundation

/// A primary and a standby as real `apiary node` processes on loopback, and optionally the
/// monitor (zone c) that fails them over: for `apiary up`, the integration tests and the
/// benchmark.
public final class LocalCluster: @unchecked Sendable {
    public struct NodeSpec: Sendable {
        public var name: String
        public var role: String
        public var apiPort: Int
        public var replicationPort: Int
        public var extraArguments: [String] = []
        /// Set in the node's environment on top of this process's (tests arm seams with it).
        public var environment: [String: String] = [:]
        /// The address it listens on and is reached at.
        public var host = "127.0.0.1"
        /// The Linux network namespace it runs in (its zone's), if the cluster has zones.
        public var namespace: String?
        /// `host:port` of its API (a node's, the monitor's, a gateway's client endpoint).
        public var apiAddress: String { "\(host):\(apiPort)" }
        public var replicationAddress: String { "\(host):\(replicationPort)" }
    }

    /// Where each zone's processes run when zones are network namespaces (the chaos runner's
    /// zones): the namespace and the address of each zone, by zone name.
    public struct ZonePlacement: Sendable {
        public var namespaces: [String: String]
        public var addresses: [String: String]
        public init(namespaces: [String: String], addresses: [String: String]) {
            self.namespaces = namespaces
            self.addresses = addresses
        }
    }

    public let directory: String
    public let executable: String
    public var certificates: String { directory + "/certs" }
    /// node-a, bootstrapped as the primary (zone a).
    public let primary: NodeSpec
    /// node-b, bootstrapped as the standby (zone b).
    public let standby: NodeSpec
    /// The monitor (zone c; `apiPort` is where it listens), when the cluster has one: the nodes
    /// then follow its goals, and roles move between them.
    public let monitor: NodeSpec?
    /// Gateways (listening on `apiPort`), each following the monitor: the endpoint that stays
    /// through failover.
    public let gateways: [NodeSpec]
    private var processes: [String: Process] = [:]
    /// What each node printed (stdout and stderr), kept for ``waitForOutput(of:containing:timeoutSeconds:)``.
    private var outputs: [String: NodeOutput] = [:]
    /// Set by ``stopAll()``: from then on no end of a process is unexpected.
    private var stopping = false
    /// Called, on a thread of its own, when a process ends that was not stopped through this
    /// cluster (it crashed, or was killed from outside): `apiary up` starts it again, as
    /// systemd's `Restart=on-failure` does on a real cluster. Set before the processes start.
    public var onUnexpectedExit: (@Sendable (NodeSpec) -> Void)?
    private let lock = NSLock()

    /// - Parameters:
    ///   - directory: holds `certs/`, each node's data and `logs/`.
    ///   - executable: the `apiary` binary.
    ///   - basePort: the primary's API port; the others follow it.
    ///   - monitorArguments: nil for a cluster without a monitor; else the monitor's extra flags.
    ///   - gateways: how many gateways (they need the monitor), listening from `basePort + 30` on.
    ///   - zones: each zone's network namespace and address; nil: every process on loopback.
    public init(directory: String, executable: String, basePort: Int, primaryArguments: [String] = [], standbyArguments: [String] = [],
                monitorArguments: [String]? = nil, gateways: Int = 0, gatewayArguments: [String] = [], zones: ZonePlacement? = nil) {
        precondition(gateways == 0 || monitorArguments != nil, "gateways follow the monitor")
        self.directory = directory
        self.executable = executable
        func placed(_ spec: NodeSpec, gatewayIndex: Int = 0) -> NodeSpec {
            guard let zones else { return spec }
            var spec = spec
            let zone = Self.zone(role: spec.role, name: spec.name, gatewayIndex: gatewayIndex)
            spec.namespace = zones.namespaces[zone]
            spec.host = zones.addresses[zone] ?? spec.host
            return spec
        }
        primary = placed(NodeSpec(name: "node-a", role: "primary", apiPort: basePort, replicationPort: basePort + 1, extraArguments: primaryArguments))
        standby = placed(NodeSpec(name: "node-b", role: "standby", apiPort: basePort + 10, replicationPort: basePort + 11, extraArguments: standbyArguments))
        monitor = monitorArguments.map { placed(NodeSpec(name: "monitor", role: "monitor", apiPort: basePort + 20, replicationPort: 0, extraArguments: $0)) }
        self.gateways = (0..<gateways).map { i in
            placed(NodeSpec(name: "gateway-\(i + 1)", role: "gateway", apiPort: basePort + 30 + i, replicationPort: 0, extraArguments: gatewayArguments),
                   gatewayIndex: i)
        }
    }

    /// The node that is not `spec`.
    public func peer(of spec: NodeSpec) -> NodeSpec { spec.name == primary.name ? standby : primary }

    /// Makes the CA once, and the certificates of every process and an operator whenever the
    /// cluster's addresses are not the ones they name (zones in namespaces take another subnet
    /// at each start), from the same CA.
    public func prepareCertificates() throws {
        try FileManager.default.createDirectory(atPath: directory + "/logs", withIntermediateDirectories: true)
        // Every certificate names every address of the cluster: clients check the host they
        // connected to, and in zones the processes have addresses other than loopback.
        let hosts = ["localhost", "127.0.0.1", "::1"] + Set(all.map(\.host)).subtracting(["127.0.0.1"]).sorted()
        let hostsPath = certificates + "/hosts"
        let ca: CertificateAuthority
        if FileManager.default.fileExists(atPath: certificates + "/ca.key") {
            guard (try? String(contentsOfFile: hostsPath, encoding: .utf8)) != hosts.joined(separator: "\n") else { return }
            ca = try CertificateAuthority.load(from: certificates)
        } else {
            ca = try CertificateAuthority.create(in: certificates)
        }
        for identity in [PeerIdentity(role: .node, name: primary.name), PeerIdentity(role: .node, name: standby.name),
                         PeerIdentity(role: .operator, name: "operator"), PeerIdentity(role: .gateway, name: "gateway"),
                         PeerIdentity(role: .monitor, name: "monitor")] + gateways.map({ PeerIdentity(role: .gateway, name: $0.name) }) {
            try ca.issue(identity, hosts: hosts, into: certificates)
        }
        try hosts.joined(separator: "\n").write(toFile: hostsPath, atomically: true, encoding: .utf8)
    }

    /// Every process of the cluster: the nodes, the monitor, the gateways.
    public var all: [NodeSpec] { [primary, standby] + (monitor.map { [$0] } ?? []) + gateways }

    public func arguments(_ spec: NodeSpec) -> [String] {
        if spec.role == "gateway" {
            return ["gateway", "--name", spec.name, "--certs", certificates, "--listen", spec.apiAddress,
                    "--monitor", monitor!.apiAddress,
                    "--node", "\(primary.name)=\(primary.apiAddress)", "--node", "\(standby.name)=\(standby.apiAddress)"] + spec.extraArguments
        }
        if spec.role == "monitor" {
            return ["monitor", "--name", spec.name, "--data", directory + "/" + spec.name, "--certs", certificates,
                    "--listen", spec.apiAddress, "--formation", "local",
                    "--primary", primary.name + "@a", "--standby", standby.name + "@b"] + spec.extraArguments
        }
        var args = ["node", "--name", spec.name, "--role", spec.role, "--data", directory + "/" + spec.name,
                    "--certs", certificates, "--api", spec.apiAddress]
        // A standby listens on its replication address only once promoted.
        args += ["--replication", spec.replicationAddress]
        if spec.role == "primary" { args += ["--standby", standby.name] }
        // Either node follows the other whenever it is the standby.
        args += ["--peer", peer(of: spec).replicationAddress, "--peer-api", peer(of: spec).apiAddress]
        if let monitor { args += ["--monitor", monitor.apiAddress] }
        return args + spec.extraArguments
    }

    /// Starts a node and waits (bounded) until it prints its ready line.
    /// - Throws: if it does not within `timeoutSeconds`, or exits before (at once, not after the timeout).
    public func start(_ spec: NodeSpec, timeoutSeconds: Double = 30) throws {
        let launched = try launch(spec)
        if launched.readyOrEnded.wait(timeout: .now() + timeoutSeconds) == .timedOut {
            kill(spec, signal: SIGKILL)
            throw NodeError("\(spec.name) did not become ready within \(timeoutSeconds)s; see \(launched.logPath)")
        }
        guard launched.ready.isSet else {
            kill(spec) // reaps it; it has exited already
            throw NodeError("\(spec.name) exited before it became ready; see \(launched.logPath)")
        }
    }

    /// Starts a node that is expected to end by itself (a test seam stops it), ready or not, and
    /// waits (bounded) until it has.
    /// - Returns: its exit status.
    /// - Throws: if it is still running after `timeoutSeconds` (it is then killed).
    @discardableResult
    public func runUntilExit(_ spec: NodeSpec, timeoutSeconds: Double = 60) throws -> Int32 {
        let launched = try launch(spec)
        if launched.ended.wait(timeout: .now() + timeoutSeconds) == .timedOut {
            kill(spec, signal: SIGKILL)
            throw NodeError("\(spec.name) was still running after \(timeoutSeconds)s; see \(launched.logPath)")
        }
        let process = lock.withLock { processes.removeValue(forKey: spec.name) }
        process?.waitUntilExit() // its output has ended: it has exited or is about to
        return process?.terminationStatus ?? -1
    }

    private struct Launched {
        let logPath: String
        /// Set when the node printed its ready line.
        let ready: LockedFlag
        /// Signalled once, at the ready line or at the end of the node's output, whichever is first.
        let readyOrEnded: DispatchSemaphore
        /// Signalled at the end of the node's output (it has exited).
        let ended: DispatchSemaphore
    }

    /// Whether ``stopAll()`` has begun: nothing is started any more.
    public var isStopping: Bool { lock.withLock { stopping } }

    private func launch(_ spec: NodeSpec) throws -> Launched {
        guard !isStopping else { throw NodeError("the cluster is stopping: \(spec.name) is not started") }
        let process = Process()
        if let namespace = spec.namespace {
            // `ip netns exec` execs the node in place: the pid is the node's, signals reach it.
            process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
            process.arguments = ["netns", "exec", namespace, executable] + arguments(spec)
        } else {
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = arguments(spec)
        }
        // A node started for a demo or a test dies with its parent, even if the parent is killed.
        var environment = ProcessInfo.processInfo.environment
        environment["APIARY_EXIT_WITH_PARENT"] = String(getpid())
        environment.merge(spec.environment) { _, new in new }
        process.environment = environment
        let logPath = directory + "/logs/\(spec.name).log"
        // A restarted node appends: what it said before a crash is the evidence.
        if !FileManager.default.fileExists(atPath: logPath) { FileManager.default.createFile(atPath: logPath, contents: nil) }
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        log.seekToEndOfFile()
        let pipe = Pipe()
        // Both streams through one reader: logs go to stderr, and tests wait for log lines.
        process.standardOutput = pipe
        process.standardError = pipe
        let watched = NodeOutput()
        let readyOrEnded = DispatchSemaphore(value: 0)
        let ended = DispatchSemaphore(value: 0)
        let readyLine = "apiary \(spec.role == "monitor" || spec.role == "gateway" ? spec.role : "node") \(spec.name) ready"
        let seen = LockedFlag()
        let signalled = LockedFlag()
        let output = pipe.fileHandleForReading
        // A blocking read loop on a thread of its own, not `readabilityHandler`: tearing down
        // that handler's dispatch source races its descriptor's close and crashes libdispatch on
        // Linux now and then (swift-corelibs-libdispatch#949; seen here in a test teardown).
        let reader = Thread {
            while true {
                let data = output.availableData // blocks; empty at the end of the stream
                if data.isEmpty { break }
                log.write(data)
                let text = String(decoding: data, as: UTF8.self)
                watched.append(text)
                if text.contains(readyLine), seen.setOnce(), signalled.setOnce() { readyOrEnded.signal() }
            }
            try? output.close()
            watched.end()
            if signalled.setOnce() { readyOrEnded.signal() }
            ended.signal()
            // Still this spec's process, and no one stopping it: it ended by itself.
            let unexpected = self.lock.withLock { !self.stopping && self.processes[spec.name] === process }
            if unexpected, let onUnexpectedExit = self.onUnexpectedExit {
                self.lock.withLock { if self.processes[spec.name] === process { self.processes[spec.name] = nil } }
                process.waitUntilExit() // reaped before anyone starts it again
                onUnexpectedExit(spec)
            }
        }
        reader.name = "apiary-node-output-\(spec.name)"
        try process.run()
        // The reader sees the end only once every write end is closed. Foundation's `run()`
        // closes the parent's copy already; closing again is a no-op, kept so the reader's end
        // does not depend on that detail.
        try? pipe.fileHandleForWriting.close()
        reader.start()
        lock.withLock {
            processes[spec.name] = process
            outputs[spec.name] = watched
        }
        return Launched(logPath: logPath, ready: seen, readyOrEnded: readyOrEnded, ended: ended)
    }

    /// Waits until the node (its latest start) has printed `text`, on stdout or stderr (its log
    /// lines); false if it did not within `timeoutSeconds` or its output ended first.
    public func waitForOutput(of spec: NodeSpec, containing text: String, times: Int = 1, timeoutSeconds: Double = 60) -> Bool {
        guard let output = lock.withLock({ outputs[spec.name] }) else { return false }
        return output.wait(for: text, times: times, until: Date().addingTimeInterval(timeoutSeconds))
    }

    /// How often the node (its latest start) has printed `text` so far: to wait for its next time.
    public func outputCount(of spec: NodeSpec, containing text: String) -> Int {
        lock.withLock({ outputs[spec.name] })?.count(text) ?? 0
    }

    /// The running process of `spec`, if started (benchmarks read its CPU time).
    public func processID(of spec: NodeSpec) -> Int32? {
        lock.withLock { processes[spec.name].map { $0.processIdentifier } }
    }

    /// Starts the monitor (if the cluster has one), then both nodes.
    public func startBoth() throws {
        try prepareCertificates()
        if let monitor { try start(monitor) }
        try start(primary)
        try start(standby)
        for gateway in gateways { try start(gateway) }
    }

    /// Sends `signal` (SIGKILL for a crash) and waits for the process to exit.
    public func kill(_ spec: NodeSpec, signal: Int32 = SIGKILL) {
        guard let process = lock.withLock({ processes.removeValue(forKey: spec.name) }) else { return }
        if process.isRunning { Glibc.kill(process.processIdentifier, signal) }
        process.waitUntilExit()
    }

    public func isRunning(_ spec: NodeSpec) -> Bool { lock.withLock { processes[spec.name]?.isRunning ?? false } }

    /// Stops every node (SIGTERM, then SIGKILL after a grace period).
    public func stopAll() {
        let all = lock.withLock {
            stopping = true
            return processes.map { ($0.value, outputs[$0.key]) }
        }
        for (p, _) in all where p.isRunning { Glibc.kill(p.processIdentifier, SIGTERM) }
        let deadline = Date().addingTimeInterval(5)
        for (p, output) in all {
            // The end of a node's output is its exit (or, at worst, the grace period's end).
            if p.isRunning, output?.waitForEnd(until: deadline) != true, p.isRunning { Glibc.kill(p.processIdentifier, SIGKILL) }
            p.waitUntilExit()
        }
        lock.withLock { processes.removeAll() }
    }

    deinit { stopAll() }
}

/// A node's output as it arrives, for waiting on a line. Bounded: the newest 1 MiB.
final class NodeOutput: @unchecked Sendable {
    static let charactersMax = 1 << 20
    private let condition = NSCondition()
    private var text = ""
    private var ended = false

    func append(_ more: String) {
        condition.withLock {
            text += more
            if text.utf8.count > Self.charactersMax { text = String(text.suffix(Self.charactersMax / 4)) }
            condition.broadcast()
        }
    }

    func end() {
        condition.withLock {
            ended = true
            condition.broadcast()
        }
    }

    /// True once `needle` has been printed `times` times; false at `deadline` or the output's
    /// end short of that.
    func wait(for needle: String, times: Int = 1, until deadline: Date) -> Bool {
        condition.withLock {
            while occurrences(of: needle) < times {
                if ended || !condition.wait(until: deadline) { return occurrences(of: needle) >= times }
            }
            return true
        }
    }

    /// How often `needle` has been printed so far.
    func count(_ needle: String) -> Int { condition.withLock { occurrences(of: needle) } }

    private func occurrences(of needle: String) -> Int { text.components(separatedBy: needle).count - 1 }

    /// True once the output has ended (the process closed it: it exited); false at `deadline`.
    func waitForEnd(until deadline: Date) -> Bool {
        condition.withLock {
            while !ended {
                if !condition.wait(until: deadline) { return ended }
            }
            return true
        }
    }
}

final class LockedFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var set = false
    /// True the first time only.
    func setOnce() -> Bool { lock.withLock { defer { set = true }; return !set } }
    var isSet: Bool { lock.withLock { set } }
}
