import ApiaryCore
import ApiaryReplication
import ApiaryTLS
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS

/// Milliseconds for the cores: never the wall clock (it jumps), and CLOCK_BOOTTIME rather
/// than CLOCK_MONOTONIC, which stops while the machine is suspended: a primary suspended
/// past its lease must find the lease expired when it wakes, and a standby must count the
/// suspended time toward the lease it waits out (DESIGN §6).
func monotonicNowMs() -> Milliseconds {
    var now = timespec()
    clock_gettime(CLOCK_BOOTTIME, &now)
    return Milliseconds(now.tv_sec) * 1_000 + Milliseconds(now.tv_nsec) / 1_000_000
}

extension EventLoop {
    /// Runs `body` now when already on this loop, else enqueues it.
    func run(_ body: @escaping @Sendable () -> Void) {
        if inEventLoop { body() } else { execute(body) }
    }
}

/// Events a replication connection reports to its driver, all on the driver's event loop.
protocol ConnectionEvents: AnyObject, Sendable {
    /// TLS is up and the peer's identity was read from its certificate.
    func connected(_ id: ConnectionID, channel: any Channel, peer: ApiaryReplication.PeerIdentity)
    func received(_ id: ConnectionID, _ message: Result<Message, DecodeError>)
    func disconnected(_ id: ConnectionID)
}

/// Gives every connection a fresh id for the process's lifetime (the cores require it).
final class ConnectionIDs: @unchecked Sendable {
    private let lock = NSLock()
    private var next: UInt64 = 1
    func make() -> ConnectionID {
        lock.lock()
        defer { lock.unlock() }
        defer { next += 1 }
        return ConnectionID(next)
    }
}

/// Connections whose TLS handshake has not finished, bounded: a peer that connects and sends
/// nothing (or stalls mid-handshake) must not hold sockets and memory without limit.
final class UnfinishedHandshakes: Sendable {
    private let count = LockedValue(0)
    let max: Int
    init(max: Int) { self.max = max }

    /// Counts a new connection in until its handshake completes or it closes, or refuses it
    /// (nil) past `max`.
    func admit(_ channel: any Channel) -> Slot? {
        let admitted = count.withLock { n -> Bool in
            guard n < max else { return false }
            n += 1
            return true
        }
        guard admitted else { return nil }
        let slot = Slot(self)
        channel.closeFuture.whenComplete { _ in slot.release() }
        return slot
    }

    var current: Int { count.withLock { $0 } }

    /// One admitted connection's place, given back once.
    final class Slot: Sendable {
        private let owner: UnfinishedHandshakes
        private let released = LockedValue(false)
        init(_ owner: UnfinishedHandshakes) { self.owner = owner }
        func release() {
            guard released.withLock({ done in defer { done = true }; return !done }) else { return }
            owner.count.withLock { $0 -= 1 }
        }
    }
}

/// Waits for the TLS handshake, reads the peer's identity from its certificate, and only
/// then reports the connection. A peer without a valid apiary identity is dropped, and so is
/// one whose handshake does not finish within `handshakeTimeout` (TCP up, TLS stalled).
final class PeerIdentityHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Any
    let id: ConnectionID
    let events: any ConnectionEvents
    let driverLoop: any EventLoop
    private let handshakeTimeout: TimeAmount
    private let slot: UnfinishedHandshakes.Slot?
    private var deadline: Scheduled<Void>?
    /// The handshake ended (completed, or the connection closed first).
    private var settled = false

    /// - Parameter slot: the connection's place among the listener's unfinished handshakes.
    init(id: ConnectionID, events: any ConnectionEvents, driverLoop: any EventLoop, handshakeTimeout: TimeAmount,
         slot: UnfinishedHandshakes.Slot?) {
        self.id = id
        self.events = events
        self.driverLoop = driverLoop
        self.handshakeTimeout = handshakeTimeout
        self.slot = slot
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        deadline = context.eventLoop.scheduleTask(in: handshakeTimeout) { channel.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) { settle() }

    func channelInactive(context: ChannelHandlerContext) {
        settle()
        context.fireChannelInactive()
    }

    private func settle() {
        guard !settled else { return }
        settled = true
        deadline?.cancel()
        deadline = nil
        slot?.release()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            settle()
            let channel = context.channel
            let certificate = try? channel.pipeline.syncOperations.handler(type: NIOSSLHandler.self).peerCertificate
            guard let certificate, let identity = ClusterCredentials.identity(of: certificate) else {
                context.close(promise: nil)
                return
            }
            let role: PeerRole = identity.role == .node ? .node : .other(identity.role.rawValue)
            let peer = ApiaryReplication.PeerIdentity(nodeID: identity.name, role: role)
            let id = self.id, events = self.events
            driverLoop.run { events.connected(id, channel: channel, peer: peer) }
        }
        context.fireUserInboundEventTriggered(event)
    }
}

