import ApiaryCore

// MARK: - Actions

/// What the standby's shell must do. Perform the actions of one returned array in order.
///
/// Storage actions of one tenant (`.persist`, `.truncateLog`, `.apply`, `.beginSnapshot`,
/// `.writeSnapshotPages`, `.installSnapshot`, `.abandonSnapshot`) MUST run in the order they
/// were emitted, across calls too (one serial queue per tenant): a record is appended after
/// the truncation before it, applied after it is persisted, and so on.
///
/// Why the order within one event is safe: an ack is emitted only from
/// ``StandbyReplication/onPersisted(_:throughLSN:now:)``, i.e. after the fsync (invariant 1);
/// `.apply` only covers records that are both persisted and committed, so the database is
/// never ahead of the log nor of the primary's commit (a primary may roll back an uncommitted
/// record and reuse its lsn).
public enum StandbyAction: Hashable, Sendable {
    /// Open a connection to the primary; report ``StandbyReplication/onConnected(_:peer:now:)``
    /// or ``StandbyReplication/onConnectFailed(now:)``. The shell SHOULD bound the attempt
    /// by `peerTimeoutMs`.
    case connect
    /// Encode and write `message` on the connection, after everything sent on it before.
    case send(ConnectionID, Message)
    /// Close the connection. The core has already forgotten it.
    case closeConnection(ConnectionID, CloseReason)
    /// Append the record to the tenant's log and fsync, then report
    /// ``StandbyReplication/onPersisted(_:throughLSN:now:)`` (cumulative, in lsn order).
    case persist(TenantID, Record)
    /// Discard the tenant's log records after `afterLSN` (never applied ones). Needs no fsync:
    /// if the discarded records come back after a crash, the next handshake discards them again.
    case truncateLog(TenantID, afterLSN: LSN)
    /// Apply the log's records up to `throughLSN` to the tenant's database, in order. After
    /// applying, the database checksum MUST equal `checksum` (the record's); a mismatch breaks
    /// invariant 6 and MUST stop the node rather than serve a diverged database.
    case apply(TenantID, throughLSN: LSN, checksum: UInt64)
    /// Start receiving a snapshot at `lsn` into a scratch file (the live database stays).
    case beginSnapshot(TenantID, lsn: LSN, dbSizePages: UInt32)
    /// Write these pages into the scratch file.
    case writeSnapshotPages(TenantID, [Page])
    /// Verify that the scratch pages' ``PageHashes`` checksum equals `checksum`, then replace
    /// the database with them and reset the log to start after `lsn`, atomically and durably;
    /// report ``StandbyReplication/onSnapshotInstalled(_:lsn:now:)``, or
    /// ``StandbyReplication/onSnapshotFailed(_:now:)`` without installing on a mismatch.
    case installSnapshot(TenantID, lsn: LSN, dbSizePages: UInt32, checksum: UInt64)
    /// Drop the scratch file of an unfinished snapshot.
    case abandonSnapshot(TenantID)
    /// A peer claims the newer epoch `newerEpoch`. Ask the monitor; if confirmed, call
    /// ``StandbyReplication/onEpochChanged(_:now:)``.
    case epochStale(newerEpoch: Epoch)
}

// MARK: - Startup state

/// What the standby's database and log hold for one tenant when the core starts.
public struct StandbyTenantLog: Hashable, Sendable {
    public var appliedLSN: LSN
    public var appliedChecksum: UInt64
    /// Summaries of the log's records after `appliedLSN`, in order (all of them).
    public var tail: [RecordSummary]
    /// Summaries of the log's last records up to `appliedLSN`, in order, ending at it (at most
    /// ``TenantPosition/historyMax``; those the log still holds). A former primary's tell the
    /// new primary where the two histories part (``TenantPosition/history``).
    public var history: [RecordSummary]

