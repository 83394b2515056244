import ApiaryCore
import Foundation
import XCTest
@testable import ApiaryStorage

/// Reads on the caller's thread (`TenantDatabase.queryInline`): an event loop answers a read by
/// key without handing it to a reader thread and back; what cannot be finished at once is left
/// to the reader threads, which give the same answers.
final class InlineReadTests: XCTestCase {
    func open(_ dir: TemporaryDirectory, _ options: TenantDatabase.Options = .init()) throws -> TenantDatabase {
        try TenantDatabase(tenant: try TenantID("acme"), path: dir.path + "/acme.db", sink: ReplicaSink(replicaPath: dir.path + "/replica.db"),
                           options: options)
    }

    /// What a client reads of a result: its columns and rows, or its error (not its timing).
    func seen(_ results: [StatementResult]) -> [String] {
        results.map { result in
            switch result {
            case .success(let o): return "\(o.columns) \(o.rows)"
            case .failure(let message): return "error: \(message)"
            }
        }
    }

    /// A budget no machine runs out of: these reads must be answered inline.
    var generous: TenantDatabase.Options {
        var options = TenantDatabase.Options()
        options.inlineReadBudgetMs = 600_000
        options.inlineReadPauseMs = 3_600_000
        return options
    }

    func testAReadIsAnsweredInlineAsTheReaderThreadsAnswerIt() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir, generous)
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        try await db.mustExecute("INSERT INTO t VALUES (1, 'one'), (2, 'two'), (3, NULL)")
        let reads = [SQLStatement("SELECT v FROM t WHERE id = ?", [.integer(2)]), SQLStatement("SELECT count(*), max(id) FROM t"),
                     SQLStatement("SELECT * FROM missing")]
        // No reader connection is open before the first query on the reader threads.
        XCTAssertNil(db.queryInline(reads))
        let pooled = try await db.query(reads)
        XCTAssertEqual(db.readers.idleCount, 1)
        let inline = try XCTUnwrap(db.queryInline(reads))
        XCTAssertEqual(seen(inline), seen(pooled))
        XCTAssertEqual(seen(inline).first, #"["v"] [[ApiaryStorage.SQLValue.text("two")]]"#)
        XCTAssertTrue(seen(inline).last?.contains("no such table") ?? false, "\(seen(inline))")
        let inOneSnapshot = try XCTUnwrap(db.queryInline(reads.dropLast(), transaction: true))
        XCTAssertEqual(seen(inOneSnapshot), Array(seen(pooled).dropLast()))
        XCTAssertEqual(db.readers.idleCount, 1, "the connection is given back")
        // A write is not a read: the reader's connection is read-only, inline too.
        let write = try XCTUnwrap(db.queryInline([SQLStatement("INSERT INTO t VALUES (4, 'four')")]))
        XCTAssertTrue(seen(write).first?.hasPrefix("error:") ?? false, "\(seen(write))")
        let count = try await db.rows("SELECT count(*) FROM t")
        XCTAssertEqual(count, [[.integer(3)]])
    }

    /// What could hold the loop in one step that no deadline check interrupts is not read
    /// inline: long SQL (preparing it), a value past 1 MiB (one function call makes it).
    func testWhatCouldHoldTheLoopIsLeftToTheReaderThreads() async throws {
        let dir = TemporaryDirectory()
        let db = try open(dir, generous)
        defer { db.close() }
        _ = try await db.query([SQLStatement("SELECT 1")])
        let longSQL = SQLStatement("SELECT '" + String(repeating: "x", count: 5_000) + "' IS NOT NULL")
        XCTAssertNil(db.queryInline([longSQL]))
        XCTAssertNotNil(db.queryInline([SQLStatement("SELECT 1")]), "long SQL alone does not pause the tenant's inline reads")
        let bigValue = SQLStatement("SELECT length(hex(zeroblob(1000000)))")
        XCTAssertNil(db.queryInline([bigValue]))
        XCTAssertNil(db.queryInline([SQLStatement("SELECT 1")]), "after a value past the bound the tenant's reads go to the threads")
        let pooled = try await db.query([bigValue])
        XCTAssertEqual(seen(pooled), [#"["length(hex(zeroblob(1000000)))"] [[ApiaryStorage.SQLValue.integer(2000000)]]"#])
    }

    func testAQueryPastTheBudgetIsLeftToTheReaderThreadsAndTheTenantsReadsPauseInlining() async throws {
        let dir = TemporaryDirectory()
        var options = TenantDatabase.Options()
        options.inlineReadPauseMs = 3_600_000 // longer than the test, however slow the machine
        let db = try open(dir, options)
        defer { db.close() }
        try await db.mustExecute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        _ = try await db.query([SQLStatement("SELECT 1")])
        // Never ends by itself: only the inline budget stops it.
        let endless = SQLStatement("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
        XCTAssertNil(db.queryInline([SQLStatement("SELECT 1"), endless]))
        XCTAssertEqual(db.readers.idleCount, 1, "the connection is given back")
        XCTAssertNil(db.queryInline([SQLStatement("SELECT 1")]), "inline reads pause for the tenant")
        let pooled = try await db.query([SQLStatement("SELECT count(*) FROM t")])
        XCTAssertEqual(seen(pooled), [#"["count(*)"] [[ApiaryStorage.SQLValue.integer(0)]]"#])
    }
}
