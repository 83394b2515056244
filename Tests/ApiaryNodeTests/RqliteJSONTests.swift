import ApiaryStorage
import ApiaryTLS
import Foundation
import XCTest
@testable import ApiaryNode

final class RqliteJSONTests: XCTestCase {
    func parse(_ json: String) throws -> [SQLStatement] {
        try RqliteJSON.statements(fromBody: Array(json.utf8), statementsMax: 100)
    }

    /// Strings are escaped by bytes as Go escapes them, scalar by scalar (the reference below
    /// is the scalar-by-scalar implementation the byte-level one replaced).
    func testStringsAreEscapedByBytesAsScalarByScalar() {
        func reference(_ s: String) -> String {
            var out = "\""
            for scalar in s.unicodeScalars {
                switch scalar {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                case "\r": out += "\\r"
                case "\t": out += "\\t"
                case "\u{2028}": out += "\\u2028"
                case "\u{2029}": out += "\\u2029"
                case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
                default: out.unicodeScalars.append(scalar)
                }
            }
            return out + "\""
        }
        let samples = ["", "plain", "quote\"back\\slash", "line\nfeed\r\t", "\u{01}\u{1f}\u{7f}", "é ü 日本", "sep\u{2028}par\u{2029}",
                       "\u{2027}\u{202A}\u{2028}", "€\u{2029}€", "emoji 🐝", "x\u{0}y", "\u{2028}\u{2028}", String(decoding: [0xE2, 0x80], as: UTF8.self)]
        for sample in samples {
            XCTAssertEqual(RqliteJSON.quote(sample), reference(sample), sample.debugDescription)
        }
    }

