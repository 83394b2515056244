import ApiaryCore

// MARK: - Actions

/// What the primary's shell must do. Perform the actions of one returned array in order.
///
/// Order matters where it is stated; the cores emit, for one event:
/// 1. `.stepDown` first, so the shell stops taking writes before anything else happens;
/// 2. `.commitFailed` in ascending lsn order: the lowest failed lsn is where the shell
///    rolls its log back to, and every later pending record depends on it;
/// 3. `.closeConnection` of a replaced or failed connection before `.send`s on its successor;
/// 4. `.commitDurable` in ascending lsn order, only after the standby's ack for that lsn (in
///    `sync` mode): a client MUST NOT learn of a commit before it is durable where the mode
///    requires (invariants 1 and 4);
/// 5. `.send`s in the order the peer must see them (welcome before rewind before records).
public enum PrimaryAction: Hashable, Sendable {
    /// Encode (``WireCodec/encodeFrame(_:)``) and write `message` on the connection, after
    /// everything sent on it before. A connection that cannot take it MUST be closed
    /// (report ``PrimaryReplication/onDisconnected(_:now:)``), never skipped.
    case send(ConnectionID, Message)
    /// Close the connection. The core has already forgotten it; a later
    /// `onDisconnected` for it is harmless.
    case closeConnection(ConnectionID, CloseReason)
    /// Read records from the local log and report them with
    /// ``PrimaryReplication/onLogRead(_:request:records:now:)``.
    case readLog(ConnectionID, LogReadRequest)
    /// Read record summaries from the local log and report them with
    /// ``PrimaryReplication/onLogSummaries(_:request:summaries:now:)``.
    case readLogSummaries(ConnectionID, SummaryReadRequest)
    /// Stream a snapshot of the tenant's database on the connection, then report
    /// ``PrimaryReplication/onSnapshotSent(_:request:lsn:now:)``. See ``SnapshotRequest``.
    case sendSnapshot(ConnectionID, SnapshotRequest)
    /// The commit of `lsn` is durable where the mode requires: make it visible and answer
    /// its client.
    case commitDurable(TenantID, LSN)
    /// The commit of `lsn` failed: roll the tenant's log and database back to `lsn - 1`,
    /// durably (a rolled-back record MUST NOT come back after a crash: its client may have
    /// been told "not committed"), before answering its client and before handing the core
    /// another record of that tenant (the lsn is then reused).
    case commitFailed(TenantID, LSN, CommitFailure)
    /// A newer epoch exists: this node is no longer primary. Stop accepting writes, report
    /// to the monitor, and discard this core.
    case stepDown(newerEpoch: Epoch)
    /// The standby holds records that are not on this primary's history (a former primary
    /// rejoining): they are discarded (a rewind, or the snapshot that follows). Report it to
    /// the operator and the monitor; nothing to do otherwise.
    case standbyDiverged(Divergence)
}

/// What a standby discards because this primary's history does not have it.
public struct Divergence: Hashable, Sendable, CustomStringConvertible {
    public var tenant: TenantID
    public var standby: NodeID
    /// The last record the two histories share; nil when none of the records compared matched
    /// (the standby reported too few, or they are older than this primary's log).
    public var sharedThroughLSN: LSN?
    /// The standby's records discarded: `discardedFromLSN ... discardedThroughLSN`.
    public var discardedFromLSN: LSN
    public var discardedThroughLSN: LSN
    /// The epochs of the discarded records, as the standby's summaries name them (oldest
    /// first; empty when it sent none of them).
    public var discardedEpochs: [Epoch]
    /// A snapshot replaces the standby's database (else a rewind of its log's tail).
    public var bySnapshot: Bool

    public init(tenant: TenantID, standby: NodeID, sharedThroughLSN: LSN?, discardedFromLSN: LSN, discardedThroughLSN: LSN, discardedEpochs: [Epoch], bySnapshot: Bool) {
        self.tenant = tenant
        self.standby = standby
        self.sharedThroughLSN = sharedThroughLSN
        self.discardedFromLSN = discardedFromLSN
        self.discardedThroughLSN = discardedThroughLSN
        self.discardedEpochs = discardedEpochs
        self.bySnapshot = bySnapshot
    }

    public var discardedCount: UInt64 { discardedThroughLSN - discardedFromLSN + 1 }

    public var description: String {
        let range = discardedFromLSN == discardedThroughLSN ? "lsn \(discardedFromLSN)" : "lsns \(discardedFromLSN)–\(discardedThroughLSN)"
        let epochs = discardedEpochs.isEmpty ? "" : " (epoch\(discardedEpochs.count > 1 ? "s" : "") \(discardedEpochs.map { "\($0)" }.joined(separator: ", ")))"
        let shared = sharedThroughLSN.map { "histories part after lsn \($0)" } ?? "no shared record found among those compared"
        return "node \(standby) discards tenant \(tenant)'s \(range)\(epochs): not on the primary's history; \(shared); \(bySnapshot ? "replaced by a snapshot" : "rewound")"
    }
}

/// Why a commit failed, and what its client may be told.
public enum CommitFailure: Hashable, Sendable, CustomStringConvertible {
    /// Sync mode, and the standby did not get the record in time (no standby, or too far
    /// behind). The write is NOT committed anywhere: safe to retry.
    case standbyUnavailable
    /// The record reached a standby but no ack came in time. The standby may hold it, and it
    /// survives if that standby is promoted: tell the client "outcome unknown" (invariant 9).
    case outcomeUnknown
    /// Too many commits already wait for the standby (``ReplicationConfig/pendingCommitsMax``).
    /// Not committed: safe to retry later.
    case overloaded
    /// The record exceeds ``ReplicationConfig/recordBytesMax`` and can never be replicated.
    /// Not committed.
    case recordTooLarge
    /// This node stepped down before the record was sent anywhere. Not committed.
    case steppedDown
    /// A switchover is in progress: the primary takes no new commit while its standby catches
    /// up to hand over. Not committed: safe to retry (on the new primary, moments later).
    case draining

    public var description: String {
        switch self {
        case .standbyUnavailable: return "standby unavailable"
        case .outcomeUnknown: return "outcome unknown"
        case .overloaded: return "too many commits waiting for the standby"
        case .recordTooLarge: return "transaction too large to replicate"
        case .steppedDown: return "this node is no longer the primary"
        case .draining: return "a switchover is in progress"
        }
    }
}

/// Read records `fromLSN...throughLSN` of `tenant` and return the longest prefix whose total
/// ``Record/byteCount`` is at most `bytesMax`; when that prefix is empty and
/// `firstRecordMayExceed` is set, return the first record alone (so that a record larger than
/// the window still goes out, alone). Echo the request back.
public struct LogReadRequest: Hashable, Sendable {
    public var requestID: UInt64
    public var tenant: TenantID
    public var fromLSN: LSN
    public var throughLSN: LSN
    public var bytesMax: Int
    public var firstRecordMayExceed: Bool
}

/// Read the summaries (lsn, epoch, checksum) of records `fromLSN...throughLSN` of `tenant`,
/// in order; leave out any the log no longer holds. Echo `requestID` back.
public struct SummaryReadRequest: Hashable, Sendable {
    public var requestID: UInt64
    public var tenant: TenantID
    public var fromLSN: LSN
    public var throughLSN: LSN
}

