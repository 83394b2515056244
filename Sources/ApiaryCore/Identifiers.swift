/// A tenant's name: the key of its database, its log and its keys.
///
/// A tenant id MUST be 1...64 characters of `[a-z0-9_-]`, starting with a letter or digit,
/// so that it is safe as a file name and in a URL path on every node.
public struct TenantID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: String

    public static let lengthMax = 64

    public init(_ rawValue: String) throws {
        guard Self.isValid(rawValue) else { throw InvalidTenantID(rawValue: rawValue) }
        self.rawValue = rawValue
    }

    /// The cluster's own database (tenants, users): stored and replicated like a tenant's, and
    /// named so that no client can name it (a tenant id cannot start with '_').
    public static let system = TenantID(unchecked: "_system")

    private init(unchecked rawValue: String) { self.rawValue = rawValue }

    /// A tenant id as storage and replication know them: any valid tenant id, or ``system``.
    /// Clients' names MUST go through ``init(_:)`` instead.
    public init(stored rawValue: String) throws {
        if rawValue == Self.system.rawValue { self = .system } else { try self.init(rawValue) }
    }

    public static func isValid(_ s: String) -> Bool {
        let bytes = Array(s.utf8)
        guard !bytes.isEmpty, bytes.count <= lengthMax else { return false }
        func ok(_ b: UInt8) -> Bool {
            (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x5F || b == 0x2D
        }
        guard bytes.allSatisfy(ok), bytes[0] != 0x5F, bytes[0] != 0x2D else { return false }
        return true
    }

    public var description: String { rawValue }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
}

public struct InvalidTenantID: Error, CustomStringConvertible {
    public let rawValue: String
    public var description: String {
        "invalid tenant id: must be 1...\(TenantID.lengthMax) characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
    }
}

/// The cluster's term number. It only grows; each epoch has at most one writer (DESIGN §9.3).
public struct Epoch: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static let zero = Epoch(0)
    public var next: Epoch { Epoch(rawValue + 1) }
    public var description: String { String(rawValue) }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
}

/// Log sequence number: counts commits per tenant, starting at 1. `0` means "nothing yet".
public typealias LSN = UInt64

/// A node's identity in the cluster, as named in its certificate.
public typealias NodeID = String
