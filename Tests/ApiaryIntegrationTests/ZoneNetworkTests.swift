import ApiaryChaos
import ApiaryNode
import Foundation
import XCTest

/// The chaos runner's zones (issue 11): three Linux network namespaces joined by a bridge, and
/// network faults as nftables rules inside them. Each test puts a real cluster in the zones
/// (node-a in a, node-b in b, the monitor in c) and checks that a fault does what it says,
/// seen from the monitor, and that healing undoes it. They need root (CI runs as root).
final class ZoneNetworkTests: NodeProcessTestCase {
    var network: ZoneNetwork?

    override func setUp() async throws {
        if let reason = ZoneNetwork.unavailableReason() { throw XCTSkip(reason) }
        let network = try ZoneNetwork()
        self.network = network
        directory = NSTemporaryDirectory() + "apiary-zones-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               monitorArguments: ["--tick-interval-ms", "20"], zones: network.placement)
        try cluster.startBoth()
    }

    override func tearDown() async throws {
        try await super.tearDown() // stops the processes first: a namespace lives while one runs in it
        network?.destroy()
        if let network {
            let left = try ZoneNetworkTests.namespaces().filter { $0.hasPrefix(network.namespace("")) }
            XCTAssertEqual(left, [], "every namespace removed")
        }
    }

    static func namespaces() throws -> [String] {
        let (status, text) = try runTool("/usr/sbin/ip", ["netns", "list"])
        guard status == 0 else { throw ChaosError("ip netns list: \(text)") }
        return text.split(separator: "\n").compactMap { $0.split(separator: " ").first.map(String.init) }
    }

    func inSync(_ monitor: MonitorClient, primary: String, standby: String) async throws {
        try await monitor.waitUntil("\(primary) primary, \(standby) promotable", timeoutSeconds: 60) { s in
            s.node(primary)?.reported == "primary" && s.node(standby)?.reported == "secondary" && s.node(standby)?.promotable == true
        }
    }

    /// The cluster in sync (node-a primary, node-b its standby) and tenant `zones` made: where
    /// each test starts. Returns the monitor's client.
    func inSyncWithATenant() async throws -> MonitorClient {
        let monitor = try await MonitorClient(cluster: cluster)
        try await inSync(monitor, primary: "node-a", standby: "node-b")
        try await cluster.createTenant("zones")
        return monitor
    }