/// Send the tenant's database as it is at its latest *committed* lsn `S` (one consistent read
/// transaction; SQLite shows only published, i.e. durable, commits): ``SnapshotBegin`` with
/// `epoch`, `S` and the size, ``SnapshotPages`` chunks (≤ ~1 MiB each), ``SnapshotEnd`` with
/// the ``PageHashes`` checksum of the pages sent. The log MUST still hold every record after `S`.
public struct SnapshotRequest: Hashable, Sendable {
    public var requestID: UInt64
    public var tenant: TenantID
    public var epoch: Epoch
}

// MARK: - Startup state

/// What the primary's log holds for one tenant when the core starts.
///
/// Every record in the log counts as committed from then on: a record left pending by a
/// crash was fsynced locally and may be in the database, so it is kept and streamed.
public struct PrimaryTenantLog: Hashable, Sendable {
    /// The last record in the log (``RecordSummary/empty`` for a new tenant).
    public var last: RecordSummary
    /// The first lsn the log can still read; records before it live only in the database.
    public var firstLSN: LSN
    /// The database checksum at `firstLSN - 1` (0 when `firstLSN == 1`).
    public var baseChecksum: UInt64

    public init(last: RecordSummary, firstLSN: LSN = 1, baseChecksum: UInt64 = 0) {
        precondition(firstLSN >= 1 && firstLSN <= last.lsn + 1, "log starts at \(firstLSN) but ends at \(last.lsn)")
        self.last = last
        self.firstLSN = firstLSN
        self.baseChecksum = baseChecksum
    }
}

/// One tenant as the primary sees it, for status pages, metrics and tests.
public struct PrimaryTenantStatus: Hashable, Sendable {
    public var lastLSN: LSN
    public var committedLSN: LSN
    /// Records through this lsn commit without the standby's ack (taken while the primary
    /// committed alone, or acked) once the local log has them; at least `committedLSN`. What
    /// the monitor must see the standby hold before it counts it in sync (invariant 2): a
    /// record taken in `wait_primary` whose local fsync ends after a switch to sync is
    /// acknowledged without the standby.
    public var readyLSN: LSN
    public var firstLSN: LSN
    public var pendingCommits: Int
    /// Highest lsn the connected standby holds fsynced; nil without a streaming standby.
    public var standbyAckedLSN: LSN?
    public var inFlightRecords: Int
    public var inFlightBytes: Int
}

// MARK: - The core

/// The primary side of replication: streams each tenant's records to one standby and decides
/// when a commit is durable. A pure state machine (CONVENTIONS): events in, actions out.
///
/// Shell contract in brief: hand over every record with ``onLocalRecord(_:_:now:)`` after it
/// is appended and fsynced in the local log; answer `.readLog`/`.readLogSummaries`/
/// `.sendSnapshot`; call ``onTick(now:)`` at least every `heartbeatIntervalMs / 2`.
public struct PrimaryReplication: Sendable {
    public let nodeID: NodeID
    public let epoch: Epoch
    public let config: ReplicationConfig
    /// The only node that may connect as the standby; nil: no node may (none is assigned).
    public private(set) var standbyNodeID: NodeID?
    public private(set) var mode: ReplicationMode
    /// A switchover is handing over: no new commit is taken and no lease used
    /// (``onDrainingChanged(_:now:)``).
    public private(set) var draining = false
    /// Whether this primary may use the leases its standby grants. A primary that starts under a
    /// monitor may have been handing over when it stopped: its standby may be promoted without a
    /// lease wait (the monitor believes it drained), so it uses no lease until the monitor
    /// confirmed a writer goal that is not draining (``onLeaseConfirmed()``).
    public private(set) var leaseConfirmed: Bool
    /// The shell hands a record over as soon as it is appended (its fsync runs while the record
    /// travels to the standby) and reports the fsync with ``onLocalSynced(_:throughLSN:now:)``.
    /// False: a record is handed over once fsynced (the simpler contract).
    public let reportsLocalSync: Bool
    /// The newer epoch that made this node step down; nil while it is primary.
    public private(set) var steppedDownTo: Epoch?
    /// Until when the standby promised not to be promoted, measured on this node's clock
    /// from when the acked record or heartbeat was sent (DESIGN §6). Nil before any grant.
    public private(set) var leaseGrantedUntil: Milliseconds?

    /// Whether this primary may serve strong and linearizable reads at `now` (invariant 5):
    /// never once it stepped down; in sync mode only while the standby's lease holds (measured
    /// from when this node sent what earned it, so it ends no later than the standby's own
    /// count); alone (`single`, `waitPrimary`) no other node can be promoted behind its back.
    public func holdsLease(now: Milliseconds) -> Bool {
        // Draining (a switchover's hand-over) gives the lease up at once: the standby may then be
        // promoted without waiting it out. Unconfirmed: a primary started under a monitor uses no
        // lease until the monitor confirmed it is still the writer (see `leaseConfirmed`).
        guard steppedDownTo == nil, !draining, leaseConfirmed else { return false }
        guard mode.waitsForStandby else { return true }
        return (leaseGrantedUntil ?? .min) > now
    }

    private var tenants: [TenantID: TenantLog]
    private var candidates: [ConnectionID: Candidate] = [:]
    private var link: StandbyLink?
    private var nextRequestID: UInt64 = 1
    /// Tenants dropped while this core ran (``onTenantRemoved(_:now:)``): the standby's acks
    /// for their records may still arrive, and are no violation.
    private var removed: Set<TenantID> = []

    /// Connections allowed to be mid-handshake at once.
    static let candidatesMax = 8

    /// - Parameters:
    ///   - tenants: what the local log holds per tenant (see ``PrimaryTenantLog``).
    ///   - standbyNodeID: the standby the monitor assigned, if known.
    public init(
        nodeID: NodeID, epoch: Epoch, mode: ReplicationMode, config: ReplicationConfig = ReplicationConfig(),
        standbyNodeID: NodeID? = nil, tenants: [TenantID: PrimaryTenantLog] = [:], leaseConfirmed: Bool = true,
        reportsLocalSync: Bool = false
    ) {
        self.leaseConfirmed = leaseConfirmed
        self.reportsLocalSync = reportsLocalSync
        precondition(config.inFlightRecordsMax >= 1 && config.pendingCommitsMax >= 1, "limits must be positive: \(config)")
        self.nodeID = nodeID
        self.epoch = epoch
        self.mode = mode
        self.config = config
        self.standbyNodeID = standbyNodeID
        let recentMax = config.unappliedRecordsMax + config.pendingCommitsMax + 1
        self.tenants = tenants.mapValues { TenantLog(log: $0, recentMax: recentMax) }
    }

    // MARK: Queries

    /// Every tenant the core knows, in no particular order.
    public var tenantIDs: [TenantID] { Array(tenants.keys) }

    /// The connection of the standby that completed its handshake, if any.
    public var standbyConnection: ConnectionID? { link?.connection }

