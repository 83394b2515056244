// ApiaryChaos: the chaos harness (docs/chaos.md). This file is its pure part: the history of
// the workload's operations and the checkers that judge it. No I/O: the runner records, the
// checkers read.
import Foundation

/// How an operation ended, as its client saw it.
public enum Outcome: String, Codable, Sendable {
    /// Acknowledged.
    case ok
    /// Definitely not applied (the cluster said so: `not_executed`, a 4xx).
    case failed
    /// May or may not have been applied (`outcome_unknown`, a lost answer, a timeout): "maybe
    /// applied" for the safety checks, failed for availability.
    case unknown
}

/// One operation of a workload: invoked and completed at these times (ms since the run began).
public struct WorkloadOperation: Codable, Sendable, Hashable {
    public enum Kind: String, Codable, Sendable {
        /// Insert a unique value into the set.
        case add
        /// Move `amount` from account `from` to `to`, if `from` has it.
        case transfer
        /// Read the bank's total at level `strong`.
        case readTotal = "read_total"
        /// Read register `key` at level `linearizable` (`readValue`; nil: no row).
        case registerRead = "register_read"
        /// Set register `key` to `written`.
        case registerWrite = "register_write"
        /// Set register `key` to `written` if it holds `expected` (`swapped` says whether it did).
        case registerCAS = "register_cas"
    }
    public var kind: Kind
    public var client: Int
    public var value: Int
    public var from: Int = 0
    public var to: Int = 0
    public var amount: Int = 0
    /// A read's answer.
    public var readValue: Int?
    /// Register operations: the register (the others leave it out of the JSON).
    public var key: Int?
    /// A register write's or compare-and-set's new value, unique per operation in the workload.
    public var written: Int?
    /// A compare-and-set's expected value.
    public var expected: Int?
    /// An acknowledged compare-and-set's result: true when it found `expected` and wrote
    /// (`rows_affected` 1), false when it found another value (0). An `ok` one without it is
    /// checked as an unknown outcome.
    public var swapped: Bool?
    public var invokedMs: Int64
    public var completedMs: Int64
    public var outcome: Outcome
    /// The HTTP status or the error, for the report.
    public var detail: String

    public init(kind: Kind, client: Int, value: Int, invokedMs: Int64, completedMs: Int64, outcome: Outcome, detail: String) {
        self.kind = kind
        self.client = client
        self.value = value
        self.invokedMs = invokedMs
        self.completedMs = completedMs
        self.outcome = outcome
        self.detail = detail
    }

    /// A register read that returned `value` (nil: no row).
    public static func registerRead(client: Int, key: Int, value: Int?, invokedMs: Int64, completedMs: Int64, outcome: Outcome, detail: String = "") -> WorkloadOperation {
        var op = WorkloadOperation(kind: .registerRead, client: client, value: 0, invokedMs: invokedMs, completedMs: completedMs, outcome: outcome, detail: detail)
        op.key = key
        op.readValue = value
        return op
    }

    /// A register write of `value`.
    public static func registerWrite(client: Int, key: Int, value: Int, invokedMs: Int64, completedMs: Int64, outcome: Outcome, detail: String = "") -> WorkloadOperation {
        var op = WorkloadOperation(kind: .registerWrite, client: client, value: 0, invokedMs: invokedMs, completedMs: completedMs, outcome: outcome, detail: detail)
        op.key = key
        op.written = value
        return op
    }

    /// A compare-and-set from `expected` to `value`; `swapped` for an acknowledged one.
    public static func registerCAS(client: Int, key: Int, expected: Int, value: Int, swapped: Bool?, invokedMs: Int64, completedMs: Int64,
                                   outcome: Outcome, detail: String = "") -> WorkloadOperation {
        var op = WorkloadOperation(kind: .registerCAS, client: client, value: 0, invokedMs: invokedMs, completedMs: completedMs, outcome: outcome, detail: detail)
        op.key = key
        op.written = value
        op.expected = expected
        op.swapped = swapped
        return op
    }
}

/// One check's verdict.
public struct CheckResult: Codable, Sendable, Hashable {
    public var name: String
    public var passed: Bool
    public var detail: String
}

