import NIOCore
import NIOPosix
import NIOSSL

/// The load generator of `apiary bench`: closed-loop clients, each one keep-alive HTTPS
/// connection sending the same pre-encoded request as soon as the previous answer arrives.
///
/// Written on raw NIO rather than `HTTPSConnection` because the generator shares the 2 cores
/// with the nodes it measures: every microsecond it spends is taken from them. pgbench, the
/// other side of the comparison, is a lean C client; so is this: no HTTP codec, no task per
/// request, no allocation per request beyond NIO's buffers. It parses only what it needs from a
/// response (status, `Content-Length`, and whether the body reports an error) and trusts
/// nothing else in it.
final class BenchLoad: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    struct Outcome {
        var latenciesNs: [UInt64] = []
        var errors = 0
        var failure: (any Error)?
    }

    private let request: ByteBuffer
    private let deadline: NIODeadline
    private let done: EventLoopPromise<Outcome>
    private var outcome = Outcome()
    private var sentAt = NIODeadline.uptimeNanoseconds(0)
    private var received: ByteBuffer?
    /// Responses larger than this are a broken server, not a benchmark result.
    private static let responseBytesMax = 1 << 20

    init(request: ByteBuffer, deadline: NIODeadline, done: EventLoopPromise<Outcome>) {
        self.request = request
        self.deadline = deadline
        self.done = done
        outcome.latenciesNs.reserveCapacity(1 << 16)
    }

    /// Starts the loop once TLS is up (the first write waits for the handshake).
    func channelActive(context: ChannelHandlerContext) {
        send(context: context)
        context.fireChannelActive()
    }

    private func send(context: ChannelHandlerContext) {
        sentAt = .now()
        context.writeAndFlush(wrapOutboundOut(request), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if received == nil {
            received = bytes
        } else {
            received!.writeBuffer(&bytes)
        }
        guard let response = Self.parse(received!) else {
            if received!.readableBytes > Self.responseBytesMax { finish(context: context, failure: BenchError("response larger than \(Self.responseBytesMax) bytes")) }
            return
        }
        let now = NIODeadline.now()
        received!.moveReaderIndex(forwardBy: response.bytes)
        if received!.readableBytes == 0 { received = nil }
        if response.ok {
            outcome.latenciesNs.append(now.uptimeNanoseconds - sentAt.uptimeNanoseconds)
        } else {
            outcome.errors += 1
        }
        if now < deadline {
            send(context: context)
        } else {
            finish(context: context, failure: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(context: context, failure: BenchError("the server closed the connection"))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish(context: context, failure: error)
    }

    private var finished = false
    private func finish(context: ChannelHandlerContext, failure: (any Error)?) {
        guard !finished else { return }
        finished = true
        outcome.failure = failure
        done.succeed(outcome)
        context.close(promise: nil)
    }

    /// One whole response at the front of `buffer`: its size, and whether it is a 200 whose
    /// body reports no statement error. Nil while incomplete.
    static func parse(_ buffer: ByteBuffer) -> (bytes: Int, ok: Bool)? {
        buffer.withUnsafeReadableBytes { raw -> (Int, Bool)? in
            let headEnd = headerEnd(raw)
            guard let headEnd else { return nil }
            // "HTTP/1.1 200 ..."
            let ok200 = raw.count > 12 && raw[9] == UInt8(ascii: "2") && raw[10] == UInt8(ascii: "0") && raw[11] == UInt8(ascii: "0")
            guard let length = contentLength(raw[..<headEnd]) else { return (headEnd, false) }
            let total = headEnd + length
            guard raw.count >= total else { return nil }
            return (total, ok200 && !contains(raw[headEnd..<total], Array(#""error""#.utf8)))
        }
    }

    private static func headerEnd(_ raw: UnsafeRawBufferPointer) -> Int? {
        guard raw.count >= 4 else { return nil }
        for i in 3..<raw.count where raw[i] == 10 && raw[i - 1] == 13 && raw[i - 2] == 10 && raw[i - 3] == 13 { return i + 1 }
        return nil
    }

    private static func contentLength(_ head: Slice<UnsafeRawBufferPointer>) -> Int? {
        let name = Array("\ncontent-length:".utf8)
        var i = head.startIndex
        while i + name.count <= head.endIndex {
            var matches = true
            for (k, c) in name.enumerated() where head[i + k] | 0x20 != c | 0x20 { matches = false; break }
            if matches {
                var j = i + name.count
                while j < head.endIndex, head[j] == UInt8(ascii: " ") { j += 1 }
                var value = 0
                while j < head.endIndex, head[j] >= UInt8(ascii: "0"), head[j] <= UInt8(ascii: "9"), value < responseBytesMax {
                    value = value * 10 + Int(head[j] - UInt8(ascii: "0"))
                    j += 1
                }
                return value
            }
            i += 1
        }
        return nil
    }

    private static func contains(_ haystack: Slice<UnsafeRawBufferPointer>, _ needle: [UInt8]) -> Bool {
        guard haystack.count >= needle.count else { return false }
        var i = haystack.startIndex
        while i + needle.count <= haystack.endIndex {
            if haystack[i] == needle[0] && zip(haystack[i..<(i + needle.count)], needle).allSatisfy({ $0 == $1 }) { return true }
            i += 1
        }
        return false
    }

    /// Runs `clients` connections against `port` until `deadline`.
    static func run(clients: Int, port: Int, tls: TLSConfiguration, request: [UInt8], until deadline: NIODeadline,
                    group: any EventLoopGroup) async throws -> [Outcome] {
        let context = try NIOSSLContext(configuration: tls)
        var outcomes: [EventLoopFuture<Outcome>] = []
        var channels: [any Channel] = []
        defer { for c in channels { c.close(promise: nil) } }
        for _ in 0..<clients {
            let loop = group.next()
            let done = loop.makePromise(of: Outcome.self)
            let channel = try await ClientBootstrap(group: loop)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: nil))
                        try channel.pipeline.syncOperations.addHandler(BenchLoad(request: channel.allocator.buffer(bytes: request), deadline: deadline, done: done))
                    }
                }
                .connect(host: "127.0.0.1", port: port).get()
            channels.append(channel)
            outcomes.append(done.futureResult)
        }
        var results: [Outcome] = []
        for future in outcomes {
            let outcome = try await future.get()
            if let failure = outcome.failure { throw failure }
            results.append(outcome)
        }
        return results
    }
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
