import ApiaryNode
import Foundation

/// The three zones of a chaos run as Linux network namespaces (`apiary-<pid>-a`, `-b`, `-c`),
/// each joined to a bridge in this namespace by a veth pair, on a /24 of their own: zone a is
/// `.1`, b `.2`, c `.3`, the bridge (where the workload's clients are) `.254`. Network faults
/// are nftables rules inside a zone's namespace, so they touch nothing outside the run:
/// isolating a zone drops everything it sends and receives but its loopback; a cut drops what
/// goes between two zones, both ways or one way; loss drops a share of it at random. A delay
/// (with jitter and reordering) sends what goes between two zones through an NFQUEUE queue
/// (an iptables rule: nftables here cannot queue) to a ``PacketDelayer`` process in the zone,
/// since this kernel has no netem. Healing flushes the rules and stops the delayer.
///
/// Needs root and `ip`/`nft` (iproute2, nftables). ``unavailableReason()`` says why not, and
/// the runner then stays on loopback with process faults only and says so.
public final class ZoneNetwork: @unchecked Sendable {
    public static let zones = ["a", "b", "c"]
    static let ip = "/usr/sbin/ip"
    static let nft = "/usr/sbin/nft"
    static let table = "apiary_chaos"
    static let iptables = "/usr/sbin/iptables"
    /// The NFQUEUE queue of a zone's delayer (queues are per namespace).
    static let delayQueue = 1

    /// The run's owner, in every name: leftovers of a run that died are found by it.
    let owner: Int32
    /// The first three octets of the run's /24.
    let subnet: String
    private var created = false
    private let lock = NSLock()
    /// The packet delayer of each zone with a delay fault.
    private var delayers: [String: Process] = [:]

    /// The bridge's name in this namespace (at most 15 characters, as Linux requires).
    var bridge: String { "apbr\(owner)" }
    public func namespace(_ zone: String) -> String { "apiary-\(owner)-\(zone)" }
    public func address(_ zone: String) -> String { "\(subnet).\(Self.zones.firstIndex(of: zone)! + 1)" }
    /// Where the zones reach this namespace (the workload's clients).
    public var outside: String { "\(subnet).254" }

    public var placement: LocalCluster.ZonePlacement {
        .init(namespaces: Dictionary(uniqueKeysWithValues: Self.zones.map { ($0, namespace($0)) }),
              addresses: Dictionary(uniqueKeysWithValues: Self.zones.map { ($0, address($0)) }))
    }

    /// Why zones cannot be made here (not root, no `ip` or `nft`, namespaces refused), or nil.
    public static func unavailableReason() -> String? {
        guard geteuid() == 0 else { return "network namespaces need root (this run is uid \(geteuid()))" }
        for tool in [ip, nft] where !FileManager.default.isExecutableFile(atPath: tool) {
            return "\(tool) is missing (install iproute2 and nftables: scripts/install-system-packages)"
        }
        let probe = "apiary-probe-\(getpid())"
        do {
            try run(ip, ["netns", "add", probe])
            defer { _ = try? run(ip, ["netns", "delete", probe]) }
            try run(ip, ["netns", "exec", probe, nft, "add", "table", "inet", table])
        } catch {
            return "cannot make a network namespace with a firewall here: \(error)"
        }
        return nil
    }

    /// Makes the namespaces, the bridge and the links, after removing what runs that died left.
    /// On failure, removes what it made.
    public init() throws {
        let owner = getpid()
        self.owner = owner
        Self.removeLeftovers()
        let used = (try? Self.run(Self.ip, ["-o", "-4", "addr"])) ?? ""
        // A /24 no interface here is on, picked by the owner so that runs side by side differ.
        let third = (0..<250).map { (Int(owner) + $0) % 250 }.first { !used.contains("10.213.\($0).") } ?? 0
        subnet = "10.213.\(third)"
        do { try build() } catch {
            destroy()
            throw error
        }
    }

