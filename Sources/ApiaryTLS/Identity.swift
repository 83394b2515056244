import Foundation
import X509

/// What a certificate holder may do in the cluster. It is read from the certificate
/// (never from what a peer says), as the URI SAN `apiary://<role>/<name>`.
public enum ClusterRole: String, CaseIterable, Sendable {
    case node, monitor, gateway, `operator`
}

/// A verified peer: its role and name as its certificate (signed by the cluster CA) states.
public struct PeerIdentity: Hashable, Sendable, CustomStringConvertible {
    public var role: ClusterRole
    public var name: String
    public init(role: ClusterRole, name: String) {
        self.role = role
        self.name = name
    }

    static let scheme = "apiary://"

    var uri: String { "\(Self.scheme)\(role.rawValue)/\(name)" }

    /// Reads the identity from a certificate's URI SAN; nil when it has none or a malformed one.
    public init?(certificate: Certificate) {
        guard let sans = try? certificate.extensions.subjectAlternativeNames else { return nil }
        for san in sans {
            guard case .uniformResourceIdentifier(let uri) = san, uri.hasPrefix(Self.scheme) else { continue }
            let parts = uri.dropFirst(Self.scheme.count).split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count == 2, let role = ClusterRole(rawValue: String(parts[0])), Self.isValidName(String(parts[1])) else { return nil }
            self.init(role: role, name: String(parts[1]))
            return
        }
        return nil
    }

    /// Names are 1...64 of `[A-Za-z0-9._-]`: safe in file names, URIs and logs.
    public static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 64 && name.utf8.allSatisfy { b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2E || b == 0x5F || b == 0x2D
        } && name != "." && name != ".."
    }

    public var description: String { "\(role.rawValue) \(name)" }
}
