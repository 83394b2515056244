import ApiaryNode
import ArgumentParser
import Foundation

struct Ctl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Operate a cluster.",
        subcommands: [Verify.self]
    )

    struct Verify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Compare every tenant's (epoch, lsn, checksum) on the primary and the standby.",
            discussion: "Exits non-zero when the two nodes hold different checksums at the same lsn, or a node is unreachable."
        )
        @Option(help: "The primary's HTTPS API (host:port).") var primary: Address
        @Option(help: "The standby's HTTPS API (host:port).") var standby: Address
        @Option(help: "Directory with ca.pem and the operator certificate.") var certs = "certs"
        @Option(help: "Operator certificate name in --certs.") var `operator` = "operator"
        @Option(help: "Wait up to this long for the standby to reach the primary's lsns before comparing.") var waitMs = 10_000

        func run() async throws {
            let report = try await ClusterVerifier(certificatesDirectory: certs, operatorName: `operator`)
                .verify(primary: (primary.host, primary.port), standby: (standby.host, standby.port), waitMs: waitMs)
            print(report.text)
            if !report.consistent { throw ExitCode(1) }
        }
    }
}
