import Foundation

/// A fixed set of threads for blocking SQLite work: SQLite calls block (fsync, and the capture
/// waiting for the standby), so they never run on NIO event loops or Swift's cooperative pool
/// (DESIGN §4). Tenants share the pool, so the thread count stays bounded however many tenants
/// are open; each tenant keeps its own order by scheduling one drain at a time (a mailbox).
public final class BlockingPool: @unchecked Sendable {
    public let threadCount: Int
    private let condition = NSCondition()
    private var work: [() -> Void] = []

    /// The pools every tenant database uses unless given others.
    public static let writers = BlockingPool(threads: 64, name: "apiary-writer")
    public static let readers = BlockingPool(threads: 32, name: "apiary-reader")

    /// - Parameter threads: how many tenants can run blocking work at once.
    public init(threads: Int, name: String) {
        precondition(threads > 0, "a pool needs threads, got \(threads)")
        threadCount = threads
        for i in 0..<threads {
            let thread = Thread { [unowned self] in self.loop() }
            thread.name = "\(name)-\(i)"
            thread.start()
        }
    }

    /// Runs `body` on a pool thread. Callers bound what they submit: a tenant has at most one
    /// drain scheduled per mailbox, so the queue holds at most a few entries per open tenant.
    func submit(_ body: @escaping () -> Void) {
        condition.lock()
        work.append(body)
        condition.unlock()
        // Signalled after unlocking: a thread woken while the lock is still held would only
        // block again on the lock, one more sleep and wake-up on every hand-off.
        condition.signal()
    }

    /// Whether submitted work waits for a free thread (then long-running users should yield).
    var hasWaitingWork: Bool {
        condition.lock()
        defer { condition.unlock() }
        return !work.isEmpty
    }

    /// Runs blocking `body` on a pool thread and returns its result to the async caller.
    public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            submit { continuation.resume(with: Result { try body() }) }
        }
    }

    private func loop() {
        while true {
            condition.lock()
            while work.isEmpty { condition.wait() }
            let next = work.removeFirst()
            condition.unlock()
            next()
        }
    }
}
