#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// When each held packet goes on: `delayMs` plus or minus up to `jitterMs`, uniformly; and
/// `reorderPercent` of the packets at once, overtaking those held (as netem's reorder does).
/// Pure: the delayer asks it for each packet, tests drive it with a seeded generator.
public struct DelaySchedule: Sendable, Equatable {
    public var delayMs: Int
    public var jitterMs: Int
    public var reorderPercent: Int

    public init(delayMs: Int, jitterMs: Int = 0, reorderPercent: Int = 0) {
        precondition(delayMs >= 0 && jitterMs >= 0 && jitterMs <= delayMs && (0...100).contains(reorderPercent),
                     "delay \(delayMs) ms, jitter \(jitterMs) ms (at most the delay), reorder \(reorderPercent)%")
        self.delayMs = delayMs
        self.jitterMs = jitterMs
        self.reorderPercent = reorderPercent
    }

    /// How long the packet arriving now is held, in ms.
    public func holdMs(using rng: inout some RandomNumberGenerator) -> Int {
        if reorderPercent > 0, Int.random(in: 0..<100, using: &rng) < reorderPercent { return 0 }
        return jitterMs == 0 ? delayMs : delayMs + Int.random(in: -jitterMs...jitterMs, using: &rng)
    }
}

/// Holds packets that a firewall rule sent to an NFQUEUE queue (`iptables … -j NFQUEUE
/// --queue-num N --queue-bypass`) and lets each go on when ``DelaySchedule`` says: link delay,
/// jitter and reordering without netem (this kernel has none), in the network namespace it
/// runs in. Speaks nfnetlink_queue itself (no libnetfilter_queue): bind the queue, take each
/// packet's id (metadata only, no payload copied), give the verdict "accept" later.
///
/// Run by `apiary chaos delay-packets` inside a zone's namespace. Stopped (SIGTERM, or its
/// run gone), it accepts what it holds first; from then on packets pass (`--queue-bypass`).
/// Killed outright, what it held is dropped by the kernel (the runner reports a delayer that
/// ended before its fault did).
///
/// Releasing packets in the order of their times means jitter reorders them too, as netem's
/// jitter does; `reorderPercent` adds packets that overtake all held ones.
public final class PacketDelayer {
    let queue: UInt16
    let schedule: DelaySchedule
    private let socket: Int32
    private var held: [(releaseAtNs: UInt64, id: UInt32)] = []

    // nfnetlink_queue (linux/netfilter/nfnetlink_queue.h).
    static let netlinkNetfilter: Int32 = 12
    static let subsystemQueue: UInt16 = 3
    static let messagePacket: UInt16 = 0, messageVerdict: UInt16 = 1, messageConfig: UInt16 = 2
    static let commandBind: UInt8 = 1
    static let attributeCommand: UInt16 = 1, attributeParameters: UInt16 = 2, attributeQueueMaxLength: UInt16 = 3
    static let attributeMask: UInt16 = 4, attributeFlags: UInt16 = 5
    static let attributePacketHeader: UInt16 = 1, attributeVerdictHeader: UInt16 = 2
    static let copyMeta: UInt8 = 1
    static let flagFailOpen: UInt32 = 1
    static let verdictAccept: UInt32 = 1
    static let requestFlag: UInt16 = 1, ackFlag: UInt16 = 4

    public init(queue: UInt16, schedule: DelaySchedule) throws {
        self.queue = queue
        self.schedule = schedule
        socket = Glibc.socket(AF_NETLINK, Int32(SOCK_RAW.rawValue), Self.netlinkNetfilter)
        guard socket >= 0 else { throw ChaosError("cannot open a netfilter netlink socket: \(String(cString: strerror(errno)))") }
        // struct sockaddr_nl (Swift's Glibc module leaves it out): family, pad, port id 0 (the
        // kernel assigns one), no groups.
        let local: [UInt8] = Self.little16Bytes(UInt16(AF_NETLINK)) + [UInt8](repeating: 0, count: 10)
        let bound = local.withUnsafeBytes { bind(socket, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) }
        guard bound == 0 else { throw ChaosError("cannot bind the netlink socket: \(String(cString: strerror(errno)))") }
        // Bind the queue for IPv4; copy only metadata (the id is all a verdict needs); a full
        // queue lets packets through rather than dropping them (a delay fault, not loss).
        try configure("bind", Self.attribute(Self.attributeCommand, [Self.commandBind, 0] + Self.big16(UInt16(AF_INET))))
        try configure("copy mode", Self.attribute(Self.attributeParameters, Self.big32(0) + [Self.copyMeta]))
        try configure("length", Self.attribute(Self.attributeQueueMaxLength, Self.big32(8192)))
        try configure("fail-open", Self.attribute(Self.attributeFlags, Self.big32(Self.flagFailOpen)) + Self.attribute(Self.attributeMask, Self.big32(Self.flagFailOpen)))
    }

    deinit { close(socket) }