    public func status(of tenant: TenantID) -> PrimaryTenantStatus? {
        guard let log = tenants[tenant] else { return nil }
        let stream = link?.streams[tenant]
        var acked: LSN? = nil
        if let stream, case .streaming = stream.phase { acked = stream.ackedLSN }
        return PrimaryTenantStatus(
            lastLSN: log.lastLSN, committedLSN: log.committedLSN, readyLSN: max(log.readyLSN, log.committedLSN), firstLSN: log.firstLSN,
            pendingCommits: log.pending.count, standbyAckedLSN: acked,
            inFlightRecords: stream?.inFlight.count ?? 0, inFlightBytes: stream?.inFlightBytes ?? 0)
    }

    // MARK: Events: local

    /// A commit's record, appended and fsynced in the local log.
    ///
    /// The caller MUST hand records of a tenant in lsn order (`lastLSN + 1`, with this node's
    /// epoch) and MUST keep the commit invisible until `.commitDurable` for it.
    public mutating func onLocalRecord(_ tenant: TenantID, _ record: Record, now: Milliseconds) -> [PrimaryAction] {
        guard steppedDownTo == nil else { return [.commitFailed(tenant, record.lsn, .steppedDown)] }
        guard !draining else { return [.commitFailed(tenant, record.lsn, .draining)] }
        if tenants[tenant] == nil {
            tenants[tenant] = TenantLog(log: PrimaryTenantLog(last: .empty), recentMax: config.unappliedRecordsMax + config.pendingCommitsMax + 1)
        }
        var log = tenants[tenant]!
        precondition(record.lsn == log.lastLSN + 1, "\(tenant): record lsn \(record.lsn) does not follow last lsn \(log.lastLSN)")
        precondition(record.epoch == epoch, "\(tenant): record of epoch \(record.epoch) handed to the primary of epoch \(epoch)")
        guard record.byteCount <= min(config.recordBytesMax, WireCodec.recordBytesMax) else {
            return [.commitFailed(tenant, record.lsn, .recordTooLarge)]
        }
        if mode.waitsForStandby, log.pending.count >= config.pendingCommitsMax {
            return [.commitFailed(tenant, record.lsn, .overloaded)]
        }

        var actions: [PrimaryAction] = []
        if link != nil, link!.streams[tenant] == nil {
            // A tenant born while the standby is connected: reconcile it like one in the hello,
            // before this record joins the log, so that a fresh stream can send it live.
            let position = link!.unknownPositions.removeValue(forKey: tenant) ?? .empty(tenant)
            actions += startStream(tenant, position: position, now: now)
            log = tenants[tenant]!
        }
        log.append(RecordSummary(record))
        if !reportsLocalSync { log.syncedLSN = record.lsn }
        if mode.waitsForStandby {
            log.pending.append(PendingCommit(lsn: record.lsn, deadline: now + config.standbyWaitMs, sentOn: nil))
        } else {
            log.readyLSN = record.lsn
        }
        tenants[tenant] = log
        actions += advanceCommitted(tenant)
        if let stream = link?.streams[tenant], stream.canSendLive(record, config: config) {
            actions.append(sendRecord(tenant, record, now: now))
        }
        return actions
    }

    /// A dropped tenant's writer stopped and its files are about to go: the core forgets it.
    /// Nothing more is sent for it, a standby that still holds it is left alone (its hello
    /// position is ignored, as for any tenant this primary has no log for), and the answers
    /// to reads of its log under way are ignored. The shell MUST call this only once no commit
    /// of the tenant waits for a verdict (its writer stopped), and MUST never log a record of
    /// it again (a dropped tenant's name is never reused).
    public mutating func onTenantRemoved(_ tenant: TenantID, now: Milliseconds) -> [PrimaryAction] {
        guard let log = tenants[tenant] else { return [] }
        precondition(log.pending.isEmpty, "\(tenant): removed with \(log.pending.count) commits waiting for a verdict")
        tenants[tenant] = nil
        link?.streams[tenant] = nil
        link?.unknownPositions[tenant] = nil
        removed.insert(tenant)
        return []
    }

    /// The mode changed (the monitor's goal state). Leaving `sync` completes every waiting
    /// commit at once: each is already durable locally.
    public mutating func onModeChanged(_ newMode: ReplicationMode, now: Milliseconds) -> [PrimaryAction] {
        mode = newMode
        guard !newMode.waitsForStandby else { return [] }
        var actions: [PrimaryAction] = []
        for tenant in tenants.keys.sorted() {
            actions += completeCommits(tenant, through: tenants[tenant]!.lastLSN)
        }
        return actions
    }

    /// The monitor assigned `standby` as the only node that may replicate from this primary
    /// (nil: none). A standby attached under another name is dropped: the topology no longer
    /// names it, and a commit must not count its ack.
    public mutating func onStandbyAssigned(_ standby: NodeID?, now: Milliseconds) -> [PrimaryAction] {
        guard standby != standbyNodeID else { return [] }
        standbyNodeID = standby
        var actions: [PrimaryAction] = []
        for (connection, candidate) in candidates.sorted(by: { $0.key.rawValue < $1.key.rawValue }) where candidate.peer.nodeID != standby {
            actions += reject(connection, .unexpectedPeer, "node '\(candidate.peer.nodeID)' is no longer this primary's standby")
        }
        if let current = link, current.peer.nodeID != standby {
            actions += reject(current.connection, .unexpectedPeer, "node '\(current.peer.nodeID)' is no longer this primary's standby")
        }
        return actions
    }

    /// The monitor confirmed this primary as the writer, not draining: it may use leases.
    public mutating func onLeaseConfirmed() { leaseConfirmed = true }

    /// Whether this primary may answer reads at all (`none`/`weak` too; strong ones also need
    /// ``holdsLease(now:)``). Not once it stepped down; and a primary started under a monitor
    /// not before the monitor confirmed it as the writer: its database holds every record of
    /// its log, and if a newer epoch exists those past what its standby acknowledged were never
    /// the cluster's (the new primary may hold other content at the same lsns).
    public var servesReads: Bool { steppedDownTo == nil && leaseConfirmed }

    /// The monitor told this primary to step down (a newer epoch exists, or is about to):
    /// commits and strong reads stop at once, as when a peer shows a newer epoch.
    public mutating func onStepDownOrdered(now: Milliseconds) -> [PrimaryAction] {
        guard steppedDownTo == nil else { return [] }
        return stepDown(to: epoch.next, now: now)
    }

    /// A switchover begins (`true`: take no new commit; those already waiting finish as usual,
    /// and the stream goes on until the standby holds everything) or is called off.
    public mutating func onDrainingChanged(_ draining: Bool, now: Milliseconds) -> [PrimaryAction] {
        self.draining = draining
        return []
    }

