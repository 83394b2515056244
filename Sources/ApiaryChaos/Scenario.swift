import Foundation

/// A chaos scenario, as a file in `chaos/scenarios/` (JSON): how long the workload runs, how
/// many clients of each kind, and the faults, each at a time after the workload started.
public struct Scenario: Codable, Sendable {
    public struct Fault: Codable, Sendable, Hashable, CustomStringConvertible {
        public enum Kind: String, Codable, Sendable {
            /// `kill -9` the target; it stays down until a `restart`.
            case kill
            /// Start the target again (the node, monitor or gateway killed last under that name).
            case restart
            /// `SIGSTOP` the target for `seconds`, then `SIGCONT`: a process that is alive but
            /// does nothing (the classic split-brain test when it is the primary).
            case pause
            /// Drop everything the target's zone sends and receives for `seconds` (its other
            /// processes with it: zone a holds node-a and gateway-1), then connect it again.
            /// Network faults need zones in network namespaces (``ZoneNetwork``).
            case isolate
            /// Drop what goes between the primary's zone and the standby's, both ways, for
            /// `seconds`: only the replication link; the monitor and clients still reach both.
            case cut
            /// Drop only what the target's zone sends to the other node's zone, for `seconds`:
            /// its packets are lost, the other side's still arrive.
            case cutOneWay = "cut_one_way"
            /// Drop `percent` of the packets between the primary's zone and the standby's, both
            /// ways, at random, for `seconds` (netem's loss).
            case loss
            /// Hold each packet between the primary's zone and the standby's, each way, for
            /// `delayMs` ± `jitterMs` (uniformly), sending `reorderPercent` of them at once so that
            /// they overtake those held, for `seconds` (netem's delay, jitter and reorder, done
            /// by an NFQUEUE ``PacketDelayer``: this kernel has no netem).
            case delay
            /// Fill the target node's file system (a small one of its own, mounted for the run)
            /// for `seconds`, then free it: every write it must make fails with ENOSPC.
            case fillDisk = "fill_disk"

            var isNetworkFault: Bool { self == .isolate || self == .cut || self == .cutOneWay || self == .loss || self == .delay }
            /// Faults that last `seconds` and end by themselves.
            var lasts: Bool { isNetworkFault || self == .pause || self == .fillDisk }
        }
        public enum Target: String, Codable, Sendable {
            /// The node the monitor names as the writer when the fault happens.
            case primary
            /// The other node.
            case standby
            case monitor
            /// The first gateway (clients fall back to the second).
            case gateway
            /// For `restart`: the node killed last.
            case killedNode = "killed_node"
        }
        public var at: Double
        public var kind: Kind
        public var target: Target
        /// For `pause`, `fill_disk` and the network faults: how long.
        public var seconds: Double?
        /// For `loss`: the share of packets dropped, 1...100.
        public var percent: Int?
        /// For `delay`: how long each packet is held (1...10,000 ms), give or take `jitterMs`
        /// (at most the delay; 0 when left out), and the share sent at once (0...100).
        public var delayMs: Int?
        public var jitterMs: Int?
        public var reorderPercent: Int?

        public var description: String { "\(kind.rawValue) \(target.rawValue)" + (seconds.map { " for \($0) s" } ?? "") + " at \(at) s" }
    }

    public var name: String
    public var description: String
    /// How long the workload runs, in seconds.
    public var seconds: Double
    /// Clients inserting unique values (the set workload).
    public var setClients: Int
    /// Clients moving money between accounts, and reading the total at level `strong`.
    public var bankClients: Int
    /// Clients reading, writing and compare-and-setting registers (at level `linearizable`),
    /// checked for linearizability. 0 when the file leaves it out.
    public var registerClients: Int
    /// How many registers they share (5 when left out): fewer keys, more contention.
    public var registerKeys: Int
    /// The linearizability search's bound per key (``Linearizability/statesMaxDefault`` when
    /// left out); past it the check says "could not decide", a failure.
    public var linearizabilityStatesMax: Int?
    public var faults: [Fault]
    /// Availability the run must reach, both ways, if given (the `hour` scenario: 0.999).
    public var availabilityMin: Double?

    enum CodingKeys: String, CodingKey {
        case name, description, seconds, setClients, bankClients, registerClients, registerKeys, linearizabilityStatesMax, faults, availabilityMin
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        description = try c.decode(String.self, forKey: .description)
        seconds = try c.decode(Double.self, forKey: .seconds)
        setClients = try c.decode(Int.self, forKey: .setClients)
        bankClients = try c.decode(Int.self, forKey: .bankClients)
        // Added with the register workload: files written before it still load.
        registerClients = try c.decodeIfPresent(Int.self, forKey: .registerClients) ?? 0
        registerKeys = try c.decodeIfPresent(Int.self, forKey: .registerKeys) ?? 5
        linearizabilityStatesMax = try c.decodeIfPresent(Int.self, forKey: .linearizabilityStatesMax)
        faults = try c.decode([Fault].self, forKey: .faults)
        availabilityMin = try c.decodeIfPresent(Double.self, forKey: .availabilityMin)
    }

