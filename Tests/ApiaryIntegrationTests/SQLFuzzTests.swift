import ApiaryNode
import Foundation
import XCTest
@testable import ApiaryStorage

/// Hostile SQL through the HTTP API of a real node process (issue: one unauthenticated request
/// crashed the primary through `fts3_tokenizer`). Every function the system's SQLite lists and
/// every virtual-table module is called with hostile arguments; the node must answer every
/// request and still serve afterwards. Allowed or refused does not matter here (the sandbox's
/// own tests say which is which): surviving and answering does.
final class SQLFuzzTests: XCTestCase {
    /// Arguments that have crashed or leaked from SQL functions somewhere: NULL, extremes,
    /// empty and malformed blobs and text, pointer-shaped blobs, format strings, large values,
    /// deeply nested and malformed JSON.
    static let hostileValues = [
        "NULL", "0", "-1", "1", "2", "9223372036854775807", "-9223372036854775808", "1e308", "-1e308", "0.5",
        "''", "x''", "x'00'", "x'4141414141414141'", "x'ffffffffffffffffffffffffffffffff'",
        "'%s%n%x%.999999999d%999999999c'", "CAST(x'fffe80c0' AS TEXT)", "'$.a[#-1]'", "'$[999999999]'",
        "printf('%.*c', 100000, 'x')", "zeroblob(100000)", "randomblob(64)",
        "(printf('%.*c', 5000, '[') || printf('%.*c', 5000, ']'))",
        "('{\"a\":' || printf('%.*c', 5000, '['))",
        "'unicode61 remove_diacritics 2 tokenchars ''-'''",
    ]

    /// The functions and modules the system's SQLite library offers, asked of the same library
    /// the node links (Apiary's own SQL on a private connection, outside the sandbox).
    func libraryCatalogue() throws -> (functions: [(name: String, arity: Int, window: Bool)], modules: [String]) {
        let directory = TemporaryDirectoryPath()
        defer { directory.remove() }
        let connection = try SQLiteConnection(path: directory.path + "/catalogue.db", readOnly: false)
        var functions: [(String, Int, Bool)] = []
        for row in try connection.run("SELECT DISTINCT name, narg, type FROM pragma_function_list ORDER BY name, narg").rows {
            guard case .text(let name) = row[0], case .integer(let narg) = row[1], case .text(let type) = row[2] else { continue }
            functions.append((name, Int(narg), type == "w"))
        }
        let modules = try connection.run("SELECT name FROM pragma_module_list ORDER BY name").rows.compactMap { row -> String? in
            if case .text(let name) = row[0] { return name } else { return nil }
        }
        XCTAssertGreaterThan(functions.count, 100, "the catalogue must list the library's functions")
        XCTAssertTrue(modules.contains("fts3"), "\(modules)")
        return (functions, modules)
    }

