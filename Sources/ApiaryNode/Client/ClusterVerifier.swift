import ApiaryTLS
import Foundation
import NIOCore
import NIOPosix

/// `apiary ctl verify`: proves invariant 6 on a live cluster by comparing each tenant's
/// checksum on the primary and the standby at the same lsn.
public struct ClusterVerifier {
    let credentials: ClusterCredentials

    public init(certificatesDirectory: String, operatorName: String) throws {
        credentials = try ClusterCredentials(directory: certificatesDirectory, name: operatorName)
    }

    public struct Report {
        public var lines: [String]
        public var consistent: Bool
        public var text: String { lines.joined(separator: "\n") }
    }

    public func status(host: String, port: Int, group: any EventLoopGroup) async throws -> NodeStatus {
        let connection = try await HTTPSConnection.connect(host: host, port: port, tls: credentials.clusterClient(), group: group)
        defer { Task { await connection.close() } }
        let response = try await connection.request(.GET, "/status")
        guard response.status == 200 else { throw NodeError("\(host):\(port) /status answered \(response.status): \(response.text)") }
        return try JSONDecoder().decode(NodeStatus.self, from: Data(response.body))
    }

    /// Waits (bounded) for the standby to apply the primary's last lsn of every tenant, then compares.
    public func verify(primary: (String, Int), standby: (String, Int), waitMs: Int) async throws -> Report {
        let group = MultiThreadedEventLoopGroup.singleton
        let deadline = Date().addingTimeInterval(Double(waitMs) / 1000)
        while true {
            let p = try await status(host: primary.0, port: primary.1, group: group)
            let s = try await status(host: standby.0, port: standby.1, group: group)
            let report = compare(primary: p, standby: s)
            if report.caughtUp || Date() >= deadline { return report.report }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    func compare(primary: NodeStatus, standby: NodeStatus) -> (report: Report, caughtUp: Bool) {
        var lines = ["tenant\tprimary (epoch, lsn, checksum)\tstandby (applied lsn, checksum)\tverdict"]
        var consistent = true, caughtUp = true
        if let error = standby.error {
            lines.append("standby stopped: \(error)")
            consistent = false
        }
        let standbyTenants = Dictionary(standby.tenants.map { ($0.tenant, $0) }, uniquingKeysWith: { a, _ in a })
        for p in primary.tenants {
            let primaryText = "(\(p.epoch), \(p.lsn), \(String(p.checksum, radix: 16)))"
            guard let s = standbyTenants[p.tenant] else {
                lines.append("\(p.tenant)\t\(primaryText)\t-\tMISSING on standby")
                consistent = false
                caughtUp = false
                continue
            }
            let standbyText = "(\(s.appliedLSN), \(String(s.checksum, radix: 16)))"
            if s.appliedLSN == p.lsn {
                let same = s.checksum == p.checksum
                lines.append("\(p.tenant)\t\(primaryText)\t\(standbyText)\t\(same ? "ok" : "MISMATCH")")
                if !same { consistent = false }
            } else {
                lines.append("\(p.tenant)\t\(primaryText)\t\(standbyText)\tBEHIND (not compared)")
                consistent = false
                caughtUp = false
            }
        }
        lines.append(consistent ? "verify: \(primary.tenants.count) tenant(s) identical on both nodes" : "verify: FAILED")
        return (Report(lines: lines, consistent: consistent), caughtUp)
    }
}
