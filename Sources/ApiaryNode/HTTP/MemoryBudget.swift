/// One node's budget for the memory its clients make it hold (invariant 8): open connections
/// (TLS and decoder buffers, a fixed charge each), request bodies from their head until their
/// answer is written, and answers until the socket has taken them. Per-connection limits
/// alone do not bound the sum: 4,096 connections each with an 8 MiB body are 32 GiB.
///
/// Past the budget a new connection is closed at accept, and a new request is answered 503
/// (not executed, safe to retry) without its body being kept. An answer is never refused (its
/// work is done; a write's outcome would become unknown): it is counted even past the budget,
/// which then refuses new work until it is written.
final class MemoryBudget: Sendable {
    let bytesMax: Int
    private let used = LockedValue(0)

    init(bytesMax: Int) {
        precondition(bytesMax > 0, "a memory budget needs bytes, got \(bytesMax)")
        self.bytesMax = bytesMax
    }

    /// Takes `bytes` if they fit.
    func tryReserve(_ bytes: Int) -> Bool {
        precondition(bytes >= 0, "reserving \(bytes) bytes")
        return used.withLock { used in
            guard used + bytes <= bytesMax else { return false }
            used += bytes
            return true
        }
    }

    /// Takes `bytes` whether or not they fit (what is already computed must still be sent).
    func reserve(_ bytes: Int) {
        precondition(bytes >= 0, "reserving \(bytes) bytes")
        used.withLock { $0 += bytes }
    }

    func release(_ bytes: Int) {
        used.withLock { used in
            precondition(bytes >= 0 && bytes <= used, "releasing \(bytes) bytes of \(used) reserved")
            used -= bytes
        }
    }

    var usedBytes: Int { used.withLock { $0 } }
}