    /// The log dropped records before `firstLSN` (they live on in the database).
    /// `baseChecksum` is the checksum at `firstLSN - 1`.
    ///
    /// The log MUST keep its last committed record (`firstLSN <= committedLSN`): pending
    /// records may be rolled back, and a restarted core is told the log's last record.
    public mutating func onLogCompacted(_ tenant: TenantID, firstLSN: LSN, baseChecksum: UInt64, now: Milliseconds) -> [PrimaryAction] {
        guard var log = tenants[tenant], firstLSN > log.firstLSN else { return [] }
        precondition(firstLSN <= log.committedLSN, "\(tenant): log compacted to start at \(firstLSN), past its last committed record \(log.committedLSN)")
        log.firstLSN = firstLSN
        log.baseChecksum = baseChecksum
        tenants[tenant] = log
        return []
    }

    /// Timers: heartbeats, peer timeouts and commit deadlines. Call at least every
    /// `heartbeatIntervalMs / 2`, and SHOULD be more often when commit latency matters
    /// (a deadline is noticed only on a tick).
    public mutating func onTick(now: Milliseconds) -> [PrimaryAction] {
        guard steppedDownTo == nil else { return [] }
        var actions: [PrimaryAction] = []
        for (connection, candidate) in candidates.sorted(by: { $0.key.rawValue < $1.key.rawValue })
        where now - candidate.connectedAt >= config.peerTimeoutMs {
            candidates[connection] = nil
            actions.append(.closeConnection(connection, .peerTimeout))
        }
        if let current = link, now - current.lastReceivedAt >= config.peerTimeoutMs {
            link = nil
            actions.append(.closeConnection(current.connection, .peerTimeout))
        }
        // Deadlines grow with lsn, so only a tenant's first pending commit can be due. Sort
        // just the due tenants: a tick must stay cheap with thousands of tenants.
        let due = tenants.compactMap { tenant, log in log.pending.first.map { $0.deadline <= now } == true ? tenant : nil }
        for tenant in due.sorted() {
            actions += failPending(tenant, from: tenants[tenant]!.pending.first!.lsn, now: now)
        }
        if let current = link, now - current.lastHeartbeatSentAt >= config.heartbeatIntervalMs {
            actions.append(.send(current.connection, .primaryHeartbeat(makeHeartbeat(now: now))))
        }
        return actions
    }

    // MARK: Events: connections

    /// A standby connected and its certificate checked out; its hello is awaited.
    public mutating func onConnected(_ connection: ConnectionID, peer: PeerIdentity, now: Milliseconds) -> [PrimaryAction] {
        if steppedDownTo != nil {
            return reject(connection, .notPrimary, "this node is no longer the primary")
        }
        guard peer.role == .node else {
            return reject(connection, .wrongRole, "only database nodes may replicate")
        }
        // Decided on the certificate's name, before anything the peer says: only the node the
        // topology names as this primary's standby may replicate from it.
        guard let expected = standbyNodeID, expected == peer.nodeID else {
            return reject(connection, .unexpectedPeer, standbyNodeID.map { "node '\(peer.nodeID)' is not this primary's standby (the standby is '\($0)')" }
                ?? "no standby is assigned to this primary; node '\(peer.nodeID)' may not replicate from it")
        }
        guard candidates.count < Self.candidatesMax else {
            return reject(connection, .protocolViolation, "too many handshakes in progress")
        }
        candidates[connection] = Candidate(peer: peer, connectedAt: now)
        return []
    }

    /// The connection is gone (closed by the peer, reset, or the shell gave up on it).
    public mutating func onDisconnected(_ connection: ConnectionID, now: Milliseconds) -> [PrimaryAction] {
        candidates[connection] = nil
        if link?.connection == connection { link = nil }
        return []
    }

    /// Bytes on the connection did not decode; it is rejected and closed.
    public mutating func onDecodeError(_ connection: ConnectionID, _ error: DecodeError, now: Milliseconds) -> [PrimaryAction] {
        guard candidates[connection] != nil || link?.connection == connection else { return [] }
        return reject(connection, .protocolViolation, "undecodable message: \(error)")
    }

    /// A message arrived on the connection.
    public mutating func onMessage(_ message: Message, from connection: ConnectionID, now: Milliseconds) -> [PrimaryAction] {
        guard steppedDownTo == nil else { return [] }
        if let candidate = candidates[connection] {
            guard case .hello(let hello) = message else {
                return reject(connection, .protocolViolation, "expected hello, got \(message.kind)")
            }
            return onHello(hello, from: connection, peer: candidate.peer, now: now)
        }
        guard link?.connection == connection else { return [] } // a late message of a closed connection
        link!.lastReceivedAt = now
        if message.epoch < epoch {
            return reject(connection, .staleEpoch, "message of epoch \(message.epoch); the primary's epoch is \(epoch)")
        }
        if message.epoch > epoch { return stepDown(to: message.epoch, now: now) }
        switch message {
        case .ack(let ack):
            return onAck(ack, now: now)
        case .standbyHeartbeat(let heartbeat):
            guard heartbeat.echoSentAtMs <= now else {
                return reject(connection, .protocolViolation, "heartbeat echoes a time in the future")
            }
            grantLease(until: heartbeat.echoSentAtMs + heartbeat.leaseMs)
            return []
        case .reject(let r):
            link = nil
            return [.closeConnection(connection, .rejectedByPeer(r.code, r.reason))]
        case .hello, .welcome, .record, .primaryHeartbeat, .rewind, .snapshotBegin, .snapshotPages, .snapshotEnd:
            return reject(connection, .protocolViolation, "a primary does not accept \(message.kind)")
        }
    }

    // MARK: Events: answers to read actions

    /// The answer to a `.readLog`. Answers to requests the core no longer waits for (the
    /// connection closed, the tenant rolled back) are ignored.
    public mutating func onLogRead(_ connection: ConnectionID, request: LogReadRequest, records: [Record], now: Milliseconds) -> [PrimaryAction] {
        let tenant = request.tenant
        guard link?.connection == connection, var stream = link!.streams[tenant], stream.readRequestID == request.requestID else { return [] }
        stream.readRequestID = nil
        link!.streams[tenant] = stream
        let log = tenants[tenant]!
        var bytes = 0
        for (i, record) in records.enumerated() {
            bytes += record.byteCount
            let withinBudget = bytes <= request.bytesMax || (i == 0 && records.count == 1 && request.firstRecordMayExceed)
            precondition(record.lsn == request.fromLSN + UInt64(i) && record.lsn <= request.throughLSN && withinBudget,
                         "\(tenant): log read \(request) returned lsn \(record.lsn) at index \(i), \(bytes) bytes so far")
            // A rollback cancels the reads it could invalidate, so a record that disagrees
            // with the core's view of the log means the log is not what it handed over.
            precondition(record.lsn <= log.lastLSN && (log.recent.summary(at: record.lsn).map { $0 == RecordSummary(record) } ?? true),
                         "\(tenant): log read returned \(RecordSummary(record)), the core knows \(String(describing: log.recent.summary(at: record.lsn))) with last lsn \(log.lastLSN)")
        }
        if records.isEmpty {
            // The next record did not fit the byte budget: wait for an ack to free room, or
            // ask again at once if the window emptied while the read was under way.
            guard request.firstRecordMayExceed else { return stream.inFlight.isEmpty ? pump(tenant, now: now) : [] }
            // Any record could go: either the log was compacted under the read (a snapshot
            // follows) or it failed to serve the record.
            if stream.nextLSN < log.firstLSN { return pump(tenant, now: now) }
            link = nil
            return [.closeConnection(connection, .localReadFailed)]
        }
        var actions: [PrimaryAction] = []
        for record in records { actions.append(sendRecord(tenant, record, now: now)) }
        return actions + pump(tenant, now: now)
    }