    /// Calls of `name` with `arity` arguments: each hostile value in every position, and
    /// neighbouring values mixed.
    static func calls(_ name: String, arity: Int, window: Bool) -> [String] {
        let quoted = name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }) ? name : "\"\(name)\""
        var calls: [String] = []
        let values = hostileValues
        for (i, value) in values.enumerated() {
            var tuples = [Array(repeating: value, count: arity)]
            if arity >= 2 { tuples.append((0..<arity).map { values[(i + $0) % values.count] }) }
            for arguments in tuples {
                let call: String
                if name == "->" || name == "->>" {
                    call = arguments.count == 2 ? "(\(arguments[0])) \(name) (\(arguments[1]))" : "1"
                } else {
                    call = "\(quoted)(\(arguments.joined(separator: ", ")))"
                }
                calls.append("SELECT \(call)\(window ? " OVER ()" : "")")
            }
            if arity == 0 { break }
        }
        return calls
    }

    func testEveryFunctionAndModuleWithHostileArgumentsLeavesTheNodeServing() async throws {
        let (cluster, _, api) = try startSinglePrimary("fuzz")
        let tenant = [("X-Apiary-Tenant", "fuzz")]
        let c = try await api.connect()
        try await createTenant("fuzz", on: c)
        try await executeEach(["CREATE TABLE t (id INTEGER PRIMARY KEY, v)", "INSERT INTO t (v) VALUES ('seed')"], tenant: "fuzz", on: c)

        var answered = 0
        /// Sends `statements` (in requests of at most 40) and requires an answer to each.
        func send(_ statements: [String], write: Bool) async throws {
            for start in stride(from: 0, to: statements.count, by: 40) {
                let chunk = Array(statements[start..<min(start + 40, statements.count)])
                let body = try JSONSerialization.data(withJSONObject: chunk)
                let response: HTTPSConnection.Response
                do {
                    response = try await c.request(.POST, write ? "/db/execute" : "/db/query?level=none", headers: tenant, body: Array(body))
                } catch {
                    return XCTFail("no answer (node running: \(cluster.isRunning(cluster.primary))) to \(chunk): \(error)")
                }
                XCTAssertEqual(response.status, 200, "\(chunk): \(response.text.prefix(500))")
                let json = try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]
                let results = json?["results"] as? [Any]
                XCTAssertEqual(results?.count, chunk.count, "one result per statement: \(response.text.prefix(500))")
                answered += chunk.count
            }
        }

        // The crash a new user found: forge a tokenizer, then make FTS3 use it.
        try await send(["SELECT hex(fts3_tokenizer('simple'))", "SELECT fts3_tokenizer('simple', x'4141414141414141')"], write: false)
        try await send(["SELECT fts3_tokenizer('simple', x'4141414141414141')", "CREATE VIRTUAL TABLE crash USING fts3(x)",
                        "INSERT INTO crash VALUES ('boom')"], write: true)

        let catalogue = try libraryCatalogue()
        var statements: [String] = []
        for function in catalogue.functions {
            let arities = function.arity >= 0 ? [function.arity] : [0, 1, 2, 3]
            for arity in arities { statements += Self.calls(function.name, arity: arity, window: function.window) }
        }
        try await send(statements, write: false)

        var ddl: [String] = []
        var reads: [String] = []
        for (m, module) in catalogue.modules.enumerated() {
            let argumentLists = ["", "(x)", "(a, b, c)", "(x, tokenize=porter)", "('%s%n%s%n')", "(x, content=t)",
                                 "(tokenize=\"unicode61 remove_diacritics 2\")", "(\(String(repeating: "c,", count: 300))c)"]
            for (a, arguments) in argumentLists.enumerated() {
                let table = "vt_\(m)_\(a)"
                ddl.append("CREATE VIRTUAL TABLE \(table) USING \(module)\(arguments)")
                for value in Self.hostileValues.prefix(16) { ddl.append("INSERT INTO \(table) VALUES (\(value))") }
                reads += ["SELECT * FROM \(table) LIMIT 5", "SELECT * FROM \(table) WHERE \(table) MATCH 'x*' LIMIT 5"]
            }
            for value in Self.hostileValues { reads.append("SELECT * FROM \"\(module)\"(\(value)) LIMIT 5") }
        }
        try await send(ddl, write: true)
        try await send(reads, write: false)

        // Still serving, and still right.
        XCTAssertTrue(cluster.isRunning(cluster.primary), "the node died")
        let fresh = try await api.connect()
        let ready = try await fresh.request(.GET, "/readyz")
        XCTAssertEqual(ready.status, 200, ready.text)
        let check = try await fresh.request(.GET, "/db/query?q=SELECT+v+FROM+t&level=none", headers: tenant)
        XCTAssertTrue(check.text.contains("seed"), check.text)
        XCTAssertGreaterThan(answered, 5_000, "the fuzz must make thousands of calls")
        await fresh.close()
        await c.close()
    }
}

/// A scratch directory removed by `remove()`.
struct TemporaryDirectoryPath {
    let path = NSTemporaryDirectory() + "apiary-fuzz-" + UUID().uuidString
    init() { try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}
