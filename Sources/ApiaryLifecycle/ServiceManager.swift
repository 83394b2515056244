import CSystemd
import Foundation

/// Tells the service manager (systemd) how the process is doing, through libsystemd's
/// `sd_notify(3)`: `READY=1` once it serves, `STATUS=` lines an operator sees in
/// `systemctl status`, `STOPPING=1` on shutdown, and `WATCHDOG=1` pings. Outside systemd
/// (no `NOTIFY_SOCKET`, as under `apiary up` and in most tests) every call does nothing.
public enum ServiceManager {
    /// The process serves: systemd's `Type=notify` start completes now, not at exec.
    public static func ready(status: String) {
        notify("READY=1\nSTATUS=\(status)")
    }

    public static func status(_ status: String) {
        notify("STATUS=\(status)")
    }

    public static func stopping() {
        notify("STOPPING=1\nSTATUS=stopping")
    }

    public static func watchdogPing() {
        notify("WATCHDOG=1")
    }

    /// How often systemd expects a watchdog ping (`WatchdogSec=`), nil when it expects none.
    public static func watchdogIntervalMs() -> Int64? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return Int64(usec / 1000)
    }

    private static func notify(_ state: String) {
        // Newlines separate assignments; a status is one line (an error text may hold several).
        _ = sd_notify(0, state)
    }
}

/// Pings systemd's watchdog only while `check` proves the process healthy: a hung event loop
/// or a stuck commit path stops the pings, and systemd (`WatchdogSec=`) restarts the process.
/// Each round runs `check` with a deadline of half the interval; a check that does not finish
/// in time counts as failed.
public final class Watchdog: @unchecked Sendable {
    private let intervalMs: Int64
    private let check: @Sendable () async -> Bool
    private var task: Task<Void, Never>?
    private let lock = NSCondition()
    private var rounds = 0
    private var pings = 0

    /// - Parameters:
    ///   - intervalMs: systemd's watchdog interval; the check runs every half of it.
    ///   - check: true when the process is healthy. It MUST NOT block a thread: it should
    ///     only wait for its probes.
    public init(intervalMs: Int64, check: @escaping @Sendable () async -> Bool) {
        precondition(intervalMs > 0, "watchdog interval \(intervalMs) ms")
        self.intervalMs = intervalMs
        self.check = check
    }

    /// Rounds run and pings sent so far (for tests and metrics).
    public var counts: (rounds: Int, pings: Int) { lock.withLock { (rounds, pings) } }

    /// Waits until `rounds` rounds have run (or `deadline` passed) and returns the counts then.
    public func waitForRounds(_ rounds: Int, until deadline: Date) -> (rounds: Int, pings: Int) {
        lock.withLock {
            while self.rounds < rounds, lock.wait(until: deadline) {}
            return (self.rounds, pings)
        }
    }

    public func start() {
        let halfMs = max(1, intervalMs / 2)
        task = Task { [check, lock] in
            while !Task.isCancelled {
                let healthy = await Self.within(ms: halfMs, check)
                if healthy { ServiceManager.watchdogPing() }
                lock.withLock {
                    rounds += 1
                    if healthy { pings += 1 }
                    lock.broadcast()
                }
                try? await Task.sleep(for: .milliseconds(halfMs))
            }
        }
    }

    public func stop() {
        task?.cancel()
        task = nil
    }

    /// `body`'s answer, or false if it has none within `ms`. A probe that never answers (a hung
    /// loop) is left behind rather than awaited: the pings stop either way.
    static func within(ms: Int64, _ body: @escaping @Sendable () async -> Bool) async -> Bool {
        await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let once = ResumeOnce(continuation)
            Task { once.resume(await body()) }
            Task {
                try? await Task.sleep(for: .milliseconds(ms))
                once.resume(false)
            }
        }
    }
}

/// Resumes a continuation with the first of several answers.
private final class ResumeOnce: @unchecked Sendable {
    private let lock = NSLock()
    private var continuation: CheckedContinuation<Bool, Never>?
    init(_ continuation: CheckedContinuation<Bool, Never>) { self.continuation = continuation }
    func resume(_ value: Bool) {
        let c = lock.withLock { () -> CheckedContinuation<Bool, Never>? in
            defer { continuation = nil }
            return continuation
        }
        c?.resume(returning: value)
    }
}

/// The receiving end of the notify protocol, as systemd's socket is: a unix datagram socket
/// whose path goes into a child's `NOTIFY_SOCKET`. For tests of the protocol against real
/// processes (and anything that supervises nodes the way systemd does).
public final class NotifySocketListener: @unchecked Sendable {
    public let path: String
    private let fd: Int32

    /// Binds a new socket at `path` (which must not exist).
    public init(path: String) throws {
        self.path = path
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard fd >= 0, path.utf8.count < capacity else { throw CocoaError(.fileWriteInvalidFileName) }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            let bytes = Array(path.utf8)
            buffer.copyBytes(from: bytes)
            buffer[bytes.count] = 0
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Foundation.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else {
            close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EINVAL)
        }
        self.fd = fd
    }

    deinit {
        close(fd)
        unlink(path)
    }

    /// The next message, or nil if none arrives within `timeoutMs` (a bound, not an order).
    public func receive(timeoutMs: Int = 10_000) -> String? {
        var timeout = timeval(tv_sec: timeoutMs / 1000, tv_usec: (timeoutMs % 1000) * 1000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &buffer, buffer.count, 0)
        return n > 0 ? String(decoding: buffer[..<n], as: UTF8.self) : nil
    }

    /// Messages until one satisfies `matches` (returned), or nil once `timeoutMs` passes
    /// without one.
    public func receive(until matches: (String) -> Bool, timeoutMs: Int = 30_000) -> String? {
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(timeoutMs) * 1_000_000
        while DispatchTime.now().uptimeNanoseconds < deadline {
            let leftMs = Int((deadline - DispatchTime.now().uptimeNanoseconds) / 1_000_000) + 1
            guard let message = receive(timeoutMs: leftMs) else { return nil }
            if matches(message) { return message }
        }
        return nil
    }

    /// Drops whatever has arrived.
    public func drain() {
        while receive(timeoutMs: 1) != nil {}
    }
}
