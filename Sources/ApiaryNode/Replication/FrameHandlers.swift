import ApiaryCore
import ApiaryReplication
import NIOCore

/// Splits the TLS byte stream into replication frames and decodes them. Decoding errors are
/// passed on as values so that the core decides (it closes the connection with a reason).
final class MessageDecoder: ByteToMessageDecoder {
    typealias InboundOut = Result<Message, DecodeError>

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        let bodyLength: Int
        do {
            bodyLength = try WireCodec.validateBodyLength(length)
        } catch let error as DecodeError {
            buffer.moveReaderIndex(to: buffer.writerIndex) // nothing after a bad frame can be trusted
            context.fireChannelRead(wrapInboundOut(.failure(error)))
            return .needMoreData
        }
        guard buffer.readableBytes >= WireCodec.lengthPrefixBytes + bodyLength else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: WireCodec.lengthPrefixBytes)
        let body = buffer.readBytes(length: bodyLength)!
        do {
            context.fireChannelRead(wrapInboundOut(.success(try WireCodec.decode(body: body))))
        } catch let error as DecodeError {
            context.fireChannelRead(wrapInboundOut(.failure(error)))
        }
        return .continue
    }
}

/// Encodes outbound messages into frames.
final class MessageEncoder: ChannelOutboundHandler {
    typealias OutboundIn = Message
    typealias OutboundOut = ByteBuffer

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let message = unwrapOutboundIn(data)
        let frame = WireCodec.encodeFrame(message)
        context.write(wrapOutboundOut(context.channel.allocator.buffer(bytes: frame)), promise: promise)
    }
}

/// Hands decoded messages and connection events of one connection to the node's driver.
final class ConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = Result<Message, DecodeError>

    let onMessage: (Result<Message, DecodeError>) -> Void
    let onClose: () -> Void

    init(onMessage: @escaping (Result<Message, DecodeError>) -> Void, onClose: @escaping () -> Void) {
        self.onMessage = onMessage
        self.onClose = onClose
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        onMessage(unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        onClose()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
