// The register workload's checker (docs/chaos.md): is each key's history linearizable? Pure:
// no clock, no I/O. Written by hand: there is no Swift library for it. The search is Wing &
// Gong's, with Lowe's memoisation of (linearized set, register value) as Porcupine and Knossos
// use it, and a bound on the states it may explore: past the bound the answer is "could not
// decide", never a pass.

/// Linearizability of single-register histories (read, write, compare-and-set), one key at a
/// time (registers are independent, so a history is linearizable if and only if each key's is).
///
/// Outcomes: an `ok` operation took effect exactly once between its invocation and its
/// completion (a compare-and-set answered "not swapped" is `ok` too: it saw another value); a
/// `failed` one never took effect and is dropped; an `unknown` write or compare-and-set took
/// effect at most once at any time after its invocation (its completion is +infinity), or never.
/// Reads that are not `ok` observed nothing and are dropped.
public enum Linearizability {
    /// States (distinct linearized set and register value) the search may visit per key before it
    /// gives up with ``Verdict/undecided``. What it takes grows with how many operations on one
    /// key overlap in time, not with the length of the history: a few thousand operations per
    /// key from a handful of clients take about as many states (milliseconds); 300,000 states take
    /// about a second and 120 MB in a release build (measured: a linearizable history of 16
    /// clients on one key decides in under 150,000; of 32 clients, not within the bound).
    public static let statesMaxDefault = 300_000

    public enum Verdict: String, Codable, Sendable {
        case linearizable
        case notLinearizable = "not_linearizable"
        /// The bound on states was reached first: neither a pass nor a failure.
        case undecided = "could_not_decide"
    }

    /// One key's verdict.
    public struct KeyResult: Sendable, Hashable {
        public var key: Int
        public var verdict: Verdict
        /// Operations the search had to order (acknowledged ones, and writes and compare-and-sets
        /// of unknown outcome); operations not executed and reads without an answer are left out.
        public var operations: Int
        /// Of them, writes and compare-and-sets whose outcome is unknown.
        public var unknown: Int
        public var statesExplored: Int
        /// Why not linearizable, or where the search stopped; empty when linearizable.
        public var explanation: String
    }

    /// Checks every key's history of register operations (the other kinds are ignored).
    /// - Parameters:
    ///   - history: the workload's operations; register ones MUST carry their `key`.
    ///   - initialValue: every register's value before the first operation.
    ///   - statesMax: the bound per key (``statesMaxDefault``).
    /// - Returns: one result per key, by key.
    public static func check(history: [WorkloadOperation], initialValue: Int = 0, statesMax: Int = statesMaxDefault) -> [KeyResult] {
        let registers = history.filter { $0.kind.isRegister && $0.key != nil }
        return Dictionary(grouping: registers, by: { $0.key! }).sorted { $0.key < $1.key }.map {
            checkKey($0.key, operations: $0.value, initialValue: initialValue, statesMax: statesMax)
        }
    }

    /// Checks one key's operations (all MUST be register operations on that key).
    public static func checkKey(_ key: Int, operations: [WorkloadOperation], initialValue: Int, statesMax: Int = statesMaxDefault) -> KeyResult {
        var search = Search(operations: operations, initialValue: initialValue, statesMax: statesMax)
        // The plain violations first: decided without search, whatever the bound, and said plainly.
        let plain = Prechecks.unexplainedObservations(operations, initialValue: initialValue)
            + Prechecks.readsBackInTime(operations, initialValue: initialValue).problems
        if !plain.isEmpty {
            return KeyResult(key: key, verdict: .notLinearizable, operations: search.definite.count + search.unknown.count, unknown: search.unknown.count,
                             statesExplored: 0, explanation: "key \(key): " + plain.prefix(3).joined(separator: "; ") + (plain.count > 3 ? "; and \(plain.count - 3) more" : ""))
        }
        let verdict = search.run()
        var result = KeyResult(key: key, verdict: verdict, operations: search.definite.count + search.unknown.count,
                               unknown: search.unknown.count, statesExplored: search.states, explanation: "")
        switch verdict {
        case .linearizable: break
        case .notLinearizable: result.explanation = "key \(key): " + search.explain()
        case .undecided: result.explanation = "key \(key): no verdict within \(statesMax) states; " + search.explain()
        }
        return result
    }
}

