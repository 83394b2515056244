import ApiaryCore

// MARK: - The message set

/// Everything said on a replication connection (DESIGN §5). Wire format: ``WireCodec``.
///
/// Conversation:
/// ```
/// standby                                   primary
///   hello(version, node, epoch, positions) ──▶
///                                       ◀── welcome(epoch, node)     or reject(code, reason)
///                                       ◀── rewind(tenant, lsn)      discard a diverged tail
///                                       ◀── snapshotBegin/Pages/End  when the log cannot serve
///                                       ◀── record(tenant, record, committedLSN)  …pipelined
///   ack(tenant, lsn, leaseMs) ────────────▶  after fsync, cumulative
///                                       ◀── primaryHeartbeat(sentAt, committed per tenant)
///   standbyHeartbeat(echo sentAt, leaseMs) ─▶  answers each primary heartbeat
/// ```
/// Every message carries the sender's epoch: a node rejects a message from an older epoch
/// and reports a newer one (DESIGN §5, invariant 3).
public enum Message: Hashable, Sendable {
    case hello(Hello)
    case welcome(Welcome)
    case reject(Reject)
    case record(RecordMessage)
    case ack(Ack)
    case primaryHeartbeat(PrimaryHeartbeat)
    case standbyHeartbeat(StandbyHeartbeat)
    case rewind(Rewind)
    case snapshotBegin(SnapshotBegin)
    case snapshotPages(SnapshotPages)
    case snapshotEnd(SnapshotEnd)

    /// The sender's epoch.
    public var epoch: Epoch {
        switch self {
        case .hello(let m): return m.epoch
        case .welcome(let m): return m.epoch
        case .reject(let m): return m.epoch
        case .record(let m): return m.epoch
        case .ack(let m): return m.epoch
        case .primaryHeartbeat(let m): return m.epoch
        case .standbyHeartbeat(let m): return m.epoch
        case .rewind(let m): return m.epoch
        case .snapshotBegin(let m): return m.epoch
        case .snapshotPages(let m): return m.epoch
        case .snapshotEnd(let m): return m.epoch
        }
    }

    /// A short name for logs (never the payload: it may hold tenant data).
    public var kind: String {
        switch self {
        case .hello: return "hello"
        case .welcome: return "welcome"
        case .reject: return "reject"
        case .record: return "record"
        case .ack: return "ack"
        case .primaryHeartbeat: return "primaryHeartbeat"
        case .standbyHeartbeat: return "standbyHeartbeat"
        case .rewind: return "rewind"
        case .snapshotBegin: return "snapshotBegin"
        case .snapshotPages: return "snapshotPages"
        case .snapshotEnd: return "snapshotEnd"
        }
    }
}

// MARK: - Handshake

/// The standby's opening message: who it is and what its log and database hold per tenant.
public struct Hello: Hashable, Sendable {
    /// The protocol version this build speaks.
    /// 2: ``TenantPosition/history`` (the primary names what a rejoining node discards).
    public static let currentProtocolVersion: UInt16 = 2

    /// For a version this node does not speak, the decoder fills only this field (the rest of
    /// such a hello may be laid out differently) so that the primary can reject it clearly.
    public var protocolVersion: UInt16
    /// MUST equal the node id in the standby's certificate.
    public var nodeID: NodeID
    public var epoch: Epoch
    public var tenants: [TenantPosition]

    public init(protocolVersion: UInt16 = Hello.currentProtocolVersion, nodeID: NodeID, epoch: Epoch, tenants: [TenantPosition]) {
        self.protocolVersion = protocolVersion
        self.nodeID = nodeID
        self.epoch = epoch
        self.tenants = tenants
    }
}

