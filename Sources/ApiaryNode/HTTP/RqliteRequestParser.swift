import ApiaryStorage

/// Parses an rqlite request body into statements, by hand.
///
/// Hand-written rather than `JSONDecoder` because this runs once per request on the insert
/// path, where profiling showed `JSONDecoder` (and the type-mismatch errors thrown and dropped
/// by trying Bool, then Int64, then Double, then String on each parameter) costing several
/// microseconds per request. Measured on a one-insert, four-parameter body (release build,
/// x86-64 Linux): 6-8 µs with `JSONDecoder`, 0.7-0.8 µs with this parser. It makes one pass,
/// allocates only the statements and their strings, and throws only to reject the request.
///
/// Grammar accepted: strict JSON (RFC 8259) restricted to this shape, UTF-8, an optional
/// leading UTF-8 byte-order mark, whitespace wherever JSON allows it:
///
///     body      = '[' statement (',' statement)* ']'      ; "[]" parses, then fails as empty
///     statement = string | '[' string (',' argument)* ']'
///     argument  = value | '{' (string ':' value (',' string ':' value)*)? '}'   ; named values
///     value     = 'null' | 'true' | 'false' | number | string | bytes
///     bytes     = '[' (integer (',' integer)*)? ']'        ; each 0...255: a BLOB
///
/// No trailing commas, no comments, no NaN or Infinity. Values map to SQLite values as rqlite
/// maps them (its `http/request_parser.go`): null → NULL; true/false → 1/0; a number with
/// neither fraction nor exponent that fits in Int64 → INTEGER; any other number → REAL, and
/// one beyond Double's range is an error (rqlite tries Go's ParseInt on the number's text,
/// then ParseFloat, so `1.0` and `1e3` are REAL); a string → TEXT, except one that is an
/// SQLite BLOB literal (`x'53514C'`, blanks around it allowed) → that BLOB; an array of
/// byte values → BLOB. An object's members are named values, bound to `:name`, `@name` or
/// `$name`; a statement may mix them with positional ones.
/// Nesting is at most three levels deep (body, statement, object or bytes), so the parser
/// needs no recursion; every loop advances `index`, so work is bounded by the body size,
/// which the HTTP layer caps.
struct RqliteRequestParser {
    /// Array subscripts, not unsafe pointers, on purpose: this reads untrusted network input,
    /// and a bounds check is cheap next to a read past the end.
    private let bytes: [UInt8]
    private var index = 0

    /// - Throws: `RqliteRequestError`; every malformed body throws, none traps.
    static func statements(fromBody body: [UInt8], statementsMax: Int) throws -> [SQLStatement] {
        var parser = RqliteRequestParser(bytes: body)
        return try parser.body(statementsMax: statementsMax)
    }

    // MARK: Structure

    private mutating func body(statementsMax: Int) throws -> [SQLStatement] {
        // RFC 8259 lets a parser ignore a UTF-8 byte-order mark; JSONDecoder did, so clients may send one.
        if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { index = 3 }
        skipWhitespace()
        try expect(UInt8(ascii: "["))
        var statements: [SQLStatement] = []
        // Counts on past statementsMax so that the error says how many there were, but keeps
        // none of the extra; the HTTP layer's body-size cap bounds that work.
        var count = 0
        skipWhitespace()
        if peek() == UInt8(ascii: "]") {
            index += 1
        } else {
            repeat {
                skipWhitespace()
                let statement = try self.statement()
                count += 1
                if count <= statementsMax { statements.append(statement) }
                skipWhitespace()
            } while consume(UInt8(ascii: ","))
            try expect(UInt8(ascii: "]"))
        }
        skipWhitespace()
        guard index == bytes.count else { throw malformed() }
        guard count > 0 else { throw RqliteRequestError("request has no statements") }
        guard count <= statementsMax else { throw RqliteRequestError("request has \(count) statements (max \(statementsMax))") }
        return statements
    }

    private mutating func statement() throws -> SQLStatement {
        if peek() == UInt8(ascii: "\"") { return SQLStatement(try string()) }
        try expect(UInt8(ascii: "["))
        skipWhitespace()
        guard peek() == UInt8(ascii: "\"") else { throw malformed() }
        let sql = try string()
        var parameters: [SQLValue] = []
        // Only made when a value is named: the insert path's statements have none.
        var names: [String]?
        skipWhitespace()
        while consume(UInt8(ascii: ",")) {
            skipWhitespace()
            if consume(UInt8(ascii: "{")) {
                if names == nil { names = Array(repeating: "", count: parameters.count) }
                skipWhitespace()
                if !consume(UInt8(ascii: "}")) {
                    repeat {
                        skipWhitespace()
                        guard peek() == UInt8(ascii: "\"") else { throw malformed() }
                        let name = try string()
                        guard !name.isEmpty else { throw RqliteRequestError("a named value of '\(sql.prefix(40))' has an empty name") }
                        skipWhitespace()
                        try expect(UInt8(ascii: ":"))
                        skipWhitespace()
                        parameters.append(try value(name: name, sql: sql))
                        names!.append(name)
                        skipWhitespace()
                    } while consume(UInt8(ascii: ","))
                    try expect(UInt8(ascii: "}"))
                }
            } else {
                parameters.append(try value(name: String(parameters.count + 1), sql: sql))
                names?.append("")
            }
            skipWhitespace()
        }
        try expect(UInt8(ascii: "]"))
        return SQLStatement(sql, parameters, names: names)
    }

