import ApiaryTLS
import ArgumentParser

struct Certs: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make the cluster CA and issue role certificates.",
        subcommands: [Init.self, Issue.self]
    )

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a new cluster CA (ca.pem, ca.key).")
        @Option(help: "Directory for the CA files.") var dir = "certs"

        func run() throws {
            _ = try CertificateAuthority.create(in: dir)
            print("created cluster CA in \(dir)/ca.pem (key \(dir)/ca.key, mode 0600)")
        }
    }

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Issue a certificate for a node, monitor, gateway or operator.")
        @Option(help: "Directory holding the CA; the certificate is written there too.") var dir = "certs"
        @Option(help: "node, monitor, gateway or operator.") var role: String
        @Option(help: "The holder's name (1-64 of A-Z a-z 0-9 . _ -).") var name: String
        @Option(name: .customLong("host"), help: "A DNS name or IP the holder serves on (repeatable).") var hosts: [String] = ["localhost", "127.0.0.1", "::1"]
        @Option(help: "Days the certificate is valid.") var validityDays = CertificateAuthority.validityDaysDefault

        func validate() throws {
            guard ClusterRole(rawValue: role) != nil else {
                throw ValidationError("--role must be one of: \(ClusterRole.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            guard PeerIdentity.isValidName(name) else { throw ValidationError("--name must be 1-64 of A-Z a-z 0-9 . _ -") }
            guard validityDays > 0 else { throw ValidationError("--validity-days must be positive") }
        }

        func run() throws {
            let ca = try CertificateAuthority.load(from: dir)
            let paths = try ca.issue(PeerIdentity(role: ClusterRole(rawValue: role)!, name: name), hosts: hosts, validityDays: validityDays, into: dir)
            print("issued \(role) certificate \(paths.certificatePath) (key \(paths.keyPath), mode 0600)")
        }
    }
}