/// A standby's durable state for one tenant, as reported in ``Hello``.
///
/// The database holds records up to `appliedLSN`; the log holds records up to `lastLSN`
/// (≥ `appliedLSN`). `tail` summarises the log's unapplied records from `appliedLSN + 1` on,
/// contiguously; it MAY stop short of `lastLSN` (it is bounded), and the primary then treats
/// the rest as unverified and has it discarded. `history` summarises the last applied records
/// (at most ``historyMax``, contiguous, ending at `appliedLSN`; MAY be empty): when the applied
/// point itself is not on the primary's history (a former primary rejoining), the primary
/// finds the divergence point in it and names exactly which records the snapshot replaces.
public struct TenantPosition: Hashable, Sendable {
    /// Covers what can diverge in sync mode with the default settings: the records a primary
    /// had sent and not seen acknowledged, plus those waiting to be sent (``ReplicationConfig``'s
    /// `unappliedRecordsMax`, 128). 16 bytes each on the wire.
    public static let historyMax = 128

    public var tenant: TenantID
    public var appliedLSN: LSN
    /// ``PageHashes/checksum`` of the standby's database at `appliedLSN`.
    public var appliedChecksum: UInt64
    public var lastLSN: LSN
    public var tail: [RecordSummary]
    public var history: [RecordSummary]

    public init(tenant: TenantID, appliedLSN: LSN, appliedChecksum: UInt64, lastLSN: LSN, tail: [RecordSummary], history: [RecordSummary] = []) {
        self.tenant = tenant
        self.appliedLSN = appliedLSN
        self.appliedChecksum = appliedChecksum
        self.lastLSN = lastLSN
        self.tail = tail
        self.history = history
    }

    /// A tenant the standby knows nothing of.
    public static func empty(_ tenant: TenantID) -> TenantPosition {
        TenantPosition(tenant: tenant, appliedLSN: 0, appliedChecksum: 0, lastLSN: 0, tail: [])
    }
}

/// The primary accepts the standby; streaming follows.
public struct Welcome: Hashable, Sendable {
    public var epoch: Epoch
    public var nodeID: NodeID
    public init(epoch: Epoch, nodeID: NodeID) {
        self.epoch = epoch
        self.nodeID = nodeID
    }
}

/// Why a peer is refused. The sender closes the connection right after sending it.
/// Its layout is the same in every protocol version, so that any peer can read it.
public enum RejectCode: UInt8, Hashable, Sendable, CustomStringConvertible {
    /// The hello's protocol version is not one this node speaks.
    case unsupportedVersion = 1
    /// The peer's epoch is older than this node's.
    case staleEpoch = 2
    /// The peer's certificate is not a node's.
    case wrongRole = 3
    /// The peer is not the standby this primary was told to serve, or says it is someone else.
    case unexpectedPeer = 4
    /// This node is not (or no longer) the primary.
    case notPrimary = 5
    /// The peer sent something the protocol does not allow at that point.
    case protocolViolation = 6

    public var description: String {
        switch self {
        case .unsupportedVersion: return "unsupportedVersion"
        case .staleEpoch: return "staleEpoch"
        case .wrongRole: return "wrongRole"
        case .unexpectedPeer: return "unexpectedPeer"
        case .notPrimary: return "notPrimary"
        case .protocolViolation: return "protocolViolation"
        }
    }
}

public struct Reject: Hashable, Sendable {
    public var epoch: Epoch
    public var code: RejectCode
    /// For humans; MUST NOT contain secrets or other tenants' names.
    public var reason: String
    public init(epoch: Epoch, code: RejectCode, reason: String) {
        self.epoch = epoch
        self.code = code
        self.reason = reason
    }
}

// MARK: - Streaming

/// One record of one tenant, plus how far the primary has committed that tenant.
///
/// The standby MUST NOT apply a record above `committedLSN`: until committed, the primary
/// may roll it back and reuse its lsn.
public struct RecordMessage: Hashable, Sendable {
    public var epoch: Epoch
    public var tenant: TenantID
    public var committedLSN: LSN
    public var record: Record
    public init(epoch: Epoch, tenant: TenantID, committedLSN: LSN, record: Record) {
        self.epoch = epoch
        self.tenant = tenant
        self.committedLSN = committedLSN
        self.record = record
    }
}

