import ApiaryNode
import ApiaryTLS
import Foundation
import NIOPosix
import NIOSSL
import XCTest

/// The API's TLS as applications meet it: a certificate of the operator's choosing (here from
/// a CA of its own, standing in for a public one), TLS 1.2 and 1.3 only with modern suites,
/// checked with `openssl s_client` as an independent client.
final class ClientTLSTests: XCTestCase {
    var directory: String!
    var cluster: LocalCluster!
    var publicCA: String { directory + "/public-ca" }

    override func setUp() async throws {
        directory = NSTemporaryDirectory() + "apiary-client-tls-" + UUID().uuidString
        // The operator's own CA and a server certificate from it, unrelated to the cluster CA.
        try CertificateAuthority.create(in: publicCA, commonName: "Some public CA")
            .issue(PeerIdentity(role: .gateway, name: "api"), into: publicCA)
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               primaryArguments: ["--mode", "single", "--api-certificate", publicCA + "/api.pem", "--api-key", publicCA + "/api.key"])
        try cluster.prepareCertificates()
        try cluster.start(cluster.primary)
    }

    override func tearDown() async throws {
        cluster?.stopAll()
        if let directory { try? FileManager.default.removeItem(atPath: directory) }
    }

    func connect(trusting ca: String, asOperator: Bool = false) async throws -> HTTPSConnection {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(ca)
        if asOperator {
            let op = try ClusterCredentials(directory: cluster.certificates, name: "operator")
            tls.certificateChain = op.certificateChain.map { .certificate($0) }
            tls.privateKey = .privateKey(op.privateKey)
        }
        return try await HTTPSConnection.connect(host: "127.0.0.1", port: cluster.primary.apiPort, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
    }

    func testApplicationsSeeTheOperatorsCertificateAndOperatorsStillSignInWithTheirs() async throws {
        let app = try await connect(trusting: publicCA + "/ca.pem")
        let ready = try await app.request(.GET, "/readyz")
        XCTAssertEqual(ready.status, 200)
        await app.close()
        // A client that trusts only the cluster CA does not accept the API's certificate.
        do {
            let wrong = try await connect(trusting: cluster.certificates + "/ca.pem")
            _ = try await wrong.request(.GET, "/readyz")
            XCTFail("the API must present the operator's certificate, not the cluster one")
        } catch {}
        // Client certificates are still checked against the cluster CA.
        let op = try await connect(trusting: publicCA + "/ca.pem", asOperator: true)
        let status = try await op.request(.GET, "/status")
        XCTAssertEqual(status.status, 200, status.text)
        await op.close()
    }

    func testOnlyTLS12And13WithModernSuitesAreAccepted() throws {
        try assertOnlyModernTLS(port: cluster.primary.apiPort)
    }
}

extension XCTestCase {
    /// With `openssl s_client` as an independent client: TLS 1.0 and 1.1 refused, 1.2 and 1.3
    /// accepted, the CBC and SHA-1 suites an ECDSA certificate could otherwise use refused.
    func assertOnlyModernTLS(port: Int) throws {
        for version in ["-tls1", "-tls1_1"] {
            let old = try sClient(port: port, [version, "-cipher", "DEFAULT@SECLEVEL=0"])
            XCTAssertFalse(old.handshake, "\(version) must be refused: \(old.output.suffix(400))")
        }
        let v12 = try sClient(port: port, ["-tls1_2"])
        XCTAssertTrue(v12.handshake && v12.output.contains("TLSv1.2"), v12.output.suffix(400).description)
        let v13 = try sClient(port: port, ["-tls1_3"])
        XCTAssertTrue(v13.handshake && v13.output.contains("TLSv1.3"), v13.output.suffix(400).description)
        // The API certificate is ECDSA: these are the CBC and SHA-1 suites it could otherwise use.
        for weak in ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"] {
            let w = try sClient(port: port, ["-tls1_2", "-cipher", weak + ":@SECLEVEL=0"])
            XCTAssertFalse(w.handshake, "suite \(weak) must be refused: \(w.output.suffix(400))")
        }
    }

    /// Runs `openssl s_client` against the API and reports whether a handshake completed.
    func sClient(port: Int, _ options: [String]) throws -> (handshake: Bool, output: String) {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else { throw XCTSkip("openssl is not installed (scripts/install-system-packages installs it)") }
        let (status, text) = try runTool("/usr/bin/openssl", ["s_client", "-connect", "127.0.0.1:\(port)", "-servername", "localhost"] + options)
        // s_client prints the negotiated cipher once a handshake completed; "(NONE)" otherwise.
        let handshake = status == 0 && text.contains("Cipher is ") && !text.contains("Cipher is (NONE)")
        return (handshake, text)
    }
}