extension WorkloadOperation.Kind {
    var isRegister: Bool { self == .registerRead || self == .registerWrite || self == .registerCAS }
}

// MARK: The search

/// One key's search. Vocabulary: a *definite* operation is one that took effect within its
/// interval (every `ok` one); an *unknown* one is a write or compare-and-set that may have taken
/// effect at any time after its invocation, or never. A linearization places every definite
/// operation, and any unknown ones it needs, in an order that respects real time (an operation
/// that completed before another was invoked comes first) and register semantics.
///
/// Depth-first over nodes (the definite operations placed, the unknown ones applied, the value);
/// a node's children place one more operation that may come next (invoked no later than the
/// earliest completion among the definite operations not yet placed). Visited nodes are kept
/// (Lowe's cache): a node met again, or one that applied a superset of the unknown operations of
/// a visited node with the same placed set and value, cannot succeed where that one failed.
///
/// Four reductions keep the states few, each exact (each by moving an operation within a
/// linearization that exists, so that the search still finds one if any exists):
/// - a value that no remaining operation observes (reads it, or compares against it) is the
///   same as any other such value: they all become one value, "unobserved" (-1);
/// - an operation that leaves the value as it is and may be placed now (a read of the current
///   value, a compare-and-set that finds another value) is placed without trying alternatives:
///   any linearization from here can be changed to place it first;
/// - an unknown write or compare-and-set is tried only right before an operation that needs its
///   effect (one that reads or compares against the value it writes, or a compare-and-set that
///   must not find the current value): elsewhere it can be moved later, or left out when a
///   write overwrites it first;
/// - unknown writes of unobserved values are interchangeable once invoked: only the earliest
///   invoked one not yet applied is tried.
struct Search {
    enum Kind { case read, write, casSwapped, casNotSwapped, casUnknown }
    struct Op {
        var kind: Kind
        var invokedMs: Int64
        /// `Int64.max` for unknown operations.
        var completedMs: Int64
        /// The value read, written, or expected (compare-and-set), as a value id.
        var a: Int32
        /// A compare-and-set's new value id.
        var b: Int32
        var source: WorkloadOperation
    }

    struct CacheKey: Hashable {
        var placedPrefix: Int32
        var placedExtra: [Int32]
        var value: Int32
    }

    struct Node {
        /// Definite operations 0..<placedPrefix are placed, and those in placedExtra (sorted, all
        /// above placedPrefix).
        var placedPrefix: Int32
        var placedExtra: [Int32]
        /// Unknown operations applied, sorted.
        var applied: [Int32]
        /// How many of `unobservedWrites` are applied: always the first ones.
        var unobservedApplied: Int32 = 0
        var value: Int32
        /// Definite operation i as i, unknown j as ~j.
        var candidates: [Int32] = []
        var next = 0
    }

    static let unobserved: Int32 = -1
    /// A read that found no row: a value nothing writes.
    static let absent: Int32 = -2

    let statesMax: Int
    private(set) var definite: [Op] = []
    private(set) var unknown: [Op] = []
    private var rawValues: [Int] = []
    private var initial: Int32 = unobserved
    /// For each observed value id: the definite operations that observe it (read it, or compare
    /// against it), and whether an unknown compare-and-set does.
    private var observers: [[Int32]] = []
    private var observedByUnknown: [Bool] = []
    // Unknown operations by what they could be for, so that a node does not go through all.
    /// Unknown writes of values nothing observes, in invocation order.
    private var unobservedWrites: [Int32] = []
    /// Unknown writes of observed values, and the same by value.
    private var observedWrites: [Int32] = []
    private var writesByValue: [[Int32]] = []
    /// Unknown compare-and-sets by the value they expect.
    private var casByExpected: [[Int32]] = []
    /// Unknown operations writing a value that an unknown compare-and-set expects.
    private var chainProducers: [Int32] = []
    private var cache: [CacheKey: [[Int32]]] = [:]
    private(set) var states = 0
    /// The node that placed the most definite operations: where the explanation looks.
    private var deepest: Node?
    private var deepestCount = -1