    func testParsesPlainAndParameterisedStatements() throws {
        let statements = try parse(#"["CREATE TABLE t (x)", ["INSERT INTO t VALUES(?, ?, ?, ?, ?)", 1, 2.5, "s", null, true]]"#)
        XCTAssertEqual(statements, [
            SQLStatement("CREATE TABLE t (x)"),
            SQLStatement("INSERT INTO t VALUES(?, ?, ?, ?, ?)", [.integer(1), .real(2.5), .text("s"), .null, .integer(1)]),
        ])
    }

    func testMalformedRequestsGetClearErrors() {
        for (body, expected) in [
            ("not json", "JSON array"),
            (#"{"a": 1}"#, "JSON array"),
            ("[]", "no statements"),
            (#"[["SELECT ?", {"named": {"x": 1}}]]"#, "nested objects"),
            (#"[["SELECT ?", [1, 2000]]]"#, "an array is a BLOB of byte values"),
            ("[1]", "JSON array"),
        ] {
            XCTAssertThrowsError(try parse(body), body) { error in
                XCTAssertTrue(String(describing: error).contains(expected), "\(body): \(error)")
            }
        }
        let many = "[" + Array(repeating: #""SELECT 1""#, count: 101).joined(separator: ",") + "]"
        XCTAssertThrowsError(try parse(many)) { XCTAssertTrue(String(describing: $0).contains("max 100")) }
    }

    func testResponsesFollowRqlitesFormat() throws {
        var read = StatementOutcome()
        read.columns = ["id", "name"]
        read.declaredTypes = ["integer", "blob"]
        read.rows = [[.integer(1), .text("fi\"ona\n")], [.null, .blob([1, 2])]]
        var write = StatementOutcome()
        write.lastInsertID = 5
        write.rowsAffected = 1
        let json = String(decoding: RqliteJSON.response([.success(write), .success(read), .failure("near \"x\": syntax error")]), as: UTF8.self)
        let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        let results = object["results"] as! [[String: Any]]
        XCTAssertEqual(results[0]["last_insert_id"] as? Int, 5)
        XCTAssertEqual(results[0]["rows_affected"] as? Int, 1)
        XCTAssertEqual(results[1]["columns"] as? [String], ["id", "name"])
        XCTAssertEqual(results[1]["types"] as? [String], ["integer", "blob"])
        let values = results[1]["values"] as! [[Any]]
        XCTAssertEqual(values[0][1] as? String, "fi\"ona\n")
        XCTAssertEqual(values[1][1] as? String, "AQI=", "blobs are base64 as in rqlite")
        XCTAssertEqual(results[2]["error"] as? String, "near \"x\": syntax error")
    }

    /// `?qualify_columns`: a table's column is `table.column`, an expression keeps its name;
    /// in the associative form too.
    func testQualifiedColumns() throws {
        var read = StatementOutcome()
        read.columns = ["id", "n"]
        read.declaredTypes = ["integer", ""]
        read.columnTables = ["t", ""]
        read.rows = [[.integer(1), .integer(2)]]
        var format = RqliteJSON.Format()
        format.qualifyColumns = true
        let plain = try JSONSerialization.jsonObject(with: Data(RqliteJSON.response([.success(read)], format: format))) as! [String: Any]
        XCTAssertEqual((plain["results"] as! [[String: Any]])[0]["columns"] as? [String], ["t.id", "n"])
        format.associative = true
        let associative = try JSONSerialization.jsonObject(with: Data(RqliteJSON.response([.success(read)], format: format))) as! [String: Any]
        let row = ((associative["results"] as! [[String: Any]])[0]["rows"] as! [[String: Any]])[0]
        XCTAssertEqual(row["t.id"] as? Int, 1)
        XCTAssertEqual(row["n"] as? Int, 2)
        // Without the flag, and for results kept from before tables were recorded: bare names.
        read.columnTables = nil
        let old = try JSONSerialization.jsonObject(with: Data(RqliteJSON.response([.success(read)], format: RqliteJSON.Format(qualifyColumns: true)))) as! [String: Any]
        XCTAssertEqual((old["results"] as! [[String: Any]])[0]["columns"] as? [String], ["id", "n"])
        XCTAssertTrue(try RqliteQuery.parse("qualify_columns").format.qualifyColumns)
    }

    func testQueryStringValuesDecodeAsFormsDo() throws {
        XCTAssertEqual(try APIRoutes.formValue("q", in: "q=SELECT+*+FROM+t&level=weak"), "SELECT * FROM t")
        XCTAssertEqual(try APIRoutes.formValue("q", in: "level=none&q=SELECT%201%2B1"), "SELECT 1+1")
        XCTAssertNil(try APIRoutes.formValue("q", in: "level=none"))
    }
}

final class ClusterVerifierTests: XCTestCase {
    func status(_ role: String, _ tenants: [TenantStatus], error: String? = nil) -> NodeStatus {
        NodeStatus(node: role, role: role, epoch: 1, tenants: tenants, error: error)
    }
    func t(_ name: String, lsn: UInt64, checksum: UInt64, applied: UInt64? = nil) -> TenantStatus {
        TenantStatus(tenant: name, epoch: 1, lsn: lsn, checksum: checksum, appliedLSN: applied ?? lsn, standbyAckedLSN: nil)
    }

    func testSameLSNSameChecksumIsConsistent() throws {
        let v = try verifier()
        let r = v.compare(primary: status("p", [t("a", lsn: 5, checksum: 9)]), standby: status("s", [t("a", lsn: 5, checksum: 9)]))
        XCTAssertTrue(r.report.consistent)
        XCTAssertTrue(r.caughtUp)
    }

    func testSameLSNDifferentChecksumIsAMismatch() throws {
        let r = try verifier().compare(primary: status("p", [t("a", lsn: 5, checksum: 9)]), standby: status("s", [t("a", lsn: 5, checksum: 8)]))
        XCTAssertFalse(r.report.consistent)
        XCTAssertTrue(r.report.text.contains("MISMATCH"))
    }

    func testBehindOrMissingOrStoppedIsNotConsistent() throws {
        let v = try verifier()
        XCTAssertFalse(v.compare(primary: status("p", [t("a", lsn: 5, checksum: 9)]), standby: status("s", [t("a", lsn: 6, checksum: 1, applied: 4)])).report.consistent)
        XCTAssertFalse(v.compare(primary: status("p", [t("a", lsn: 5, checksum: 9)]), standby: status("s", [])).report.consistent)
        XCTAssertFalse(v.compare(primary: status("p", []), standby: status("s", [], error: "diverged")).report.consistent)
    }

    func verifier() throws -> ClusterVerifier {
        let dir = NSTemporaryDirectory() + "apiary-verifier-" + UUID().uuidString
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try ApiaryTLS.CertificateAuthority.create(in: dir)
        try ca.issue(ApiaryTLS.PeerIdentity(role: .operator, name: "operator"), into: dir)
        return try ClusterVerifier(certificatesDirectory: dir, operatorName: "operator")
    }
}
