import Foundation
import Logging

// Signals that tests wait for instead of sleeping: a test orders events by facts ("the server
// is answering the slow request", "the connection decided to close after it"), never by how
// long something probably takes.

/// A gate a service call waits at until the test opens it (and stays open). Also says how
/// many calls have reached it.
final class Gate: @unchecked Sendable {
    private let lock = NSLock()
    private var isOpen = false
    private var arrivals = 0
    private var waiting: [CheckedContinuation<Void, Never>] = []
    private var arrivalWaiters: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []

    /// Waits until the gate is open.
    func pass() async {
        await withCheckedContinuation { continuation in
            let (passes, ready) = lock.withLock { () -> (Bool, [CheckedContinuation<Void, Never>]) in
                arrivals += 1
                if !isOpen { waiting.append(continuation) }
                return (isOpen, takeArrivalWaiters())
            }
            ready.forEach { $0.resume() }
            if passes { continuation.resume() }
        }
    }

    func open() {
        let released = lock.withLock { () -> [CheckedContinuation<Void, Never>] in
            isOpen = true
            defer { waiting = [] }
            return waiting
        }
        released.forEach { $0.resume() }
    }

    /// Waits until `count` calls have reached the gate; false after `seconds`.
    func reached(_ count: Int = 1, seconds: Double = 10) async -> Bool {
        (try? await within(seconds) { [self] in
            await withCheckedContinuation { continuation in
                let now = lock.withLock { () -> Bool in
                    if arrivals >= count { return true }
                    arrivalWaiters.append((count, continuation))
                    return false
                }
                if now { continuation.resume() }
            }
        }) != nil
    }

    /// Caller holds `lock`.
    private func takeArrivalWaiters() -> [CheckedContinuation<Void, Never>] {
        var ready: [CheckedContinuation<Void, Never>] = []
        arrivalWaiters.removeAll { waiter in
            guard arrivals >= waiter.count else { return false }
            ready.append(waiter.continuation)
            return true
        }
        return ready
    }
}

/// What a server logged, as signals: `LogSignals.logger` logs everything (trace and up) here
/// and nowhere else, and a test waits for the message that says the server got somewhere.
final class LogSignals: @unchecked Sendable {
    private let lock = NSLock()
    private var messages: [String] = []
    private var waiters: [(text: String, count: Int, continuation: CheckedContinuation<Void, Never>)] = []

    func logger(label: String) -> Logger {
        Logger(label: label) { _ in Handler(signals: self) }
    }

    /// How many messages so far contain `text` (message and metadata).
    func count(_ text: String) -> Int { lock.withLock { countLocked(text) } }

    /// Waits until `count` messages contain `text`; false after `seconds`.
    func wait(for text: String, count: Int = 1, seconds: Double = 10) async -> Bool {
        (try? await within(seconds) { [self] in
            await withCheckedContinuation { continuation in
                let now = lock.withLock { () -> Bool in
                    if countLocked(text) >= count { return true }
                    waiters.append((text, count, continuation))
                    return false
                }
                if now { continuation.resume() }
            }
        }) != nil
    }

    fileprivate func record(_ message: String) {
        let ready = lock.withLock { () -> [CheckedContinuation<Void, Never>] in
            messages.append(message)
            var ready: [CheckedContinuation<Void, Never>] = []
            waiters.removeAll { waiter in
                guard countLocked(waiter.text) >= waiter.count else { return false }
                ready.append(waiter.continuation)
                return true
            }
            return ready
        }
        ready.forEach { $0.resume() }
    }

    private func countLocked(_ text: String) -> Int { messages.lazy.filter { $0.contains(text) }.count }

    private struct Handler: LogHandler {
        let signals: LogSignals
        var metadata: Logger.Metadata = [:]
        var metadataProvider: Logger.MetadataProvider?
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            let all = metadata.merging(event.metadata ?? [:]) { $1 }
            signals.record(all.isEmpty ? "\(event.message)" : "\(event.message) \(all)")
        }
    }
}
