import Foundation
import NIOCore
import NIOEmbedded
import NIOSSL
import NIOTLS
import XCTest
@testable import ApiaryTLS

/// Records whether the TLS handshake completed on a channel.
final class HandshakeRecorder: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    var completed = false
    var error: (any Error)?
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event { completed = true }
        context.fireUserInboundEventTriggered(event)
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { self.error = error }
}

final class HandshakeTests: XCTestCase {
    var dir: String!
    var ca: CertificateAuthority!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "apiary-tls-" + UUID().uuidString
        ca = try CertificateAuthority.create(in: dir)
        try ca.issue(PeerIdentity(role: .node, name: "node-a"), into: dir)
        try ca.issue(PeerIdentity(role: .node, name: "node-b"), into: dir)
        try ca.issue(PeerIdentity(role: .gateway, name: "gw-1"), into: dir)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(atPath: dir) }

    struct Outcome {
        var clientCompleted: Bool
        var serverCompleted: Bool
        var serverPeer: PeerIdentity?
        var clientError: (any Error)?
        var serverError: (any Error)?
    }

    /// Runs a TLS handshake between two in-memory channels, shuttling bytes both ways.
    func handshake(client clientConfig: TLSConfiguration, server serverConfig: TLSConfiguration, sendData: Bool = true) throws -> Outcome {
        let client = EmbeddedChannel(), server = EmbeddedChannel()
        let clientRecorder = HandshakeRecorder(), serverRecorder = HandshakeRecorder()
        let serverHandler = NIOSSLServerHandler(context: try NIOSSLContext(configuration: serverConfig))
        try client.pipeline.syncOperations.addHandlers([
            try NIOSSLClientHandler(context: try NIOSSLContext(configuration: clientConfig), serverHostname: "localhost"),
            clientRecorder,
        ])
        try server.pipeline.syncOperations.addHandlers([serverHandler, serverRecorder])
        client.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 1), promise: nil)
        server.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 2), promise: nil)
        var sentData = false
        for _ in 0..<50 {
            var moved = false
            while let bytes = try? client.readOutbound(as: ByteBuffer.self) {
                moved = true
                _ = try? server.writeInbound(bytes)
            }
            while let bytes = try? server.readOutbound(as: ByteBuffer.self) {
                moved = true
                _ = try? client.writeInbound(bytes)
            }
            // Under TLS 1.3 the server checks the client's certificate after the client
            // considers the handshake done: send data so a rejection reaches the client.
            if sendData, clientRecorder.completed, !sentData {
                sentData = true
                moved = true
                client.writeAndFlush(ByteBuffer(string: "hello"), promise: nil)
            }
            if !moved { break }
        }
        var peer: PeerIdentity?
        if serverRecorder.completed, let cert = try? serverHandler.peerCertificate {
            peer = ClusterCredentials.identity(of: cert)
        }
        // No finish(): it waits for TLS close_notify replies that nobody shuttles.
        return Outcome(clientCompleted: clientRecorder.completed, serverCompleted: serverRecorder.completed,
                       serverPeer: peer, clientError: clientRecorder.error, serverError: serverRecorder.error)
    }

    func credentials(_ name: String, in directory: String? = nil) throws -> ClusterCredentials {
        try ClusterCredentials(directory: directory ?? dir, name: name)
    }

    func testMutualTLSBetweenNodesCarriesTheCertifiedIdentity() throws {
        let a = try credentials("node-a"), b = try credentials("node-b")
        XCTAssertEqual(a.identity, PeerIdentity(role: .node, name: "node-a"))
        let outcome = try handshake(client: b.clusterClient(), server: a.clusterServer())
        XCTAssertTrue(outcome.clientCompleted)
        XCTAssertTrue(outcome.serverCompleted)
        XCTAssertNil(outcome.serverError)
        XCTAssertEqual(outcome.serverPeer, PeerIdentity(role: .node, name: "node-b"))
    }

    func testGatewayCertificateIsIdentifiedAsAGateway() throws {
        let outcome = try handshake(client: try credentials("gw-1").clusterClient(), server: try credentials("node-a").clusterServer())
        XCTAssertEqual(outcome.serverPeer?.role, .gateway, "the role comes from the certificate, for the shell to refuse")
    }

    func testPeerFromAnotherCAIsRefused() throws {
        let otherDir = dir + "/other"
        let other = try CertificateAuthority.create(in: otherDir)
        try other.issue(PeerIdentity(role: .node, name: "node-a"), into: otherDir) // same name, wrong CA
        // The intruder trusts our CA, so any refusal comes from the side under test.
        let intruder = try ClusterCredentials(certificatePath: otherDir + "/node-a.pem", keyPath: otherDir + "/node-a.key", caPath: dir + "/ca.pem")
        let server = try handshake(client: intruder.clusterClient(), server: try credentials("node-a").clusterServer())
        XCTAssertFalse(server.serverCompleted, "a server must refuse a client certificate from another CA")
        XCTAssertNotNil(server.serverError)
        let client = try handshake(client: try credentials("node-b").clusterClient(), server: intruder.clusterServer())
        XCTAssertFalse(client.clientCompleted, "a client must refuse a server certificate from another CA")
        XCTAssertNotNil(client.clientError)
    }

    func testClientWithoutCertificateIsRefused() throws {
        var noCert = try credentials("node-b").clusterClient()
        noCert.certificateChain = []
        noCert.privateKey = nil
        let outcome = try handshake(client: noCert, server: try credentials("node-a").clusterServer())
        XCTAssertFalse(outcome.serverCompleted)
        XCTAssertNotNil(outcome.serverError)
    }

    func testExpiredCertificateIsRefused() throws {
        try ca.issue(PeerIdentity(role: .node, name: "old"), validityDays: 1, now: Date().addingTimeInterval(-10 * 86400), into: dir)
        let outcome = try handshake(client: try credentials("old").clusterClient(), server: try credentials("node-a").clusterServer())
        XCTAssertFalse(outcome.serverCompleted)
        XCTAssertNotNil(outcome.serverError)
    }

    func testClusterRefusesTLS12() throws {
        var old = try credentials("node-b").clusterClient()
        old.minimumTLSVersion = .tlsv12
        old.maximumTLSVersion = .tlsv12
        let outcome = try handshake(client: old, server: try credentials("node-a").clusterServer())
        XCTAssertFalse(outcome.clientCompleted)
        XCTAssertFalse(outcome.serverCompleted)
    }

    func testClientFacingServerRefusesTLS11AndAcceptsTLS12() throws {
        let node = try credentials("node-a")
        var legacy = TLSConfiguration.makeClientConfiguration()
        legacy.trustRoots = .certificates([node.clusterCA])
        legacy.minimumTLSVersion = .tlsv1
        legacy.maximumTLSVersion = .tlsv11
        XCTAssertFalse(try handshake(client: legacy, server: node.clientFacingServer(), sendData: false).clientCompleted)
        var modern = legacy
        modern.maximumTLSVersion = .tlsv12
        modern.minimumTLSVersion = .tlsv12
        XCTAssertTrue(try handshake(client: modern, server: node.clientFacingServer(), sendData: false).clientCompleted)
    }

    func testPrivateKeysAreMode0600AndCAIsNotOverwritten() throws {
        for file in ["ca.key", "node-a.key", "gw-1.key"] {
            let mode = try FileManager.default.attributesOfItem(atPath: dir + "/" + file)[.posixPermissions] as? Int
            XCTAssertEqual(mode, 0o600, file)
        }
        XCTAssertThrowsError(try CertificateAuthority.create(in: dir))
        XCTAssertThrowsError(try ca.issue(PeerIdentity(role: .node, name: "../evil"), into: dir))
    }
}