public enum Checkers {
    /// Every acknowledged insert is there at the end, none twice, none that was never asked for.
    public static func set(history: [WorkloadOperation], finalValues: [Int]) -> CheckResult {
        let adds = history.filter { $0.kind == .add }
        let acknowledged = Set(adds.filter { $0.outcome == .ok }.map(\.value))
        let attempted = Set(adds.map(\.value))
        let counts = Dictionary(finalValues.map { ($0, 1) }, uniquingKeysWith: +)
        let lost = acknowledged.subtracting(counts.keys).sorted()
        let twice = counts.filter { $0.value > 1 }.keys.sorted()
        let phantom = Set(counts.keys).subtracting(attempted).sorted()
        let definitelyFailedButThere = Set(adds.filter { $0.outcome == .failed }.map(\.value))
            .subtracting(adds.filter { $0.outcome != .failed }.map(\.value)).intersection(counts.keys).sorted()
        var problems: [String] = []
        if !lost.isEmpty { problems.append("\(lost.count) acknowledged inserts lost: \(lost.prefix(10))") }
        if !twice.isEmpty { problems.append("\(twice.count) values applied twice: \(twice.prefix(10))") }
        if !phantom.isEmpty { problems.append("\(phantom.count) values nobody inserted: \(phantom.prefix(10))") }
        if !definitelyFailedButThere.isEmpty { problems.append("\(definitelyFailedButThere.count) inserts answered 'not executed' are there: \(definitelyFailedButThere.prefix(10))") }
        let maybe = adds.filter { $0.outcome == .unknown }.count
        return CheckResult(name: "set: acknowledged inserts present exactly once", passed: problems.isEmpty,
                           detail: problems.isEmpty ? "\(acknowledged.count) acknowledged, \(counts.count) present, \(maybe) unknown outcomes" : problems.joined(separator: "; "))
    }

    /// The bank's total never changes: in every acknowledged strong read, and at the end.
    public static func bank(history: [WorkloadOperation], total: Int, finalTotal: Int) -> CheckResult {
        let reads = history.filter { $0.kind == .readTotal && $0.outcome == .ok }
        let wrong = reads.filter { $0.readValue != total }
        var problems: [String] = []
        if !wrong.isEmpty { problems.append("\(wrong.count) strong reads saw another total: \(wrong.prefix(5).map { "\($0.readValue ?? -1) at \($0.completedMs) ms" })") }
        if finalTotal != total { problems.append("the total at the end is \(finalTotal), not \(total)") }
        let transfers = history.filter { $0.kind == .transfer && $0.outcome == .ok }.count
        return CheckResult(name: "bank: the total never changes", passed: problems.isEmpty,
                           detail: problems.isEmpty ? "\(transfers) transfers acknowledged, \(reads.count) strong reads, total \(total) throughout" : problems.joined(separator: "; "))
    }

    /// At most one node took the writer's role in each epoch (from the nodes' own logs).
    public static func oneWriterPerEpoch(claims: [(node: String, epoch: UInt64)]) -> CheckResult {
        let byEpoch = Dictionary(grouping: claims, by: \.epoch).mapValues { Set($0.map(\.node)) }
        let twice = byEpoch.filter { $0.value.count > 1 }.sorted { $0.key < $1.key }
        return CheckResult(name: "one writer per epoch", passed: twice.isEmpty,
                           detail: twice.isEmpty ? "epochs \(byEpoch.keys.sorted()), each with one writer"
                               : twice.map { "epoch \($0.key): \($0.value.sorted().joined(separator: ", "))" }.joined(separator: "; "))
    }
}

/// Availability both ways (issue 11): successes over attempts, and the share of 1-second
/// windows in which no operation failed (an unknown outcome counts as failed here).
public struct Availability: Codable, Sendable, Hashable {
    public var requests: Int
    public var succeeded: Int
    public var byRequests: Double
    public var windows: Int
    public var cleanWindows: Int
    public var byTime: Double

    public init(history: [WorkloadOperation], durationMs: Int64) {
        requests = history.count
        succeeded = history.filter { $0.outcome == .ok }.count
        byRequests = requests == 0 ? 1 : Double(succeeded) / Double(requests)
        windows = Int(max(1, (durationMs + 999) / 1000))
        var bad = Set<Int64>()
        for op in history where op.outcome != .ok { bad.insert(op.completedMs / 1000) }
        let total = windows
        let clean = total - bad.filter { $0 < Int64(total) }.count
        cleanWindows = clean
        byTime = Double(clean) / Double(total)
    }
}
