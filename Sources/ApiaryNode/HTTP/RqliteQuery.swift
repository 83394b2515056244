/// The query parameters of an rqlite request (rqlite's `http/query_params.go`), parsed once.
///
/// Flags count when present, whatever their value (`?transaction`, `?transaction=false` alike,
/// as rqlite's `HasKey`); names are case-sensitive; the first of a repeated name wins. What
/// rqlite validates is validated the same way (400 with rqlite's message): durations
/// (`timeout`, `freshness`, `db_timeout`, `linearizable_timeout`), integers (`retries`,
/// `trailing_logs`), an empty `q`, `freshness_strict` without `freshness`. Apiary refuses an
/// unknown `level` (rqlite reads it as `weak`): guessing would serve a read at a weaker level
/// than the client asked for.
///
/// Parameters that change nothing on Apiary are accepted and ignored: `redirect` (a primary
/// serves everything itself), `freshness`/`freshness_strict` (reads come from the primary,
/// never stale), `retries`, `timeout` (but for a queued write's `wait`) and `linearizable_timeout` (the node's own
/// per-statement and per-request limits apply), `noparse`, `norwrandom`, `norwtime` (rqlite
/// rewrites `RANDOM()` and time functions because it replicates statements; Apiary replicates
/// pages). `queue` (with `wait` and `timeout`) queues a write (``QueuedWrites``); `raft_index`
/// asks for the commit's position in the answer. `db_timeout` bounds each statement's run
/// time when it is shorter than the node's own limit.
struct RqliteQuery: Sendable, Equatable {
    var transaction = false
    var level = ReadLevel.weak
    var q: String?
    var format = RqliteJSON.Format()
    /// `/readyz`: only whether the node answers.
    var noLeader = false
    /// `/readyz`: also whether the node has applied all it committed.
    var sync = false
    /// `/nodes`: `ver=2` is the list form; the default is rqlite's legacy map.
    var version: String?
    /// `/status`: a dotted path to one part of the answer.
    var key: String?
    /// `db_timeout`, in whole ms (rounded up): each statement is stopped past it, as past the
    /// node's own limit (the shorter applies). Nil when absent or not positive.
    var dbTimeoutMs: Int?
    /// `/db/execute?queue`: answer once queued, write later in a batch.
    var queue = false
    /// With `queue`: answer once the request's batch is written (or given up).
    var wait = false
    /// `timeout`, in whole ms (rounded up): how long a queued write's `wait` lasts; nil when
    /// absent (rqlite's 30 s then).
    var timeoutMs: Int64?

    static let durationParameters: Set<Substring> = ["timeout", "freshness", "db_timeout", "linearizable_timeout"]
    static let integerParameters: Set<Substring> = ["retries", "trailing_logs"]

    /// - Throws: `APIError(.badRequest)` for what rqlite refuses, invalid %-encoding and an
    ///   unknown level.
    static func parse(_ query: Substring?) throws -> RqliteQuery {
        var result = RqliteQuery()
        guard let query, !query.isEmpty else { return result }
        var seen: Set<Substring> = []
        var freshness = false, freshnessStrict = false
        // Bounded by the query's length (the HTTP layer bounds the request target). Scanned
        // as bytes, without arrays of pieces: `split` took half of this function's time, and
        // the function 6% of a read's CPU (`perf`, reads by key at 8 clients).
        let utf8 = query.utf8
        var next = utf8.startIndex
        while next != utf8.endIndex {
            let end = utf8[next...].firstIndex(of: UInt8(ascii: "&")) ?? utf8.endIndex
            let pair = query[next..<end]
            next = end == utf8.endIndex ? end : utf8.index(after: end)
            guard !pair.isEmpty else { continue }
            let equals = pair.utf8.firstIndex(of: UInt8(ascii: "="))
            let name = equals.map { pair[..<$0] } ?? pair
            guard seen.insert(name).inserted else { continue }
            // Every value is decoded, flags' too: `transaction=%zz` is refused rather than guessed.
            var decoded = ""
            if let equals {
                guard let text = formDecoded(pair[pair.utf8.index(after: equals)...]) else {
                    throw APIError(.badRequest, "query parameter '\(name.prefix(40))' is not valid %-encoding")
                }
                decoded = text
            }
            func value() -> String { decoded }
            switch name {
            case "transaction": result.transaction = true
            case "timings": result.format.timings = true
            case "pretty": result.format.pretty = true
            case "associative": result.format.associative = true
            case "blob_array": result.format.blobsAsArrays = true
            case "noleader": result.noLeader = true
            case "sync": result.sync = true
            case "freshness_strict": freshnessStrict = true
            case "ver": result.version = value()
            case "key": result.key = value()
            case "qualify_columns": result.format.qualifyColumns = true
            case "queue": result.queue = true
            case "wait": result.wait = true
            case "raft_index": result.format.raftIndex = true
            case "q":
                let q = value()
                guard !q.isEmpty else { throw APIError(.badRequest, "query parameter not set") }
                result.q = q
            case "level":
                let text = value()
                switch text.lowercased() {
                case "", "weak", "auto": result.level = .weak
                case "none": result.level = .none
                case "strong": result.level = .strong
                case "linearizable": result.level = .linearizable
                default:
                    throw APIError(.badRequest, "unknown level '\(text.prefix(40))': use none, weak, strong, linearizable or auto")
                }
            case _ where durationParameters.contains(name):
                if name == "freshness" { freshness = true }
                guard let ns = goDurationNs(value()) else { throw APIError(.badRequest, "\(name) is not a valid duration") }
                if name == "db_timeout", ns > 0 { result.dbTimeoutMs = Int(min((ns / 1e6).rounded(.up), Double(Int32.max))) }
                if name == "timeout" { result.timeoutMs = Int64(min(max(0, (ns / 1e6).rounded(.up)), Double(Int32.max))) }
            case _ where integerParameters.contains(name):
                guard Int(value()) != nil else { throw APIError(.badRequest, "\(name) is not a valid integer") }
            default:
                break
            }
        }
        if freshnessStrict, !freshness { throw APIError(.badRequest, "freshness_strict requires freshness") }
        return result
    }