/// The standby holds every record of `tenant` up to `lsn` fsynced in its log (cumulative).
///
/// It also promises not to be promoted for `leaseMs`, measured on the standby's monotonic
/// clock from when it sent this ack (DESIGN §6).
public struct Ack: Hashable, Sendable {
    public var epoch: Epoch
    public var tenant: TenantID
    public var lsn: LSN
    public var leaseMs: Milliseconds
    public init(epoch: Epoch, tenant: TenantID, lsn: LSN, leaseMs: Milliseconds) {
        self.epoch = epoch
        self.tenant = tenant
        self.lsn = lsn
        self.leaseMs = leaseMs
    }
}

/// A tenant's committed lsn, as the primary tells the standby.
public struct TenantCommitted: Hashable, Sendable {
    public var tenant: TenantID
    public var committedLSN: LSN
    public init(tenant: TenantID, committedLSN: LSN) {
        self.tenant = tenant
        self.committedLSN = committedLSN
    }
}

/// Keeps the connection alive and tells the standby how far each tenant has committed
/// (only tenants whose committed lsn moved since the last time it was told).
public struct PrimaryHeartbeat: Hashable, Sendable {
    public var epoch: Epoch
    /// The primary's clock when sending; the standby echoes it so that the primary can
    /// measure the lease it gets from when it sent this heartbeat.
    public var sentAtMs: Milliseconds
    public var committed: [TenantCommitted]
    public init(epoch: Epoch, sentAtMs: Milliseconds, committed: [TenantCommitted]) {
        self.epoch = epoch
        self.sentAtMs = sentAtMs
        self.committed = committed
    }
}

/// The standby's answer to a ``PrimaryHeartbeat``: alive, and a lease grant like an ack's.
public struct StandbyHeartbeat: Hashable, Sendable {
    public var epoch: Epoch
    public var echoSentAtMs: Milliseconds
    public var leaseMs: Milliseconds
    public init(epoch: Epoch, echoSentAtMs: Milliseconds, leaseMs: Milliseconds) {
        self.epoch = epoch
        self.echoSentAtMs = echoSentAtMs
        self.leaseMs = leaseMs
    }
}

/// Discard every record of `tenant` after `toLSN` (an unapplied tail that differs from the
/// primary's log). Sent only during the handshake, before any record of that tenant.
public struct Rewind: Hashable, Sendable {
    public var epoch: Epoch
    public var tenant: TenantID
    public var toLSN: LSN
    public init(epoch: Epoch, tenant: TenantID, toLSN: LSN) {
        self.epoch = epoch
        self.tenant = tenant
        self.toLSN = toLSN
    }
}

// MARK: - Snapshots

/// A consistent copy of a tenant's database at `lsn` follows, in ``SnapshotPages`` chunks.
public struct SnapshotBegin: Hashable, Sendable {
    public var epoch: Epoch
    public var tenant: TenantID
    public var lsn: LSN
    public var dbSizePages: UInt32
    public init(epoch: Epoch, tenant: TenantID, lsn: LSN, dbSizePages: UInt32) {
        self.epoch = epoch
        self.tenant = tenant
        self.lsn = lsn
        self.dbSizePages = dbSizePages
    }
}

/// Some pages of the snapshot. Every page number MUST be in `1...dbSizePages`; a snapshot
/// holds at most `dbSizePages` pages in all; one message SHOULD carry at most about 1 MiB.
public struct SnapshotPages: Hashable, Sendable {
    public var epoch: Epoch
    public var tenant: TenantID
    public var pages: [Page]
    public init(epoch: Epoch, tenant: TenantID, pages: [Page]) {
        self.epoch = epoch
        self.tenant = tenant
        self.pages = pages
    }
}

/// The snapshot is complete; `checksum` is the ``PageHashes/checksum`` of all its pages,
/// which the standby MUST verify before installing.
public struct SnapshotEnd: Hashable, Sendable {
    public var epoch: Epoch
    public var tenant: TenantID
    public var lsn: LSN
    public var checksum: UInt64
    public init(epoch: Epoch, tenant: TenantID, lsn: LSN, checksum: UInt64) {
        self.epoch = epoch
        self.tenant = tenant
        self.lsn = lsn
        self.checksum = checksum
    }
}
