import ApiaryStorage
import Foundation
import XCTest
@testable import ApiaryNode

/// The hand-written request parser (`RqliteRequestParser`, through `RqliteJSON.statements`):
/// exact values for every parameter type, strict JSON everywhere else, and, on seeded random
/// and mutated bodies, no trap and no body accepted that `JSONSerialization` rejects.
/// (`RqliteJSONTests` holds the basic cases and the response format.)
final class RqliteRequestParserTests: XCTestCase {
    let malformed = "must be a JSON array of statements"

    func parse(_ body: [UInt8], statementsMax: Int = 100) throws -> [SQLStatement] {
        try RqliteJSON.statements(fromBody: body, statementsMax: statementsMax)
    }

    func parse(_ json: String, statementsMax: Int = 100) throws -> [SQLStatement] {
        try parse(Array(json.utf8), statementsMax: statementsMax)
    }

    /// The parameters of a one-statement body `[["s", <parameters>]]`.
    func parameters(_ json: String, file: StaticString = #filePath, line: UInt = #line) throws -> [SQLValue] {
        let statements = try parse(#"[["s", "# + json + "]]")
        XCTAssertEqual(statements.count, 1, file: file, line: line)
        return statements[0].parameters
    }

    func assertRejected(_ body: [UInt8], _ expected: String, _ label: String? = nil, file: StaticString = #filePath, line: UInt = #line) {
        let label = label ?? String(decoding: body, as: UTF8.self)
        XCTAssertThrowsError(try parse(body), label, file: file, line: line) { error in
            XCTAssertTrue(error is RqliteRequestError, "\(label): \(type(of: error)) would not reach the client as a 400", file: file, line: line)
            XCTAssertTrue(String(describing: error).contains(expected), "\(label): \(error)", file: file, line: line)
        }
    }

    func assertRejected(_ json: String, _ expected: String, file: StaticString = #filePath, line: UInt = #line) {
        assertRejected(Array(json.utf8), expected, json, file: file, line: line)
    }

    // MARK: Values

    func testEachParameterTypeMapsToItsSQLiteValue() throws {
        assertExactly(try parameters(#"null, true, false, 0, -7, 9223372036854775807, -9223372036854775808, 2.5, "text", """#),
                      [.null, .integer(1), .integer(0), .integer(0), .integer(-7), .integer(.max), .integer(.min), .real(2.5), .text("text"), .text("")])
        assertExactly(try parse(#"["SELECT 1", ["SELECT 2"]]"#), [SQLStatement("SELECT 1"), SQLStatement("SELECT 2")])
    }

    /// INTEGER only for a plain integer that fits in Int64, as in rqlite (its request parser
    /// tries Go's ParseInt on the number's text, then ParseFloat); JSONDecoder used to turn
    /// `1.0` and `1e3` into integers.
    func testNumbersAreIntegersOnlyWithoutFractionOrExponent() throws {
        assertExactly(try parameters("-0, -0.0, 1.0, 1e3, 1E2, 2.50e+1, 1e-400, 0.1, -1.5E-3, 9007199254740993"),
                      [.integer(0), .real(-0.0), .real(1), .real(1000), .real(100), .real(25), .real(0), .real(0.1), .real(-0.0015), .integer(9_007_199_254_740_993)])
        assertExactly(try parameters("9223372036854775808, -9223372036854775809, 12345678901234567890123, 18446744073709551616"),
                      [.real(0x1p63), .real(-0x1p63), .real(12_345_678_901_234_567_741_440), .real(0x1p64)], "the nearest Double")
        for huge in ["1e400", "-1e400", "1" + String(repeating: "0", count: 400)] {
            assertRejected(#"[["s", "# + huge + "]]", "parameter 1 of 's': number is out of range")
        }
        for bad in ["01", "-01", "00", "1.", ".5", "+1", "-", "1e", "1e+", "1.e3", "0x10", "1.5.3", "1ee3", "1 2", "NaN", "Infinity", "-Infinity",
                    "tru", "nul", "True", "1_000", "1e999x", "1e999.5"] {
            assertRejected(#"[["s", "# + bad + "]]", malformed)
        }
    }

    func testStringsDecodeEveryEscapeAndRawUTF8() throws {
        assertExactly(try parameters(#""\"\\\/\b\f\n\r\t", "\u00e9\u00C9\u0000\u001f", "\ud83d\ude00\uD83D\uDE00", "é€😀\#u{7f}", "a\u0041b""#),
                      [.text("\"\\/\u{8}\u{c}\n\r\t"), .text("éÉ\u{0}\u{1f}"), .text("😀😀"), .text("é€😀\u{7f}"), .text("aAb")])
        // Escapes in the SQL too, and a string that changes to the escaped path half-way.
        assertExactly(try parse(#"["SELECT \"x\" FROM t", ["SELECT ? -- é\n", "ünï\tcode"]]"#),
                      [SQLStatement(#"SELECT "x" FROM t"#), SQLStatement("SELECT ? -- é\n", [.text("ünï\tcode")])])
    }

    func testStringsRejectBadEscapesSurrogatesAndControlCharacters() {
        for bad in [#""\x""#, #""\u12""#, #""\u12G4""#, #""\U0041""#, #""\ud800""#, #""\ud800x""#, #""\ud800\u0041""#,
                    #""\ud800\n""#, #""\udc00""#, #""\ude00\ud83d""#, #""abc"#, #""abc\"#, #""abc\""#] {
            assertRejected(#"[["s", "# + bad + "]]", malformed)
            assertRejected("[" + bad + "]", malformed)
        }
        for control in [0x00, 0x01, 0x09, 0x0A, 0x0D, 0x1F] as [UInt8] {
            assertRejected(Array(#"[["s", "a"#.utf8) + [control] + Array(#"b"]]"#.utf8), malformed, "raw \(control) in a parameter")
            assertRejected(Array(#"["a\n"#.utf8) + [control] + Array(#"b"]"#.utf8), malformed, "raw \(control) after an escape")
        }
    }

    func testInvalidUTF8IsRejected() {
        let sequences: [[UInt8]] = [[0xFF], [0x80], [0xC0, 0xAF], [0xE0, 0x80, 0xAF], [0xED, 0xA0, 0x80], [0xE2, 0x82],
                                    [0xF4, 0x90, 0x80, 0x80], [0xF8, 0x88, 0x80, 0x80, 0x80], [0xC3]]
        for bytes in sequences {
            assertRejected(Array(#"["a"#.utf8) + bytes + Array(#"b"]"#.utf8), malformed, "\(bytes) in the SQL")
            assertRejected(Array(#"[["s", "\t"#.utf8) + bytes + Array(#""]]"#.utf8), malformed, "\(bytes) after an escape")
        }
        assertRejected([0xFF, 0xFE] + Array(#"["s"]"#.utf8), malformed, "UTF-16 byte-order mark")
        assertExactly(try parse([0xEF, 0xBB, 0xBF] + Array(#"["s"]"#.utf8)), [SQLStatement("s")], "a UTF-8 byte-order mark is ignored")
    }

    // MARK: Structure

    func testWhitespaceWhereJSONAllowsIt() throws {
        let ws = " \t\r\n"
        let body = [ws, "[", ws, #""a""#, ws, ",", ws, "[", ws, #""b""#, ws, ",", ws, "1", ws, ",", ws, "null", ws, "]", ws, "]", ws].joined()
        assertExactly(try parse(body), [SQLStatement("a"), SQLStatement("b", [.integer(1), .null])])
        for notWhitespace in ["\u{0B}", "\u{0C}", "\u{A0}", "\u{0}"] {
            assertRejected(#"["a","# + notWhitespace + #""b"]"#, malformed)
        }
    }

    func testMalformedStructureIsRejected() {
        for body in ["", " ", "[", "]", "null", #""s""#, "1", #"{"s": 1}"#, #"["s"] x"#, #"["s"]]"#, #"["s"][]"#, #"["s",]"#,
                     #"[,"s"]"#, #"["s" "t"]"#, #"[["s" 1]]"#, #"[["s", 1,]]"#, #"[["s",, 1]]"#, #"[["s", ]]"#, "[[]]", "[[1]]",
                     "[null]", "[1]", "[true]", #"[{"s": 1}]"#, #"[["s"]"#, #"[["s", 1]"#, #"[[["s"]]]"#, "[\"s\"]\u{0}"] {
            assertRejected(body, malformed)
        }
        assertRejected(#"["a",  x]"#, "(at byte offset 7)")
    }

    /// rqlite's named values: an object's members, bound by name; positional ones may come
    /// before and after.
    func testObjectsHoldNamedValues() throws {
        let statements = try parse(#"[["INSERT INTO foo(name, age) VALUES(:name, :age)", {"name": "fiona", "age": 20}], ["SELECT ?, :a", 1, { "a" : null }], ["SELECT 1", {}]]"#)
        assertExactly(statements, [
            SQLStatement("INSERT INTO foo(name, age) VALUES(:name, :age)", [.text("fiona"), .integer(20)], names: ["name", "age"]),
            SQLStatement("SELECT ?, :a", [.integer(1), .null], names: ["", "a"]),
            SQLStatement("SELECT 1", [], names: []),
        ])
        XCTAssertNil(try parse(#"[["SELECT ?", 1]]"#)[0].parameterNames, "no names, no array: the insert path's case")
        assertRejected(#"[["SELECT :a", {"a": {"b": 1}}]]"#, "parameter a of 'SELECT :a': nested objects are not supported")
        assertRejected(#"[["SELECT :a", {"": 1}]]"#, "empty name")
        for bad in [#"{"a" 1}"#, #"{"a": 1,}"#, #"{a: 1}"#, #"{"a": 1"#, #"{,}"#, #"{"a": }"#] {
            assertRejected(#"[["s", "# + bad + "]]", malformed)
        }
    }

    /// rqlite's BLOB parameters: an array of byte values, or a string that is an SQLite BLOB
    /// literal (`x'…'`, as its `db.ParseHex` reads one).
    func testByteArraysAndBlobLiteralsAreBlobs() throws {
        assertExactly(try parameters(#"[83,81,76,105,116,101], [], [ 0 , 255 ], "x'53514C'", " X'00ff' ", "x''", {"b": [1]}"#),
                      [.blob(Array("SQLite".utf8)), .blob([]), .blob([0, 255]), .blob(Array("SQL".utf8)), .blob([0, 255]), .blob([]), .blob([1])])
        // Not BLOB literals: text.
        assertExactly(try parameters(#""x'5'", "x'zz'", "x'00", "'00'", "xx'00'", "x'00'y", "hex""#),
                      [.text("x'5'"), .text("x'zz'"), .text("x'00"), .text("'00'"), .text("xx'00'"), .text("x'00'y"), .text("hex")])
        for bad in ["[256]", "[-1]", "[1.5]", "[1e2]", "[01]", "[\"a\"]", "[null]", "[[1]]", "[{}]", "[1,]", "[,1]"] {
            assertRejected(#"[["s", "# + bad + "]]", "an array is a BLOB of byte values")
        }
        assertRejected(#"[["s", [1 2]]]"#, malformed)
    }

    func testStatementCountLimit() throws {
        assertRejected("[]", "request has no statements")
        assertRejected(" [ \n ] ", "request has no statements")
        let statement = #""SELECT 1""#
        XCTAssertEqual(try parse("[" + Array(repeating: statement, count: 3).joined(separator: ",") + "]", statementsMax: 3).count, 3)
        XCTAssertThrowsError(try parse("[" + Array(repeating: statement, count: 4).joined(separator: ",") + "]", statementsMax: 3)) {
            XCTAssertEqual(String(describing: $0), "request has 4 statements (max 3)")
        }
    }

    func testEveryPrefixOfAValidBodyIsRejected() throws {
        let body = Array(#" [ "CREATE TABLE t (x)", ["INSERT INTO t VALUES(?,?,?,?,?,?)", -12, 3.5e-2, "a\"\u00e9\ud83d\ude00é", null, true, false] ]"#.utf8)
        XCTAssertEqual(try parse(body).count, 2)
        for length in 0..<body.count {
            assertRejected(Array(body[..<length]), malformed, "prefix of \(length) bytes")
        }
    }

    // MARK: Random bodies

    /// Generated bodies (random values, escapes and whitespace) parse to exactly what was
    /// generated, and `JSONSerialization` reads the same values from them.
    func testGeneratedBodiesParseExactly() throws {
        for seed: UInt64 in 1...300 {
            var random = SplitMix64(seed: seed)
            let (body, expected) = BodyGenerator.body(&random)
            let label = "seed \(seed): \(String(decoding: body, as: UTF8.self))"
            assertExactly(try parse(body, statementsMax: 1000), expected, label)
            assertAgreesWithJSONSerialization(body, expected, label)
        }
    }

    /// Random bytes and random mutations of valid bodies: no trap, only `RqliteRequestError`,
    /// and nothing accepted that `JSONSerialization` rejects or reads differently.
    func testRandomAndMutatedBodiesNeverTrapNorAcceptInvalidJSON() {
        let interesting = Array(#"[]{}",:\/"-+.0123456789eEutrnfalsu "#.utf8) + [0x00, 0x09, 0x0A, 0x1F, 0x7F, 0x80, 0xBF, 0xC0, 0xC3, 0xED, 0xEF, 0xF4, 0xFF]
        var accepted = 0
        for seed: UInt64 in 1...3000 {
            var random = SplitMix64(seed: seed)
            var body: [UInt8]
            if seed % 4 == 0 {
                body = (0..<Int.random(in: 0...40, using: &random)).map { _ in interesting.randomElement(using: &random)! }
            } else {
                body = BodyGenerator.body(&random).0
                for _ in 0..<Int.random(in: 1...3, using: &random) {
                    let at = Int.random(in: 0...body.count, using: &random)
                    switch Int.random(in: 0..<4, using: &random) {
                    case 0 where at < body.count: body[at] = interesting.randomElement(using: &random)!
                    case 1: body.insert(interesting.randomElement(using: &random)!, at: at)
                    case 2 where at < body.count: body.remove(at: at)
                    default: body.insert(contentsOf: body[at...].prefix(8), at: at)
                    }
                }
            }
            let label = "seed \(seed): \(body)"
            do {
                let statements = try parse(body, statementsMax: 1000)
                accepted += 1
                assertAgreesWithJSONSerialization(body, statements, label)
            } catch {
                XCTAssertTrue(error is RqliteRequestError, "\(label): \(error)")
            }
        }
        XCTAssertGreaterThan(accepted, 100, "mutations should leave some bodies valid, or the agreement check tests nothing")
    }

    /// Numbers compare as Double: JSONSerialization does not say whether `1.0` was written `1`.
    func assertAgreesWithJSONSerialization(_ body: [UInt8], _ statements: [SQLStatement], _ label: String, file: StaticString = #filePath, line: UInt = #line) {
        guard let object = try? JSONSerialization.jsonObject(with: Data(body)), let items = object as? [Any] else {
            return XCTFail("\(label): accepted, but JSONSerialization rejects it", file: file, line: line)
        }
        XCTAssertEqual(items.count, statements.count, label, file: file, line: line)
        for (item, statement) in zip(items, statements) {
            let values = (item as? [Any]) ?? [item]
            XCTAssertEqual((values.first as? String).map { Array($0.utf8) }, Array(statement.sql.utf8), label, file: file, line: line)
            // An object's members are named values; JSONSerialization's dictionaries keep no
            // order (and the last of a repeated name), so they are compared by name.
            var positional: [Any] = []
            var named: [String: Any] = [:]
            for value in values.dropFirst() {
                if let object = value as? [String: Any] { named.merge(object) { $1 } } else { positional.append(value) }
            }
            let names = statement.parameterNames ?? Array(repeating: "", count: statement.parameters.count)
            var ours: [(Any, SQLValue)] = []
            var ourNamed: [String: SQLValue] = [:]
            for (name, parameter) in zip(names, statement.parameters) {
                if name.isEmpty { ours.append((NSNull(), parameter)) } else { ourNamed[name] = parameter }
            }
            XCTAssertEqual(positional.count, ours.count, label, file: file, line: line)
            XCTAssertEqual(Set(named.keys), Set(ourNamed.keys), label, file: file, line: line)
            let pairs = zip(positional, ours.map(\.1)).map { ($0, $1) } + ourNamed.compactMap { name, p in named[name].map { ($0, p) } }
            for (value, parameter) in pairs {
                switch parameter {
                case .null: XCTAssertTrue(value is NSNull, label, file: file, line: line)
                case .text(let s): XCTAssertEqual((value as? String).map { Array($0.utf8) }, Array(s.utf8), label, file: file, line: line)
                case .integer(let i): XCTAssertEqual((value as? NSNumber)?.doubleValue, Double(i), label, file: file, line: line)
                case .real(let d):
                    let theirs = (value as? NSNumber)?.doubleValue ?? .nan
                    XCTAssertLessThanOrEqual(abs(theirs - d), abs(d) * 1e-12, "\(label): \(theirs) vs \(d)", file: file, line: line)
                case .blob(let b):
                    // An array of byte values, or a string that is an SQLite BLOB literal.
                    if let array = value as? [NSNumber] {
                        XCTAssertEqual(array.map(\.intValue), b.map(Int.init), label, file: file, line: line)
                    } else {
                        XCTAssertEqual((value as? String).flatMap(RqliteRequestParser.blobLiteral), b, label, file: file, line: line)
                    }
                }
            }
        }
    }
}

/// Bit-for-bit equality: `==` on String is canonical equivalence, and on Double makes -0 == 0.
func assertExactly(_ actual: @autoclosure () throws -> [SQLValue], _ expected: [SQLValue], _ message: String = "", file: StaticString = #filePath, line: UInt = #line) {
    assertExactly(try [SQLStatement("", actual())], [SQLStatement("", expected)], message, file: file, line: line)
}

func assertExactly(_ actual: @autoclosure () throws -> [SQLStatement], _ expected: [SQLStatement], _ message: String = "", file: StaticString = #filePath, line: UInt = #line) {
    func key(_ statements: [SQLStatement]) -> [[String]] {
        statements.map { s in
            ["\(Array(s.sql.utf8))", "\(s.parameterNames ?? ["no names"])"] + s.parameters.map { p in
                switch p {
                case .text(let t): return "text \(Array(t.utf8))"
                case .real(let d): return "real \(d) \(d.bitPattern)"
                default: return "\(p)"
                }
            }
        }
    }
    do {
        let value = try actual()
        XCTAssertEqual(key(value), key(expected), message, file: file, line: line)
    } catch {
        XCTFail("\(message): threw \(error)", file: file, line: line)
    }
}

/// A small seeded generator, so that a failing seed replays.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Valid request bodies with the statements they must parse to.
enum BodyGenerator {
    static func body(_ r: inout SplitMix64) -> ([UInt8], [SQLStatement]) {
        var statements: [SQLStatement] = []
        var parts: [String] = []
        for _ in 0..<Int.random(in: 1...4, using: &r) {
            let (sqlJSON, sql) = string(&r)
            if Bool.random(using: &r) {
                statements.append(SQLStatement(sql))
                parts.append(sqlJSON)
                continue
            }
            var items = [sqlJSON], parameters: [SQLValue] = [], names: [String]?
            for _ in 0..<Int.random(in: 0...5, using: &r) {
                if Int.random(in: 0..<6, using: &r) == 0 {
                    // Named values, in an object (unique names: JSONSerialization keeps one).
                    if names == nil { names = Array(repeating: "", count: parameters.count) }
                    var members: [String] = []
                    for _ in 0..<Int.random(in: 0...3, using: &r) {
                        let name = "n\(names!.count)"
                        let (json, value) = parameter(&r)
                        members.append(#"""# + name + #"""# + whitespace(&r) + ":" + whitespace(&r) + json)
                        parameters.append(value)
                        names!.append(name)
                    }
                    items.append("{" + whitespace(&r) + members.joined(separator: "," + whitespace(&r)) + whitespace(&r) + "}")
                    continue
                }
                let (json, value) = parameter(&r)
                items.append(json)
                parameters.append(value)
                names?.append("")
            }
            statements.append(SQLStatement(sql, parameters, names: names))
            parts.append(array(items, &r))
        }
        return (Array((whitespace(&r) + array(parts, &r) + whitespace(&r)).utf8), statements)
    }

    static func array(_ items: [String], _ r: inout SplitMix64) -> String {
        "[" + items.map { whitespace(&r) + $0 + whitespace(&r) }.joined(separator: ",") + "]"
    }

    static func whitespace(_ r: inout SplitMix64) -> String {
        String((0..<Int.random(in: 0...2, using: &r)).map { _ in [" ", "\t", "\n", "\r"].randomElement(using: &r)! })
    }

    static func parameter(_ r: inout SplitMix64) -> (String, SQLValue) {
        switch Int.random(in: 0..<8, using: &r) {
        case 0: return ("null", .null)
        case 1: return Bool.random(using: &r) ? ("true", .integer(1)) : ("false", .integer(0))
        case 2:
            let i = [Int64.min, .max, 0, -1].randomElement(using: &r)! &+ Int64.random(in: -2...2, using: &r)
            return (String(i), .integer(i))
        case 3:
            let d = Double(bitPattern: r.next())
            return d.isFinite ? ("\(d)", .real(d)) : ("-0.0", .real(-0.0))
        case 4:
            let text = ["1.000", "1E3", "-0e0", "2.5e+2", "123456789012345678901234567890"].randomElement(using: &r)!
            return (text, .real(Double(text)!))
        case 5:
            let bytes = (0..<Int.random(in: 0...4, using: &r)).map { _ in UInt8.random(in: 0...255, using: &r) }
            if Bool.random(using: &r) { return ("[" + bytes.map { String($0) }.joined(separator: ",") + "]", .blob(bytes)) }
            return (#""x'"# + bytes.map { String(format: "%02x", $0) }.joined() + #"'""#, .blob(bytes))
        default:
            let (json, s) = string(&r)
            return (json, .text(s))
        }
    }

    /// A JSON string and its value, each scalar written raw or escaped at random.
    static func string(_ r: inout SplitMix64) -> (String, String) {
        let pool: [Unicode.Scalar] = ["a", "Z", " ", "?", "\"", "\\", "/", "\u{0}", "\u{8}", "\u{9}", "\u{A}", "\u{1F}", "\u{7F}",
                                      "é", "\u{301}", "€", "\u{FFFF}", "\u{E000}", "😀", "\u{10FFFF}"]
        var json = "\"", value = ""
        for _ in 0..<Int.random(in: 0...12, using: &r) {
            let scalar = pool.randomElement(using: &r)!
            value.unicodeScalars.append(scalar)
            let short: [Unicode.Scalar: String] = ["\"": #"\""#, "\\": #"\\"#, "/": #"\/"#, "\u{8}": #"\b"#, "\u{C}": #"\f"#,
                                                   "\u{A}": #"\n"#, "\u{D}": #"\r"#, "\u{9}": #"\t"#]
            let mustEscape = scalar.value < 0x20 || scalar == "\"" || scalar == "\\"
            switch Int.random(in: 0..<3, using: &r) {
            case 0 where !mustEscape: json.unicodeScalars.append(scalar)
            case 1 where short[scalar] != nil: json += short[scalar]!
            default:
                for unit in String(scalar).utf16 {
                    let hex = String(unit, radix: 16)
                    json += "\\u" + String(repeating: "0", count: 4 - hex.count) + (Bool.random(using: &r) ? hex : hex.uppercased())
                }
            }
        }
        return (json + "\"", value)
    }
}