    init(operations: [WorkloadOperation], initialValue: Int, statesMax: Int) {
        self.statesMax = statesMax
        let kept = operations.filter { op in
            switch (op.kind, op.outcome) {
            case (_, .failed): false
            case (.registerRead, .unknown): false
            default: op.kind.isRegister
            }
        }
        // Observed values get ids; every other value is "unobserved".
        var ids: [Int: Int32] = [:]
        func observe(_ v: Int) {
            if ids[v] == nil {
                ids[v] = Int32(rawValues.count)
                rawValues.append(v)
            }
        }
        for op in kept {
            if op.kind == .registerRead, let v = op.readValue { observe(v) }
            if op.kind == .registerCAS, let e = op.expected { observe(e) }
        }
        func id(_ v: Int?) -> Int32 { v.flatMap { ids[$0] } ?? Self.unobserved }
        initial = id(initialValue)
        for op in kept {
            // An acknowledged compare-and-set without its result counts as unknown: weaker, not wrong.
            let isUnknown = op.outcome == .unknown || (op.kind == .registerCAS && op.swapped == nil)
            var o = Op(kind: .read, invokedMs: op.invokedMs, completedMs: isUnknown ? Int64.max : max(op.invokedMs, op.completedMs),
                       a: Self.unobserved, b: Self.unobserved, source: op)
            switch op.kind {
            case .registerRead:
                o.a = op.readValue.map { ids[$0]! } ?? Self.absent
            case .registerWrite:
                o.kind = .write
                o.a = id(op.written)
            case .registerCAS:
                o.kind = isUnknown ? .casUnknown : (op.swapped == true ? .casSwapped : .casNotSwapped)
                o.a = id(op.expected)
                o.b = id(op.written)
            default:
                continue
            }
            if isUnknown { unknown.append(o) } else { definite.append(o) }
        }
        definite.sort { ($0.invokedMs, $0.completedMs) < ($1.invokedMs, $1.completedMs) }
        unknown.sort { $0.invokedMs < $1.invokedMs }
        observers = Array(repeating: [], count: rawValues.count)
        observedByUnknown = Array(repeating: false, count: rawValues.count)
        for (i, op) in definite.enumerated() where op.kind != .write && op.a >= 0 { observers[Int(op.a)].append(Int32(i)) }
        for op in unknown where op.kind == .casUnknown && op.a >= 0 { observedByUnknown[Int(op.a)] = true }
        writesByValue = Array(repeating: [], count: rawValues.count)
        casByExpected = Array(repeating: [], count: rawValues.count)
        for (j, op) in unknown.enumerated() {
            let produced = op.kind == .write ? op.a : op.b
            if produced >= 0, observedByUnknown[Int(produced)] { chainProducers.append(Int32(j)) }
            if op.kind == .casUnknown {
                if op.a >= 0 { casByExpected[Int(op.a)].append(Int32(j)) }
            } else if op.a >= 0 {
                observedWrites.append(Int32(j))
                writesByValue[Int(op.a)].append(Int32(j))
            } else {
                unobservedWrites.append(Int32(j))
            }
        }
    }

    // MARK: Running

    mutating func run() -> Linearizability.Verdict {
        var root = Node(placedPrefix: 0, placedExtra: [], applied: [], value: initial)
        root.value = canonical(initial, root)
        if definite.isEmpty { return .linearizable }
        guard visit(root) else { return .undecided }
        root.candidates = candidates(of: root)
        var stack = [root]
        while !stack.isEmpty {
            let top = stack.count - 1
            guard stack[top].next < stack[top].candidates.count else {
                stack.removeLast()
                continue
            }
            let candidate = stack[top].candidates[stack[top].next]
            stack[top].next += 1
            var child = apply(candidate, to: stack[top])
            if placedCount(child) == definite.count { return .linearizable }
            if subsumed(child) { continue }
            guard visit(child) else { return .undecided }
            child.candidates = candidates(of: child)
            stack.append(child)
        }
        return .notLinearizable
    }

