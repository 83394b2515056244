import ApiaryCore

/// Requests per second per key (a client's address, a user), as token buckets: `burst`
/// requests at once, then `perSecond` on average. Pure: the shell passes `now` (monotonic ms).
///
/// Bounded (invariant 8): at most `keysMax` keys are remembered. A key whose bucket is full
/// again carries no information (a new key starts full), so those go first when room is
/// needed; if every bucket is still refilling, the oldest is forgotten (that client gets a full
/// bucket early, which errs on the side of serving it).
public struct RateLimiter: Sendable {
    public struct Config: Hashable, Sendable {
        public var perSecond: Double
        public var burst: Double
        public var keysMax: Int

        public init(perSecond: Double, burst: Double, keysMax: Int = 100_000) {
            precondition(perSecond > 0 && burst >= 1 && keysMax > 0, "invalid rate limit \(perSecond)/s, burst \(burst), keys \(keysMax)")
            self.perSecond = perSecond
            self.burst = burst
            self.keysMax = keysMax
        }
    }

    public enum Admission: Hashable, Sendable {
        case admitted
        /// Refused: the next request would be admitted in this many milliseconds.
        case refused(retryAfterMs: Int64)
    }

    private struct Bucket: Sendable {
        var tokens: Double
        var updatedAt: Int64
    }

    public let config: Config
    private var buckets: [String: Bucket] = [:]

    public init(config: Config) { self.config = config }

    /// Takes one token from `key`'s bucket if it has one.
    public mutating func admit(_ key: String, now: Int64) -> Admission {
        var bucket = buckets[key] ?? Bucket(tokens: config.burst, updatedAt: now)
        let elapsed = Double(max(0, now - bucket.updatedAt)) / 1000
        bucket.tokens = min(config.burst, bucket.tokens + elapsed * config.perSecond)
        bucket.updatedAt = now
        defer {
            if buckets[key] == nil, buckets.count >= config.keysMax { makeRoom(now: now) }
            buckets[key] = bucket
        }
        guard bucket.tokens >= 1 else {
            let waitMs = Int64(((1 - bucket.tokens) / config.perSecond * 1000).rounded(.up))
            return .refused(retryAfterMs: max(1, waitMs))
        }
        bucket.tokens -= 1
        return .admitted
    }

    /// Keys remembered now (for tests and metrics).
    public var keyCount: Int { buckets.count }

    private mutating func makeRoom(now: Int64) {
        let full = buckets.filter { _, b in b.tokens + Double(max(0, now - b.updatedAt)) / 1000 * config.perSecond >= config.burst }.map(\.key)
        if !full.isEmpty {
            for key in full { buckets[key] = nil }
        } else if let oldest = buckets.min(by: { $0.value.updatedAt < $1.value.updatedAt })?.key {
            buckets[oldest] = nil
        }
    }
}