    /// One write straight to a node's API, as the operator: its HTTP status, or nil when the node
    /// cannot be reached within the client's connect timeout.
    func write(to spec: LocalCluster.NodeSpec, id: Int) async -> UInt? {
        let client = APIClient(host: spec.host, port: spec.apiPort, caPath: cluster.certificates + "/ca.pem")
        guard let c = try? await client.connect() else { return nil }
        defer { Task { await c.close() } }
        let r = try? await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "zones")],
                                     body: Array("[\"CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY)\", \"INSERT INTO t VALUES (\(id))\"]".utf8))
        return r.map { UInt($0.status) }
    }

    /// Zone a cut off from everything: the monitor (zone c) no longer hears node-a and promotes
    /// node-b; clients outside cannot reach node-a. Healed, node-a learns of the new epoch and
    /// rejoins as the standby.
    func testIsolatingTheZoneOfThePrimaryFailsItOverAndHealingLetsItRejoin() async throws {
        let network = try XCTUnwrap(network)
        let monitor = try await inSyncWithATenant()
        let status1 = await write(to: cluster.primary, id: 1)
        XCTAssertEqual(status1, 200)

        try network.isolate("a")
        try await monitor.waitUntil("node-b promoted in epoch 2", timeoutSeconds: 30) { s in
            s.epoch == 2 && (s.node("node-b")?.reported == "primary" || s.node("node-b")?.reported == "wait_primary")
        }
        let status2 = await write(to: cluster.primary, id: 2)
        XCTAssertNil(status2, "node-a cannot be reached from outside its zone")
        let status3 = await write(to: cluster.standby, id: 3)
        XCTAssertEqual(status3, 200, "node-b takes writes")

        try network.heal("a")
        try await inSync(monitor, primary: "node-b", standby: "node-a")
    }

    /// Only the link between zones a and b cut, both ways: the monitor still hears both nodes, so
    /// nothing fails over; the standby loses the stream, is marked not promotable, and the primary
    /// commits alone. Healed, the standby catches up and is promotable again.
    func testCuttingTheReplicationLinkLetsThePrimaryCommitAloneWithoutAFailover() async throws {
        try await cutTheReplicationLink(oneWay: false)
    }

    /// One way only: what zone a sends to zone b is lost, what b sends still arrives. The
    /// standby hears nothing from the primary: the same as a cut, seen from the monitor.
    func testAOneWayCutIsSeenAsALostStandby() async throws {
        try await cutTheReplicationLink(oneWay: true)
    }

    func cutTheReplicationLink(oneWay: Bool) async throws {
        let network = try XCTUnwrap(network)
        let monitor = try await inSyncWithATenant()

        try network.cut("a", from: "b", oneWay: oneWay)
        try await monitor.waitUntil("node-a commits alone, node-b not promotable, no failover", timeoutSeconds: 30) { s in
            s.epoch == 1 && s.node("node-a")?.reported == "wait_primary" && s.node("node-b")?.promotable == false
        }
        let written = await write(to: cluster.primary, id: 1)
        XCTAssertEqual(written, 200, "node-a commits alone")

        try network.heal("a")
        try await inSync(monitor, primary: "node-a", standby: "node-b")
        let status = try await monitor.status()
        XCTAssertEqual(status.epoch, 1, "a cut replication link is not a failover")
    }

    /// 100 ms each way between zones a and b (an NFQUEUE rule and the packet delayer in zone a:
    /// this kernel has no netem). A replicated write waits for the standby's ack, a round trip
    /// between the zones, so each takes at least 200 ms more: a lower bound, which holds on a
    /// machine of any speed. With jitter and a third of the packets reordered, TCP carries the
    /// stream through and every write is acknowledged. Healed: the delayer and its rules are gone.
    func testADelayBetweenTheZonesHoldsEachPacket() async throws {
        let network = try XCTUnwrap(network)
        let monitor = try await inSyncWithATenant()
        let first = await write(to: cluster.primary, id: 0)
        XCTAssertEqual(first, 200)

        try network.delay("a", from: "b", DelaySchedule(delayMs: 100), executable: try apiaryExecutable(), seed: 1)
        XCTAssertTrue(network.isDelaying("a"))
        XCTAssertEqual(try network.delayRules("a"), 2, "one rule each way")
        for id in 1...3 {
            let started = ContinuousClock.now
            let status = await write(to: cluster.primary, id: id)
            let took = ContinuousClock.now - started
            XCTAssertEqual(status, 200, "write \(id)")
            XCTAssertGreaterThanOrEqual(took, .milliseconds(200), "write \(id) took \(took): its record and its ack each held 100 ms")
        }

        try network.delay("a", from: "b", DelaySchedule(delayMs: 30, jitterMs: 25, reorderPercent: 30), executable: try apiaryExecutable(), seed: 2)
        XCTAssertEqual(try network.delayRules("a"), 2, "a new delay replaces the old one")
        let started = ContinuousClock.now
        for id in 4...23 {
            let status = await write(to: cluster.primary, id: id)
            XCTAssertEqual(status, 200, "write \(id)")
        }
        // Each packet not reordered is held 5 ms at least: 20 writes, each a record and an
        // ack, cannot all have gone at once.
        XCTAssertGreaterThanOrEqual(ContinuousClock.now - started, .milliseconds(100), "the jittered delay held packets")
        try network.heal("a")
        XCTAssertFalse(network.isDelaying("a"))
        XCTAssertEqual(try network.delayRules("a"), 0, "healed: no rule left")
        try await inSync(monitor, primary: "node-a", standby: "node-b")
    }

    /// A fifth of the packets between zones a and b lost at random, each way: TCP carries the
    /// stream through, every write is acknowledged, and the rules did drop packets.
    func testLossBetweenTheZonesDropsPacketsAndWritesGoOn() async throws {
        let network = try XCTUnwrap(network)
        let monitor = try await inSyncWithATenant()

        try network.lose("a", from: "b", percent: 20)
        for id in 1...30 {
            let status = await write(to: cluster.primary, id: id)
            XCTAssertEqual(status, 200, "write \(id)")
        }
        XCTAssertGreaterThan(try network.droppedPackets("a"), 0, "the loss rules dropped packets")
        try network.heal("a")
        XCTAssertEqual(try network.droppedPackets("a"), 0, "healed: no rule left")
        try await inSync(monitor, primary: "node-a", standby: "node-b")
    }
}