    /// Records a new node; false when that is one state past the bound.
    private mutating func visit(_ node: Node) -> Bool {
        states += 1
        cache[CacheKey(placedPrefix: node.placedPrefix, placedExtra: node.placedExtra, value: node.value), default: []].append(node.applied)
        let count = placedCount(node)
        if count > deepestCount {
            deepestCount = count
            deepest = node
        }
        return states <= statesMax
    }

    private func subsumed(_ node: Node) -> Bool {
        guard let seen = cache[CacheKey(placedPrefix: node.placedPrefix, placedExtra: node.placedExtra, value: node.value)] else { return false }
        return seen.contains { Self.isSubset($0, of: node.applied) }
    }

    static func isSubset(_ a: [Int32], of b: [Int32]) -> Bool {
        guard a.count <= b.count else { return false }
        var j = 0
        for x in a {
            while j < b.count, b[j] < x { j += 1 }
            guard j < b.count, b[j] == x else { return false }
            j += 1
        }
        return true
    }

    private func placedCount(_ node: Node) -> Int { Int(node.placedPrefix) + node.placedExtra.count }

    private func isPlaced(_ i: Int32, _ node: Node) -> Bool {
        i < node.placedPrefix || Self.sortedContains(node.placedExtra, i)
    }

    static func sortedContains(_ array: [Int32], _ x: Int32) -> Bool {
        var lo = 0, hi = array.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if array[mid] < x { lo = mid + 1 } else { hi = mid }
        }
        return lo < array.count && array[lo] == x
    }

    static func sortedInsert(_ array: inout [Int32], _ x: Int32) {
        var lo = 0, hi = array.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if array[mid] < x { lo = mid + 1 } else { hi = mid }
        }
        array.insert(x, at: lo)
    }

    /// The value as the rest of the history can tell it: "unobserved" once every operation that
    /// observes it is placed (and no unknown compare-and-set compares against it).
    private func canonical(_ value: Int32, _ node: Node) -> Int32 {
        guard value >= 0, !observedByUnknown[Int(value)] else { return value }
        return observers[Int(value)].allSatisfy { isPlaced($0, node) } ? Self.unobserved : value
    }

    /// The definite operations not placed that may come next (invoked no later than the earliest
    /// completion among those not placed), in invocation order, and that earliest completion.
    private func window(of node: Node) -> (ops: [Int32], earliestCompletionMs: Int64) {
        var earliest = Int64.max
        var ops: [Int32] = []
        var i = Int(node.placedPrefix)
        while i < definite.count, definite[i].invokedMs <= earliest {
            if !isPlaced(Int32(i), node) {
                earliest = min(earliest, definite[i].completedMs)
                ops.append(Int32(i))
            }
            i += 1
        }
        return (ops, earliest)
    }

    private func candidates(of node: Node) -> [Int32] {
        let (window, earliest) = window(of: node)
        var result: [Int32] = []
        // What an unknown operation applied now could be for: the values that operations which
        // may come next wait for, and whether one waits for the current value to go.
        var wanted: [Int32] = []
        var waitsForChange = false
        for i in window {
            let op = definite[Int(i)]
            switch op.kind {
            case .read where op.a == node.value, .casNotSwapped where op.a != node.value:
                return [i] // leaves the value alone and fits now: no alternative needed
            case .write:
                result.append(i)
            case .casSwapped where op.a == node.value:
                result.append(i)
            case .read, .casSwapped:
                wanted.append(op.a)
            case .casNotSwapped:
                waitsForChange = true
            case .casUnknown:
                break
            }
        }
        // An unknown operation applied where nothing next needs its effect can be moved later
        // (past what does not care) or left out (when a write overwrites it): try it only right
        // before an operation that needs it.
        var unknownCandidates: [Int32] = []
        func pending(_ j: Int32) -> Bool { unknown[Int(j)].invokedMs <= earliest && !Self.sortedContains(node.applied, j) }
        func consider(_ j: Int32) {
            guard !unknownCandidates.contains(~j), pending(j) else { return }
            let op = unknown[Int(j)]
            let target: Int32
            switch op.kind {
            case .write: target = canonical(op.a, node)
            case .casUnknown where op.a == node.value: target = canonical(op.b, node)
            default: return
            }
            guard target != node.value else { return }
            if target == Self.unobserved {
                // Only good for making the current value go; such writes are handled below.
                guard op.kind == .casUnknown, waitsForChange else { return }
            } else {
                guard waitsForChange || wanted.contains(target) || casByExpected[Int(target)].contains(where: pending) else { return }
            }
            unknownCandidates.append(~j)
        }
        for t in wanted where t >= 0 { writesByValue[Int(t)].forEach(consider) }
        if node.value >= 0 { casByExpected[Int(node.value)].forEach(consider) }
        chainProducers.forEach(consider)
        if waitsForChange, node.value != Self.unobserved {
            observedWrites.forEach(consider)
            // Writes of unobserved values (and of values no longer observed) are
            // interchangeable: the earliest invoked one not applied stands for all.
            var earliestUnobserved: Int32? = node.unobservedApplied < unobservedWrites.count ? unobservedWrites[Int(node.unobservedApplied)] : nil
            for j in observedWrites where canonical(unknown[Int(j)].a, node) == Self.unobserved && pending(j) {
                if earliestUnobserved.map({ j < $0 }) ?? true { earliestUnobserved = j }
                break
            }
            if let j = earliestUnobserved, pending(j) { unknownCandidates.append(~j) }
        }
        return result + unknownCandidates
    }

    private func apply(_ candidate: Int32, to parent: Node) -> Node {
        var child = Node(placedPrefix: parent.placedPrefix, placedExtra: parent.placedExtra, applied: parent.applied,
                         unobservedApplied: parent.unobservedApplied, value: parent.value)
        let op: Op
        if candidate >= 0 {
            op = definite[Int(candidate)]
            if candidate == child.placedPrefix {
                child.placedPrefix += 1
                var k = 0
                while k < child.placedExtra.count, child.placedExtra[k] == child.placedPrefix {
                    child.placedPrefix += 1
                    k += 1
                }
                if k > 0 { child.placedExtra.removeFirst(k) }
            } else {
                Self.sortedInsert(&child.placedExtra, candidate)
            }
        } else {
            op = unknown[Int(~candidate)]
            Self.sortedInsert(&child.applied, ~candidate)
            if op.kind == .write, op.a == Self.unobserved { child.unobservedApplied += 1 }
        }
        switch op.kind {
        case .read, .casNotSwapped: break
        case .write: child.value = op.a
        case .casSwapped, .casUnknown: child.value = op.b
        }
        child.value = canonical(child.value, child)
        return child
    }

    // MARK: Explaining

    /// Where the search got furthest: how many operations it could place, the value then, and
    /// the operations that might come next, none of which leads to a linearization.
    func explain() -> String {
        guard let node = deepest else { return "nothing to explain" }
        let (window, _) = window(of: node)
        let blocking = window.min { definite[Int($0)].completedMs < definite[Int($1)].completedMs }
        var text = "at most \(deepestCount) of \(definite.count) acknowledged operations can be placed in order"
        if deepestCount > 0, let last = (0..<Int32(definite.count)).filter({ isPlaced($0, node) }).max(by: { definite[Int($0)].completedMs < definite[Int($1)].completedMs }) {
            text += " (the last to complete of them: \(Self.describe(definite[Int(last)].source)))"
        }
        text += "; then the register holds \(describe(value: node.value))"
        if let blocking {
            text += ", and \(Self.describe(definite[Int(blocking)].source)) must come before anything invoked after it completed"
        }
        let next = window.prefix(8).map { Self.describe(definite[Int($0)].source) }
        if !next.isEmpty { text += "; none of these fits next: " + next.joined(separator: "; ") + (window.count > 8 ? "; …" : "") }
        let pending = unknown.indices.filter { !Self.sortedContains(node.applied, Int32($0)) }.prefix(4).map { Self.describe(unknown[$0].source) }
        if !pending.isEmpty { text += "; unknown outcomes not applied there: " + pending.joined(separator: "; ") }
        return text
    }

    private func describe(value: Int32) -> String {
        switch value {
        case Self.unobserved: "a value no later operation reads or compares against"
        case Self.absent: "no row"
        default: "\(rawValues[Int(value)])"
        }
    }

    static func describe(_ op: WorkloadOperation) -> String {
        let what: String
        switch op.kind {
        case .registerRead: what = "read → " + (op.readValue.map(String.init) ?? "no row")
        case .registerWrite: what = "write \(op.written.map(String.init) ?? "?")"
        case .registerCAS:
            let result = op.outcome == .ok ? op.swapped.map { $0 ? " (swapped)" : " (not swapped)" } ?? "" : ""
            what = "cas \(op.expected.map(String.init) ?? "?") → \(op.written.map(String.init) ?? "?")\(result)"
        default: what = op.kind.rawValue
        }
        let end = op.outcome == .unknown ? "∞" : "\(op.completedMs)"
        return "client \(op.client) \(what) [\(op.invokedMs), \(end)] ms\(op.outcome == .unknown ? " (unknown outcome)" : "")"
    }
}

