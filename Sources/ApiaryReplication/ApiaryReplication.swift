// ApiaryReplication: the primary⇄standby replication protocol (DESIGN §5) as pure state machines.
//
// Two cores, `PrimaryReplication` and `StandbyReplication`, take events (a message arrived,
// a record is ready, an fsync finished, a timer ticked) and return actions (send this, persist
// that, this commit is durable). They perform no I/O, read no clock and draw no random number:
// the shell passes `now` in and interprets the actions. `Message` and `WireCodec` define the
// wire format. Tests run both cores inside a deterministic simulator
// (Tests/ApiaryReplicationTests/Simulator.swift).
//
// How it works, and why:
//
// - Commit ≠ record. A record reaches the standby before its commit is durable, and a failed
//   commit is rolled back on the primary and its lsn reused. So the standby persists and acks
//   a record at once but applies it only once the primary says it is committed (every record
//   and heartbeat carries the committed lsn). Its unapplied tail may therefore differ from the
//   primary's log.
// - Handshake. The standby's hello reports, per tenant, its applied point (lsn, checksum) and a
//   summary (epoch, checksum) of each unapplied record. It is sent only when nothing is being
//   fsynced, so everything in it is durable. The primary compares the summaries with its log
//   (from memory for recent records, else through `.readLogSummaries`): the longest matching
//   prefix is kept (and counts as acked: a pending commit can complete on a hello), the rest is
//   discarded with `rewind`, and streaming resumes after it. If the applied point itself is
//   not on the primary's history (checksum differs), or the log no longer reaches back, a
//   snapshot replaces the standby's database and log. Checksums are of database states, so
//   equal summaries mean equal databases (invariant 6).
// - Rollback on a live connection. A commit that times out after its record was sent fails as
//   "outcome unknown". The tenant's stream then drains: nothing more is sent for it until
//   every sent record is acked, and only then does `rewind` go out. An earlier rewind could
//   cross an ack of the old record, which would then pass for an ack of the record that
//   reuses its lsn. (Closing the connection instead was tried first; the simulator found that
//   it can livelock: each new connection is killed by the next stale timeout.)
// - Flow control per tenant: at most `inFlightRecordsMax` records and `inFlightBytesMax` bytes
//   sent and unacked (a single larger record may go alone), at most `pendingCommitsMax`
//   commits waiting; the standby enforces the matching bound on its unapplied tail.
// - Epochs (invariant 3): every message carries the sender's epoch. An older one is rejected
//   (and the connection closed); a newer one makes the primary step down and the standby ask
//   the monitor. Epochs come from the monitor only; a core never adopts one from a peer.
// - Leases (DESIGN §6): each ack and standby heartbeat grants `leaseMs`. The primary counts it
//   from when it sent the record or heartbeat that got the grant (its own clock; the heartbeat
//   echoes the send time). The standby counts its promise from when it sent the grant.
import ApiaryCore

// MARK: - Time, connections, peers

/// A reading of a monotonic clock in milliseconds. Only differences between readings of the
/// same node's clock are meaningful; the cores never compare readings across nodes, except
/// that a primary's own send time comes back to it in a standby heartbeat (``StandbyHeartbeat``).
public typealias Milliseconds = Int64

/// Identifies one transport connection (one TLS stream) for the lifetime of a process.
///
/// The shell MUST give every new connection a fresh id and MUST NOT reuse an id. Events that
/// name a connection the core no longer tracks are ignored, so a late event from a closed
/// connection can never be mistaken for one from its successor.
public struct ConnectionID: Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public var description: String { "conn#\(rawValue)" }
}

/// What a connection's peer is, as its certificate says (the shell verified it).
public enum PeerRole: Hashable, Sendable {
    /// A database node: the only role allowed to replicate.
    case node
    /// Anything else (monitor, gateway, operator tool), named for error messages.
    case other(String)
}

/// A verified peer: the shell MUST fill this from the peer's certificate, never from what the
/// peer says about itself (DESIGN §2).
public struct PeerIdentity: Hashable, Sendable {
    public var nodeID: NodeID
    public var role: PeerRole
    public init(nodeID: NodeID, role: PeerRole) {
        self.nodeID = nodeID
        self.role = role
    }
}

// MARK: - Records in summary

/// What identifies a record for comparing two logs: its position, its epoch and the database
/// checksum after it. Two logs whose summaries agree at an lsn describe the same database there.
public struct RecordSummary: Hashable, Sendable, CustomStringConvertible {
    public var lsn: LSN
    public var epoch: Epoch
    public var checksum: UInt64

    public init(lsn: LSN, epoch: Epoch, checksum: UInt64) {
        self.lsn = lsn
        self.epoch = epoch
        self.checksum = checksum
    }

    public init(_ record: Record) {
        self.init(lsn: record.lsn, epoch: record.epoch, checksum: record.checksum)
    }

    /// The state before the first record: an empty database.
    public static let empty = RecordSummary(lsn: 0, epoch: .zero, checksum: 0)