    public init(appliedLSN: LSN, appliedChecksum: UInt64, tail: [RecordSummary] = [], history: [RecordSummary] = []) {
        for (i, s) in tail.enumerated() {
            precondition(s.lsn == appliedLSN + 1 + UInt64(i), "tail entry \(i) has lsn \(s.lsn) after applied lsn \(appliedLSN)")
        }
        let history = history.suffix(TenantPosition.historyMax)
        for (i, s) in history.enumerated() {
            precondition(s.lsn + UInt64(history.count - i) == appliedLSN + 1, "history entry \(i) has lsn \(s.lsn), applied lsn is \(appliedLSN)")
        }
        self.appliedLSN = appliedLSN
        self.appliedChecksum = appliedChecksum
        self.tail = tail
        self.history = Array(history)
    }
}

/// One tenant as the standby sees it, for status pages, metrics and tests.
public struct StandbyTenantStatus: Hashable, Sendable {
    public var appliedLSN: LSN
    public var appliedChecksum: UInt64
    public var persistedLSN: LSN
    public var lastLSN: LSN
    /// The primary's committed lsn as last told on the current connection.
    public var committedLSN: LSN
    public var receivingSnapshot: Bool
    public var installingSnapshot: Bool
}

// MARK: - The core

/// The standby side of replication: connects to the primary, persists and acks its records,
/// applies the committed ones. A pure state machine (CONVENTIONS): events in, actions out.
///
/// Call ``onTick(now:)`` regularly (at least every `heartbeatIntervalMs / 2`); it asks for
/// the first connection too.
public struct StandbyReplication: Sendable {
    public let nodeID: NodeID
    public let config: ReplicationConfig
    public private(set) var epoch: Epoch
    /// This node promised not to be promoted before this time on its own monotonic clock
    /// (each ack and heartbeat promises `leaseMs` from when it is sent). A promotion MUST wait
    /// until it has passed, plus a margin for clock-rate drift (DESIGN §6).
    public private(set) var leasePromisedUntil: Milliseconds

    private var tenants: [TenantID: TenantState]
    /// Tenants dropped while this core ran (``onTenantRemoved(_:now:)``).
    private var removed: Set<TenantID> = []
    /// The first tick connects at once.
    private var link: Link = .idle(reconnectAt: .min)
    /// The node id in the certificate of the primary on the current connection.
    private var primaryNodeID: NodeID?

    /// - Parameters:
    ///   - tenants: what the database and log hold per tenant (see ``StandbyTenantLog``).
    ///   - now: the node's clock at startup. Promises are not persisted, so the core assumes
    ///     that an earlier incarnation promised `leaseMs` just before it stopped.
    public init(nodeID: NodeID, epoch: Epoch, config: ReplicationConfig = ReplicationConfig(), tenants: [TenantID: StandbyTenantLog] = [:], now: Milliseconds) {
        self.nodeID = nodeID
        self.epoch = epoch
        self.config = config
        self.tenants = tenants.mapValues { TenantState($0) }
        self.leasePromisedUntil = now + config.leaseMs
    }

    // MARK: Queries

    /// How long a promotion must still wait (0: it may go ahead): until the last lease this
    /// standby granted, plus the drift margin, has passed on its own clock, so the old primary
    /// has stopped committing and serving strong reads before this node starts (invariant 3).
    /// The caller MUST have stopped the stream first, so that no lease is granted meanwhile.
    public func promotionWaitMs(now: Milliseconds) -> Milliseconds {
        max(0, leasePromisedUntil + config.leaseDriftMarginMs - now)
    }

    /// Every tenant the core knows, in no particular order.
    public var tenantIDs: [TenantID] { Array(tenants.keys) }

    /// The connection on which the primary welcomed this standby, if any.
    public var streamingConnection: ConnectionID? {
        if case .streaming(let connection, _) = link { return connection }
        return nil
    }

    public func status(of tenant: TenantID) -> StandbyTenantStatus? {
        guard let t = tenants[tenant] else { return nil }
        return StandbyTenantStatus(
            appliedLSN: t.appliedLSN, appliedChecksum: t.appliedChecksum, persistedLSN: t.persistedLSN,
            lastLSN: t.lastLSN, committedLSN: t.committedLSN,
            receivingSnapshot: t.snapshot != nil, installingSnapshot: t.installing != nil)
    }