// MARK: Checks

extension Checkers {
    /// Every key's register history is linearizable (``Linearizability``). A key the search
    /// could not decide within `statesMax` states makes the check fail: it is not a pass.
    public static func registers(history: [WorkloadOperation], initialValue: Int = 0,
                                 statesMax: Int = Linearizability.statesMaxDefault) -> CheckResult {
        let name = "registers: linearizable per key"
        let results = Linearizability.check(history: history, initialValue: initialValue, statesMax: statesMax)
        let wrong = results.filter { $0.verdict == .notLinearizable }
        let undecided = results.filter { $0.verdict == .undecided }
        let operations = results.map(\.operations).reduce(0, +)
        let unknown = results.map(\.unknown).reduce(0, +)
        let states = results.map(\.statesExplored).reduce(0, +)
        if !wrong.isEmpty || !undecided.isEmpty {
            var parts = wrong.map { "NOT LINEARIZABLE, \($0.explanation)" }
            parts += undecided.map { "COULD NOT DECIDE (\($0.operations) operations; raise the bound or read the history), \($0.explanation)" }
            return CheckResult(name: name, passed: false, detail: parts.joined(separator: " | "))
        }
        return CheckResult(name: name, passed: true,
                           detail: "\(results.count) keys, \(operations) operations ordered (\(unknown) with unknown outcomes), \(states) states explored (bound \(statesMax) per key)")
    }