    /// The answer to a `.readLogSummaries`.
    public mutating func onLogSummaries(_ connection: ConnectionID, request: SummaryReadRequest, summaries: [RecordSummary], now: Milliseconds) -> [PrimaryAction] {
        let tenant = request.tenant
        guard link?.connection == connection, let stream = link!.streams[tenant] else { return [] }
        var read: [LSN: RecordSummary] = [:]
        for s in summaries where s.lsn >= request.fromLSN && s.lsn <= request.throughLSN { read[s.lsn] = s }
        switch stream.phase {
        case .verifying(let requestID, let position) where requestID == request.requestID:
            return decideStream(tenant, position: position, read: read, now: now)
        case .findingDivergence(let requestID, let position) where requestID == request.requestID:
            return replaceBySnapshot(tenant, position: position, read: read, historyRead: true, now: now)
        default:
            return []
        }
    }

    /// The snapshot asked for by `.sendSnapshot` is on the wire, taken at committed lsn `lsn`.
    public mutating func onSnapshotSent(_ connection: ConnectionID, request: SnapshotRequest, lsn: LSN, now: Milliseconds) -> [PrimaryAction] {
        let tenant = request.tenant
        guard link?.connection == connection, var stream = link!.streams[tenant],
              case .snapshotting(let requestID, let startedAt) = stream.phase, requestID == request.requestID else { return [] }
        // (Should the log be compacted past `lsn` meanwhile, the stream finds out after the
        // snapshot's ack and sends another snapshot.)
        precondition(lsn <= tenants[tenant]!.committedLSN, "\(tenant): snapshot at lsn \(lsn) but committed is \(tenants[tenant]!.committedLSN)")
        stream.phase = .awaitingSnapshotAck(lsn: lsn, sentAt: startedAt)
        link!.streams[tenant] = stream
        return []
    }

    /// The shell could not take or send the snapshot; the connection is closed (the next
    /// handshake decides again).
    public mutating func onSnapshotFailed(_ connection: ConnectionID, request: SnapshotRequest, now: Milliseconds) -> [PrimaryAction] {
        // A dropped tenant's snapshot fails as its files go: nothing to decide again.
        guard link?.connection == connection, !removed.contains(request.tenant) else { return [] }
        link = nil
        return [.closeConnection(connection, .localReadFailed)]
    }
}

// MARK: - Handshake

extension PrimaryReplication {
    private mutating func onHello(_ hello: Hello, from connection: ConnectionID, peer: PeerIdentity, now: Milliseconds) -> [PrimaryAction] {
        guard hello.protocolVersion == Hello.currentProtocolVersion else {
            return reject(connection, .unsupportedVersion,
                          "protocol version \(hello.protocolVersion) is not supported; this node speaks version \(Hello.currentProtocolVersion)")
        }
        guard hello.nodeID == peer.nodeID else {
            return reject(connection, .unexpectedPeer, "hello names node '\(hello.nodeID)' but the certificate names '\(peer.nodeID)'")
        }
        if hello.epoch < epoch {
            return reject(connection, .staleEpoch, "standby epoch \(hello.epoch) is older than the primary's epoch \(epoch)")
        }
        if hello.epoch > epoch { return stepDown(to: hello.epoch, now: now) }
        guard hello.tenants.count <= config.tenantsMax, Set(hello.tenants.map(\.tenant)).count == hello.tenants.count else {
            return reject(connection, .protocolViolation, "hello lists \(hello.tenants.count) tenants, duplicated or over \(config.tenantsMax)")
        }

        var actions: [PrimaryAction] = []
        candidates[connection] = nil
        if let old = link {
            actions.append(.closeConnection(old.connection, .replacedByNewerConnection))
        }
        link = StandbyLink(connection: connection, peer: peer, lastReceivedAt: now, lastHeartbeatSentAt: now)
        actions.append(.send(connection, .welcome(Welcome(epoch: epoch, nodeID: nodeID))))
        var positions: [TenantID: TenantPosition] = [:]
        for position in hello.tenants { positions[position.tenant] = position }
        for tenant in tenants.keys.sorted() {
            actions += startStream(tenant, position: positions.removeValue(forKey: tenant) ?? .empty(tenant), now: now)
        }
        link!.unknownPositions = positions
        return actions
    }

    /// Begins reconciling one tenant with what the standby reported: decide at once, or read
    /// the summaries the decision needs first.
    private mutating func startStream(_ tenant: TenantID, position: TenantPosition, now: Milliseconds) -> [PrimaryAction] {
        var log = tenants[tenant]!
        let connection = link!.connection
        // Pending records the standby provably lacks were never delivered: a timeout on them
        // is "standby unavailable", not "outcome unknown".
        for i in log.pending.indices {
            let lsn = log.pending[i].lsn
            let standbyHas = position.tail.first(where: { $0.lsn == lsn })
            if position.lastLSN < lsn || (standbyHas != nil && standbyHas != log.recent.summary(at: lsn)) {
                log.pending[i].sentOn = nil
            }
        }
        tenants[tenant] = log

        let applied = position.appliedLSN
        if applied > log.lastLSN || applied + 1 < log.firstLSN {
            return replaceBySnapshot(tenant, position: position, read: [:], now: now)
        }
        let through = min(applied + UInt64(position.tail.count), log.lastLSN)
        let readFrom = log.checksum(at: applied) == nil ? applied : applied + 1
        let readThrough = min(through, log.recent.firstLSN - 1)
        guard readFrom <= readThrough else {
            return decideStream(tenant, position: position, read: [:], now: now)
        }
        let request = SummaryReadRequest(requestID: takeRequestID(), tenant: tenant, fromLSN: readFrom, throughLSN: readThrough)
        link!.streams[tenant] = TenantStream(phase: .verifying(requestID: request.requestID, position: position))
        return [.readLogSummaries(connection, request)]
    }

    /// Finds the longest prefix of the standby's log that matches ours, has the rest
    /// discarded, and streams from there; or falls back to a snapshot when even the
    /// standby's database (its applied point) is not on our history.
    private mutating func decideStream(_ tenant: TenantID, position: TenantPosition, read: [LSN: RecordSummary], now: Milliseconds) -> [PrimaryAction] {
        let log = tenants[tenant]!
        let applied = position.appliedLSN
        guard applied <= log.lastLSN, applied + 1 >= log.firstLSN,
              let ourChecksum = log.checksum(at: applied) ?? read[applied]?.checksum,
              ourChecksum == position.appliedChecksum else {
            return replaceBySnapshot(tenant, position: position, read: read, now: now)
        }
        var common = applied
        for theirs in position.tail where theirs.lsn <= log.lastLSN {
            guard let ours = log.recent.summary(at: theirs.lsn) ?? read[theirs.lsn], ours == theirs else { break }
            common = theirs.lsn
        }
        var actions: [PrimaryAction] = []
        if position.lastLSN > common {
            let discarded = position.tail.filter { $0.lsn > common }
            actions.append(.standbyDiverged(Divergence(
                tenant: tenant, standby: link!.peer.nodeID, sharedThroughLSN: common, discardedFromLSN: common + 1,
                discardedThroughLSN: position.lastLSN, discardedEpochs: Self.epochs(of: discarded), bySnapshot: false)))
            actions.append(.send(link!.connection, .rewind(Rewind(epoch: epoch, tenant: tenant, toLSN: common))))
        }
        link!.streams[tenant] = TenantStream(phase: .streaming, ackedLSN: common, nextLSN: common + 1, committedTold: 0)
        if mode.waitsForStandby { actions += completeCommits(tenant, through: common) }
        return actions + pump(tenant, now: now)
    }

