import Crypto
import Foundation
import SwiftASN1
import X509

/// The cluster's own CA: makes the root and issues role certificates (`apiary certs`).
///
/// Files: `ca.pem` (the root, public), `ca.key` (mode 0600), and per holder
/// `<name>.pem` (leaf then CA) and `<name>.key` (mode 0600).
public struct CertificateAuthority {
    public let certificate: Certificate
    let privateKey: Certificate.PrivateKey

    public static let validityDaysDefault = 825

    /// Creates a new CA in `directory`. Refuses to overwrite an existing one.
    public static func create(in directory: String, commonName: String = "Apiary cluster CA", now: Date = Date()) throws -> CertificateAuthority {
        let certPath = directory + "/ca.pem", keyPath = directory + "/ca.key"
        guard !FileManager.default.fileExists(atPath: keyPath) else {
            throw TLSSetupError("a CA already exists in \(directory); remove it first to make a new one")
        }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let name = try DistinguishedName { CommonName(commonName); OrganizationName("Apiary") }
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-300),
            notValidAfter: now.addingTimeInterval(10 * 365 * 86400),
            issuer: name,
            subject: name,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
            },
            issuerPrivateKey: key
        )
        try writeSecret(try key.serializeAsPEM().pemString, to: keyPath)
        try writePublic(try certificate.serializeAsPEM().pemString, to: certPath)
        return CertificateAuthority(certificate: certificate, privateKey: key)
    }

    public static func load(from directory: String) throws -> CertificateAuthority {
        let cert = try Certificate(pemEncoded: try readText(directory + "/ca.pem"))
        let key = try Certificate.PrivateKey(pemEncoded: try readText(directory + "/ca.key"))
        return CertificateAuthority(certificate: cert, privateKey: key)
    }

    /// Issues a certificate for `identity`, valid for TLS client and server use, with `hosts`
    /// (DNS names or IP addresses) in its SAN for hostname checks. Writes `<name>.pem`/`.key`.
    @discardableResult
    public func issue(
        _ identity: PeerIdentity,
        hosts: [String] = ["localhost", "127.0.0.1", "::1"],
        validityDays: Int = validityDaysDefault,
        now: Date = Date(),
        into directory: String
    ) throws -> (certificatePath: String, keyPath: String) {
        guard PeerIdentity.isValidName(identity.name) else {
            throw TLSSetupError("invalid name '\(identity.name)': use 1-64 of A-Z a-z 0-9 . _ -")
        }
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        var names: [GeneralName] = [.uniformResourceIdentifier(identity.uri)]
        for host in hosts {
            if let ip = Self.ipBytes(host) { names.append(.ipAddress(ASN1OctetString(contentBytes: ArraySlice(ip)))) } else { names.append(.dnsName(host)) }
        }
        let leaf = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),
            publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-300),
            notValidAfter: now.addingTimeInterval(TimeInterval(validityDays) * 86400),
            issuer: certificate.subject,
            subject: try DistinguishedName { CommonName(identity.name); OrganizationalUnitName(identity.role.rawValue); OrganizationName("Apiary") },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true, keyEncipherment: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectAlternativeNames(names)
            },
            issuerPrivateKey: privateKey
        )
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let certPath = directory + "/\(identity.name).pem", keyPath = directory + "/\(identity.name).key"
        try Self.writeSecret(try key.serializeAsPEM().pemString, to: keyPath)
        try Self.writePublic(try leaf.serializeAsPEM().pemString + "\n" + certificate.serializeAsPEM().pemString, to: certPath)
        return (certPath, keyPath)
    }

    /// The address bytes when `host` is an IPv4 or IPv6 literal, else nil (a DNS name).
    public static func ipBytes(_ host: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 { return withUnsafeBytes(of: v4) { Array($0) } }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 { return withUnsafeBytes(of: v6) { Array($0) } }
        return nil
    }

    /// Private keys are created with mode 0600 from the first byte (never chmod after writing).
    static func writeSecret(_ text: String, to path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw TLSSetupError("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fchmod(fd, 0o600) == 0 else { throw TLSSetupError("cannot restrict \(path) to mode 0600") }
        let bytes = Array(text.utf8)
        guard write(fd, bytes, bytes.count) == bytes.count, fsync(fd) == 0 else {
            throw TLSSetupError("cannot write \(path): \(String(cString: strerror(errno)))")
        }
    }

    static func writePublic(_ text: String, to path: String) throws {
        guard FileManager.default.createFile(atPath: path, contents: Data(text.utf8), attributes: [.posixPermissions: 0o644]) else {
            throw TLSSetupError("cannot write \(path)")
        }
    }

    static func readText(_ path: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw TLSSetupError("cannot read \(path)")
        }
        return text
    }
}

/// A TLS setup problem the operator must fix (missing or unreadable files, bad names).
public struct TLSSetupError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