    private func build() throws {
        created = true
        try Self.run(Self.ip, ["link", "add", bridge, "type", "bridge"])
        try Self.run(Self.ip, ["addr", "add", outside + "/24", "dev", bridge])
        try Self.run(Self.ip, ["link", "set", bridge, "up"])
        for zone in Self.zones {
            let ns = namespace(zone)
            let outer = Self.outerLink(owner, zone), inner = "apz\(owner)\(zone)"
            try Self.run(Self.ip, ["netns", "add", ns])
            try Self.run(Self.ip, ["link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns])
            try Self.run(Self.ip, ["link", "set", outer, "master", bridge, "up"])
            try Self.run(Self.ip, ["-n", ns, "addr", "add", address(zone) + "/24", "dev", inner])
            try Self.run(Self.ip, ["-n", ns, "link", "set", inner, "up"])
            try Self.run(Self.ip, ["-n", ns, "link", "set", "lo", "up"])
            try nft(zone, """
                table inet \(Self.table) {
                    chain input { type filter hook input priority 0; policy accept; }
                    chain output { type filter hook output priority 0; policy accept; }
                }
                """)
        }
    }

    /// Everything `zone` sends or receives is dropped, but its loopback.
    public func isolate(_ zone: String) throws { try Self.isolate(namespace: namespace(zone)) }

    /// The same for a zone of a network this process did not make (the drill, on the zones of
    /// `apiary up --zones`): everything the namespace sends or receives dropped, but its loopback.
    public static func isolate(namespace: String) throws {
        try apply("""
            add rule inet \(table) input iifname != "lo" drop
            add rule inet \(table) output oifname != "lo" drop
            """, in: namespace)
    }

    /// Removes every rule from the namespace's table: its zone is connected again.
    public static func removeRules(namespace: String) throws {
        try apply("""
            flush chain inet \(table) input
            flush chain inet \(table) output
            """, in: namespace)
    }

    /// What goes between `zone` and `other` is dropped: both ways, or only from `zone` to
    /// `other` (`other` still reaches `zone`, and its packets arrive; no answer comes back).
    public func cut(_ zone: String, from other: String, oneWay: Bool = false) throws {
        var rules = "add rule inet \(Self.table) output ip daddr \(address(other)) drop"
        if !oneWay { rules += "\nadd rule inet \(Self.table) input ip saddr \(address(other)) drop" }
        try nft(zone, rules)
    }

    /// `percent` of the packets between `zone` and `other` dropped at random, each way (each
    /// rule counts what it dropped: ``droppedPackets(_:)``).
    public func lose(_ zone: String, from other: String, percent: Int) throws {
        try nft(zone, """
            add rule inet \(Self.table) output ip daddr \(address(other)) numgen random mod 100 < \(percent) counter drop
            add rule inet \(Self.table) input ip saddr \(address(other)) numgen random mod 100 < \(percent) counter drop
            """)
    }

    /// Each packet between `zone` and `other`, each way, held as `schedule` says (so a round
    /// trip between them takes twice the delay more): a ``PacketDelayer`` started in the zone's
    /// namespace (`executable chaos delay-packets`), then iptables rules that send it the
    /// packets. `--queue-bypass`: should the delayer be gone, packets pass.
    public func delay(_ zone: String, from other: String, _ schedule: DelaySchedule, executable: String, seed: UInt64) throws {
        // Rules first: a queue bound but not yet set up rejects what it is sent (a drop).
        try flushDelayRules(zone)
        try stopDelayer(zone)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.ip)
        process.arguments = ["netns", "exec", namespace(zone), executable, "chaos", "delay-packets", "--queue", String(Self.delayQueue),
                             "--delay-ms", String(schedule.delayMs), "--jitter-ms", String(schedule.jitterMs),
                             "--reorder-percent", String(schedule.reorderPercent), "--seed", String(seed)]
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        lock.withLock { delayers[zone] = process }
        // Ready once it says so (it bound the queue); its output ending first means it failed.
        var said = Data()
        while !String(decoding: said, as: UTF8.self).contains("holding packets") {
            let more = output.fileHandleForReading.availableData
            guard !more.isEmpty else {
                try? stopDelayer(zone)
                throw ChaosError("the packet delayer of zone \(zone) did not start: \(String(decoding: said, as: UTF8.self))")
            }
            said.append(more)
        }
        for rule in [["OUTPUT", "-d"], ["INPUT", "-s"]] {
            try Self.run(Self.ip, ["netns", "exec", namespace(zone), Self.iptables, "-w", "-A", rule[0], rule[1], address(other),
                                   "-j", "NFQUEUE", "--queue-num", String(Self.delayQueue), "--queue-bypass"])
        }
    }

    /// Whether a delayer runs in `zone` (tests).
    public func isDelaying(_ zone: String) -> Bool { lock.withLock { delayers[zone]?.isRunning ?? false } }

    /// The rules of `zone` that send packets to its delayer (tests).
    public func delayRules(_ zone: String) throws -> Int {
        try Self.run(Self.ip, ["netns", "exec", namespace(zone), Self.iptables, "-w", "-S"]).components(separatedBy: "NFQUEUE").count - 1
    }

    /// Stops the delayer of `zone`. Throws when it had ended by itself (it failed, or was
    /// killed): what it held was then dropped, and the delay ended early.
    private func stopDelayer(_ zone: String) throws {
        guard let process = lock.withLock({ delayers.removeValue(forKey: zone) }) else { return }
        let endedEarly = !process.isRunning
        if !endedEarly { kill(process.processIdentifier, SIGTERM) }
        process.waitUntilExit()
        if endedEarly {
            throw ChaosError("the packet delayer of zone \(zone) ended before its fault did (status \(process.terminationStatus))")
        }
    }

    /// Removes the rules that send `zone`'s packets to a delayer (none: nothing to do).
    private func flushDelayRules(_ zone: String) throws {
        guard FileManager.default.isExecutableFile(atPath: Self.iptables) else { return }
        for chain in ["OUTPUT", "INPUT"] { try Self.run(Self.ip, ["netns", "exec", namespace(zone), Self.iptables, "-w", "-F", chain]) }
    }

    /// Packets the counting rules of `zone` have dropped so far.
    public func droppedPackets(_ zone: String) throws -> Int {
        let listing = try Self.run(Self.ip, ["netns", "exec", namespace(zone), Self.nft, "list", "table", "inet", Self.table])
        return listing.components(separatedBy: "counter packets ").dropFirst().compactMap { Int($0.prefix { $0.isNumber }) }.reduce(0, +)
    }

    /// Removes every rule of `zone` and stops its delayer: it is connected again.
    public func heal(_ zone: String) throws {
        try Self.removeRules(namespace: namespace(zone))
        // Delay rules exist only while a delayer is registered: `delay` flushes them before it
        // starts one, and adds them only after.
        if lock.withLock({ delayers[zone] != nil }) {
            try flushDelayRules(zone)
            try stopDelayer(zone)
        }
    }

    public func healAll() {
        for zone in Self.zones { try? heal(zone) }
    }

    /// Removes the links, the namespaces and the bridge. Each veth pair is deleted by its outer
    /// end, which is gone when the command returns: a namespace's own teardown frees its links
    /// later, on the kernel's schedule, and not at all while anything still holds the namespace
    /// (a process in it, an open handle), so a network made again at once under the same names
    /// would find them taken.
    public func destroy() {
        // Once, whoever comes first: the run's end or an interrupt.
        guard lock.withLock({ defer { created = false }; return created }) else { return }
        for zone in Self.zones { try? stopDelayer(zone) }
        Self.remove(owner)
    }

    deinit { destroy() }

    private func nft(_ zone: String, _ script: String) throws { try Self.apply(script, in: namespace(zone)) }

    /// Runs an nftables script inside a namespace.
    private static func apply(_ script: String, in namespace: String) throws {
        try run(ip, ["netns", "exec", namespace, nft, "-f", "-"], input: script)
    }

    /// Namespaces and bridges of runs whose process is gone (killed, or the machine's power
    /// cut mid-run): removed, so that a crashed run costs nothing but itself.
    public static func removeLeftovers() {
        var owners: Set<Int32> = []
        // Namespaces `apiary-<pid>-<zone>`, and links `apbr<pid>` and `apv<pid><zone>` (a
        // namespace may be gone and its bridge or veth end left).
        for line in ((try? run(ip, ["netns", "list"])) ?? "").split(separator: "\n") {
            let name = line.split(separator: " ").first.map(String.init) ?? ""
            let parts = name.split(separator: "-")
            guard parts.count == 3, parts[0] == "apiary", let pid = Int32(parts[1]), zones.contains(String(parts[2])) else { continue }
            owners.insert(pid)
        }
        for line in ((try? run(ip, ["-o", "link"])) ?? "").split(separator: "\n") {
            // "12: apv1234a@if11: <BROADCAST,..." or "13: apbr1234: <...": the name, then the owner.
            let fields = line.split(separator: " ")
            guard fields.count > 1 else { continue }
            let name = fields[1].split(separator: "@").first.map { String($0.dropLast($0.hasSuffix(":") ? 1 : 0)) } ?? ""
            if name.hasPrefix("apbr"), let pid = Int32(name.dropFirst(4)) { owners.insert(pid) }
            if name.hasPrefix("apv"), let zone = name.last, zones.contains(String(zone)), let pid = Int32(name.dropFirst(3).dropLast()) { owners.insert(pid) }
        }
        for pid in owners where kill(pid, 0) != 0 && errno == ESRCH { remove(pid) }
    }

    /// The veth pair's end in this namespace (at most 15 characters).
    static func outerLink(_ owner: Int32, _ zone: String) -> String { "apv\(owner)\(zone)" }

    /// Everything a run of `owner` makes, whatever of it exists.
    static func remove(_ owner: Int32) {
        for zone in zones {
            _ = try? run(ip, ["link", "delete", outerLink(owner, zone)])
            _ = try? run(ip, ["netns", "delete", "apiary-\(owner)-\(zone)"])
        }
        _ = try? run(ip, ["link", "delete", "apbr\(owner)"])
    }

    /// Runs a tool; its output, or an error with what it printed.
    @discardableResult
    static func run(_ tool: String, _ arguments: [String], input: String? = nil) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        let stdin = Pipe()
        process.standardInput = stdin
        try process.run()
        if let input { stdin.fileHandleForWriting.write(Data(input.utf8)) }
        try? stdin.fileHandleForWriting.close()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw ChaosError("\(([tool] + arguments).joined(separator: " ")) failed: \(text.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return text
    }
}