    /// A read at level `linearizable` never goes back in time: when read r1 completed before
    /// read r2 began (same key, any clients), r2 must not return a value whose write completed
    /// before the write of r1's value began (that value had been overwritten before r1). Needs
    /// unique written values (reads of a value written twice are skipped); implied by
    /// ``registers(history:initialValue:statesMax:)``, but it needs no search and so holds its
    /// verdict whatever the size of the history.
    public static func registerReadsMonotonic(history: [WorkloadOperation], initialValue: Int = 0) -> CheckResult {
        let name = "registers: linearizable reads never go back in time"
        var problems: [String] = []
        var reads = 0
        let registers = history.filter { $0.kind.isRegister && $0.key != nil }
        for (key, ops) in Dictionary(grouping: registers, by: { $0.key! }).sorted(by: { $0.key < $1.key }) {
            let found = Prechecks.readsBackInTime(ops, initialValue: initialValue)
            reads += found.reads
            problems += found.problems.map { "key \(key): " + $0 }
        }
        return CheckResult(name: name, passed: problems.isEmpty,
                           detail: problems.isEmpty ? "\(reads) acknowledged reads of values written once" : "\(problems.count) reads went back in time: " + problems.prefix(5).joined(separator: " | "))
    }
}

// MARK: Without search

/// Necessary conditions of linearizability that a pass over one key's history decides without
/// search: a failed one is a definite "not linearizable" whatever the bound, with a plain reason.
enum Prechecks {
    /// Acknowledged reads (and swapped compare-and-sets) of a value that no operation which may
    /// have written it had begun by the time they completed: never written, written only by
    /// operations answered "not executed", or only by later ones.
    static func unexplainedObservations(_ ops: [WorkloadOperation], initialValue: Int) -> [String] {
        var earliestWriteMs: [Int: Int64] = [initialValue: .min]
        for op in ops where op.outcome != .failed {
            guard let v = op.written, op.kind == .registerWrite || (op.kind == .registerCAS && op.swapped != false) else { continue }
            earliestWriteMs[v] = min(earliestWriteMs[v] ?? .max, op.invokedMs)
        }
        var problems: [String] = []
        for op in ops where op.outcome == .ok {
            let seen: Int?
            switch op.kind {
            case .registerRead: seen = op.readValue
            case .registerCAS where op.swapped == true: seen = op.expected
            default: continue
            }
            guard let v = seen else {
                problems.append("\(Search.describe(op)): the register has no row")
                continue
            }
            guard let first = earliestWriteMs[v] else {
                let refused = ops.contains { $0.outcome == .failed && $0.written == v }
                problems.append("\(Search.describe(op)): \(refused ? "only a write answered 'not executed' wrote" : "nothing wrote") \(v)")
                continue
            }
            if first > op.completedMs { problems.append("\(Search.describe(op)): \(v) was first written at \(first) ms, after it completed") }
        }
        return problems
    }