    /// One query-string value decoded as HTML forms encode it: '+' is a space, `%XX` a byte;
    /// nil for a `%` not followed by two hex digits or bytes that are not UTF-8 (as
    /// Foundation's `removingPercentEncoding`, which did it through NSString and took a tenth
    /// of a read's CPU: by bytes here, and a value with neither `%` nor `+` is copied as it is).
    static func formDecoded(_ text: Substring) -> String? {
        let utf8 = text.utf8
        guard utf8.contains(where: { $0 == UInt8(ascii: "%") || $0 == UInt8(ascii: "+") }) else { return String(text) }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(utf8.count)
        var i = utf8.startIndex
        while i != utf8.endIndex {
            let byte = utf8[i]
            utf8.formIndex(after: &i)
            switch byte {
            case UInt8(ascii: "+"):
                bytes.append(UInt8(ascii: " "))
            case UInt8(ascii: "%"):
                guard i != utf8.endIndex, let high = hexValue(utf8[i]) else { return nil }
                utf8.formIndex(after: &i)
                guard i != utf8.endIndex, let low = hexValue(utf8[i]) else { return nil }
                utf8.formIndex(after: &i)
                bytes.append(high << 4 | low)
            default:
                bytes.append(byte)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    /// Whether `text` is what Go's `time.ParseDuration` accepts: an optional sign, then one or
    /// more decimal numbers each with a unit (ns, us, µs, μs, ms, s, m, h), or just `0`.
    static func isGoDuration(_ text: String) -> Bool { goDurationNs(text) != nil }

    /// The nanoseconds of a Go duration (``isGoDuration(_:)``), negative with a `-`; nil when
    /// `text` is none.
    static func goDurationNs(_ text: String) -> Double? {
        var s = Substring(text)
        var sign = 1.0
        if s.first == "-" || s.first == "+" {
            if s.first == "-" { sign = -1 }
            s = s.dropFirst()
        }
        if s == "0" { return 0 }
        guard !s.isEmpty else { return nil }
        // Longest unit first: "ms" before "m".
        let units: [(String, Double)] = [("ns", 1), ("us", 1e3), ("µs", 1e3), ("μs", 1e3), ("ms", 1e6), ("s", 1e9), ("m", 60e9), ("h", 3600e9)]
        var total = 0.0
        while !s.isEmpty {
            let whole = s.prefix(while: \.isASCIIDigit)
            s = s.dropFirst(whole.count)
            var fraction: Substring = ""
            if s.first == "." {
                s = s.dropFirst()
                fraction = s.prefix(while: \.isASCIIDigit)
                s = s.dropFirst(fraction.count)
            }
            guard !whole.isEmpty || !fraction.isEmpty else { return nil }
            guard let unit = units.sorted(by: { $0.0.count > $1.0.count }).first(where: { s.hasPrefix($0.0) }) else { return nil }
            s = s.dropFirst(unit.0.count)
            total += (Double("\(whole.isEmpty ? "0" : whole).\(fraction.isEmpty ? "0" : fraction)") ?? 0) * unit.1
        }
        return sign * total
    }
}

private extension Character {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}