/// A chaos run cleans up after itself: when interrupted, and (for a run killed outright) at the
/// start of the next one.
final class ChaosCleanupTests: XCTestCase {
    func testAnInterruptedRunStopsItsClusterAndRemovesItsZones() throws {
        if let reason = ZoneNetwork.unavailableReason() { throw XCTSkip(reason) }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let directory = NSTemporaryDirectory() + "apiary-chaos-interrupted-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try apiaryExecutable())
        process.arguments = ["chaos", "run", "smoke", "--scenarios", root + "/chaos/scenarios", "--reports", directory + "-reports",
                             "--base-port", String(freeBasePort()), "--dir", directory, "--keep"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        // A bound, not a wait: a run that never prints its line is stopped, which ends its
        // output and the read below (the test waits on the line itself).
        let watchdog = DispatchWorkItem { kill(process.processIdentifier, SIGKILL) }
        DispatchQueue.global().asyncAfter(deadline: .now() + 300, execute: watchdog)
        defer { watchdog.cancel() }
        var output = Self.read(pipe, until: "cluster up and in sync")
        XCTAssertTrue(output.contains("network: zones a, b, c in network namespaces apiary-\(process.processIdentifier)-*"), output)
        XCTAssertTrue(output.contains("cluster up and in sync"), output)
        XCTAssertEqual(try ZoneNetworkTests.namespaces().filter { $0.hasPrefix("apiary-\(process.processIdentifier)-") }.count, 3)

        kill(process.processIdentifier, SIGINT)
        output += Self.read(pipe, until: "interrupted: stopping the cluster and removing its zones")
        // What it prints while it stops is read too: a full pipe would hold it up.
        let rest = pipe.fileHandleForReading
        DispatchQueue.global().async { _ = rest.readDataToEndOfFile() }
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 130)
        XCTAssertTrue(output.contains("interrupted: stopping the cluster and removing its zones"), output)
        XCTAssertEqual(try ZoneNetworkTests.namespaces().filter { $0.hasPrefix("apiary-\(process.processIdentifier)-") }, [])
        XCTAssertFalse(try Self.processes().contains { $0.contains(directory + "/") }, "no process of the run is left")
    }

