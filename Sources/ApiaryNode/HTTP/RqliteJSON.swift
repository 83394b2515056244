import ApiaryCore
import ApiaryStorage
import Foundation

/// rqlite's JSON request and response formats, so that existing rqlite clients work unchanged
/// (docs/rqlite-compatibility.md).
///
/// A request body is a JSON array of statements; each is either an SQL string or an array of
/// the SQL string followed by its parameters (`RqliteRequestParser` has the grammar):
/// `["CREATE TABLE foo (id INTEGER)", ["INSERT INTO foo VALUES(?)", 1]]`.
/// A response is `{"results": [...]}` with one entry per statement: `last_insert_id` and
/// `rows_affected` for writes (each left out when 0, as rqlite does), `columns`, `types` and
/// `values` for reads (or `types` and `rows` in the associative form), or `error`.
public enum RqliteJSON {
    /// How a response is written: rqlite's query parameters.
    public struct Format: Sendable, Equatable {
        /// `?associative`: rows as objects keyed by column, `types` as an object.
        public var associative = false
        /// `?timings`: each result's `time` and the request's, in seconds.
        public var timings = false
        /// `?pretty`: indented as Go's `json.MarshalIndent(v, "", "    ")` writes it.
        public var pretty = false
        /// `?blob_array`: BLOBs as arrays of byte values rather than base64 strings.
        public var blobsAsArrays = false
        /// `?qualify_columns`: a column of a table is named `table.column`.
        public var qualifyColumns = false
        /// Results of `/db/query` are rows even without columns; `/db/execute` and
        /// `/db/request` report a statement as rows only when it returned columns.
        public var allRows = false
        /// `?raft_index`: the answer's `raft_index` is the position of the latest commit that
        /// holds one of its writes (the tenant's lsn), left out when it wrote nothing.
        public var raftIndex = false
        public init(associative: Bool = false, timings: Bool = false, pretty: Bool = false, blobsAsArrays: Bool = false, allRows: Bool = false,
                    qualifyColumns: Bool = false) {
            self.qualifyColumns = qualifyColumns
            self.associative = associative
            self.timings = timings
            self.pretty = pretty
            self.blobsAsArrays = blobsAsArrays
            self.allRows = allRows
        }
    }

    /// Parses a request body into statements (see `RqliteRequestParser` for the grammar).
    /// - Throws: `RqliteRequestError` with a message naming what is wrong and where.
    public static func statements(fromBody body: [UInt8], statementsMax: Int) throws -> [SQLStatement] {
        try RqliteRequestParser.statements(fromBody: body, statementsMax: statementsMax)
    }

    /// Encodes results as rqlite does.
    /// - Parameter timeSeconds: the request's run time, written only with `format.timings`.
    /// - Parameter sequenceNumber: a queued write's (`?queue`).
    public static func response(_ results: [StatementResult], format: Format = Format(), timeSeconds: Double? = nil,
                                sequenceNumber: UInt64? = nil) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(64)
        out += Array(#"{"results":["#.utf8)
        for (i, result) in results.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            encode(result, format, into: &out)
        }
        out.append(UInt8(ascii: "]"))
        if format.timings, let timeSeconds, timeSeconds > 0 {
            out += Array(#","time":"#.utf8)
            out += Array(goFloat(timeSeconds).utf8)
        }
        if let sequenceNumber { out += Array(",\"sequence_number\":\(sequenceNumber)".utf8) }
        if format.raftIndex, let position = results.compactMap({ r -> UInt64? in if case .success(let o) = r { o.commitPosition } else { nil } }).max() {
            out += Array(",\"raft_index\":\(position)".utf8)
        }
        out.append(UInt8(ascii: "}"))
        return format.pretty ? indent(out) : out
    }