    /// One value at `index`; `name` (a position or the client's name) is for error messages.
    private mutating func value(name: @autoclosure () -> String, sql: String) throws -> SQLValue {
        switch peek() {
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "t"): try literal("true"); return .integer(1)
        case UInt8(ascii: "f"): try literal("false"); return .integer(0)
        case UInt8(ascii: "\""):
            let text = try string()
            return Self.blobLiteral(text).map(SQLValue.blob) ?? .text(text)
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            guard let value = try number() else {
                throw RqliteRequestError("parameter \(name()) of '\(sql.prefix(40))': number is out of range for a 64-bit float")
            }
            return value
        case UInt8(ascii: "["):
            index += 1
            return .blob(try bytes(name: name(), sql: sql))
        case UInt8(ascii: "{"):
            throw RqliteRequestError("parameter \(name()) of '\(sql.prefix(40))': nested objects are not supported (an object's members are named values)")
        default: throw malformed()
        }
    }

    /// The rest of a byte array (just after its '['): integers 0...255, as rqlite takes a BLOB.
    private mutating func bytes(name: String, sql: String) throws -> [UInt8] {
        var blob: [UInt8] = []
        skipWhitespace()
        if consume(UInt8(ascii: "]")) { return blob }
        repeat {
            skipWhitespace()
            let start = index
            var byte = 0
            while isDigit(peek()), byte <= 255 {
                byte = byte * 10 + Int(bytes[index] - UInt8(ascii: "0"))
                index += 1
            }
            let digits = index - start
            // JSON allows no leading zero; rqlite takes only integers (Go's ParseInt) of 0...255.
            guard digits > 0, byte <= 255, digits == 1 || bytes[start] != UInt8(ascii: "0"), !isDigit(peek()),
                  peek() != UInt8(ascii: "."), peek() != UInt8(ascii: "e"), peek() != UInt8(ascii: "E") else {
                throw RqliteRequestError("parameter \(name) of '\(sql.prefix(40))': an array is a BLOB of byte values, each an integer 0...255")
            }
            blob.append(UInt8(byte))
            skipWhitespace()
        } while consume(UInt8(ascii: ","))
        try expect(UInt8(ascii: "]"))
        return blob
    }

    /// The bytes of an SQLite BLOB literal (`X'53514C'`, blanks around it allowed), or nil when
    /// `text` is not one, as rqlite's `db.ParseHex` decides. Cheap for other text: it looks at
    /// the first non-blank byte only.
    static func blobLiteral(_ text: String) -> [UInt8]? {
        var utf8 = text.utf8[...]
        while let first = utf8.first, isBlank(first) { utf8 = utf8.dropFirst() }
        guard let first = utf8.first, first == UInt8(ascii: "x") || first == UInt8(ascii: "X") else { return nil }
        while let last = utf8.last, isBlank(last) { utf8 = utf8.dropLast() }
        let hex = utf8.dropFirst()
        guard hex.count >= 2, hex.first == UInt8(ascii: "'"), hex.last == UInt8(ascii: "'") else { return nil }
        let digits = hex.dropFirst().dropLast()
        guard digits.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        var high: UInt8?
        for c in digits {
            let nibble: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): nibble = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): nibble = c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): nibble = c - UInt8(ascii: "A") + 10
            default: return nil
            }
            if let h = high { bytes.append(h << 4 | nibble); high = nil } else { high = nibble }
        }
        return bytes
    }

    /// Go's `strings.TrimSpace` blanks that can appear in UTF-8 as one byte.
    private static func isBlank(_ byte: UInt8) -> Bool {
        byte == 0x20 || (0x09...0x0D).contains(byte)
    }

    // MARK: Tokens

    /// A string at `index` (on its opening quote). Escape-free strings, the common case, are
    /// validated and copied straight from the body.
    private mutating func string() throws -> String {
        index += 1
        let start = index
        while index < bytes.count {
            switch bytes[index] {
            case UInt8(ascii: "\""):
                index += 1
                return try utf8(bytes[start..<index - 1], at: start)
            case UInt8(ascii: "\\"): return try escapedString(from: start)
            case 0..<0x20: throw malformed()
            default: index += 1
            }
        }
        throw malformed()
    }

    /// The rest of a string from its first backslash; `start` is just after the opening quote.
    private mutating func escapedString(from start: Int) throws -> String {
        var utf8Bytes = Array(bytes[start..<index])
        while index < bytes.count {
            let byte = bytes[index]
            index += 1
            switch byte {
            case UInt8(ascii: "\""): return try utf8(utf8Bytes[...], at: start)
            case 0..<0x20: index -= 1; throw malformed()
            case UInt8(ascii: "\\"):
                switch peek() {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): utf8Bytes.append(bytes[index])
                case UInt8(ascii: "b"): utf8Bytes.append(0x08)
                case UInt8(ascii: "f"): utf8Bytes.append(0x0C)
                case UInt8(ascii: "n"): utf8Bytes.append(0x0A)
                case UInt8(ascii: "r"): utf8Bytes.append(0x0D)
                case UInt8(ascii: "t"): utf8Bytes.append(0x09)
                case UInt8(ascii: "u"):
                    index += 1
                    let scalar = try unicodeEscape()
                    UTF8.encode(scalar) { utf8Bytes.append($0) }
                    continue
                default: throw malformed()
                }
                index += 1
            default: utf8Bytes.append(byte)
            }
        }
        throw malformed()
    }

    /// The scalar of `XXXX` (just after `\u`), or of `XXXX\uYYYY` when that is a surrogate pair.
    private mutating func unicodeEscape() throws -> Unicode.Scalar {
        let first = try hex4()
        var value = first
        if (0xD800...0xDBFF).contains(first) {
            guard consume(UInt8(ascii: "\\")), consume(UInt8(ascii: "u")) else { throw malformed() }
            let second = try hex4()
            guard (0xDC00...0xDFFF).contains(second) else { throw malformed() }
            value = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
        }
        // nil exactly for a lone low surrogate: the only values left that are not scalars.
        guard let scalar = Unicode.Scalar(value) else { throw malformed() }
        return scalar
    }

    private mutating func hex4() throws -> UInt32 {
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = peek(), digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw malformed()
            }
            value = value << 4 | UInt32(digit)
            index += 1
        }
        return value
    }

    /// A number at `index`, or nil if it is well-formed but too large for a Double (`1e400`).
    private mutating func number() throws -> SQLValue? {
        let start = index
        let negative = consume(UInt8(ascii: "-"))
        guard isDigit(peek()) else { throw malformed() }
        // Magnitude as UInt64, so Int64.min's (one more than Int64.max) fits before negation.
        var magnitude: UInt64 = 0
        var overflowed = false
        if !consume(UInt8(ascii: "0")) {
            while isDigit(peek()) {
                let (times10, o1) = magnitude.multipliedReportingOverflow(by: 10)
                let (sum, o2) = times10.addingReportingOverflow(UInt64(bytes[index] - UInt8(ascii: "0")))
                magnitude = sum
                overflowed = overflowed || o1 || o2
                index += 1
            }
        }
        var isInteger = true
        if consume(UInt8(ascii: ".")) {
            isInteger = false
            try digits()
        }
        if consume(UInt8(ascii: "e")) || consume(UInt8(ascii: "E")) {
            isInteger = false
            _ = consume(UInt8(ascii: "+")) || consume(UInt8(ascii: "-"))
            try digits()
        }
        // Checked here, not left to the caller, so that `1e999x` is malformed, not out of range.
        switch peek() {
        case UInt8(ascii: ","), UInt8(ascii: "]"), UInt8(ascii: "}"), UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): break
        default: throw malformed()
        }
        if isInteger && !overflowed {
            if !negative && magnitude <= UInt64(Int64.max) { return .integer(Int64(magnitude)) }
            if negative && magnitude <= UInt64(Int64.max) + 1 { return .integer(Int64(bitPattern: 0 &- magnitude)) }
        }
        // The lexeme matched JSON's number grammar above, a subset of what Double(_:) reads.
        guard let real = Double(String(decoding: bytes[start..<index], as: UTF8.self)), real.isFinite else { return nil }
        return .real(real)
    }

    /// One or more decimal digits.
    private mutating func digits() throws {
        guard isDigit(peek()) else { throw malformed() }
        while isDigit(peek()) { index += 1 }
    }

    private mutating func literal(_ word: StaticString) throws {
        let count = word.utf8CodeUnitCount
        guard index + count <= bytes.count,
              word.withUTF8Buffer({ bytes[index..<index + count].elementsEqual($0) })
        else { throw malformed() }
        index += count
    }

    // MARK: Bytes

    /// The byte at `index`, or 0 past the end: NUL is never valid where a token is expected.
    private func peek() -> UInt8 { index < bytes.count ? bytes[index] : 0 }

    private func isDigit(_ byte: UInt8) -> Bool { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) }

    private mutating func consume(_ byte: UInt8) -> Bool {
        guard index < bytes.count, bytes[index] == byte else { return false }
        index += 1
        return true
    }

    private mutating func expect(_ byte: UInt8) throws {
        guard consume(byte) else { throw malformed() }
    }

    /// JSON's four whitespace bytes only.
    private mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): index += 1
            default: return
            }
        }
    }

    private func utf8(_ slice: ArraySlice<UInt8>, at offset: Int) throws -> String {
        guard let string = String(validating: slice, as: UTF8.self) else { throw malformed(at: offset) }
        return string
    }

    private func malformed(at offset: Int? = nil) -> RqliteRequestError {
        RqliteRequestError("request body must be a JSON array of statements: an SQL string or [sql, parameters...] each (at byte offset \(offset ?? index))")
    }
}
