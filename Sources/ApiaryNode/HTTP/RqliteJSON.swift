import ApiaryCore
import ApiaryStorage
import Foundation

/// rqlite's JSON request and response formats, so that existing rqlite clients work.
///
/// A request body is a JSON array of statements; each is either an SQL string or an array of
/// the SQL string followed by its positional parameters:
/// `["CREATE TABLE foo (id INTEGER)", ["INSERT INTO foo VALUES(?)", 1]]`.
/// A response is `{"results": [...]}` with one entry per statement: `last_insert_id` and
/// `rows_affected` for writes, `columns`, `types` and `values` for reads, or `error`.
public enum RqliteJSON {
    /// Parses a request body into statements (see `RqliteRequestParser` for the grammar).
    /// - Throws: `RqliteRequestError` with a message naming what is wrong and where.
    public static func statements(fromBody body: [UInt8], statementsMax: Int) throws -> [SQLStatement] {
        try RqliteRequestParser.statements(fromBody: body, statementsMax: statementsMax)
    }

    /// Encodes results as rqlite does.
    public static func response(_ results: [StatementResult], timeSeconds: Double? = nil) -> [UInt8] {
        var out = "{\"results\":["
        for (i, result) in results.enumerated() {
            if i > 0 { out += "," }
            switch result {
            case .failure(let message):
                out += "{\"error\":\(quote(message))}"
            case .success(let o) where !o.columns.isEmpty:
                out += "{\"columns\":[" + o.columns.map(quote).joined(separator: ",") + "]"
                out += ",\"types\":[" + o.declaredTypes.map(quote).joined(separator: ",") + "]"
                if !o.rows.isEmpty {
                    out += ",\"values\":[" + o.rows.map { "[" + $0.map(value).joined(separator: ",") + "]" }.joined(separator: ",") + "]"
                }
                out += "}"
            case .success(let o):
                out += "{\"last_insert_id\":\(o.lastInsertID),\"rows_affected\":\(o.rowsAffected)}"
            }
        }
        out += "]"
        if let timeSeconds { out += ",\"time\":\(timeSeconds)" }
        out += "}"
        return Array(out.utf8)
    }

    /// `{"error": message}` for a request that failed as a whole.
    public static func error(_ message: String) -> [UInt8] { Array("{\"error\":\(quote(message))}".utf8) }

    static func value(_ v: SQLValue) -> String {
        switch v {
        case .null: return "null"
        case .integer(let i): return String(i)
        case .real(let d): return d.isFinite ? "\(d)" : "null"
        case .text(let s): return quote(s)
        case .blob(let b): return quote(Data(b).base64EncodedString()) // as rqlite does
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        out.reserveCapacity(s.utf8.count + 2)
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

/// A malformed API request: the client gets HTTP 400 with this message.
public struct RqliteRequestError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