    // MARK: Events: timers and epoch

    /// Reconnects when due and closes a silent connection.
    public mutating func onTick(now: Milliseconds) -> [StandbyAction] {
        switch link {
        case .idle(let reconnectAt):
            guard now >= reconnectAt else { return [] }
            link = .connecting
            return [.connect]
        case .connecting:
            return []
        case .awaitingDurability(let connection, let since), .awaitingWelcome(let connection, let since):
            guard now - since >= config.peerTimeoutMs else { return [] }
            return close(connection, .peerTimeout, now: now)
        case .streaming(let connection, let lastReceivedAt):
            guard now - lastReceivedAt >= config.peerTimeoutMs else { return [] }
            return close(connection, .peerTimeout, now: now)
        }
    }

    /// The monitor confirmed a newer epoch. The current connection is closed: its primary may
    /// be stale, and the next hello carries the new epoch.
    public mutating func onEpochChanged(_ newEpoch: Epoch, now: Milliseconds) -> [StandbyAction] {
        guard newEpoch > epoch else { return [] }
        epoch = newEpoch
        guard let connection = link.connection else { return [] }
        return close(connection, .newerEpoch(newEpoch), now: now, reconnectDelayMs: 0)
    }

    // MARK: Events: connections

    /// The connection asked for by `.connect` is up and the peer's certificate checked out.
    public mutating func onConnected(_ connection: ConnectionID, peer: PeerIdentity, now: Milliseconds) -> [StandbyAction] {
        guard case .connecting = link else {
            return [.closeConnection(connection, .protocolViolation("connection not asked for"))]
        }
        guard peer.role == .node else {
            link = .idle(reconnectAt: now + config.reconnectDelayMs)
            return [.closeConnection(connection, .rejectedPeer(.wrongRole))]
        }
        // Commit knowledge belongs to a connection: a new primary's history is checked anew.
        for tenant in tenants.keys { tenants[tenant]!.committedLSN = tenants[tenant]!.appliedLSN }
        primaryNodeID = peer.nodeID
        link = .awaitingDurability(connection, since: now)
        return sendHelloIfDurable(now: now)
    }

    /// The `.connect` attempt failed.
    public mutating func onConnectFailed(now: Milliseconds) -> [StandbyAction] {
        guard case .connecting = link else { return [] }
        link = .idle(reconnectAt: now + config.reconnectDelayMs)
        return []
    }

    public mutating func onDisconnected(_ connection: ConnectionID, now: Milliseconds) -> [StandbyAction] {
        guard link.connection == connection else { return [] }
        link = .idle(reconnectAt: now + config.reconnectDelayMs)
        return abandonSnapshots()
    }

    /// Bytes on the connection did not decode; it is rejected and closed.
    public mutating func onDecodeError(_ connection: ConnectionID, _ error: DecodeError, now: Milliseconds) -> [StandbyAction] {
        guard link.connection == connection else { return [] }
        return violation(connection, "undecodable message: \(error)", now: now)
    }

    // MARK: Events: storage

    /// The system database, as applied here, says `tenant` was dropped: the core forgets it.
    /// Storage actions already issued for it may still report back (ignored), and what the
    /// primary still sends for it (records of a stream catching up, sent before the primary
    /// forgot it too) is ignored: nothing of it is persisted, acked or applied again. The shell
    /// deletes its files after the actions already issued.
    /// Also for a tenant it does not hold: what comes for it later is ignored all the same.
    public mutating func onTenantRemoved(_ tenant: TenantID, now: Milliseconds) -> [StandbyAction] {
        removed.insert(tenant)
        guard tenants.removeValue(forKey: tenant) != nil else { return [] }
        // A hello may have waited for one of its persists.
        return sendHelloIfDurable(now: now)
    }