    /// The standby's applied point is not on this history (or not comparable with it): a
    /// snapshot replaces its database. First the divergence point is looked for among the
    /// applied records it summarised (``TenantPosition/history``), reading our summaries of them
    /// once when `recent` lacks them, so the report names exactly what is discarded.
    private mutating func replaceBySnapshot(_ tenant: TenantID, position: TenantPosition, read: [LSN: RecordSummary],
                                            historyRead: Bool = false, now: Milliseconds) -> [PrimaryAction] {
        let log = tenants[tenant]!
        let held = position.history + position.tail
        // Everything the standby holds precedes this log (a standby far behind): a catch-up,
        // nothing to compare.
        guard position.lastLSN >= log.firstLSN else { return startSnapshot(tenant, now: now) }
        let comparable = held.filter { $0.lsn + 1 >= log.firstLSN && $0.lsn <= log.lastLSN }
        let notRecent = comparable.filter { $0.lsn >= log.firstLSN && log.recent.summary(at: $0.lsn) == nil }
        if !historyRead, notRecent.contains(where: { read[$0.lsn] == nil }), let first = notRecent.first, let last = notRecent.last {
            let request = SummaryReadRequest(requestID: takeRequestID(), tenant: tenant, fromLSN: first.lsn, throughLSN: last.lsn)
            link!.streams[tenant] = TenantStream(phase: .findingDivergence(requestID: request.requestID, position: position))
            return [.readLogSummaries(link!.connection, request)]
        }
        // Histories are chains: the newest record both hold is where they part.
        let shared = comparable.reversed().first { theirs in
            if let ours = log.recent.summary(at: theirs.lsn) ?? read[theirs.lsn] { return ours == theirs }
            return theirs.lsn + 1 == log.firstLSN && theirs.checksum == log.baseChecksum
        }?.lsn
        let from = shared.map { $0 + 1 } ?? (held.first?.lsn ?? max(1, position.appliedLSN))
        var actions: [PrimaryAction] = []
        if position.lastLSN >= from {
            actions.append(.standbyDiverged(Divergence(
                tenant: tenant, standby: link!.peer.nodeID, sharedThroughLSN: shared, discardedFromLSN: from,
                discardedThroughLSN: position.lastLSN, discardedEpochs: Self.epochs(of: held.filter { $0.lsn >= from }), bySnapshot: true)))
        }
        return actions + startSnapshot(tenant, now: now)
    }

    private static func epochs(of summaries: [RecordSummary]) -> [Epoch] {
        var epochs: [Epoch] = []
        for s in summaries where epochs.last != s.epoch { epochs.append(s.epoch) }
        return epochs
    }

    private mutating func startSnapshot(_ tenant: TenantID, now: Milliseconds) -> [PrimaryAction] {
        let request = SnapshotRequest(requestID: takeRequestID(), tenant: tenant, epoch: epoch)
        link!.streams[tenant] = TenantStream(phase: .snapshotting(requestID: request.requestID, startedAt: now))
        return [.sendSnapshot(link!.connection, request)]
    }
}

// MARK: - Streaming

extension PrimaryReplication {
    private mutating func onAck(_ ack: Ack, now: Milliseconds) -> [PrimaryAction] {
        let tenant = ack.tenant
        let connection = link!.connection
        guard var stream = link!.streams[tenant] else {
            // Records of a tenant dropped since they were sent: nothing waits for them.
            if removed.contains(tenant) { return [] }
            return reject(connection, .protocolViolation, "ack for a tenant that is not streaming")
        }
        switch stream.phase {
        case .awaitingSnapshotAck(let lsn, let sentAt):
            guard ack.lsn == lsn else {
                return reject(connection, .protocolViolation, "ack of lsn \(ack.lsn) while awaiting the snapshot ack of \(lsn)")
            }
            grantLease(until: sentAt + ack.leaseMs)
            link!.streams[tenant] = TenantStream(phase: .streaming, ackedLSN: lsn, nextLSN: lsn + 1, committedTold: 0)
        case .streaming, .draining:
            guard ack.lsn > stream.ackedLSN, ack.lsn < stream.nextLSN,
                  let index = stream.inFlight.lastIndex(where: { $0.lsn == ack.lsn }) else {
                return reject(connection, .protocolViolation, "ack of lsn \(ack.lsn) outside the unacked range \(stream.ackedLSN + 1)..<\(stream.nextLSN)")
            }
            grantLease(until: stream.inFlight[index].sentAt + ack.leaseMs)
            for acked in stream.inFlight[...index] { stream.inFlightBytes -= acked.bytes }
            stream.inFlight.removeSubrange(...index)
            stream.ackedLSN = ack.lsn
            link!.streams[tenant] = stream
            if case .draining = stream.phase {
                // An ack of a rolled-back record: it completes no commit.
                return finishDrainIfDone(tenant) + pump(tenant, now: now)
            }
        case .verifying, .findingDivergence, .snapshotting:
            return reject(connection, .protocolViolation, "ack before the stream of the tenant started")
        }
        var actions: [PrimaryAction] = []
        if mode.waitsForStandby { actions += completeCommits(tenant, through: link!.streams[tenant]!.ackedLSN) }
        return actions + pump(tenant, now: now)
    }

    /// Sends what the window allows: asks the shell for the next records from the log (the
    /// only way records are sent apart from a caught-up stream's live records).
    private mutating func pump(_ tenant: TenantID, now: Milliseconds) -> [PrimaryAction] {
        guard let current = link, var stream = current.streams[tenant], case .streaming = stream.phase,
              stream.readRequestID == nil else { return [] }
        let log = tenants[tenant]!
        guard stream.nextLSN <= log.lastLSN else { return [] }
        if stream.nextLSN < log.firstLSN {
            // The log no longer reaches back: once nothing is in flight, resend from a snapshot.
            return stream.inFlight.isEmpty ? startSnapshot(tenant, now: now) : []
        }
        let room = config.inFlightRecordsMax - stream.inFlight.count
        let bytesMax = config.inFlightBytesMax - stream.inFlightBytes
        guard room > 0, bytesMax > 0 || stream.inFlight.isEmpty else { return [] }
        let request = LogReadRequest(
            requestID: takeRequestID(), tenant: tenant, fromLSN: stream.nextLSN,
            throughLSN: min(log.lastLSN, stream.nextLSN + UInt64(room) - 1), bytesMax: max(0, bytesMax),
            firstRecordMayExceed: stream.inFlight.isEmpty)
        stream.readRequestID = request.requestID
        link!.streams[tenant] = stream
        return [.readLog(current.connection, request)]
    }