    public var description: String { "(lsn \(lsn), epoch \(epoch), checksum \(String(checksum, radix: 16)))" }
}

// MARK: - Modes and configuration

/// When a commit on the primary counts as durable (DESIGN §3, §6).
public enum ReplicationMode: Hashable, Sendable {
    /// Durable once fsynced on the standby too: the commit waits for the standby's ack.
    case sync
    /// No standby configured: durable once in the primary's local log.
    case single
    /// Standby lost and marked not promotable by the monitor: durable locally; records are
    /// still streamed to a standby that (re)connects, so that it can catch up.
    case waitPrimary

    /// Whether a commit must wait for the standby's ack.
    public var waitsForStandby: Bool {
        switch self {
        case .sync: return true
        case .single, .waitPrimary: return false
        }
    }
}

/// Limits and timers shared by both cores. Both nodes SHOULD use the same values; the standby's
/// receive limits are derived from them, so a primary with larger limits than its standby
/// gets its connection closed for a protocol violation.
public struct ReplicationConfig: Hashable, Sendable {
    /// How often the primary sends a heartbeat (which the standby answers at once).
    public var heartbeatIntervalMs: Milliseconds = 100
    /// A connection on which nothing arrived for this long is closed (also bounds handshakes).
    public var peerTimeoutMs: Milliseconds = 1_000
    /// The longest a sync-mode commit waits for the standby before it fails (invariant 8).
    public var standbyWaitMs: Milliseconds = 2_000
    /// The lease each standby ack and heartbeat grants (DESIGN §6). A promoted standby waits
    /// out its last grant (plus the drift margin) before it commits, so this bounds how long a
    /// failover takes once the monitor decided; grants come every heartbeat, so a lease much
    /// longer than a few heartbeats buys nothing but a slower failover.
    public var leaseMs: Milliseconds = 500
    /// How much longer than its last lease a standby waits before it may be promoted: the two
    /// nodes measure the lease on their own clocks, which may run at slightly different rates
    /// (DESIGN §6). Clocks keep running while a machine is suspended (CLOCK_BOOTTIME).
    public var leaseDriftMarginMs: Milliseconds = 100
    /// After a lost or failed connection the standby waits this long before reconnecting.
    public var reconnectDelayMs: Milliseconds = 200
    /// Records sent to the standby and not yet acked, per tenant.
    public var inFlightRecordsMax: Int = 64
    /// Bytes (``Record/byteCount``) sent and not yet acked, per tenant. A single record larger
    /// than this may still be sent alone, so that no record is stuck forever.
    public var inFlightBytesMax: Int = 8 << 20
    /// Commits waiting for the standby, per tenant; past it a commit fails as `overloaded`.
    public var pendingCommitsMax: Int = 64
    /// Largest record (``Record/byteCount``) the primary accepts; never more than
    /// ``WireCodec/recordBytesMax``, which fits one frame.
    public var recordBytesMax: Int = WireCodec.recordBytesMax
    /// Tenants one connection may carry (bounds hello and heartbeat size). MUST exceed the
    /// number of tenants a node holds: a hello listing more is refused.
    public var tenantsMax: Int = 10_000

    public init() {}

    /// Records a standby may hold beyond what it has applied: those in flight plus those
    /// acked but not yet known to be committed. Also bounds the tail summary in a hello.
    public var unappliedRecordsMax: Int { inFlightRecordsMax + pendingCommitsMax }
}

// MARK: - Reasons

/// Why a connection is being closed; for logs and metrics. No secret is ever in it.
public enum CloseReason: Hashable, Sendable, CustomStringConvertible {
    /// Nothing arrived for `peerTimeoutMs` (or the handshake did not finish in time).
    case peerTimeout
    /// The peer broke the protocol; the detail says how.
    case protocolViolation(String)
    /// This node refused the peer (and sent it a ``Reject`` saying why).
    case rejectedPeer(RejectCode)
    /// The peer refused this node.
    case rejectedByPeer(RejectCode, String)
    /// The peer's epoch is newer than this node's.
    case newerEpoch(Epoch)
    /// The same standby connected again; the older connection is dropped.
    case replacedByNewerConnection
    /// The primary stepped down.
    case steppedDown
    /// The shell could not read the log or the database for the standby.
    case localReadFailed
    /// The standby could not install a snapshot.
    case snapshotInstallFailed

    public var description: String {
        switch self {
        case .peerTimeout: return "peer timed out"
        case .protocolViolation(let detail): return "protocol violation: \(detail)"
        case .rejectedPeer(let code): return "rejected peer (\(code))"
        case .rejectedByPeer(let code, let reason): return "rejected by peer (\(code)): \(reason)"
        case .newerEpoch(let epoch): return "peer has newer epoch \(epoch)"
        case .replacedByNewerConnection: return "replaced by a newer connection from the same standby"
        case .steppedDown: return "this node stepped down"
        case .localReadFailed: return "local log or database read failed"
        case .snapshotInstallFailed: return "snapshot install failed"
        }
    }
}