    /// `{"error": message}` for a request that failed as a whole.
    /// A failed request's body: rqlite's `error` message, and Apiary's stable `code` and
    /// whether the request may be sent again as it is (`retry_safe`).
    public static func error(_ message: String, code: ErrorCode) -> [UInt8] {
        Array("{\"error\":\(quote(message)),\"code\":\"\(code.rawValue)\",\"retry_safe\":\(code.retrySafe)}".utf8)
    }

    // MARK: Results

    private static func encode(_ result: StatementResult, _ format: Format, into out: inout [UInt8]) {
        switch result {
        case .failure(let message):
            out += Array("{\"error\":\(quote(message))}".utf8)
        case .success(let o) where format.allRows || !o.columns.isEmpty:
            let types = reportedTypes(o)
            let columns = format.qualifyColumns ? o.columns.indices.map { i in
                let table = o.columnTables.flatMap { i < $0.count ? $0[i] : nil } ?? ""
                return table.isEmpty ? o.columns[i] : table + "." + o.columns[i]
            } : o.columns
            var fields: [String] = []
            if format.associative {
                // Go writes a map's keys sorted, and a repeated column name keeps its last value.
                var lastIndex: [String: Int] = [:]
                for (i, c) in columns.enumerated() { lastIndex[c] = i }
                let keys = lastIndex.keys.sorted()
                if !keys.isEmpty {
                    fields.append("\"types\":{" + keys.map { quote($0) + ":" + quote(types[lastIndex[$0]!]) }.joined(separator: ",") + "}")
                }
                let rows = o.rows.map { row in
                    "{" + keys.map { key -> String in
                        let i = lastIndex[key]!
                        return quote(key) + ":" + value(row[i], declaredType: o.declaredTypes[i], format)
                    }.joined(separator: ",") + "}"
                }
                fields.append("\"rows\":[" + rows.joined(separator: ",") + "]")
            } else {
                // A read's answer: written straight into `out` (strings joined per value cost
                // as much as the read itself).
                out.append(UInt8(ascii: "{"))
                var first = true
                func key(_ name: StaticString, _ out: inout [UInt8]) { member(name, first: &first, into: &out) }
                if !columns.isEmpty {
                    key(#""columns":["#, &out)
                    for (i, column) in columns.enumerated() {
                        if i > 0 { out.append(UInt8(ascii: ",")) }
                        quote(column, into: &out)
                    }
                    out.append(UInt8(ascii: "]"))
                    key(#""types":["#, &out)
                    for (i, type) in types.enumerated() {
                        if i > 0 { out.append(UInt8(ascii: ",")) }
                        quote(type, into: &out)
                    }
                    out.append(UInt8(ascii: "]"))
                }
                if !o.rows.isEmpty {
                    key(#""values":["#, &out)
                    for (r, row) in o.rows.enumerated() {
                        out.append(contentsOf: r > 0 ? [UInt8(ascii: ","), UInt8(ascii: "[")] : [UInt8(ascii: "[")])
                        for i in row.indices {
                            if i > 0 { out.append(UInt8(ascii: ",")) }
                            value(row[i], declaredType: o.declaredTypes[i], format, into: &out)
                        }
                        out.append(UInt8(ascii: "]"))
                    }
                    out.append(UInt8(ascii: "]"))
                }
                if format.timings, o.timeNs > 0 {
                    key(#""time":"#, &out)
                    out.append(contentsOf: goFloat(Double(o.timeNs) / 1e9).utf8)
                }
                out.append(UInt8(ascii: "}"))
                return
            }
            if format.timings, o.timeNs > 0 { fields.append("\"time\":" + goFloat(Double(o.timeNs) / 1e9)) }
            out += Array(("{" + fields.joined(separator: ",") + "}").utf8)
        case .success(let o):
            // The insert path's answer: written straight into `out`, no strings in between.
            out.append(UInt8(ascii: "{"))
            var first = true
            func key(_ name: StaticString, _ out: inout [UInt8]) { member(name, first: &first, into: &out) }
            if o.lastInsertID != 0 {
                key(#""last_insert_id":"#, &out)
                out.append(contentsOf: String(o.lastInsertID).utf8)
            }
            if o.rowsAffected != 0 {
                key(#""rows_affected":"#, &out)
                out.append(contentsOf: String(o.rowsAffected).utf8)
            }
            if format.timings, o.timeNs > 0 {
                key(#""time":"#, &out)
                out.append(contentsOf: goFloat(Double(o.timeNs) / 1e9).utf8)
            }
            if format.associative { key(#""rows":null"#, &out) }
            out.append(UInt8(ascii: "}"))
        }
    }

    /// A JSON object's member name (`"name":`, given whole), after a comma unless it is the first.
    private static func member(_ name: StaticString, first: inout Bool, into out: inout [UInt8]) {
        if !first { out.append(UInt8(ascii: ",")) }
        first = false
        name.withUTF8Buffer { out.append(contentsOf: $0) }
    }

    /// The declared types, lower-cased; a column without one (an expression) is named after
    /// its value in the first row, as rqlite does ("" while there is no row or it is NULL).
    static func reportedTypes(_ o: StatementOutcome) -> [String] {
        o.declaredTypes.enumerated().map { i, declared in
            guard declared.isEmpty, let first = o.rows.first, i < first.count else { return declared }
            switch first[i] {
            case .null: return ""
            case .integer: return "integer"
            case .real: return "real"
            case .text: return "text"
            case .blob: return "blob"
            }
        }
    }

    // MARK: Values

    /// One value as rqlite writes it, which depends on the column's declared type the way
    /// its SQLite driver (mattn/go-sqlite3) and `db.normalizeRowParameters` make it:
    /// - `date`, `datetime` and `timestamp` columns: text in one of SQLite's time formats, and
    ///   integers (Unix seconds, or milliseconds past ±10^12), become RFC 3339 times in Go's
    ///   form (`2006-01-02T15:04:05.999999999Z07:00`), which clients parse (pyrqlite's
    ///   TIMESTAMP converter needs the `T`). Text that is no time is left as it is (rqlite
    ///   turns it into `0001-01-01T00:00:00Z`, losing it).
    /// - `boolean` columns: integers become `true` (> 0) or `false`.
    /// - a BLOB in a column of text affinity (`text`, `varchar…`, `clob`, `json`, …) is
    ///   text (invalid UTF-8 replaced); elsewhere base64, or an array of bytes with
    ///   `blob_array`. (rqlite also sends a BLOB from an expression as text, garbling it;
    ///   Apiary sends it as a BLOB and says `blob` in `types`.)
    /// - REAL as Go writes a float64 (`1` for 1.0, exponents past 1e21 or below 1e-6); not
    ///   finite (SQLite can hold ±Inf) → null, where rqlite fails the whole response.
    static func value(_ v: SQLValue, declaredType: String, _ format: Format = Format()) -> String {
        var out: [UInt8] = []
        value(v, declaredType: declaredType, format, into: &out)
        return String(decoding: out, as: UTF8.self)
    }

    static func value(_ v: SQLValue, declaredType: String, _ format: Format, into out: inout [UInt8]) {
        switch v {
        case .null: out.append(contentsOf: "null".utf8)
        case .integer(let i):
            if isTimeType(declaredType), let time = RqliteTime.fromUnix(i) { return quote(time, into: &out) }
            if declaredType == "boolean" { return out.append(contentsOf: (i > 0 ? "true" : "false").utf8) }
            out.append(contentsOf: String(i).utf8)
        case .real(let d): out.append(contentsOf: (d.isFinite ? goFloat(d) : "null").utf8)
        case .text(let s):
            if isTimeType(declaredType), let time = RqliteTime.normalized(s) { return quote(time, into: &out) }
            quote(s, into: &out)
        case .blob(let b):
            if !declaredType.isEmpty, isTextType(declaredType) { return quote(String(decoding: b, as: UTF8.self), into: &out) }
            if format.blobsAsArrays { return out.append(contentsOf: ("[" + b.map { String($0) }.joined(separator: ",") + "]").utf8) }
            quote(Data(b).base64EncodedString(), into: &out)
        }
    }

    static func isTimeType(_ declared: String) -> Bool {
        declared == "timestamp" || declared == "datetime" || declared == "date"
    }

    /// rqlite's `isTextType`: SQLite's text affinity, by the declared type's name.
    static func isTextType(_ t: String) -> Bool {
        t == "text" || t == "json" || t == "" || t.hasPrefix("varchar") || t.hasPrefix("varying character")
            || t.hasPrefix("nchar") || t.hasPrefix("native character") || t.hasPrefix("nvarchar") || t.hasPrefix("clob")
    }

    /// A float64 as Go's `encoding/json` writes it: the shortest digits that read back the
    /// same, plain for 1e-6 <= |d| < 1e21 (`1`, not `1.0`), otherwise with an exponent
    /// (`1e+21`, `1e-7`). JSON readers that tell integers from floats (Python's) then see
    /// what they would see from rqlite.
    static func goFloat(_ d: Double) -> String {
        if d == 0 { return d.sign == .minus ? "-0" : "0" }
        // Swift's description has the shortest round-trip digits; only their layout differs.
        var text = Substring(d.magnitude.description)
        var exponent = 0
        if let e = text.firstIndex(where: { $0 == "e" || $0 == "E" }) {
            exponent = Int(text[text.index(after: e)...]) ?? 0
            text = text[..<e]
        }
        var digits = ""
        var pointAt = text.count
        for (i, c) in text.enumerated() {
            if c == "." { pointAt = i } else { digits.append(c) }
        }
        // value = 0.<digits> × 10^decimalExponent, with no leading or trailing zeros.
        var decimalExponent = pointAt + exponent
        while digits.hasPrefix("0") { digits.removeFirst(); decimalExponent -= 1 }
        while digits.hasSuffix("0") { digits.removeLast() }
        let sign = d.sign == .minus ? "-" : ""
        let magnitude = d.magnitude
        if magnitude < 1e-6 || magnitude >= 1e21 {
            let mantissa = digits.count > 1 ? String(digits.first!) + "." + digits.dropFirst() : digits
            let e = decimalExponent - 1
            let exponentText = e < 0 ? "-" + String(-e) : "+" + (e < 10 ? "0" : "") + String(e)
            // Go writes at least two exponent digits, then cleans "e-07" to "e-7" only.
            return sign + mantissa + "e" + exponentText
        }
        if decimalExponent <= 0 { return sign + "0." + String(repeating: "0", count: -decimalExponent) + digits }
        if decimalExponent >= digits.count { return sign + digits + String(repeating: "0", count: decimalExponent - digits.count) }
        let split = digits.index(digits.startIndex, offsetBy: decimalExponent)
        return sign + digits[..<split] + "." + digits[split...]
    }

    static func quote(_ s: String) -> String {
        var out: [UInt8] = []
        quote(s, into: &out)
        return String(decoding: out, as: UTF8.self)
    }

    private static let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

    /// `s` as a JSON string, by bytes: quotes, backslashes and control characters escaped,
    /// and U+2028/U+2029 as Go writes them (JavaScript's line separators).
    static func quote(_ s: String, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        var pendingE2 = 0 // how many bytes of E2 80 (the start of U+2028/U+2029) were just seen
        for byte in s.utf8 {
            switch byte {
            case UInt8(ascii: "\""): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\"")])
            case UInt8(ascii: "\\"): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\\")])
            case UInt8(ascii: "\n"): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "n")])
            case UInt8(ascii: "\r"): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "r")])
            case UInt8(ascii: "\t"): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "t")])
            case 0..<0x20: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"), hexDigits[Int(byte >> 4)], hexDigits[Int(byte & 0xF)]])
            case 0xA8...0xA9 where pendingE2 == 2:
                out.removeLast(2)
                out.append(contentsOf: Array((byte == 0xA8 ? "\\u2028" : "\\u2029").utf8))
            default: out.append(byte)
            }
            pendingE2 = byte == 0xE2 ? 1 : (byte == 0x80 && pendingE2 == 1 ? 2 : 0)
        }
        out.append(UInt8(ascii: "\""))
    }

    // MARK: Pretty printing

    /// `json` (compact, valid, as this file writes it) indented as Go's `json.Indent(dst,
    /// src, "", "    ")`: one member or element a line, `[]` and `{}` kept on one line.
    static func indent(_ json: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(json.count * 2)
        var depth = 0
        var inString = false
        var escaped = false
        var i = 0
        func newline(_ out: inout [UInt8], _ depth: Int) {
            out.append(UInt8(ascii: "\n"))
            for _ in 0..<depth { out += [0x20, 0x20, 0x20, 0x20] }
        }
        while i < json.count {
            let c = json[i]
            if inString {
                out.append(c)
                if escaped { escaped = false } else if c == UInt8(ascii: "\\") { escaped = true } else if c == UInt8(ascii: "\"") { inString = false }
                i += 1
                continue
            }
            switch c {
            case UInt8(ascii: "\""):
                inString = true
                out.append(c)
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                out.append(c)
                let close = c == UInt8(ascii: "{") ? UInt8(ascii: "}") : UInt8(ascii: "]")
                if i + 1 < json.count, json[i + 1] == close {
                    out.append(close)
                    i += 1
                } else {
                    depth += 1
                    newline(&out, depth)
                }
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                newline(&out, depth)
                out.append(c)
            case UInt8(ascii: ","):
                out.append(c)
                newline(&out, depth)
            case UInt8(ascii: ":"):
                out += [c, 0x20]
            default:
                out.append(c)
            }
            i += 1
        }
        return out
    }
}

