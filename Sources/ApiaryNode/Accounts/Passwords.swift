import Crypto
import Foundation
import _CryptoExtras

/// Stored passwords: scrypt (memory-hard, so a stolen table is slow to attack on GPUs), a
/// random salt per password, parameters kept with the hash so they can grow later.
///
/// Format: `scrypt$<log2 N>$<r>$<p>$<salt, base64>$<hash, base64>`.
enum Passwords {
    /// N = 2^15, r = 8, p = 1: 32 MiB and tens of milliseconds per check. Verified
    /// credentials are cached (``CredentialCache``), so this is paid once per client and
    /// cache window, not per request.
    static let logN = 15, r = 8, p = 1
    static let hashBytes = 32, saltBytes = 16
    /// Passwords longer than this are refused (scrypt's cost does not grow with length, but a
    /// bound keeps every input bounded).
    static let lengthMax = 1024

    static func hash(_ password: String) throws -> String {
        var salt = [UInt8](repeating: 0, count: saltBytes)
        var rng = SystemRandomNumberGenerator()
        for i in salt.indices { salt[i] = UInt8.random(in: .min ... .max, using: &rng) }
        let derived = try derive(password, salt: salt, logN: logN, r: r, p: p)
        return "scrypt$\(logN)$\(r)$\(p)$\(Data(salt).base64EncodedString())$\(Data(derived).base64EncodedString())"
    }

    /// Whether `password` matches `stored`, compared in constant time.
    static func verify(_ password: String, against stored: String) -> Bool {
        let parts = stored.split(separator: "$").map(String.init)
        guard parts.count == 6, parts[0] == "scrypt", let logN = Int(parts[1]), let r = Int(parts[2]), let p = Int(parts[3]),
              (10...20).contains(logN), (1...16).contains(r), (1...4).contains(p),
              let salt = Data(base64Encoded: parts[4]), let expected = Data(base64Encoded: parts[5]),
              let derived = try? derive(password, salt: Array(salt), logN: logN, r: r, p: p) else { return false }
        return constantTimeEqual(derived, Array(expected))
    }

    /// The same work as a real check, for an unknown user: a wrong user name and a wrong
    /// password take the same time, so timing does not tell which user names exist.
    static func verifyAgainstNothing(_ password: String) {
        _ = verify(password, against: dummy)
    }

    private static let dummy: String = {
        // Without it unknown users would be answered fast: a timing oracle for user names.
        guard let hashed = try? hash("apiary-no-such-user") else { preconditionFailure("scrypt does not work here") }
        return hashed
    }()

    /// Makes the dummy hash now rather than at the first unknown user.
    static func prepareDummy() { _ = dummy }

    private static func derive(_ password: String, salt: [UInt8], logN: Int, r: Int, p: Int) throws -> [UInt8] {
        let key = try KDF.Scrypt.deriveKey(from: Array(password.utf8), salt: salt, outputByteCount: hashBytes,
                                           rounds: 1 << logN, blockSize: r, parallelism: p)
        return key.withUnsafeBytes { Array($0) }
    }

    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for i in a.indices { difference |= a[i] ^ b[i] }
        return difference == 0
    }
}
