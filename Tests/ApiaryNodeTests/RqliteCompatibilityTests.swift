import ApiaryCore
import ApiaryStorage
import ApiaryTLS
import Foundation
import NIOHTTP1
import XCTest
@testable import ApiaryNode

/// rqlite's API as its clients see it, without a socket: values and response shapes as rqlite
/// writes them, its query parameters, the unified endpoint, and its node endpoints. (The real
/// clients run in `RqliteClientsTests`.)
final class RqliteCompatibilityTests: XCTestCase {
    // MARK: Values

    func testFloatsAreWrittenAsGoWritesThem() {
        let cases: [(Double, String)] = [
            (1, "1"), (2.5, "2.5"), (0.1, "0.1"), (-0.0, "-0"), (0, "0"), (123_456_789, "123456789"),
            (1e20, "100000000000000000000"), (1e21, "1e+21"), (1.5e300, "1.5e+300"), (0.000001, "0.000001"),
            (1e-7, "1e-7"), (1.25e-10, "1.25e-10"), (5e-324, "5e-324"), (.greatestFiniteMagnitude, "1.7976931348623157e+308"),
            (-3.14159, "-3.14159"), (12_345.678, "12345.678"), (9_007_199_254_740_993, "9007199254740992"),
        ]
        for (value, expected) in cases {
            XCTAssertEqual(RqliteJSON.goFloat(value), expected, "\(value)")
        }
        XCTAssertEqual(RqliteJSON.value(.real(.infinity), declaredType: "real"), "null")
    }

    /// go-sqlite3 reads text in date, datetime and timestamp columns with SQLite's formats and
    /// rqlite writes Go's RFC 3339 (pyrqlite's TIMESTAMP converter needs the `T`).
    func testTimeTextBecomesRFC3339() {
        let cases: [(String, String?)] = [
            ("2024-01-02 03:04:05", "2024-01-02T03:04:05Z"),
            ("2024-01-02T03:04:05", "2024-01-02T03:04:05Z"),
            ("2024-01-02 03:04:05.120", "2024-01-02T03:04:05.12Z"),
            ("2024-01-02 03:04:05.000", "2024-01-02T03:04:05Z"),
            ("2024-01-02 03:04:05.1234567891234", "2024-01-02T03:04:05.123456789Z"),
            ("2024-01-02 03:04:05,5", "2024-01-02T03:04:05.5Z"),
            ("2024-01-02 03:04:05+05:30", "2024-01-02T03:04:05+05:30"),
            ("2024-01-02T03:04:05.25-07:00", "2024-01-02T03:04:05.25-07:00"),
            ("2024-01-02 03:04:05+00:00", "2024-01-02T03:04:05Z"),
            ("2024-01-02 03:04:05Z", "2024-01-02T03:04:05Z"),
            ("2024-01-02 3:04", "2024-01-02T03:04:00Z"),
            ("2024-01-02", "2024-01-02T00:00:00Z"),
            ("2024-01-02Z", "2024-01-02T00:00:00Z"),
            ("2024-02-29", "2024-02-29T00:00:00Z"),
            ("2023-02-29", nil), ("2024-13-01", nil), ("2024-01-02 24:00", nil), ("2024-01-02 03:04:60", nil),
            ("24-01-02", nil), ("2024-1-2", nil), ("2024-01-02 03:04+01:00", nil), ("yesterday", nil), ("", nil),
            ("2024-01-02 03:04:05 ", nil), ("2024-01-02ZZ", nil),
        ]
        for (text, expected) in cases {
            XCTAssertEqual(RqliteTime.normalized(text), expected, text)
        }
        // Text that is no time stays as it is (rqlite would send 0001-01-01T00:00:00Z).
        XCTAssertEqual(RqliteJSON.value(.text("soon"), declaredType: "timestamp"), "\"soon\"")
        XCTAssertEqual(RqliteJSON.value(.text("2024-01-02"), declaredType: "date"), "\"2024-01-02T00:00:00Z\"")
        XCTAssertEqual(RqliteJSON.value(.text("2024-01-02"), declaredType: "text"), "\"2024-01-02\"")
        XCTAssertEqual(RqliteJSON.value(.text("2024-01-02"), declaredType: "datetime(6)"), "\"2024-01-02\"", "go-sqlite3 matches the whole name")
    }