    func testWhatADeadRunLeftIsRemovedByTheNext() throws {
        if let reason = ZoneNetwork.unavailableReason() { throw XCTSkip(reason) }
        // A pid that belonged to a process that has exited: a run killed with -9.
        let gone = Process()
        gone.executableURL = URL(fileURLWithPath: "/bin/true")
        try gone.run()
        gone.waitUntilExit()
        let pid = gone.processIdentifier
        for zone in ZoneNetwork.zones { try Self.ip(["netns", "add", "apiary-\(pid)-\(zone)"]) }
        try Self.ip(["link", "add", "apbr\(pid)", "type", "bridge"])
        // And the links of another dead run whose namespaces are gone already.
        let goneToo = Process()
        goneToo.executableURL = URL(fileURLWithPath: "/bin/true")
        try goneToo.run()
        goneToo.waitUntilExit()
        let pidToo = goneToo.processIdentifier
        try Self.ip(["link", "add", "apv\(pidToo)a", "type", "veth", "peer", "name", "apz\(pidToo)a"])
        try Self.ip(["link", "add", "apbr\(pidToo)", "type", "bridge"])
        // A namespace of a live run (this process) is left alone.
        try Self.ip(["netns", "add", "apiary-\(getpid())-a"])
        defer { try? Self.ip(["netns", "delete", "apiary-\(getpid())-a"]) }

        // Enough other mounts that /proc/mounts is longer than a page (as on a machine with
        // containers), the dead run's after them.
        var fillers: [String] = []
        defer {
            for path in fillers {
                try? Self.run("/bin/umount", [path])
                try? FileManager.default.removeItem(atPath: path)
            }
        }
        while ProcFile.read("/proc/mounts")!.utf8.count <= 6_000 {
            let path = NSTemporaryDirectory() + "apiary-filler-mount-" + UUID().uuidString
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            fillers.append(path)
            try Self.run("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "apiary-filler", path])
        }
        // And its small file system, mounted under its pid's name.
        let mountPoint = NSTemporaryDirectory() + "apiary-leftover-mount-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: mountPoint) }
        try Self.run("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "apiary-chaos-\(pid)", mountPoint])

        ZoneNetwork.removeLeftovers()
        SmallDisk.removeLeftovers()
        let mounts = try XCTUnwrap(ProcFile.read("/proc/mounts"))
        XCTAssertFalse(mounts.contains("apiary-chaos-\(pid) "), "the dead run's file system is unmounted")
        let names = try ZoneNetworkTests.namespaces()
        XCTAssertEqual(names.filter { $0.hasPrefix("apiary-\(pid)-") }, [])
        XCTAssertTrue(names.contains("apiary-\(getpid())-a"))
        XCTAssertThrowsError(try Self.ip(["link", "show", "apbr\(pid)"]), "the dead run's bridge is removed")
        XCTAssertThrowsError(try Self.ip(["link", "show", "apv\(pidToo)a"]), "a veth pair left without its namespace is removed")
        XCTAssertThrowsError(try Self.ip(["link", "show", "apbr\(pidToo)"]), "a bridge left without its namespaces is removed")
    }

    func testANetworkMadeAgainAtOnceFindsItsNamesFree() throws {
        if let reason = ZoneNetwork.unavailableReason() { throw XCTSkip(reason) }
        let first = try ZoneNetwork()
        // A handle on zone a's namespace keeps it, and a link in it, alive past `ip netns
        // delete`, as a process still exiting from it does between two tests of one process.
        let handle = open("/run/netns/" + first.namespace("a"), O_RDONLY)
        XCTAssertGreaterThanOrEqual(handle, 0)
        defer { close(handle) }
        first.destroy()
        let second = try ZoneNetwork()
        second.destroy()
        XCTAssertEqual(try ZoneNetworkTests.namespaces().filter { $0.hasPrefix(first.namespace("")) }, [])
    }

    /// What a process writes to `pipe`, read until it holds `text` or the pipe ends.
    static func read(_ pipe: Pipe, until text: String) -> String {
        var output = ""
        while true {
            let chunk = pipe.fileHandleForReading.availableData
            if chunk.isEmpty { return output }
            output += String(decoding: chunk, as: UTF8.self)
            if output.contains(text) { return output }
        }
    }

    static func ip(_ arguments: [String]) throws { try run("/usr/sbin/ip", arguments) }

    static func run(_ tool: String, _ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        if process.terminationStatus != 0 { throw NodeError("\(tool) \(arguments.joined(separator: " ")) failed") }
    }

    /// The command lines of every process on the machine.
    static func processes() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: "/proc").filter { Int($0) != nil }.compactMap { pid in
            (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline"))).map { String(decoding: $0.map { $0 == 0 ? 32 : $0 }, as: UTF8.self) }
        }
    }
}