    /// Reads going back in time (``Checkers/registerReadsMonotonic(history:initialValue:)``),
    /// and how many reads it could judge.
    static func readsBackInTime(_ ops: [WorkloadOperation], initialValue: Int) -> (reads: Int, problems: [String]) {
        struct Span { var invokedMs: Int64; var completedMs: Int64; var op: WorkloadOperation? }
        // The one operation that wrote each value (the initial value: before everything).
        var writers: [Int: Span] = [initialValue: Span(invokedMs: .min, completedMs: .min, op: nil)]
        var writtenTwice = Set<Int>()
        for op in ops where op.outcome != .failed {
            guard let v = op.written else { continue }
            let writes = op.kind == .registerWrite || (op.kind == .registerCAS && (op.outcome == .unknown || op.swapped != false))
            guard writes else { continue }
            if writers[v] != nil { writtenTwice.insert(v) }
            writers[v] = Span(invokedMs: op.invokedMs, completedMs: op.outcome == .unknown ? .max : op.completedMs, op: op)
        }
        let observed = ops.filter { $0.kind == .registerRead && $0.outcome == .ok }
            .compactMap { op -> (read: WorkloadOperation, writer: Span)? in
                guard let v = op.readValue, !writtenTwice.contains(v), let w = writers[v] else { return nil }
                return (op, w)
            }
        var problems: [String] = []
        let byCompletion = observed.sorted { $0.read.completedMs < $1.read.completedMs }
        var k = 0
        var latest: (read: WorkloadOperation, writer: Span)?
        for r2 in observed.sorted(by: { $0.read.invokedMs < $1.read.invokedMs }) {
            while k < byCompletion.count, byCompletion[k].read.completedMs < r2.read.invokedMs {
                if latest == nil || byCompletion[k].writer.invokedMs > latest!.writer.invokedMs { latest = byCompletion[k] }
                k += 1
            }
            if let r1 = latest, r2.writer.completedMs < r1.writer.invokedMs {
                problems.append("\(Search.describe(r2.read)) after \(Search.describe(r1.read)), whose value was written by "
                    + "\(r1.writer.op.map(Search.describe) ?? "?"), which began after the write of \(r2.read.readValue!) completed")
            }
        }
        return (observed.count, problems)
    }
}