    /// Records of `tenant` up to `throughLSN` are appended and fsynced.
    public mutating func onPersisted(_ tenant: TenantID, throughLSN lsn: LSN, now: Milliseconds) -> [StandbyAction] {
        if removed.contains(tenant) { return [] }
        guard var t = tenants[tenant] else { preconditionFailure("\(tenant): persisted \(lsn) for an unknown tenant") }
        precondition(lsn > t.persistedLSN && lsn <= t.lastLSN,
                     "\(tenant): persisted through \(lsn) but persisted was \(t.persistedLSN) and the log ends at \(t.lastLSN)")
        t.persistedLSN = lsn
        tenants[tenant] = t
        var actions: [StandbyAction] = []
        if case .streaming(let connection, _) = link {
            // Every record being persisted while streaming came on this connection: a hello
            // is sent only once nothing is left to persist.
            leasePromisedUntil = max(leasePromisedUntil, now + config.leaseMs)
            actions.append(.send(connection, .ack(Ack(epoch: epoch, tenant: tenant, lsn: lsn, leaseMs: config.leaseMs))))
        }
        actions += applyCommitted(tenant)
        return actions + sendHelloIfDurable(now: now)
    }

    /// The snapshot of `.installSnapshot` is installed (database replaced, log reset).
    public mutating func onSnapshotInstalled(_ tenant: TenantID, lsn: LSN, now: Milliseconds) -> [StandbyAction] {
        if removed.contains(tenant) { return [] }
        guard var t = tenants[tenant], let installing = t.installing, installing.lsn == lsn else {
            preconditionFailure("\(tenant): snapshot at \(lsn) installed but not being installed")
        }
        t.installing = nil
        t.appliedLSN = lsn
        t.appliedChecksum = installing.checksum
        t.tail = []
        t.history = []
        t.persistedLSN = lsn
        // What was known committed belonged to the history the snapshot replaced, which may
        // have run further than `lsn`: only the snapshot's own lsn is known committed now.
        t.committedLSN = lsn
        tenants[tenant] = t
        var actions: [StandbyAction] = []
        if case .streaming(let connection, _) = link {
            leasePromisedUntil = max(leasePromisedUntil, now + config.leaseMs)
            actions.append(.send(connection, .ack(Ack(epoch: epoch, tenant: tenant, lsn: lsn, leaseMs: config.leaseMs))))
        }
        return actions + sendHelloIfDurable(now: now)
    }

    /// The snapshot did not verify and was not installed; the database and log are unchanged.
    /// The connection is closed so that the next handshake decides again.
    public mutating func onSnapshotFailed(_ tenant: TenantID, now: Milliseconds) -> [StandbyAction] {
        if removed.contains(tenant) { return [] }
        guard tenants[tenant]?.installing != nil else { preconditionFailure("\(tenant): snapshot failed but none is being installed") }
        tenants[tenant]!.installing = nil
        var actions: [StandbyAction] = []
        if let connection = link.connection { actions += close(connection, .snapshotInstallFailed, now: now) }
        return actions + sendHelloIfDurable(now: now)
    }

    // MARK: Events: messages

