import Foundation
import XCTest
@testable import ApiaryLifecycle

/// The sd_notify protocol against a socket the test listens on, as systemd's would be.
final class ServiceManagerTests: XCTestCase {
    var socket: NotifySocketListener!

    override func setUp() async throws {
        socket = try NotifySocketListener(path: NSTemporaryDirectory() + "apiary-notify-\(UUID().uuidString.prefix(8)).sock")
        setenv("NOTIFY_SOCKET", socket.path, 1)
    }

    override func tearDown() {
        unsetenv("NOTIFY_SOCKET")
        unsetenv("WATCHDOG_USEC")
        socket = nil
    }

    func testReadyStatusStoppingAndPingsReachTheSocket() {
        ServiceManager.ready(status: "primary of epoch 3")
        XCTAssertEqual(socket.receive(), "READY=1\nSTATUS=primary of epoch 3")
        ServiceManager.status("demoted in epoch 3")
        XCTAssertEqual(socket.receive(), "STATUS=demoted in epoch 3")
        ServiceManager.watchdogPing()
        XCTAssertEqual(socket.receive(), "WATCHDOG=1")
        ServiceManager.stopping()
        XCTAssertEqual(socket.receive(), "STOPPING=1\nSTATUS=stopping")
    }

    func testTheWatchdogIntervalComesFromTheEnvironment() {
        XCTAssertNil(ServiceManager.watchdogIntervalMs())
        setenv("WATCHDOG_USEC", "4000000", 1)
        XCTAssertEqual(ServiceManager.watchdogIntervalMs(), 4_000)
    }

    /// Pings flow while the check passes and stop, round after round, once it fails (a hung
    /// loop is a check that never answers).
    func testTheWatchdogPingsOnlyWhileTheCheckPasses() async throws {
        final class Health: @unchecked Sendable {
            let lock = NSLock()
            var mode = 0 // 0 healthy, 1 unhealthy, 2 hung
            func value() -> Int { lock.withLock { mode } }
        }
        let health = Health()
        let watchdog = Watchdog(intervalMs: 40) {
            switch health.value() {
            case 0: return true
            case 1: return false
            default:
                try? await Task.sleep(for: .seconds(3_600)) // never answers in time
                return true
            }
        }
        watchdog.start()
        defer { watchdog.stop() }
        XCTAssertEqual(socket.receive(), "WATCHDOG=1")
        XCTAssertEqual(socket.receive(), "WATCHDOG=1")
        for mode in [1, 2] {
            health.lock.withLock { health.mode = mode }
            // Let any round that began while healthy finish, then count rounds, not time.
            let start = await waitForRounds(watchdog, after: watchdog.counts.rounds + 1)
            socket.drain()
            _ = await waitForRounds(watchdog, after: start.rounds + 3)
            XCTAssertEqual(watchdog.counts.pings, start.pings, "mode \(mode): pinged while unhealthy")
            XCTAssertNil(socket.receive(timeoutMs: 1), "mode \(mode): a ping reached the socket")
        }
    }

    private func waitForRounds(_ watchdog: Watchdog, after rounds: Int) async -> (rounds: Int, pings: Int) {
        let counts = watchdog.waitForRounds(rounds, until: Date().addingTimeInterval(30))
        XCTAssertGreaterThanOrEqual(counts.rounds, rounds, "the watchdog stopped running rounds")
        return counts
    }
}