    /// Holds and releases packets until `stop()` says so (checked at least every 100 ms).
    public func run(seed: UInt64, stop: () -> Bool) throws {
        var rng = SeededGenerator(seed: seed)
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while !stop() {
            let now = Self.nowNs()
            // Released in order of their time, which jitter and reordering make differ from
            // the order they came in.
            while let first = held.first, first.releaseAtNs <= now {
                held.removeFirst()
                try verdict(first.id)
            }
            let waitMs = held.first.map { Int32(min(100, ($0.releaseAtNs - now + 999_999) / 1_000_000)) } ?? 100
            var poller = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, waitMs) > 0 else { continue }
            let count = recv(socket, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            guard count > 0 else {
                if errno == EAGAIN || errno == EINTR || errno == ENOBUFS { continue } // ENOBUFS: the kernel dropped some messages (fail-open accepts)
                throw ChaosError("reading the queue failed: \(String(cString: strerror(errno)))")
            }
            for id in Self.packetIDs(in: buffer[..<count]) {
                let hold = schedule.holdMs(using: &rng)
                if hold == 0 { try verdict(id); continue }
                let entry = (releaseAtNs: Self.nowNs() + UInt64(hold) * 1_000_000, id: id)
                held.insert(entry, at: held.firstIndex { $0.releaseAtNs > entry.releaseAtNs } ?? held.endIndex)
            }
        }
        for entry in held { try? verdict(entry.id) }
        held.removeAll()
    }

    // MARK: Messages

    /// The ids of the packets in a batch of netlink messages.
    static func packetIDs(in bytes: ArraySlice<UInt8>) -> [UInt32] {
        var ids: [UInt32] = []
        var offset = bytes.startIndex
        while offset + 16 <= bytes.endIndex {
            let length = Int(little32(bytes, offset))
            guard length >= 16, offset + length <= bytes.endIndex else { break }
            let type = little16(bytes, offset + 4)
            if type == (subsystemQueue << 8) | messagePacket {
                var a = offset + 16 + 4 // netlink header, nfgenmsg
                while a + 4 <= offset + length {
                    let attributeLength = Int(little16(bytes, a))
                    guard attributeLength >= 4, a + attributeLength <= offset + length else { break }
                    // The type without the nested and byte-order flags (NLA_TYPE_MASK).
                    if little16(bytes, a + 2) & 0x3FFF == attributePacketHeader, attributeLength >= 8 {
                        ids.append(UInt32(bytes[a + 4]) << 24 | UInt32(bytes[a + 5]) << 16 | UInt32(bytes[a + 6]) << 8 | UInt32(bytes[a + 7]))
                    }
                    a += (attributeLength + 3) & ~3
                }
            }
            offset += (length + 3) & ~3
        }
        return ids
    }

    private func verdict(_ id: UInt32) throws {
        try send(type: Self.messageVerdict, flags: Self.requestFlag, Self.attribute(Self.attributeVerdictHeader, Self.big32(Self.verdictAccept) + Self.big32(id)))
    }

    private func configure(_ what: String, _ attributes: [UInt8]) throws {
        try send(type: Self.messageConfig, flags: Self.requestFlag | Self.ackFlag, attributes)
        var answer = [UInt8](repeating: 0, count: 65_536)
        // The ack is an error message (type 2) whose code is 0 on success. A packet may come
        // first (a rule already in place): it is let through at once.
        for _ in 0..<64 {
            let count = recv(socket, &answer, answer.count, 0)
            guard count >= 16 else { throw ChaosError("the queue's configuration got no answer: \(String(cString: strerror(errno)))") }
            guard count >= 20, Self.little16(answer[...], 4) == 2 else {
                for id in Self.packetIDs(in: answer[..<count]) { try verdict(id) }
                continue
            }
            let code = Int32(bitPattern: Self.little32(answer[...], 16))
            guard code == 0 else { throw ChaosError("configuring queue \(queue) (\(what)) failed: \(String(cString: strerror(-code)))") }
            return
        }
        throw ChaosError("configuring queue \(queue) (\(what)): no answer among the packets")
    }

    private func send(type: UInt16, flags: UInt16, _ attributes: [UInt8]) throws {
        let body = [UInt8(AF_UNSPEC), 0] + Self.big16(queue) + attributes
        let length = UInt32(16 + body.count)
        var message = Self.little32Bytes(length) + Self.little16Bytes((Self.subsystemQueue << 8) | type) + Self.little16Bytes(flags)
        message += [UInt8](repeating: 0, count: 8) + body // sequence, port id
        let sent = message.withUnsafeBytes { Glibc.send(socket, $0.baseAddress, $0.count, 0) }
        guard sent == message.count else { throw ChaosError("writing to the queue failed: \(String(cString: strerror(errno)))") }
    }

    static func attribute(_ type: UInt16, _ payload: [UInt8]) -> [UInt8] {
        let length = UInt16(4 + payload.count)
        return little16Bytes(length) + little16Bytes(type) + payload + [UInt8](repeating: 0, count: (4 - Int(length) % 4) % 4)
    }

    static func big16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
    static func big32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)] }
    static func little16Bytes(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xFF), UInt8(v >> 8)] }
    static func little32Bytes(_ v: UInt32) -> [UInt8] { [UInt8(v & 0xFF), UInt8((v >> 8) & 0xFF), UInt8((v >> 16) & 0xFF), UInt8(v >> 24)] }
    static func little16(_ b: ArraySlice<UInt8>, _ i: Int) -> UInt16 { UInt16(b[i]) | UInt16(b[i + 1]) << 8 }
    static func little32(_ b: ArraySlice<UInt8>, _ i: Int) -> UInt32 { UInt32(b[i]) | UInt32(b[i + 1]) << 8 | UInt32(b[i + 2]) << 16 | UInt32(b[i + 3]) << 24 }

    static func nowNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

/// A small seeded generator (SplitMix64): the same seed, the same delays.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
