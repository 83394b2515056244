/// Where the monitor keeps its state (DESIGN §6): its own SQLite file for now, etcd later
/// (DESIGN §11), so the core and the service see only this interface.
///
/// A failed `save` MUST stop the monitor: the core has already moved on, and a monitor whose
/// memory is ahead of its store must not answer anyone. Restarted, it loads the store and
/// decides nothing until it has heard from the nodes again (``MonitorConfig/startupGraceMs``).
public protocol MonitorStore: AnyObject {
    /// The durable state, or nil when the store holds none yet (bootstrap the formation).
    /// - Throws: when the store cannot be read or holds a state that fails
    ///   ``MonitorState/validate()``.
    func load() throws -> MonitorState?
    /// Makes a new formation's first state durable. MUST fail if the store already holds one.
    func create(_ state: MonitorState) throws
    /// Makes `change` durable, all of it or none, before it returns.
    func save(_ change: StateChange) throws
}

/// A store in memory, for tests and simulations: `save` applies the change exactly as the
/// core does (``MonitorState/apply(_:)``).
public final class InMemoryMonitorStore: MonitorStore {
    public private(set) var state: MonitorState?
    /// How many `save` calls succeeded.
    public private(set) var saves = 0

    public init(_ state: MonitorState? = nil) { self.state = state }

    public func load() throws -> MonitorState? {
        try state?.validate()
        return state
    }

    public func create(_ state: MonitorState) throws {
        guard self.state == nil else { throw MonitorStateError("the store already holds formation \(self.state!.formation)") }
        try state.validate()
        self.state = state
    }

    public func save(_ change: StateChange) throws {
        guard state != nil else { throw MonitorStateError("the store holds no formation yet") }
        state!.apply(change)
        saves += 1
    }
}