    /// A message arrived on the connection.
    public mutating func onMessage(_ message: Message, from connection: ConnectionID, now: Milliseconds) -> [StandbyAction] {
        guard link.connection == connection else { return [] } // late message of a closed connection
        switch link {
        case .awaitingWelcome: link = .awaitingWelcome(connection, since: now)
        case .streaming: link = .streaming(connection, lastReceivedAt: now)
        case .awaitingDurability:
            return violation(connection, "\(message.kind) before this standby's hello", now: now)
        case .idle, .connecting:
            preconditionFailure("message on \(connection) while \(link)")
        }
        if message.epoch < epoch {
            // Invariant 3: nothing from an older epoch is accepted.
            if case .reject = message { return close(connection, .rejectedPeer(.staleEpoch), now: now) }
            return reject(connection, .staleEpoch, "message of epoch \(message.epoch); this node's epoch is \(epoch)", now: now)
        }
        if message.epoch > epoch {
            return [.epochStale(newerEpoch: message.epoch)] + close(connection, .newerEpoch(message.epoch), now: now)
        }
        if case .reject(let r) = message {
            return close(connection, .rejectedByPeer(r.code, r.reason), now: now)
        }
        if case .awaitingWelcome = link {
            guard case .welcome(let welcome) = message else {
                return violation(connection, "expected welcome, got \(message.kind)", now: now)
            }
            guard welcome.nodeID == primaryNodeID else {
                return reject(connection, .unexpectedPeer, "welcome names node '\(welcome.nodeID)' but the certificate names '\(primaryNodeID ?? "")'", now: now)
            }
            link = .streaming(connection, lastReceivedAt: now)
            return []
        }
        switch message {
        case .record(let m) where removed.contains(m.tenant): return []
        case .rewind(let m) where removed.contains(m.tenant): return []
        case .snapshotBegin(let m) where removed.contains(m.tenant): return []
        case .snapshotPages(let m) where removed.contains(m.tenant): return []
        case .snapshotEnd(let m) where removed.contains(m.tenant): return []
        case .record(let m): return onRecord(m, connection: connection, now: now)
        case .primaryHeartbeat(let m): return onHeartbeat(m, connection: connection, now: now)
        case .rewind(let m): return onRewind(m, connection: connection, now: now)
        case .snapshotBegin(let m): return onSnapshotBegin(m, connection: connection, now: now)
        case .snapshotPages(let m): return onSnapshotPages(m, connection: connection, now: now)
        case .snapshotEnd(let m): return onSnapshotEnd(m, connection: connection, now: now)
        case .hello, .welcome, .reject, .ack, .standbyHeartbeat:
            return violation(connection, "a standby does not accept \(message.kind) while streaming", now: now)
        }
    }
}

// MARK: - Streaming

extension StandbyReplication {
    private mutating func onRecord(_ m: RecordMessage, connection: ConnectionID, now: Milliseconds) -> [StandbyAction] {
        var t = tenants[m.tenant] ?? TenantState(StandbyTenantLog(appliedLSN: 0, appliedChecksum: 0))
        guard t.snapshot == nil, t.installing == nil else {
            return violation(connection, "record while a snapshot of the tenant is in progress", now: now)
        }
        guard m.record.lsn == t.lastLSN + 1, m.record.epoch <= m.epoch else {
            return violation(connection, "record lsn \(m.record.lsn) epoch \(m.record.epoch) after lsn \(t.lastLSN) in epoch \(m.epoch)", now: now)
        }
        t.committedLSN = max(t.committedLSN, m.committedLSN)
        tenants[m.tenant] = t
        var actions = applyCommitted(m.tenant)
        t = tenants[m.tenant]!
        guard t.tail.count < config.unappliedRecordsMax else {
            return actions + violation(connection, "more than \(config.unappliedRecordsMax) unapplied records", now: now)
        }
        t.tail.append(RecordSummary(m.record))
        tenants[m.tenant] = t
        actions.append(.persist(m.tenant, m.record))
        return actions
    }

    private mutating func onHeartbeat(_ m: PrimaryHeartbeat, connection: ConnectionID, now: Milliseconds) -> [StandbyAction] {
        leasePromisedUntil = max(leasePromisedUntil, now + config.leaseMs)
        var actions: [StandbyAction] = [
            .send(connection, .standbyHeartbeat(StandbyHeartbeat(epoch: epoch, echoSentAtMs: m.sentAtMs, leaseMs: config.leaseMs))),
        ]
        for entry in m.committed where tenants[entry.tenant] != nil {
            tenants[entry.tenant]!.committedLSN = max(tenants[entry.tenant]!.committedLSN, entry.committedLSN)
            actions += applyCommitted(entry.tenant)
        }
        return actions
    }