    func testIntegersInTimeColumnsAreUnixSecondsOrMilliseconds() {
        XCTAssertEqual(RqliteTime.fromUnix(0), "1970-01-01T00:00:00Z")
        XCTAssertEqual(RqliteTime.fromUnix(1_700_000_000), "2023-11-14T22:13:20Z")
        XCTAssertEqual(RqliteTime.fromUnix(-1), "1969-12-31T23:59:59Z")
        XCTAssertEqual(RqliteTime.fromUnix(951_782_400), "2000-02-29T00:00:00Z")
        XCTAssertEqual(RqliteTime.fromUnix(1_700_000_000_123), "2023-11-14T22:13:20.123Z", "past 10^12: milliseconds")
        XCTAssertEqual(RqliteTime.fromUnix(-1_700_000_000_123), "1916-02-18T01:46:39.877Z")
        XCTAssertNil(RqliteTime.fromUnix(999_999_999_999), "year 33658: Go cannot write it")
        XCTAssertNil(RqliteTime.fromUnix(.max))
        XCTAssertEqual(RqliteJSON.value(.integer(0), declaredType: "datetime"), "\"1970-01-01T00:00:00Z\"")
        XCTAssertEqual(RqliteJSON.value(.real(1.5), declaredType: "timestamp"), "1.5", "floats stay floats")
    }

