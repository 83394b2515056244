import ApiaryCore
import ApiaryGateway
import Foundation

/// A ``RateLimiter`` shared by a server's connections (behind a lock): per client address at a
/// gateway, per tenant at a node.
final class SharedRateLimit: @unchecked Sendable {
    private let lock = NSLock()
    private var limiter: RateLimiter

    init(_ config: RateLimiter.Config) { limiter = RateLimiter(config: config) }

    /// Nil when admitted; else in how many milliseconds the next request for `key` would be.
    func admit(_ key: String) -> Int64? {
        let now = monotonicNowMs()
        return lock.withLock {
            if case .refused(let ms) = limiter.admit(key, now: now) { return ms }
            return nil
        }
    }
}
