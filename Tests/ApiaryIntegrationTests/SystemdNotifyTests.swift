import ApiaryLifecycle
import ApiaryNode
import Foundation
import XCTest

/// A real node under a notify socket, as systemd runs it (`Type=notify`, `WatchdogSec=`):
/// READY=1 only once it serves, STATUS= with role and epoch, watchdog pings while healthy,
/// STOPPING=1 on SIGTERM.
final class SystemdNotifyTests: XCTestCase {
    func testANodeTellsSystemdItIsReadyAliveAndStopping() async throws {
        let directory = NSTemporaryDirectory() + "apiary-notify-" + UUID().uuidString
        let socket = try NotifySocketListener(path: NSTemporaryDirectory() + "apiary-sd-\(UUID().uuidString.prefix(8)).sock")
        let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                                   primaryArguments: ["--mode", "single"])
        defer {
            cluster.stopAll()
            try? FileManager.default.removeItem(atPath: directory)
        }
        var node = cluster.primary
        node.environment = ["NOTIFY_SOCKET": socket.path, "WATCHDOG_USEC": "400000"]
        try cluster.prepareCertificates()
        try cluster.start(node)

        let ready = socket.receive(until: { $0.contains("READY=1") })
        XCTAssertNotNil(ready, "no READY=1")
        XCTAssertTrue(ready?.contains("STATUS=primary of epoch 1") ?? false, ready ?? "")
        // By the time READY=1 is sent the API answers (start waits for the ready line too).
        let c = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        let served = try await c.request(.GET, "/readyz")
        XCTAssertEqual(served.status, 200)
        await c.close()

        for _ in 0..<3 { XCTAssertNotNil(socket.receive(until: { $0 == "WATCHDOG=1" }), "watchdog pings stopped") }

        cluster.kill(cluster.primary, signal: SIGTERM)
        XCTAssertNotNil(socket.receive(until: { $0.contains("STOPPING=1") }), "no STOPPING=1 on SIGTERM")
    }

    /// A hung event loop stops the watchdog's pings, so that systemd restarts the process (the
    /// unit's `WatchdogSec=`). A test seam blocks the replication loop for good after 3 pings.
    func testAHungEventLoopStopsTheWatchdogPings() async throws {
        let directory = NSTemporaryDirectory() + "apiary-hang-" + UUID().uuidString
        let socket = try NotifySocketListener(path: NSTemporaryDirectory() + "apiary-sd-\(UUID().uuidString.prefix(8)).sock")
        let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                                   primaryArguments: ["--mode", "single"])
        defer {
            cluster.stopAll()
            try? FileManager.default.removeItem(atPath: directory)
        }
        var node = cluster.primary
        node.environment = ["NOTIFY_SOCKET": socket.path, "WATCHDOG_USEC": "400000", "APIARY_TEST_HANG_REPLICATION_LOOP_AFTER_PINGS": "3"]
        try cluster.prepareCertificates()
        try cluster.start(node)
        for _ in 0..<3 { XCTAssertNotNil(socket.receive(until: { $0 == "WATCHDOG=1" }), "no watchdog pings before the hang") }
        XCTAssertTrue(cluster.waitForOutput(of: node, containing: "the replication event loop hangs now"), "the seam did not fire")
        // A ping whose check ran just before the hang may still come; then none for five
        // watchdog intervals (systemd would have restarted the process after one).
        socket.drain()
        var pings = 0
        let end = Date().addingTimeInterval(2.0)
        while Date() < end { if socket.receive(timeoutMs: 100) == "WATCHDOG=1" { pings += 1 } }
        XCTAssertLessThanOrEqual(pings, 1, "watchdog pings went on with a hung replication loop")
        XCTAssertTrue(cluster.isRunning(node), "the node itself does not exit: systemd restarts it")
    }
}