    func testBooleansBlobsAndText() {
        XCTAssertEqual(RqliteJSON.value(.integer(1), declaredType: "boolean"), "true")
        XCTAssertEqual(RqliteJSON.value(.integer(0), declaredType: "boolean"), "false")
        XCTAssertEqual(RqliteJSON.value(.integer(-1), declaredType: "boolean"), "false", "go-sqlite3: val > 0")
        XCTAssertEqual(RqliteJSON.value(.integer(1), declaredType: "bool"), "1")
        XCTAssertEqual(RqliteJSON.value(.blob([1, 2]), declaredType: "blob"), "\"AQI=\"")
        XCTAssertEqual(RqliteJSON.value(.blob([1, 2]), declaredType: "", RqliteJSON.Format(blobsAsArrays: true)), "[1,2]")
        XCTAssertEqual(RqliteJSON.value(.blob(Array("héllo".utf8)), declaredType: "varchar(10)"), "\"héllo\"", "text affinity: text")
        XCTAssertEqual(RqliteJSON.value(.blob([0xFF]), declaredType: "text"), "\"\u{FFFD}\"")
        XCTAssertEqual(RqliteJSON.value(.blob([0xFF]), declaredType: ""), "\"/w==\"", "an expression's BLOB stays a BLOB")
        XCTAssertEqual(RqliteJSON.quote("a\u{2028}b\u{1}"), #""a\u2028b\u0001""#)
    }

    // MARK: Response shapes

    func outcome(_ columns: [String], _ types: [String], _ rows: [[SQLValue]], timeNs: UInt64 = 0) -> StatementResult {
        var o = StatementOutcome()
        o.columns = columns
        o.declaredTypes = types
        o.rows = rows
        o.timeNs = timeNs
        return .success(o)
    }

    func write(lastInsertID: Int64 = 0, rowsAffected: Int = 0, timeNs: UInt64 = 0) -> StatementResult {
        var o = StatementOutcome()
        o.lastInsertID = lastInsertID
        o.rowsAffected = rowsAffected
        o.timeNs = timeNs
        o.isReadOnly = false
        return .success(o)
    }

    func text(_ results: [StatementResult], _ format: RqliteJSON.Format = RqliteJSON.Format(), time: Double? = nil) -> String {
        String(decoding: RqliteJSON.response(results, format: format, timeSeconds: time), as: UTF8.self)
    }

    func testDefaultShapes() {
        let results = [write(lastInsertID: 3, rowsAffected: 1), write(), outcome(["id", "n"], ["integer", ""], [[.integer(1), .real(2)], [.integer(2), .null]]),
                       outcome(["x"], ["text"], []), .failure("no such table: bar")]
        XCTAssertEqual(text(results, time: 0.5),
                       #"{"results":[{"last_insert_id":3,"rows_affected":1},{},{"columns":["id","n"],"types":["integer","real"],"values":[[1,2],[2,null]]},{"columns":["x"],"types":["text"]},{"error":"no such table: bar"}]}"#,
                       "zero counts, empty values and the time left out; an expression's type from its first value")
    }

    func testTimings() {
        let results = [write(lastInsertID: 1, rowsAffected: 1, timeNs: 1_500), outcome(["a"], ["integer"], [[.integer(1)]], timeNs: 2_000_000)]
        XCTAssertEqual(text(results, RqliteJSON.Format(timings: true), time: 0.25),
                       #"{"results":[{"last_insert_id":1,"rows_affected":1,"time":0.0000015},{"columns":["a"],"types":["integer"],"values":[[1]],"time":0.002}],"time":0.25}"#)
    }

    func testAssociative() {
        let results = [write(lastInsertID: 1, rowsAffected: 1),
                       outcome(["name", "id", "name"], ["text", "integer", "text"], [[.text("a"), .integer(1), .text("b")]]),
                       outcome(["x"], ["integer"], []), .failure("nope")]
        XCTAssertEqual(text(results, RqliteJSON.Format(associative: true)),
                       #"{"results":[{"last_insert_id":1,"rows_affected":1,"rows":null},{"types":{"id":"integer","name":"text"},"rows":[{"id":1,"name":"b"}]},{"types":{"x":"integer"},"rows":[]},{"error":"nope"}]}"#,
                       "keys sorted as Go writes a map; a repeated column keeps its last value")
    }

    func testPrettyIsGosIndent() {
        let results = [outcome(["a", "b"], ["text", "blob"], [[.text("x, {y}: [z]"), .blob([])]]), write()]
        XCTAssertEqual(text(results, RqliteJSON.Format(pretty: true)), """
            {
                "results": [
                    {
                        "columns": [
                            "a",
                            "b"
                        ],
                        "types": [
                            "text",
                            "blob"
                        ],
                        "values": [
                            [
                                "x, {y}: [z]",
                                ""
                            ]
                        ]
                    },
                    {}
                ]
            }
            """)
    }

    func testQueryResultsAreRowsEvenWithoutColumns() {
        XCTAssertEqual(text([outcome([], [], [])], RqliteJSON.Format(allRows: true)), #"{"results":[{}]}"#)
        XCTAssertEqual(text([outcome([], [], [])], RqliteJSON.Format(associative: true, allRows: true)), #"{"results":[{"rows":[]}]}"#)
    }

    // MARK: Query parameters

    func testQueryParameters() throws {
        let all = try RqliteQuery.parse("transaction&timings&pretty&associative&blob_array&level=STRONG&q=SELECT+1&redirect&queue&norwrandom")
        XCTAssertTrue(all.transaction)
        XCTAssertEqual(all.format, RqliteJSON.Format(associative: true, timings: true, pretty: true, blobsAsArrays: true))
        XCTAssertEqual(all.level, .strong)
        XCTAssertEqual(all.q, "SELECT 1")
        XCTAssertEqual(try RqliteQuery.parse(nil), RqliteQuery())
        for (text, level) in [("none", ReadLevel.none), ("weak", .weak), ("auto", .weak), ("", .weak), ("Linearizable", .linearizable)] {
            XCTAssertEqual(try RqliteQuery.parse(Substring("level=" + text)).level, level, text)
        }
        XCTAssertEqual(try RqliteQuery.parse("level=none&level=strong").level, .none, "the first of a repeated name wins")
        XCTAssertNoThrow(try RqliteQuery.parse("level=none&freshness=1m30s&freshness_strict&timeout=2s&db_timeout=0&retries=3&linearizable_timeout=1.5s"))
        for (query, message) in [("freshness=5", "freshness is not a valid duration"), ("timeout=", "timeout is not a valid duration"),
                                 ("retries=x", "retries is not a valid integer"), ("freshness_strict", "freshness_strict requires freshness"),
                                 ("q=", "query parameter not set"), ("level=eventual", "unknown level 'eventual'"),
                                 ("transaction=%zz", "not valid %-encoding")] {
            XCTAssertThrowsError(try RqliteQuery.parse(Substring(query)), query) { error in
                XCTAssertEqual((error as? APIError)?.kind, .badRequest, query)
                XCTAssertTrue(String(describing: error).contains(message), "\(query): \(error)")
            }
        }
    }

    /// Query-string values decode as Foundation's `removingPercentEncoding` (after '+' → ' ')
    /// decodes them, which the byte-level decoder replaced on the read path.
    func testFormDecodingAgreesWithFoundation() {
        let samples = ["SELECT+1", "SELECT%201", "a%2Bb+c", "%C3%A9t%C3%A9", "caf%c3%a9", "%", "%4", "%zz", "%4g", "100%",
                       "%FF", "%C3", "%E2%82%AC", "", "plain", "+", "%2", "a%%20", "%00", "x=y", "%3D%26"]
        for sample in samples {
            let expected = sample.replacingOccurrences(of: "+", with: " ").removingPercentEncoding
            XCTAssertEqual(RqliteQuery.formDecoded(Substring(sample)), expected, sample)
        }
    }

    func testDBTimeoutBoundsEachStatementOfTheRequest() async throws {
        XCTAssertEqual(try RqliteQuery.parse("db_timeout=1.5s").dbTimeoutMs, 1_500)
        XCTAssertEqual(try RqliteQuery.parse("db_timeout=250us").dbTimeoutMs, 1, "rounded up to whole ms")
        XCTAssertEqual(try RqliteQuery.parse("db_timeout=1m").dbTimeoutMs, 60_000)
        XCTAssertNil(try RqliteQuery.parse("db_timeout=0").dbTimeoutMs, "0: no bound of its own")
        XCTAssertNil(try RqliteQuery.parse("db_timeout=-2s").dbTimeoutMs)
        XCTAssertNil(try RqliteQuery.parse("timeout=2s").dbTimeoutMs)
        let service = RecordingSQLService()
        _ = await respond(.POST, "/db/execute?db_timeout=200ms", body: #"["DELETE FROM t", ["INSERT INTO t VALUES(?)", 1]]"#, service: service)
        _ = await respond(.GET, "/db/query?q=SELECT+1&db_timeout=2s", service: service)
        _ = await respond(.POST, "/db/request?db_timeout=3s", body: #"["SELECT 1"]"#, service: service)
        _ = await respond(.POST, "/db/execute", body: #"["DELETE FROM t"]"#, service: service)
        XCTAssertEqual(service.calls.map { $0.statements.map(\.timeMsMax) }, [[200, 200], [2_000], [3_000], [nil]])
    }

    func testGoDurations() {
        for valid in ["0", "1s", "1.5h", "-1m30s", "300ms", "2µs", "2μs", "3us", "10ns", "+5m", ".5s", "1h2m3.4s"] {
            XCTAssertTrue(RqliteQuery.isGoDuration(valid), valid)
        }
        for invalid in ["", "1", "s", "1x", "1 s", "1sm", "-", ".s", "1.5"] {
            XCTAssertFalse(RqliteQuery.isGoDuration(invalid), invalid)
        }
    }

    // MARK: Routes

    func respond(_ method: HTTPMethod, _ uri: String, body: String = "", headers: [(String, String)] = [("X-Apiary-Tenant", "acme")],
                 service: any SQLService) async -> APIResponse {
        let request = APIRequest(method: method, uri: uri, headers: HTTPHeaders(headers), body: Array(body.utf8))
        return await APIRoutes(service: service, accounts: nil).respond(to: request)
    }

    func testUnifiedEndpointServesReadsAtTheirLevelAndTheRestThroughTheWriter() async throws {
        let reads = RecordingSQLService()
        let read = await respond(.POST, "/db/request?level=strong", body: #"["SELECT 1", ["  -- c\n SELECT ?", 2], "VALUES (1)"]"#, service: reads)
        XCTAssertEqual(read.status, .ok)
        XCTAssertEqual(reads.calls.map(\.kind), [.query(.strong)])

        let mixed = RecordingSQLService()
        let both = await respond(.POST, "/db/request?transaction&associative", body: #"["SELECT 1", ["INSERT INTO t VALUES(?)", 1]]"#, service: mixed)
        XCTAssertEqual(both.status, .ok)
        XCTAssertEqual(mixed.calls.map(\.kind), [.execute(transaction: true)])
        let results = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(both.body)) as? [String: Any])?["results"] as? [[String: Any]])
        XCTAssertTrue(results[0]["rows"] is NSNull, "a write's result in the associative form: \(results)")

        let get = await respond(.GET, "/db/request", service: RecordingSQLService())
        XCTAssertEqual(get.status, .methodNotAllowed)
        XCTAssertEqual(get.allow, "POST")
    }

    func testWhatCountsAsARead() {
        for sql in ["SELECT 1", " select * from t", "/* x */ SELECT 1", "-- x\nSELECT 1;", "EXPLAIN QUERY PLAN SELECT 1", "VALUES (1)", "SELECT 1 ;; "] {
            XCTAssertTrue(APIRoutes.isRead(sql), sql)
        }
        for sql in ["INSERT INTO t VALUES (1)", "WITH x AS (SELECT 1) SELECT * FROM x", "PRAGMA user_version", "SELECT 1; DELETE FROM t",
                    "SELECTED", "/* unterminated SELECT 1", "", "-- SELECT 1"] {
            XCTAssertFalse(APIRoutes.isRead(sql), sql)
        }
    }

    func testRequestTargetsInAbsoluteForm() async throws {
        let service = RecordingSQLService()
        let response = await respond(.POST, "https://127.0.0.1:4001/db/execute?transaction", body: #"["DELETE FROM t"]"#, service: service)
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(service.calls.map(\.kind), [.execute(transaction: true)])
        let query = await respond(.GET, "http://localhost/db/query?q=SELECT+2", service: service)
        XCTAssertEqual(query.status, .ok)
        XCTAssertEqual(service.calls.last?.statements, [SQLStatement("SELECT 2")])
        let bare = APIRequest(method: .GET, uri: "https://host:1", headers: [:], body: [])
        XCTAssertEqual(bare.path, "")
        XCTAssertEqual(APIRequest(method: .GET, uri: "https://host:1?x=1", headers: [:], body: []).query, "x=1")
    }

    func testTextPlainBodiesAndQOnPost() async throws {
        let service = RecordingSQLService()
        let plain = await respond(.POST, "/db/execute", body: "INSERT INTO t VALUES ('[not json]')",
                                  headers: [("X-Apiary-Tenant", "acme"), ("Content-Type", "text/plain; charset=utf-8")], service: service)
        XCTAssertEqual(plain.status, .ok)
        XCTAssertEqual(service.calls.last?.statements, [SQLStatement("INSERT INTO t VALUES ('[not json]')")])
        let q = await respond(.POST, "/db/query?q=SELECT+3", service: service)
        XCTAssertEqual(q.status, .ok)
        XCTAssertEqual(service.calls.last?.statements, [SQLStatement("SELECT 3")])
        let both = await respond(.POST, "/db/query?q=SELECT+3", body: #"["SELECT 4"]"#, service: service)
        XCTAssertEqual(both.status, .ok)
        XCTAssertEqual(service.calls.last?.statements, [SQLStatement("SELECT 4")], "a body wins over q")
    }

    func testPlainTextContentTypes() {
        for type in ["text/plain", "TEXT/Plain; charset=utf-8", "text/plain;charset=UTF-8"] { XCTAssertTrue(APIRoutes.isPlainText(type), type) }
        for type in ["application/json", "text/plai", "text\u{0F}plain", "", "text/html"] { XCTAssertFalse(APIRoutes.isPlainText(type), type) }
    }

    func testOptionsIsAnsweredOnAnyPath() async {
        let response = await respond(.OPTIONS, "/db/execute", headers: [], service: RecordingSQLService())
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(response.allow, "OPTIONS, GET, POST")
    }

    // MARK: Node endpoints

    struct Summarized: SQLService {
        let summary: NodeSummary?
        func execute(tenant: TenantID, _ statements: [SQLStatement], transaction: Bool, idempotencyKey: String?) async throws -> [StatementResult] { [] }
        func query(tenant: TenantID, _ statements: [SQLStatement], level: ReadLevel) async throws -> [StatementResult] { [] }
        func statusJSON() async -> [UInt8] { Array(#"{"apiary":"status"}"#.utf8) }
        func summary() async -> NodeSummary? { summary }
        func promote() async throws -> [UInt8] { [] }
    }

    func testReadyzSaysWhatRqliteSays() async {
        let cases: [(NodeSummary?, String, HTTPResponseStatus, String)] = [
            (NodeSummary(name: "n1", role: "primary", epoch: 2), "", .ok, "[+]node ok\n[+]leader ok\n[+]store ok"),
            (NodeSummary(name: "n1", role: "primary", epoch: 2), "?sync", .ok, "[+]node ok\n[+]leader ok\n[+]store ok\n[+]sync ok"),
            (NodeSummary(name: "n2", role: "standby", epoch: 2), "", .serviceUnavailable,
             "[+]node ok\n[+]leader ok\n[+]store not ready (a standby serves no reads or writes; use the primary)"),
            (NodeSummary(name: "n2", role: "standby", epoch: 2, error: "diverged"), "", .serviceUnavailable, "[+]node ok\n[+]leader ok\n[+]store not ready: diverged"),
            (NodeSummary(name: "n1", role: "demoted", epoch: 1), "", .serviceUnavailable,
             "[+]node ok\n[+]leader does not exist\n[+]store not ready (demoted: a newer primary exists)"),
            (nil, "", .serviceUnavailable, "[+]node ok\n[+]leader does not exist"),
            (nil, "?noleader", .ok, "[+]node ok"),
        ]
        for (summary, query, status, body) in cases {
            let response = await respond(.GET, "/readyz" + query, headers: [], service: Summarized(summary: summary))
            XCTAssertEqual(response.status, status, "\(String(describing: summary)) \(query)")
            XCTAssertEqual(String(decoding: response.body, as: UTF8.self), body)
            XCTAssertEqual(response.contentType, "text/plain; charset=utf-8")
        }
    }

    func testStatusForApplicationsIsRqlitesLayoutAboutTheNodeOnly() async throws {
        let service = Summarized(summary: NodeSummary(name: "n1", role: "primary", epoch: 3))
        let headers = [("Authorization", "Basic " + Data("alice:password-1234".utf8).base64EncodedString()), ("Host", "db.example:4001")]
        let response = await respond(.GET, "/status", headers: headers, service: service)
        XCTAssertEqual(response.status, .ok)
        let status = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])
        let store = try XCTUnwrap(status["store"] as? [String: Any])
        XCTAssertEqual((store["raft"] as? [String: Any])?["state"] as? String, "Leader")
        XCTAssertEqual((store["leader"] as? [String: Any])?["addr"] as? String, "db.example:4001")
        XCTAssertEqual((status["apiary"] as? [String: Any])?["epoch"] as? Int, 3)
        XCTAssertNotNil((status["node"] as? [String: Any])?["uptime"] as? String)
        XCTAssertNil(status["tenants"], "no tenant is named")
        XCTAssertEqual((status["build"] as? [String: Any])?["version"] as? String, ApiaryVersion.rqliteHeaderValue)
        // rqlite's queue stats, and the asking tenant's own queued requests.
        let queue = try XCTUnwrap(((status["http"] as? [String: Any])?["queue"] as? [String: Any])?["_default"] as? [String: Any])
        XCTAssertEqual(queue["max_size"] as? Int, 1024)
        XCTAssertEqual(queue["batch_size"] as? Int, 128)
        XCTAssertEqual(queue["timeout"] as? String, "100ms")

        let part = await respond(.GET, "/status?key=store.raft", headers: headers, service: service)
        XCTAssertEqual(String(decoding: part.body, as: UTF8.self), #"{"state":"Leader"}"#)
        let missing = await respond(.GET, "/status?key=nope.x", headers: headers, service: service)
        XCTAssertEqual(String(decoding: missing.body, as: UTF8.self), "{}")

        // Operators and monitors keep Apiary's own status.
        let request = APIRequest(method: .GET, uri: "/status", headers: [:], body: [], peer: .init(role: .monitor, name: "m"))
        let own = await APIRoutes(service: service, accounts: nil).respond(to: request)
        XCTAssertEqual(String(decoding: own.body, as: UTF8.self), #"{"apiary":"status"}"#)
    }

    func testNodesInBothOfRqlitesForms() async throws {
        let service = Summarized(summary: NodeSummary(name: "n1", role: "primary", epoch: 3))
        let legacy = await respond(.GET, "/nodes", headers: [("Host", "127.0.0.1:4001")], service: service)
        XCTAssertEqual(legacy.status, .ok)
        XCTAssertEqual(String(decoding: legacy.body, as: UTF8.self),
                       #"{"n1":{"api_addr":"https://127.0.0.1:4001","id":"n1","leader":true,"reachable":true,"version":"apiary-\#(ApiaryVersion.current)","voter":true}}"#)
        let list = await respond(.GET, "/nodes?ver=2", headers: [("Host", "127.0.0.1:4001")], service: service)
        XCTAssertEqual(String(decoding: list.body, as: UTF8.self),
                       #"{"nodes":[{"api_addr":"https://127.0.0.1:4001","id":"n1","leader":true,"reachable":true,"version":"apiary-\#(ApiaryVersion.current)","voter":true}]}"#)
        let post = await respond(.POST, "/nodes", service: service)
        XCTAssertEqual(post.status, .methodNotAllowed)
    }

    func testGoDurationStrings() {
        XCTAssertEqual(RqliteNodeEndpoints.goDuration(0), "0s")
        XCTAssertEqual(RqliteNodeEndpoints.goDuration(42.1), "42.1s")
        XCTAssertEqual(RqliteNodeEndpoints.goDuration(3723.5), "1h2m3.5s")
        XCTAssertEqual(RqliteNodeEndpoints.goDuration(60), "1m0s")
        XCTAssertEqual(RqliteNodeEndpoints.goDuration(0.1), "100ms")
        XCTAssertEqual(RqliteNodeEndpoints.goDuration(0.0015), "1.5ms")
        XCTAssertEqual(RqliteNodeEndpoints.goDuration(0.0000015), "1.5µs")
        XCTAssertEqual(RqliteNodeEndpoints.goDuration(0.000000007), "7ns")
    }
}
