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
        /// For `pause`: how long.
        public var seconds: Double?

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
    public static func load(_ nameOrPath: String, directory: String) throws -> Scenario {
        let path = nameOrPath.hasSuffix(".json") ? nameOrPath : directory + "/" + nameOrPath + ".json"
        guard let data = FileManager.default.contents(atPath: path) else { throw ChaosError("no scenario at \(path)") }
        let scenario = try JSONDecoder().decode(Scenario.self, from: data)
        try scenario.validate()
        return scenario
    }

    func validate() throws {
        guard seconds > 0, seconds <= 86_400 else { throw ChaosError("seconds must be 0...86400") }
        let clients = setClients + bankClients + registerClients
        guard setClients >= 0, bankClients >= 0, registerClients >= 0, clients > 0, clients <= 64 else {
            throw ChaosError("between 1 and 64 clients in all")
        }
        guard registerKeys >= 1, registerKeys <= 64 else { throw ChaosError("registerKeys must be 1...64") }
        if let bound = linearizabilityStatesMax, bound < 1 { throw ChaosError("linearizabilityStatesMax must be at least 1") }
        for fault in faults {
            guard fault.at >= 0, fault.at < seconds else { throw ChaosError("fault '\(fault)' is outside the run") }
            if fault.kind == .pause { guard let s = fault.seconds, s > 0 else { throw ChaosError("a pause needs seconds > 0") } }
            if fault.kind == .restart, fault.target == .primary || fault.target == .standby {
                throw ChaosError("'restart \(fault.target.rawValue)': restart takes monitor, gateway or killed_node")
            }
            if fault.kind != .restart, fault.target == .killedNode { throw ChaosError("killed_node goes with restart only") }
        }
    }
}

public struct ChaosError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