    private mutating func onRewind(_ m: Rewind, connection: ConnectionID, now: Milliseconds) -> [StandbyAction] {
        guard var t = tenants[m.tenant], t.snapshot == nil, t.installing == nil,
              m.toLSN >= t.appliedLSN, m.toLSN < t.lastLSN, t.persistedLSN == t.lastLSN else {
            return violation(connection, "rewind to \(m.toLSN) of a tenant that cannot rewind there", now: now)
        }
        t.tail.removeLast(Int(t.lastLSN - m.toLSN))
        t.persistedLSN = m.toLSN
        t.committedLSN = min(t.committedLSN, m.toLSN)
        tenants[m.tenant] = t
        return [.truncateLog(m.tenant, afterLSN: m.toLSN)]
    }

    /// Applies what is both fsynced here and committed on the primary.
    private mutating func applyCommitted(_ tenant: TenantID) -> [StandbyAction] {
        var t = tenants[tenant]!
        let target = min(t.committedLSN, t.persistedLSN)
        guard target > t.appliedLSN, t.installing == nil else { return [] }
        let count = Int(target - t.appliedLSN)
        t.appliedChecksum = t.tail[count - 1].checksum
        t.appliedLSN = target
        t.remember(applied: t.tail[..<count])
        t.tail.removeFirst(count)
        tenants[tenant] = t
        return [.apply(tenant, throughLSN: target, checksum: t.appliedChecksum)]
    }
}

// MARK: - Snapshots

extension StandbyReplication {
    private mutating func onSnapshotBegin(_ m: SnapshotBegin, connection: ConnectionID, now: Milliseconds) -> [StandbyAction] {
        var t = tenants[m.tenant] ?? TenantState(StandbyTenantLog(appliedLSN: 0, appliedChecksum: 0))
        guard t.snapshot == nil, t.installing == nil, t.persistedLSN == t.lastLSN else {
            return violation(connection, "snapshot while the tenant is busy", now: now)
        }
        t.snapshot = SnapshotReceive(lsn: m.lsn, dbSizePages: m.dbSizePages, pagesReceived: 0)
        tenants[m.tenant] = t
        return [.beginSnapshot(m.tenant, lsn: m.lsn, dbSizePages: m.dbSizePages)]
    }

    private mutating func onSnapshotPages(_ m: SnapshotPages, connection: ConnectionID, now: Milliseconds) -> [StandbyAction] {
        guard var snapshot = tenants[m.tenant]?.snapshot else {
            return violation(connection, "snapshot pages without a snapshot", now: now)
        }
        snapshot.pagesReceived += m.pages.count
        guard snapshot.pagesReceived <= Int(snapshot.dbSizePages), m.pages.allSatisfy({ $0.number <= snapshot.dbSizePages }) else {
            return violation(connection, "snapshot pages beyond its size of \(snapshot.dbSizePages) pages", now: now)
        }
        tenants[m.tenant]!.snapshot = snapshot
        return [.writeSnapshotPages(m.tenant, m.pages)]
    }

    private mutating func onSnapshotEnd(_ m: SnapshotEnd, connection: ConnectionID, now: Milliseconds) -> [StandbyAction] {
        guard let snapshot = tenants[m.tenant]?.snapshot, snapshot.lsn == m.lsn else {
            return violation(connection, "snapshot end without its beginning", now: now)
        }
        tenants[m.tenant]!.snapshot = nil
        tenants[m.tenant]!.installing = Installing(lsn: m.lsn, checksum: m.checksum)
        return [.installSnapshot(m.tenant, lsn: m.lsn, dbSizePages: snapshot.dbSizePages, checksum: m.checksum)]
    }

    private mutating func abandonSnapshots() -> [StandbyAction] {
        var actions: [StandbyAction] = []
        for tenant in tenants.keys.sorted() where tenants[tenant]!.snapshot != nil {
            tenants[tenant]!.snapshot = nil
            actions.append(.abandonSnapshot(tenant))
        }
        return actions
    }
}

// MARK: - Handshake and closing

