import Foundation
import NIOSSL
import X509

/// Every TLS configuration Apiary uses, made in one place.
///
/// Inside the cluster: TLS 1.3 only, mutual authentication, the cluster CA pinned as the only
/// trust root (never the system's). For clients of the HTTPS API: TLS 1.2 and 1.3 only.
public struct ClusterCredentials: Sendable {
    public let certificateChain: [NIOSSLCertificate]
    public let privateKey: NIOSSLPrivateKey
    public let clusterCA: NIOSSLCertificate
    public let identity: PeerIdentity

    /// Loads `<dir>/<name>.pem`, `<dir>/<name>.key` and `<dir>/ca.pem`.
    public init(directory: String, name: String) throws {
        try self.init(certificatePath: directory + "/\(name).pem", keyPath: directory + "/\(name).key", caPath: directory + "/ca.pem")
    }

    public init(certificatePath: String, keyPath: String, caPath: String) throws {
        do {
            certificateChain = try NIOSSLCertificate.fromPEMFile(certificatePath)
            privateKey = try NIOSSLPrivateKey(file: keyPath, format: .pem)
            guard let ca = try NIOSSLCertificate.fromPEMFile(caPath).first else { throw TLSSetupError("no certificate in \(caPath)") }
            clusterCA = ca
        } catch let error as TLSSetupError {
            throw error
        } catch {
            throw TLSSetupError("cannot load TLS files (\(certificatePath), \(caPath)): \(error)")
        }
        guard let leaf = certificateChain.first,
              let identity = PeerIdentity(certificate: try Certificate(derEncoded: try leaf.toDERBytes())) else {
            throw TLSSetupError("\(certificatePath) has no apiary:// identity; issue it with `apiary certs issue`")
        }
        self.identity = identity
    }

    /// Server side of every cluster-internal connection.
    public func clusterServer() -> TLSConfiguration {
        var c = TLSConfiguration.makeServerConfigurationWithMTLS(
            certificateChain: certificateChain.map { .certificate($0) },
            privateKey: .privateKey(privateKey),
            trustRoots: .certificates([clusterCA])
        )
        c.minimumTLSVersion = .tlsv13
        c.certificateVerification = .noHostnameVerification // identity comes from the URI SAN
        return c
    }

    /// Client side of every cluster-internal connection: own chain, pinned CA, full checks.
    public func clusterClient() -> TLSConfiguration {
        var c = TLSConfiguration.makeClientConfiguration()
        c.certificateChain = certificateChain.map { .certificate($0) }
        c.privateKey = .privateKey(privateKey)
        c.trustRoots = .certificates([clusterCA])
        c.minimumTLSVersion = .tlsv13
        c.certificateVerification = .fullVerification
        return c
    }

    /// The HTTPS endpoint applications use: TLS 1.2/1.3 with modern AEAD suites only.
    /// - Parameter presenting: the certificate applications see, when the operator chose one
    ///   (for example from a public CA, so that clients need no cluster CA); the node's
    ///   cluster certificate otherwise.
    public func clientFacingServer(presenting: ServerCertificate? = nil) -> TLSConfiguration {
        var c = TLSConfiguration.makeServerConfiguration(
            certificateChain: (presenting?.chain ?? certificateChain).map { .certificate($0) },
            privateKey: .privateKey(presenting?.privateKey ?? privateKey)
        )
        c.minimumTLSVersion = .tlsv12
        c.cipherSuiteValues = [
            .TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, .TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            .TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            .TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, .TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            .TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ]
        return c
    }

    /// Reads the verified peer's identity from its certificate chain (after the handshake).
    /// - Returns: nil when the certificate carries no valid apiary identity.
    public static func identity(of peer: NIOSSLCertificate) -> PeerIdentity? {
        guard let der = try? peer.toDERBytes(), let certificate = try? Certificate(derEncoded: der) else { return nil }
        return PeerIdentity(certificate: certificate)
    }
}

/// A certificate and key from files of the operator's choosing (PEM: the leaf first, then any
/// intermediates), for the endpoint applications connect to.
public struct ServerCertificate: Sendable {
    public let chain: [NIOSSLCertificate]
    public let privateKey: NIOSSLPrivateKey

    public init(certificatePath: String, keyPath: String) throws {
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificatePath)
            privateKey = try NIOSSLPrivateKey(file: keyPath, format: .pem)
        } catch {
            throw TLSSetupError("cannot load the API certificate (\(certificatePath), \(keyPath)): \(error)")
        }
        guard !chain.isEmpty else { throw TLSSetupError("\(certificatePath) holds no certificate") }
    }
}