    /// Puts one record on the wire and into the in-flight window.
    private mutating func sendRecord(_ tenant: TenantID, _ record: Record, now: Milliseconds) -> PrimaryAction {
        var stream = link!.streams[tenant]!
        precondition(record.lsn == stream.nextLSN, "\(tenant): sending lsn \(record.lsn), stream expects \(stream.nextLSN)")
        var log = tenants[tenant]!
        stream.nextLSN += 1
        stream.inFlight.append(InFlightRecord(lsn: record.lsn, bytes: record.byteCount, sentAt: now))
        stream.inFlightBytes += record.byteCount
        stream.committedTold = log.committedLSN
        link!.streams[tenant] = stream
        if let i = log.pending.firstIndex(where: { $0.lsn == record.lsn }) {
            log.pending[i].sentOn = link!.connection
            tenants[tenant] = log
        }
        let message = RecordMessage(epoch: epoch, tenant: tenant, committedLSN: log.committedLSN, record: record)
        return .send(link!.connection, .record(message))
    }

    private mutating func makeHeartbeat(now: Milliseconds) -> PrimaryHeartbeat {
        // Only streaming tenants: before its stream starts a tenant's tail on the standby is
        // unverified and must not be applied. Only tenants with news, to keep heartbeats small.
        let moved = link!.streams.compactMap { tenant, stream -> TenantID? in
            guard case .streaming = stream.phase, tenants[tenant]!.committedLSN > stream.committedTold else { return nil }
            return tenant
        }
        var committed: [TenantCommitted] = []
        // Bounded like a hello; tenants left out are told in the next heartbeat.
        for tenant in moved.sorted().prefix(config.tenantsMax) {
            let lsn = tenants[tenant]!.committedLSN
            committed.append(TenantCommitted(tenant: tenant, committedLSN: lsn))
            link!.streams[tenant]!.committedTold = lsn
        }
        link!.lastHeartbeatSentAt = now
        return PrimaryHeartbeat(epoch: epoch, sentAtMs: now, committed: committed)
    }

    private mutating func grantLease(until: Milliseconds) {
        leaseGrantedUntil = max(leaseGrantedUntil ?? until, until)
    }
}

// MARK: - Commits

extension PrimaryReplication {
    /// Completes waiting commits up to `lsn`, in order.
    private mutating func completeCommits(_ tenant: TenantID, through lsn: LSN) -> [PrimaryAction] {
        var log = tenants[tenant]!
        while let first = log.pending.first, first.lsn <= lsn {
            log.pending.removeFirst()
            log.readyLSN = first.lsn
        }
        tenants[tenant] = log
        return advanceCommitted(tenant)
    }

    /// A record is committed once it is durable where the mode requires AND in the local log:
    /// only then is it told to the standby as committed (the standby applies it) or to its
    /// client. A standby that applied a record its primary then lost in a crash would hold a
    /// state the cluster never keeps (invariant 6).
    private mutating func advanceCommitted(_ tenant: TenantID) -> [PrimaryAction] {
        var log = tenants[tenant]!
        let committed = min(log.readyLSN, log.syncedLSN)
        guard committed > log.committedLSN else { return [] }
        let actions = (log.committedLSN + 1...committed).map { PrimaryAction.commitDurable(tenant, $0) }
        log.committedLSN = committed
        tenants[tenant] = log
        return actions
    }

    /// The shell's local log made records durable through `lsn` (with `reportsLocalSync`). An
    /// lsn past the log's last record belongs to a commit that failed meanwhile: the shell
    /// reports syncs in its order of appends, so the next record with that lsn comes later.
    public mutating func onLocalSynced(_ tenant: TenantID, throughLSN lsn: LSN, now: Milliseconds) -> [PrimaryAction] {
        guard reportsLocalSync, var log = tenants[tenant] else { return [] }
        let synced = min(lsn, log.lastLSN)
        guard synced > log.syncedLSN else { return [] }
        log.syncedLSN = synced
        tenants[tenant] = log
        return advanceCommitted(tenant)
    }

    /// Fails the waiting commit at `lsn` and every later one (they build on it) and rolls the
    /// core's view of the log back to `lsn - 1`.
    ///
    /// If some of them were sent on the live connection, the standby holds or will hold
    /// records the shell is about to roll back, and acks for them may be on their way. The
    /// stream then drains: nothing more is sent for the tenant until every sent record is
    /// acked, and only then is the standby told to rewind. A rewind sent earlier could cross
    /// an ack of an old record, which would then pass for an ack of the record that reuses
    /// its lsn (invariant 1).
    private mutating func failPending(_ tenant: TenantID, from lsn: LSN, steppingDown: Bool = false, now: Milliseconds) -> [PrimaryAction] {
        var log = tenants[tenant]!
        guard let index = log.pending.firstIndex(where: { $0.lsn == lsn }) else { return [] }
        var actions: [PrimaryAction] = []
        for commit in log.pending[index...] {
            let failure: CommitFailure
            if commit.sentOn != nil {
                failure = .outcomeUnknown
            } else {
                failure = steppingDown ? .steppedDown : .standbyUnavailable
            }
            actions.append(.commitFailed(tenant, commit.lsn, failure))
        }
        log.pending.removeSubrange(index...)
        log.truncate(after: lsn - 1)
        tenants[tenant] = log

        guard let current = link, var stream = current.streams[tenant] else { return actions }
        switch stream.phase {
        case .streaming where stream.nextLSN > lsn:
            stream.phase = .draining(rewindTo: lsn - 1)
        case .draining(let rewindTo):
            stream.phase = .draining(rewindTo: min(rewindTo, lsn - 1))
        case .streaming, .verifying, .findingDivergence, .snapshotting, .awaitingSnapshotAck:
            break
        }
        // A log read in progress may cover rolled-back records: forget it.
        stream.readRequestID = nil
        link!.streams[tenant] = stream
        return actions + finishDrainIfDone(tenant) + pump(tenant, now: now)
    }

    /// Once every record sent before a rollback is acked, the standby discards them.
    private mutating func finishDrainIfDone(_ tenant: TenantID) -> [PrimaryAction] {
        guard let current = link, let stream = current.streams[tenant],
              case .draining(let rewindTo) = stream.phase, stream.inFlight.isEmpty else { return [] }
        link!.streams[tenant] = TenantStream(phase: .streaming, ackedLSN: rewindTo, nextLSN: rewindTo + 1, committedTold: stream.committedTold)
        return [.send(current.connection, .rewind(Rewind(epoch: epoch, tenant: tenant, toLSN: rewindTo)))]
    }