extension StandbyReplication {
    /// The hello reports what is durable, so it waits until every persist and snapshot
    /// install issued earlier has finished: the primary counts a record in the hello as
    /// held by the standby (and may complete its commit on that basis).
    private mutating func sendHelloIfDurable(now: Milliseconds) -> [StandbyAction] {
        guard case .awaitingDurability(let connection, let since) = link else { return [] }
        guard tenants.values.allSatisfy({ $0.persistedLSN == $0.lastLSN && $0.installing == nil }) else { return [] }
        link = .awaitingWelcome(connection, since: since)
        var positions: [TenantPosition] = []
        for tenant in tenants.keys.sorted() {
            let t = tenants[tenant]!
            positions.append(TenantPosition(
                tenant: tenant, appliedLSN: t.appliedLSN, appliedChecksum: t.appliedChecksum, lastLSN: t.lastLSN,
                tail: Array(t.tail.prefix(config.unappliedRecordsMax)), history: Array(t.history.suffix(TenantPosition.historyMax))))
        }
        return [.send(connection, .hello(Hello(nodeID: nodeID, epoch: epoch, tenants: positions)))]
    }

    private mutating func close(_ connection: ConnectionID, _ reason: CloseReason, now: Milliseconds, reconnectDelayMs: Milliseconds? = nil) -> [StandbyAction] {
        link = .idle(reconnectAt: now + (reconnectDelayMs ?? config.reconnectDelayMs))
        return [.closeConnection(connection, reason)] + abandonSnapshots()
    }

    private mutating func reject(_ connection: ConnectionID, _ code: RejectCode, _ reason: String, now: Milliseconds) -> [StandbyAction] {
        [.send(connection, .reject(Reject(epoch: epoch, code: code, reason: reason)))] + close(connection, .rejectedPeer(code), now: now)
    }

    private mutating func violation(_ connection: ConnectionID, _ detail: String, now: Milliseconds) -> [StandbyAction] {
        [.send(connection, .reject(Reject(epoch: epoch, code: .protocolViolation, reason: detail)))]
            + close(connection, .protocolViolation(detail), now: now)
    }
}

// MARK: - State

private enum Link: Sendable {
    case idle(reconnectAt: Milliseconds)
    /// `.connect` emitted; the shell reports the outcome.
    case connecting
    /// Connected; the hello waits for outstanding persists and installs.
    case awaitingDurability(ConnectionID, since: Milliseconds)
    case awaitingWelcome(ConnectionID, since: Milliseconds)
    case streaming(ConnectionID, lastReceivedAt: Milliseconds)

    var connection: ConnectionID? {
        switch self {
        case .idle, .connecting: return nil
        case .awaitingDurability(let c, _), .awaitingWelcome(let c, _), .streaming(let c, _): return c
        }
    }
}

private struct SnapshotReceive: Sendable {
    var lsn: LSN
    var dbSizePages: UInt32
    var pagesReceived: Int
}

private struct Installing: Sendable {
    var lsn: LSN
    var checksum: UInt64
}

private struct TenantState: Sendable {
    var appliedLSN: LSN
    var appliedChecksum: UInt64
    /// `appliedLSN + 1 ... lastLSN`: in the log, or being persisted.
    var tail: [RecordSummary]
    /// The last applied records, ending at `appliedLSN` (``TenantPosition/history``).
    var history: [RecordSummary]
    /// Records up to here are fsynced (≥ `appliedLSN`).
    var persistedLSN: LSN
    /// The primary's committed lsn, as told on the current connection.
    var committedLSN: LSN
    var snapshot: SnapshotReceive? = nil
    var installing: Installing? = nil

    var lastLSN: LSN { appliedLSN + UInt64(tail.count) }

    init(_ log: StandbyTenantLog) {
        appliedLSN = log.appliedLSN
        appliedChecksum = log.appliedChecksum
        tail = log.tail
        history = log.history
        persistedLSN = log.appliedLSN + UInt64(log.tail.count)
        committedLSN = log.appliedLSN
    }

    mutating func remember(applied: ArraySlice<RecordSummary>) {
        history.append(contentsOf: applied)
        // Trim in chunks so applies stay amortised O(1).
        if history.count >= 2 * TenantPosition.historyMax { history.removeFirst(history.count - TenantPosition.historyMax) }
    }
}