    /// Loads `chaos/scenarios/NAME.json` (or a path).
    /// - Throws: a ``ChaosError`` naming the file and the line of what is wrong (an unknown
    ///   fault, a missing field, a value out of range, a syntax error).
    public static func load(_ nameOrPath: String, directory: String) throws -> Scenario {
        let path = nameOrPath.hasSuffix(".json") ? nameOrPath : directory + "/" + nameOrPath + ".json"
        guard let data = FileManager.default.contents(atPath: path) else { throw ChaosError("no scenario at \(path)") }
        func located(_ at: [JSONLocation.Step], _ message: String) -> ChaosError {
            let line = JSONLocation.line(of: at, in: Array(data)).map { ":\($0)" } ?? ""
            return ChaosError("\(path)\(line): \(message)")
        }
        let scenario: Scenario
        do { scenario = try JSONDecoder().decode(Scenario.self, from: data) } catch let error as DecodingError {
            switch error {
            case .keyNotFound(let key, let context):
                throw located(JSONLocation.steps(context.codingPath), "'\(key.stringValue)' is missing")
            case .typeMismatch(_, let context), .valueNotFound(_, let context):
                throw located(JSONLocation.steps(context.codingPath), "'\(context.codingPath.last?.stringValue ?? "")': \(context.debugDescription)")
            case .dataCorrupted(let context) where !context.codingPath.isEmpty:
                // An unknown fault kind or target: name the allowed ones.
                let field = context.codingPath.last?.stringValue ?? ""
                let allowed = field == "kind" ? " (faults: kill, restart, pause, isolate, cut, cut_one_way, loss, delay, fill_disk)"
                    : field == "target" ? " (targets: primary, standby, monitor, gateway, killed_node)" : ""
                throw located(JSONLocation.steps(context.codingPath), "'\(field)': \(context.debugDescription)\(allowed)")
            case .dataCorrupted(let context):
                throw ChaosError("\(path) is not valid JSON: \(context.underlyingError.map { "\($0)" } ?? context.debugDescription)")
            @unknown default:
                throw ChaosError("\(path): \(error)")
            }
        }
        do { try scenario.validate() } catch let problem as Problem {
            throw located(problem.at, problem.message)
        }
        return scenario
    }

    /// What ``validate()`` found wrong, and where in the file.
    struct Problem: Error {
        var at: [JSONLocation.Step]
        var message: String
    }

    func validate() throws {
        guard seconds > 0, seconds <= 86_400 else { throw Problem(at: [.key("seconds")], message: "seconds must be 0...86400") }
        let clients = setClients + bankClients + registerClients
        guard setClients >= 0, bankClients >= 0, registerClients >= 0, clients > 0, clients <= 64 else {
            throw Problem(at: [.key("setClients")], message: "between 1 and 64 clients in all")
        }
        guard registerKeys >= 1, registerKeys <= 64 else { throw Problem(at: [.key("registerKeys")], message: "registerKeys must be 1...64") }
        if let bound = linearizabilityStatesMax, bound < 1 {
            throw Problem(at: [.key("linearizabilityStatesMax")], message: "linearizabilityStatesMax must be at least 1")
        }
        for (index, fault) in faults.enumerated() {
            func problem(_ message: String) -> Problem { Problem(at: [.key("faults"), .index(index)], message: "fault '\(fault)': " + message) }
            guard fault.at >= 0, fault.at < seconds else { throw problem("outside the run (0 to \(seconds) s)") }
            if fault.kind.lasts {
                guard let s = fault.seconds, s > 0 else { throw problem("'\(fault.kind.rawValue)' needs seconds > 0") }
            }
            if [.cut, .cutOneWay, .loss, .delay, .fillDisk].contains(fault.kind), fault.target != .primary && fault.target != .standby {
                throw problem("'\(fault.kind.rawValue)' is about a node; it takes primary or standby")
            }
            if fault.kind == .loss {
                guard let p = fault.percent, (1...100).contains(p) else { throw problem("'loss' needs percent 1...100") }
            } else if fault.percent != nil {
                throw problem("percent goes with loss only")
            }
            if fault.kind == .delay {
                guard let d = fault.delayMs, (1...10_000).contains(d) else { throw problem("'delay' needs delayMs 1...10000") }
                guard (0...d).contains(fault.jitterMs ?? 0) else { throw problem("jitterMs must be 0...delayMs") }
                guard (0...100).contains(fault.reorderPercent ?? 0) else { throw problem("reorderPercent must be 0...100") }
            } else if fault.delayMs != nil || fault.jitterMs != nil || fault.reorderPercent != nil {
                throw problem("delayMs, jitterMs and reorderPercent go with delay only")
            }
            if fault.kind == .restart, fault.target == .primary || fault.target == .standby {
                throw problem("restart takes monitor, gateway or killed_node")
            }
            if fault.kind != .restart, fault.target == .killedNode { throw problem("killed_node goes with restart only") }
            // Healing a zone removes all its rules: network faults at once would end together.
            if fault.kind.isNetworkFault, let earlier = faults[..<index].last(where: { $0.kind.isNetworkFault && $0.at + ($0.seconds ?? 0) > fault.at && $0.at <= fault.at }) {
                throw problem("overlaps '\(earlier)': one network fault at a time")
            }
        }
    }
}

