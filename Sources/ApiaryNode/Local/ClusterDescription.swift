import Foundation

/// What a tool needs to act on a running cluster as its operator: where the monitor, the
/// gateways and the nodes listen, the operator's certificates, and which process runs in which
/// zone. `apiary up` writes it as `<dir>/cluster.json` while the local cluster runs;
/// `apiary drill zone-loss` reads it (or takes the same facts as flags for a real cluster).
public struct ClusterDescription: Codable, Sendable, Equatable {
    public struct Member: Codable, Sendable, Equatable {
        public var name: String
        /// `node`, `monitor` or `gateway`.
        public var kind: String
        public var zone: String
        /// `host:port` of its API (a node's, the monitor's, a gateway's client endpoint).
        public var address: String
        /// The process, when it runs on this machine (the local cluster): a drill pauses it.
        public var pid: Int32?
        /// Its zone's Linux network namespace, when the local cluster's zones are namespaces
        /// (`apiary up --zones`): a drill cuts the zone's network there.
        public var namespace: String?

        public init(name: String, kind: String, zone: String, address: String, pid: Int32? = nil, namespace: String? = nil) {
            self.name = name
            self.kind = kind
            self.zone = zone
            self.address = address
            self.pid = pid
            self.namespace = namespace
        }
    }

    public var name: String
    /// The directory with `ca.pem` and the operator's certificate and key.
    public var certificates: String
    public var members: [Member]

    public init(name: String, certificates: String, members: [Member]) {
        self.name = name
        self.certificates = certificates
        self.members = members
    }

    public var monitor: Member? { members.first { $0.kind == "monitor" } }
    public var gateways: [Member] { members.filter { $0.kind == "gateway" } }
    public var nodes: [Member] { members.filter { $0.kind == "node" } }
    public func members(inZone zone: String) -> [Member] { members.filter { $0.zone == zone } }

    public static func load(_ path: String) throws -> ClusterDescription {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw NodeError("no cluster description at \(path): start the local cluster with `apiary up`, or name a real cluster's parts with flags")
        }
        do { return try JSONDecoder().decode(ClusterDescription.self, from: data) } catch {
            throw NodeError("\(path) is not a cluster description: \(error)")
        }
    }

    public func write(to path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(self).write(to: URL(fileURLWithPath: path), options: .atomic)
    }
}

extension LocalCluster {
    /// The zone each process of the local cluster stands for: the nodes in a and b, the monitor
    /// in c, the gateways spread over a and b (a client that loses one zone keeps a gateway).
    public func zone(of spec: NodeSpec) -> String {
        Self.zone(role: spec.role, name: spec.name, gatewayIndex: gateways.firstIndex { $0.name == spec.name } ?? 0)
    }

    static func zone(role: String, name: String, gatewayIndex: Int) -> String {
        switch role {
        case "monitor": return "c"
        case "gateway": return gatewayIndex % 2 == 0 ? "a" : "b"
        default: return name == "node-a" ? "a" : "b"
        }
    }

    /// The running cluster, as ``ClusterDescription``.
    public func describe(name: String) -> ClusterDescription {
        var members: [ClusterDescription.Member] = []
        for spec in [primary, standby] {
            members.append(.init(name: spec.name, kind: "node", zone: zone(of: spec), address: spec.apiAddress, pid: processID(of: spec), namespace: spec.namespace))
        }
        if let monitor {
            members.append(.init(name: monitor.name, kind: "monitor", zone: zone(of: monitor), address: monitor.apiAddress, pid: processID(of: monitor), namespace: monitor.namespace))
        }
        for gateway in gateways {
            members.append(.init(name: gateway.name, kind: "gateway", zone: zone(of: gateway), address: gateway.apiAddress, pid: processID(of: gateway), namespace: gateway.namespace))
        }
        return ClusterDescription(name: name, certificates: certificates, members: members)
    }
}