enum ClusterTransport {
    /// The pipeline every replication connection has, client or server side.
    /// A TLS handshake must finish within this long, on either side: a peer that connects and
    /// sends nothing is dropped (and a standby dials again) instead of holding the stream.
    static let handshakeTimeoutMs: Int64 = 5_000
    /// Connections a primary lets wait for their handshake at once; more are closed on accept.
    static let unfinishedHandshakesMax = 16

    static func configure(
        _ channel: any Channel, tls: NIOSSLHandler, id: ConnectionID, events: any ConnectionEvents, driverLoop: any EventLoop,
        slot: UnfinishedHandshakes.Slot? = nil
    ) throws {
        let ops = channel.pipeline.syncOperations
        try ops.addHandler(tls)
        try ops.addHandler(PeerIdentityHandler(id: id, events: events, driverLoop: driverLoop,
                                               handshakeTimeout: .milliseconds(handshakeTimeoutMs), slot: slot))
        try ops.addHandler(ByteToMessageHandler(MessageDecoder(), maximumBufferSize: WireCodec.frameBodyBytesMax + 64))
        try ops.addHandler(MessageEncoder())
        try ops.addHandler(ConnectionHandler(
            onMessage: { message in driverLoop.run { events.received(id, message) } },
            onClose: { driverLoop.run { events.disconnected(id) } }
        ))
    }

    /// Listens for replication connections (the primary side).
    static func listen(
        host: String, port: Int, group: any EventLoopGroup, credentials: ClusterCredentials,
        ids: ConnectionIDs, events: any ConnectionEvents, driverLoop: any EventLoop
    ) async throws -> any Channel {
        let context = try NIOSSLContext(configuration: credentials.clusterServer())
        let unfinished = UnfinishedHandshakes(max: unfinishedHandshakesMax)
        // Replication connections live on the driver's own loop: a message reaches the core
        // without a thread hop (a commit's latency is mostly hops and fsyncs).
        return try await ServerBootstrap(group: group, childGroup: driverLoop)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                guard let slot = unfinished.admit(channel) else { return channel.close() }
                return channel.eventLoop.makeCompletedFuture {
                    try configure(channel, tls: NIOSSLServerHandler(context: context), id: ids.make(), events: events, driverLoop: driverLoop,
                                  slot: slot)
                }
            }
            .bind(host: host, port: port).get()
    }

    /// Connects to the primary (the standby side). Bounded by `timeoutMs`.
    static func connect(
        host: String, port: Int, group: any EventLoopGroup, credentials: ClusterCredentials,
        id: ConnectionID, events: any ConnectionEvents, driverLoop: any EventLoop, timeoutMs: Int64
    ) -> EventLoopFuture<any Channel> {
        let context: NIOSSLContext
        do { context = try NIOSSLContext(configuration: credentials.clusterClient()) } catch {
            return driverLoop.makeFailedFuture(error)
        }
        return ClientBootstrap(group: driverLoop)
            .connectTimeout(.milliseconds(timeoutMs))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    // Hostname checks use the address we dial: it is in the node's SAN.
                    let tls = try NIOSSLClientHandler(context: context, serverHostname: hostnameForSNI(host))
                    try configure(channel, tls: tls, id: id, events: events, driverLoop: driverLoop)
                }
            }
            .connect(host: host, port: port)
    }

    /// SNI must be a DNS name, not an IP; an IP address is checked against IP SANs instead.
    static func hostnameForSNI(_ host: String) -> String? {
        CertificateAuthority.ipBytes(host) == nil ? host : nil
    }
}

/// The open replication connections of one node, by the ids the cores know them by.
/// Event-loop-only, like the core that names them.
///
/// A class, not a struct held in its node: closing a channel may report it inactive at once,
/// on the same stack, and the node then forgets it here. With a struct, that second access to
/// the node's property overlapped the first (the mutating `close`), a Swift exclusivity
/// violation that crashed a primary whose paused standby timed out (`GatewayTests`, a paused
/// primary). Each access here ends before a channel is closed.
final class ReplicationChannels {
    private var channels: [ConnectionID: any Channel] = [:]

    subscript(id: ConnectionID) -> (any Channel)? {
        get { channels[id] }
        set { channels[id] = newValue }
    }

    /// Writes `message`; false when the connection is already gone (the core must hear of it).
    func send(_ message: Message, on id: ConnectionID) -> Bool {
        guard let channel = channels[id] else { return false }
        channel.writeAndFlush(message, promise: nil)
        return true
    }

    /// Closes and forgets a connection; false if it was not open.
    @discardableResult
    func close(_ id: ConnectionID, reason: CloseReason? = nil, logger: Logger) -> Bool {
        guard let channel = channels.removeValue(forKey: id) else { return false }
        if let reason { logger.info("closing replication connection", metadata: ["connection": "\(id)", "reason": "\(reason)"]) }
        channel.close(promise: nil)
        return true
    }

    /// Forgets a connection that closed by itself; false if it was not open.
    func forget(_ id: ConnectionID) -> Bool { channels.removeValue(forKey: id) != nil }

    func closeAll() {
        let all = channels.values
        channels.removeAll()
        for channel in all { channel.close(promise: nil) }
    }
}