/// Where a value is in a JSON text, for error messages that name the line: a JSON decoder
/// reports the path to what it did not like (`faults[3].kind`), not its position.
enum JSONLocation {
    enum Step: Equatable {
        case key(String)
        case index(Int)
    }

    static func steps(_ path: [any CodingKey]) -> [Step] {
        path.map { key in key.intValue.map { .index($0) } ?? .key(key.stringValue) }
    }

    /// The line (from 1) where the value at `path` begins; nil when the text does not have it.
    static func line(of path: [Step], in text: [UInt8]) -> Int? {
        var scanner = Scanner(bytes: text)
        scanner.skipSpace()
        for step in path {
            switch step {
            case .key(let wanted):
                guard scanner.take(UInt8(ascii: "{")) else { return nil }
                while true {
                    scanner.skipSpace()
                    guard let key = scanner.string() else { return nil }
                    scanner.skipSpace()
                    guard scanner.take(UInt8(ascii: ":")) else { return nil }
                    scanner.skipSpace()
                    if key == wanted { break }
                    scanner.skipValue()
                    scanner.skipSpace()
                    guard scanner.take(UInt8(ascii: ",")) else { return nil }
                }
            case .index(let wanted):
                guard scanner.take(UInt8(ascii: "[")) else { return nil }
                for _ in 0..<wanted {
                    scanner.skipSpace()
                    scanner.skipValue()
                    scanner.skipSpace()
                    guard scanner.take(UInt8(ascii: ",")) else { return nil }
                }
                scanner.skipSpace()
            }
        }
        return scanner.line
    }

    struct Scanner {
        let bytes: [UInt8]
        var i = 0
        var line = 1

        mutating func advance() {
            if bytes[i] == UInt8(ascii: "\n") { line += 1 }
            i += 1
        }

        mutating func skipSpace() {
            while i < bytes.count, [UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\r"), UInt8(ascii: "\n")].contains(bytes[i]) { advance() }
        }

        mutating func take(_ byte: UInt8) -> Bool {
            guard i < bytes.count, bytes[i] == byte else { return false }
            advance()
            return true
        }

        /// A string's contents (escapes kept as written: keys here are plain).
        mutating func string() -> String? {
            guard take(UInt8(ascii: "\"")) else { return nil }
            let start = i
            while i < bytes.count, bytes[i] != UInt8(ascii: "\"") {
                if bytes[i] == UInt8(ascii: "\\") { advance() }
                if i < bytes.count { advance() }
            }
            let text = String(decoding: bytes[start..<min(i, bytes.count)], as: UTF8.self)
            return take(UInt8(ascii: "\"")) ? text : nil
        }

        /// Skips one value: an object or array with all it holds, a string, a number or a word.
        mutating func skipValue() {
            guard i < bytes.count else { return }
            if bytes[i] == UInt8(ascii: "\"") {
                _ = string()
                return
            }
            var depth = 0
            while i < bytes.count {
                let byte = bytes[i]
                if byte == UInt8(ascii: "\"") {
                    _ = string()
                    continue
                }
                if byte == UInt8(ascii: "{") || byte == UInt8(ascii: "[") { depth += 1 }
                if byte == UInt8(ascii: "}") || byte == UInt8(ascii: "]") {
                    if depth == 0 { return }
                    depth -= 1
                    advance()
                    if depth == 0 { return }
                    continue
                }
                if depth == 0, byte == UInt8(ascii: ",") || byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\n") { return }
                advance()
            }
        }
    }
}

public struct ChaosError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
