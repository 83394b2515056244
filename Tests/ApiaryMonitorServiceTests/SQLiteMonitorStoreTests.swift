import ApiaryCore
import ApiaryMonitor
@testable import ApiaryMonitorService
import Foundation
import CSQLite
import XCTest

final class SQLiteMonitorStoreTests: XCTestCase {
    private func temporaryPath() -> String {
        let dir = NSTemporaryDirectory() + "apiary-monitor-store-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        return dir + "/monitor.db"
    }

    private func bootstrap() throws -> MonitorState {
        try MonitorState.bootstrap(formation: "f1", primary: FormationNode(id: "node-a", zone: "a"),
                                   standby: FormationNode(id: "node-b", zone: "b"), epoch: Epoch(1))
    }

    func testStateSurvivesReopen() throws {
        let path = temporaryPath()
        var expected = try bootstrap()
        let stamp = Date(timeIntervalSince1970: 1_800_000_000.123)
        do {
            let store = try SQLiteMonitorStore(path: path, wallClock: { stamp })
            XCTAssertNil(try store.load())
            try store.create(expected)
            // A promotion-shaped change: the epoch, both nodes and two events in one transaction.
            var a = expected.nodes[0], b = expected.nodes[1]
            a.goal = .demoted; a.goalSequence = 3; a.reported = .waitPrimary
            a.lsns = [try TenantID("t1"): 42, try TenantID("t2"): 7]
            b.goal = .waitPrimary; b.goalSequence = 4
            let change = StateChange(epoch: Epoch(2), nodes: [a, b], events: [
                MonitorEvent(sequence: 2, epoch: Epoch(2), kind: .decision, node: "node-b", text: "promoted"),
                MonitorEvent(sequence: 3, epoch: Epoch(2), kind: .observation, node: nil, text: "two\nlines, 'quotes'"),
            ])
            try store.save(change)
            expected.apply(change)
            XCTAssertThrowsError(try store.create(expected)) // a formation exists already
        }
        // "Restarted": a new store object on the same file.
        let reopened = try SQLiteMonitorStore(path: path)
        XCTAssertEqual(try reopened.load(), expected)
        let history = try reopened.events(after: 1)
        XCTAssertEqual(history.map(\.event.sequence), [2, 3])
        XCTAssertEqual(history[0].at.timeIntervalSince1970, stamp.timeIntervalSince1970, accuracy: 0.001)
        XCTAssertEqual(try reopened.events(after: 0, newest: 1).map(\.event.sequence), [3])
    }

    func testHistoryBeyondTheStateIsKept() throws {
        let path = temporaryPath()
        var state = try bootstrap()
        let store = try SQLiteMonitorStore(path: path)
        try store.create(state)
        for i in 0..<(MonitorState.recentEventsMax + 5) {
            let change = StateChange(events: [MonitorEvent(sequence: state.lastEventSequence + 1, epoch: state.epoch, kind: .observation, node: nil, text: "e\(i)")])
            try store.save(change)
            state.apply(change)
        }
        XCTAssertEqual(try SQLiteMonitorStore(path: path).load(), state)
        XCTAssertEqual(try store.events(after: 0).count, MonitorState.recentEventsMax + 6)
    }

    func testDamagedFileIsRefused() throws {
        let path = temporaryPath()
        do {
            let store = try SQLiteMonitorStore(path: path)
            try store.create(try bootstrap())
        }
        // Overwrite the header and the first pages with garbage.
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: path))
        try handle.write(contentsOf: Data(repeating: 0xA5, count: 8192))
        try handle.close()
        try? FileManager.default.removeItem(atPath: path + "-wal")
        XCTAssertThrowsError(try SQLiteMonitorStore(path: path)) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains(path) && text.contains("cannot be used"), text)
        }
    }

    func testAnotherSQLiteFileIsRefused() throws {
        let path = temporaryPath()
        var db: OpaquePointer?
        _ = sqlite3_open(path, &db)
        _ = sqlite3_exec(db, "CREATE TABLE t (x)", nil, nil, nil)
        sqlite3_close(db)
        XCTAssertThrowsError(try SQLiteMonitorStore(path: path)) { error in
            XCTAssertTrue("\(error)".contains("not a monitor store"), "\(error)")
        }
    }

    func testInvalidStateIsRefused() throws {
        let path = temporaryPath()
        do {
            let store = try SQLiteMonitorStore(path: path)
            try store.create(try bootstrap())
            var b = try bootstrap().nodes[1]
            b.goal = .primary // two writers
            try store.save(StateChange(nodes: [b]))
        }
        XCTAssertThrowsError(try SQLiteMonitorStore(path: path).load()) { error in
            XCTAssertTrue("\(error)".contains("invalid state"), "\(error)")
        }
    }
}