    private mutating func stepDown(to newer: Epoch, now: Milliseconds) -> [PrimaryAction] {
        steppedDownTo = newer
        var closes: [PrimaryAction] = []
        for connection in candidates.keys.sorted(by: { $0.rawValue < $1.rawValue }) {
            closes.append(.closeConnection(connection, .newerEpoch(newer)))
        }
        if let current = link { closes.append(.closeConnection(current.connection, .newerEpoch(newer))) }
        candidates = [:]
        link = nil
        var actions: [PrimaryAction] = [.stepDown(newerEpoch: newer)]
        for tenant in tenants.keys.sorted() {
            if let first = tenants[tenant]!.pending.first {
                actions += failPending(tenant, from: first.lsn, steppingDown: true, now: now)
            }
        }
        return actions + closes
    }

    /// Tells the peer why, then closes.
    private mutating func reject(_ connection: ConnectionID, _ code: RejectCode, _ reason: String) -> [PrimaryAction] {
        candidates[connection] = nil
        if link?.connection == connection { link = nil }
        return [
            .send(connection, .reject(Reject(epoch: epoch, code: code, reason: reason))),
            .closeConnection(connection, .rejectedPeer(code)),
        ]
    }

    private mutating func takeRequestID() -> UInt64 {
        defer { nextRequestID += 1 }
        return nextRequestID
    }
}

// MARK: - State

/// A commit waiting for the standby (sync mode).
private struct PendingCommit: Hashable, Sendable {
    var lsn: LSN
    var deadline: Milliseconds
    /// The connection it was last sent on, while the standby may hold it; nil when it was
    /// never sent or the standby proved in a hello that it does not have it.
    var sentOn: ConnectionID?
}

private struct InFlightRecord: Hashable, Sendable {
    var lsn: LSN
    var bytes: Int
    var sentAt: Milliseconds
}

/// The primary's view of one tenant's log.
private struct TenantLog: Sendable {
    var lastLSN: LSN
    var committedLSN: LSN
    var firstLSN: LSN
    var baseChecksum: UInt64
    /// Summaries of the latest records, covering at least every pending one.
    var recent: RecentSummaries
    /// lsn `readyLSN + 1 ... lastLSN`, in order (empty outside sync mode).
    var pending: [PendingCommit] = []
    /// Durable where the mode requires but for the local log: acked by the standby in sync
    /// mode, every record otherwise. `committedLSN` is the lower of this and `syncedLSN`.
    var readyLSN: LSN
    /// Durable in the local log (``PrimaryReplication/onLocalSynced(_:throughLSN:now:)``).
    var syncedLSN: LSN

    init(log: PrimaryTenantLog, recentMax: Int) {
        lastLSN = log.last.lsn
        committedLSN = log.last.lsn
        readyLSN = log.last.lsn
        syncedLSN = log.last.lsn
        firstLSN = log.firstLSN
        baseChecksum = log.baseChecksum
        recent = RecentSummaries(capacity: recentMax)
        if log.last.lsn > 0 { recent.append(log.last) }
    }

    mutating func append(_ summary: RecordSummary) {
        lastLSN = summary.lsn
        recent.append(summary)
    }

    mutating func truncate(after lsn: LSN) {
        precondition(lsn >= committedLSN, "rolling back to \(lsn) below committed lsn \(committedLSN)")
        lastLSN = lsn
        readyLSN = min(readyLSN, lsn)
        syncedLSN = min(syncedLSN, lsn)
        recent.truncate(after: lsn)
    }

    /// The database checksum at `lsn`, when known without reading the log.
    func checksum(at lsn: LSN) -> UInt64? {
        if lsn == 0 { return 0 }
        if let s = recent.summary(at: lsn) { return s.checksum }
        if lsn + 1 == firstLSN { return baseChecksum }
        return nil
    }
}

/// A bounded window of the latest record summaries, by lsn.
struct RecentSummaries: Sendable {
    private var items: [RecordSummary] = []
    let capacity: Int

    init(capacity: Int) { self.capacity = capacity }

    /// The lowest lsn held (one past the last when empty).
    var firstLSN: LSN { items.first?.lsn ?? LSN.max }

    func summary(at lsn: LSN) -> RecordSummary? {
        guard let first = items.first, lsn >= first.lsn, lsn - first.lsn < UInt64(items.count) else { return nil }
        return items[Int(lsn - first.lsn)]
    }

    mutating func append(_ summary: RecordSummary) {
        precondition(items.last.map { $0.lsn + 1 == summary.lsn } ?? true, "summary of lsn \(summary.lsn) after \(items.last!.lsn)")
        items.append(summary)
        // Trim in chunks so appends stay amortised O(1).
        if items.count >= 2 * capacity { items.removeFirst(items.count - capacity) }
    }

    mutating func truncate(after lsn: LSN) {
        while let last = items.last, last.lsn > lsn { items.removeLast() }
    }
}

private struct Candidate: Sendable {
    var peer: PeerIdentity
    var connectedAt: Milliseconds
}

/// The standby connection that completed its handshake.
private struct StandbyLink: Sendable {
    let connection: ConnectionID
    let peer: PeerIdentity
    var lastReceivedAt: Milliseconds
    var lastHeartbeatSentAt: Milliseconds
    var streams: [TenantID: TenantStream] = [:]
    /// Hello positions of tenants this primary has no log for yet (bounded by the hello).
    var unknownPositions: [TenantID: TenantPosition] = [:]
}

private struct TenantStream: Sendable {
    enum Phase: Hashable, Sendable {
        /// Waiting for log summaries to compare with the standby's hello position.
        case verifying(requestID: UInt64, position: TenantPosition)
        /// Waiting for log summaries to find where the standby's history parts from ours,
        /// before a snapshot replaces it.
        case findingDivergence(requestID: UInt64, position: TenantPosition)
        /// The shell is sending a snapshot.
        case snapshotting(requestID: UInt64, startedAt: Milliseconds)
        /// The snapshot is sent; records follow once the standby acks it.
        case awaitingSnapshotAck(lsn: LSN, sentAt: Milliseconds)
        case streaming
        /// Records sent were rolled back: waiting for their acks before the standby is told
        /// to rewind to `rewindTo` (see `failPending`).
        case draining(rewindTo: LSN)
    }

    var phase: Phase
    /// The standby holds every record up to here, fsynced.
    var ackedLSN: LSN = 0
    /// The next record to send.
    var nextLSN: LSN = 0
    /// Sent and not yet acked, in lsn order: exactly `ackedLSN + 1 ..< nextLSN`.
    var inFlight: [InFlightRecord] = []
    var inFlightBytes = 0
    /// The outstanding `.readLog`, if any.
    var readRequestID: UInt64? = nil
    /// The committed lsn the standby was last told.
    var committedTold: LSN = 0

    init(phase: Phase, ackedLSN: LSN = 0, nextLSN: LSN = 0, committedTold: LSN = 0) {
        self.phase = phase
        self.ackedLSN = ackedLSN
        self.nextLSN = nextLSN
        self.committedTold = committedTold
    }

    /// Whether a new record can go straight out instead of through a log read.
    func canSendLive(_ record: Record, config: ReplicationConfig) -> Bool {
        guard case .streaming = phase, readRequestID == nil, record.lsn == nextLSN,
              inFlight.count < config.inFlightRecordsMax else { return false }
        return inFlight.isEmpty || inFlightBytes + record.byteCount <= config.inFlightBytesMax
    }
}