/// rqlite's (Go's) handling of time values in `date`, `datetime` and `timestamp` columns.
enum RqliteTime {
    /// `text` in one of SQLite's time formats (go-sqlite3's `SQLiteTimestampFormats`, after
    /// one trailing `Z` is dropped) as Go's RFC 3339 with nanoseconds, or nil when it is none:
    /// `YYYY-MM-DD`, optionally followed by ` ` or `T` and `HH:MM`, `HH:MM:SS`, fractional
    /// seconds (`.` or `,`, at most 9 digits kept) and an offset `±hh:mm` after seconds.
    static func normalized(_ text: String) -> String? {
        var b = Array(text.utf8)
        if b.last == UInt8(ascii: "Z") { b.removeLast() }
        var i = 0
        func digits(_ n: Int) -> Int? {
            guard i + n <= b.count else { return nil }
            var v = 0
            for k in i..<i + n {
                guard (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b[k]) else { return nil }
                v = v * 10 + Int(b[k] - UInt8(ascii: "0"))
            }
            i += n
            return v
        }
        func take(_ c: UInt8) -> Bool {
            guard i < b.count, b[i] == c else { return false }
            i += 1
            return true
        }
        guard let year = digits(4), take(UInt8(ascii: "-")), let month = digits(2), take(UInt8(ascii: "-")), let day = digits(2),
              (1...12).contains(month), (1...daysIn(month: month, year: year)).contains(day) else { return nil }
        var hour = 0, minute = 0, second = 0, nanos = 0, offsetMinutes = 0
        if i < b.count {
            guard take(UInt8(ascii: " ")) || take(UInt8(ascii: "T")) else { return nil }
            // Go's "15" takes one or two digits.
            guard let h1 = digits(1) else { return nil }
            hour = h1
            if let h2 = digits(1) { hour = hour * 10 + h2 }
            guard take(UInt8(ascii: ":")), let m = digits(2), hour < 24, m < 60 else { return nil }
            minute = m
            if take(UInt8(ascii: ":")) {
                guard let s = digits(2), s < 60 else { return nil }
                second = s
                if i + 1 < b.count, b[i] == UInt8(ascii: ".") || b[i] == UInt8(ascii: ","), (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b[i + 1]) {
                    i += 1
                    var count = 0
                    while i < b.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b[i]) {
                        if count < 9 { nanos = nanos * 10 + Int(b[i] - UInt8(ascii: "0")); count += 1 }
                        i += 1
                    }
                    for _ in count..<9 { nanos *= 10 }
                }
                if i < b.count {
                    let sign: Int
                    if take(UInt8(ascii: "+")) { sign = 1 } else if take(UInt8(ascii: "-")) { sign = -1 } else { return nil }
                    guard let oh = digits(2), take(UInt8(ascii: ":")), let om = digits(2), oh < 24, om < 60 else { return nil }
                    offsetMinutes = sign * (oh * 60 + om)
                }
            }
        }
        guard i == b.count else { return nil }
        return format(year: year, month: month, day: day, hour: hour, minute: minute, second: second, nanos: nanos, offsetMinutes: offsetMinutes)
    }

    /// An integer in a time column as go-sqlite3 reads it: Unix milliseconds when its
    /// magnitude passes 10^12, else Unix seconds, in UTC; nil when the year is outside
    /// 0...9999 (Go cannot write it; rqlite fails the response) or milliseconds overflow.
    static func fromUnix(_ value: Int64) -> String? {
        var seconds = value
        var nanos: Int64 = 0
        if value > 1_000_000_000_000 || value < -1_000_000_000_000 {
            guard case (let ns, false) = value.multipliedReportingOverflow(by: 1_000_000) else { return nil }
            seconds = ns / 1_000_000_000
            nanos = ns % 1_000_000_000
            if nanos < 0 { nanos += 1_000_000_000; seconds -= 1 }
        }
        // Days from the civil calendar (Howard Hinnant's algorithm), in UTC.
        let (days, secondOfDay) = floorDivide(seconds, 86_400)
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yoe + era * 400 + (month <= 2 ? 1 : 0)
        guard (0...9999).contains(year) else { return nil }
        return format(year: Int(year), month: Int(month), day: Int(day), hour: Int(secondOfDay / 3600), minute: Int(secondOfDay % 3600 / 60),
                      second: Int(secondOfDay % 60), nanos: Int(nanos), offsetMinutes: 0)
    }

    private static func floorDivide(_ a: Int64, _ b: Int64) -> (Int64, Int64) {
        let q = a / b, r = a % b
        return r < 0 ? (q - 1, r + b) : (q, r)
    }

    private static func daysIn(month: Int, year: Int) -> Int {
        switch month {
        case 2: return year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) ? 29 : 28
        case 4, 6, 9, 11: return 30
        default: return 31
        }
    }

    /// Go's `time.RFC3339Nano`: fraction without trailing zeros (none when 0), `Z` for UTC.
    private static func format(year: Int, month: Int, day: Int, hour: Int, minute: Int, second: Int, nanos: Int, offsetMinutes: Int) -> String {
        func two(_ v: Int) -> String { v < 10 ? "0\(v)" : "\(v)" }
        var out = String(repeating: "0", count: max(0, 4 - String(year).count)) + "\(year)-\(two(month))-\(two(day))T\(two(hour)):\(two(minute)):\(two(second))"
        if nanos > 0 {
            var fraction = String(nanos)
            fraction = String(repeating: "0", count: 9 - fraction.count) + fraction
            while fraction.hasSuffix("0") { fraction.removeLast() }
            out += "." + fraction
        }
        if offsetMinutes == 0 {
            out += "Z"
        } else {
            let m = abs(offsetMinutes)
            out += (offsetMinutes < 0 ? "-" : "+") + two(m / 60) + ":" + two(m % 60)
        }
        return out
    }
}

/// A malformed API request: the client gets HTTP 400 with this message.
public struct RqliteRequestError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
