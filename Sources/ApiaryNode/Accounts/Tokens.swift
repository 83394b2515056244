import Crypto
import Foundation

/// Bearer tokens: `apiary_<id>_<secret>`, for clients that send `Authorization: Bearer …`
/// instead of a user name and password. The id (16 hex digits) finds the token's row; the
/// secret (32 random bytes, base64url) proves it. The system database keeps only a SHA-256 of
/// the secret: a secret of 256 random bits cannot be guessed from its hash the way a password
/// can, so a memory-hard KDF would cost every sign-in and protect nothing more.
enum Tokens {
    static let prefix = "apiary_"
    static let idHexDigits = 16
    static let secretBytes = 32
    /// Lifetimes a token may be given; 30 days when none is asked for.
    static let ttlSecondsDefault = 30 * 86_400
    static let ttlSecondsMax = 365 * 86_400
    /// Unexpired tokens a user may have at once (the system database stays bounded).
    static let perUserMax = 20

    /// A new token: its id, the whole token (shown once), and the hash to store.
    static func make() -> (id: String, token: String, hash: String) {
        var rng = SystemRandomNumberGenerator()
        let id = (0..<idHexDigits / 2).map { _ in String(format: "%02x", UInt8.random(in: .min ... .max, using: &rng)) }.joined()
        let secret = Data((0..<secretBytes).map { _ in UInt8.random(in: .min ... .max, using: &rng) }).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        return (id, prefix + id + "_" + secret, hash(secret))
    }

    /// `apiary_<id>_<secret>` → (id, secret); nil for anything else.
    static func parse(_ token: Substring) -> (id: String, secret: String)? {
        guard token.hasPrefix(prefix) else { return nil }
        let rest = token.dropFirst(prefix.count)
        guard let underscore = rest.firstIndex(of: "_") else { return nil }
        let id = rest[..<underscore], secret = rest[rest.index(after: underscore)...]
        guard id.count == idHexDigits, id.allSatisfy({ $0.isHexDigit && !$0.isUppercase }),
              secret.count == 43, secret.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }), secret.allSatisfy(\.isASCII) else { return nil }
        return (String(id), String(secret))
    }

    static func hash(_ secret: String) -> String {
        SHA256.hash(data: Array(secret.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// Whether `secret` is the one `stored` is the hash of, compared in constant time.
    static func verify(_ secret: String, against stored: String) -> Bool {
        Passwords.constantTimeEqual(Array(hash(secret).utf8), Array(stored.utf8))
    }
}
