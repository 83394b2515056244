import ApiaryChaos
import ApiaryNode
import Foundation
import XCTest

/// `apiary up`, the README's run command, as a newcomer uses it: the endpoint it prints takes
/// the curl it prints, Ctrl-C stops everything. With `--zones` (root) each zone is a network
/// namespace, and `apiary drill zone-loss` then cuts the zone's network off instead of pausing
/// its processes.
final class UpTests: XCTestCase {
    /// A running `apiary up` and what it printed up to its banner's end.
    struct Up {
        let process: Process
        let pipe: Pipe
        let directory: String
        var output: String

        /// The banner's facts: the endpoint, the user and the password, the CA.
        func fact(_ pattern: String) throws -> String {
            let regex = try NSRegularExpression(pattern: pattern)
            guard let match = regex.firstMatch(in: output, range: NSRange(output.startIndex..., in: output)),
                  let range = Range(match.range(at: 1), in: output) else { throw NodeError("no \(pattern) in: \(output)") }
            return String(output[range])
        }

        /// What it prints next, up to `text`. The test waits on the line itself; the deadline
        /// only bounds a broken `up`, which is then killed, ending its output and the read.
        func read(until text: String, boundSeconds: Int = 180) -> String {
            let watchdog = DispatchWorkItem { [pid = process.processIdentifier] in kill(pid, SIGKILL) }
            DispatchQueue.global().asyncAfter(deadline: .now() + .seconds(boundSeconds), execute: watchdog)
            defer { watchdog.cancel() }
            return ChaosCleanupTests.read(pipe, until: text)
        }

        /// Ctrl-C, and its exit status once every process stopped.
        func interrupt() -> Int32 {
            kill(process.processIdentifier, SIGINT)
            let rest = pipe.fileHandleForReading
            DispatchQueue.global().async { _ = rest.readDataToEndOfFile() }
            process.waitUntilExit()
            return process.terminationStatus
        }
    }

    func startUp(_ extra: [String] = []) throws -> Up {
        let directory = NSTemporaryDirectory() + "apiary-up-" + UUID().uuidString
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try apiaryExecutable())
        process.arguments = ["up", "--dir", directory, "--base-port", String(freeBasePort())] + extra
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        var up = Up(process: process, pipe: pipe, directory: directory, output: "")
        up.output = up.read(until: "Press Ctrl-C to stop the cluster.")
        return up
    }

    /// The banner's curl commands, run as printed: a write and a read through the endpoint
    /// (the `expectingRows`-th write of the table).
    func writeAndReadThroughTheEndpoint(_ up: Up, expectingRows rows: Int = 1) throws {
        let endpoint = try up.fact(#"endpoint +https://([^ ]+)"#)
        let user = try up.fact(#"user (demo-[0-9]+) "#), password = try up.fact(#"password ([^ \n]+)"#)
        let ca = up.directory + "/certs/ca.pem"
        func curl(_ arguments: [String]) throws -> String {
            try runTool("/usr/bin/curl", ["-sS", "--max-time", "30", "--cacert", ca, "-u", "\(user):\(password)"] + arguments).output
        }
        let wrote = try curl(["-H", "Content-Type: application/json", "https://\(endpoint)/db/execute", "-d",
                              #"["CREATE TABLE IF NOT EXISTS hello (id INTEGER PRIMARY KEY, msg TEXT)", ["INSERT INTO hello(msg) VALUES(?)", "hello"]]"#])
        XCTAssertTrue(wrote.contains("\"last_insert_id\":\(rows)"), wrote)
        let read = try curl(["-G", "https://\(endpoint)/db/query", "--data-urlencode", "q=SELECT count(*), max(msg) FROM hello"])
        XCTAssertTrue(read.contains(#"[[\#(rows),"hello"]]"#), read)
    }

    func testUpOnLoopbackServesTheEndpointItPrintsAndStopsOnCtrlC() throws {
        let up = try startUp()
        defer { try? FileManager.default.removeItem(atPath: up.directory) }
        XCTAssertTrue(up.output.contains("endpoint        https://localhost:"), up.output)
        XCTAssertTrue(up.output.contains("the zone's processes are paused, then resumed"), up.output)
        try writeAndReadThroughTheEndpoint(up)

        // A newcomer kills the primary to see a failover: `up` starts it again, as systemd
        // would, and it rejoins; the drill's description names the new process.
        let before = try ClusterDescription.load(up.directory + "/cluster.json")
        let killed = try XCTUnwrap(before.members.first { $0.name == "node-a" }?.pid)
        kill(killed, SIGKILL)
        let more = up.read(until: "node-a is running again")
        XCTAssertTrue(more.contains("node-a exited by itself; starting it again"), more)
        XCTAssertTrue(more.contains("node-a is running again"), more)
        let after = try ClusterDescription.load(up.directory + "/cluster.json")
        let restarted = try XCTUnwrap(after.members.first { $0.name == "node-a" }?.pid)
        XCTAssertNotEqual(restarted, killed)
        XCTAssertEqual(kill(restarted, 0), 0, "node-a runs again")
        // Both nodes serve the same data once it has rejoined.
        let monitor = try up.fact(#"ctl status --monitor ([^ ]+) "#)
        let rejoined = #"node-a +[ab] +secondary +secondary +yes"#
        var status = "", asked = 0
        // Asked again until it says so; bounded by a count of asks, each a command's round trip.
        while status.range(of: rejoined, options: .regularExpression) == nil, asked < 1_000 {
            status = try runApiary(["ctl", "status", "--monitor", monitor, "--certs", up.directory + "/certs"]).output
            asked += 1
        }
        XCTAssertNotNil(status.range(of: rejoined, options: .regularExpression), "node-a rejoined as a promotable standby: \(status)")
        try writeAndReadThroughTheEndpoint(up, expectingRows: 2)
        XCTAssertEqual(up.interrupt(), 0)
        XCTAssertFalse(try ChaosCleanupTests.processes().contains { $0.contains(up.directory + "/") }, "no process of the cluster is left")
    }

    func testUpInZonesAndTheDrillCutsTheZonesNetworkWithoutPausingItsProcesses() throws {
        if let reason = ZoneNetwork.unavailableReason() { throw XCTSkip(reason) }
        let up = try startUp(["--zones"])
        defer { try? FileManager.default.removeItem(atPath: up.directory) }
        let namespaces = try ZoneNetworkTests.namespaces().filter { $0.hasPrefix("apiary-\(up.process.processIdentifier)-") }
        XCTAssertEqual(namespaces.count, 3, up.output)
        XCTAssertTrue(up.output.contains("the zone's network namespace is cut off, then connected again"), up.output)
        XCTAssertFalse(up.output.contains("endpoint        https://localhost:"), "in zones the endpoint is the gateway's own address: \(up.output)")
        try writeAndReadThroughTheEndpoint(up)

        let description = try ClusterDescription.load(up.directory + "/cluster.json")
        XCTAssertEqual(Set(description.members.compactMap(\.namespace)), Set(namespaces))
        let pids = description.members.compactMap(\.pid)
        let drill = try runApiary(["drill", "zone-loss", "--zone", "primary", "--cluster", up.directory + "/cluster.json",
                                   "--reports", up.directory + "/evidence", "--hold-ms", "500"])
        XCTAssertEqual(drill.status, 0, drill.output)
        XCTAssertTrue(drill.output.contains("zone a (node-a, gateway-1) cut"), drill.output)
        XCTAssertTrue(drill.output.contains("PASSED") && drill.output.contains("RPO 0 acknowledged writes missing"), drill.output)
        let evidence = try FileManager.default.contentsOfDirectory(atPath: up.directory + "/evidence").first { $0.hasSuffix(".md") }
        let markdown = try String(contentsOfFile: up.directory + "/evidence/" + XCTUnwrap(evidence), encoding: .utf8)
        XCTAssertTrue(markdown.contains("network namespace cut off (nftables"), markdown)
        XCTAssertTrue(markdown.contains("node-a → node-b"), "the cut zone's primary was replaced: \(markdown)")
        // No write is acknowledged between the cut and the promotion, which waits out the lost
        // primary's lease (and the standby's peer timeout, longer): an RTO below the lease says
        // writes the zone served before its cut was in place were counted (found by this drill:
        // RTOs of 3 ms, the nftables command's own time).
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: up.directory + "/evidence/"
            + XCTUnwrap(evidence).replacingOccurrences(of: ".md", with: ".json")))) as? [String: Any])
        let repetition = try XCTUnwrap((json["repetitions"] as? [[String: Any]])?.first)
        let rto = try XCTUnwrap(repetition["resumedAtMs"] as? Int) - XCTUnwrap(repetition["cutAtMs"] as? Int)
        XCTAssertGreaterThanOrEqual(rto, 500, "RTO \(rto) ms")
        // The same processes ran through it all: the cut was the network's, not a pause or a kill.
        XCTAssertEqual(pids.filter { kill($0, 0) == 0 }.count, pids.count)

        XCTAssertEqual(up.interrupt(), 0)
        XCTAssertEqual(try ZoneNetworkTests.namespaces().filter { $0.hasPrefix("apiary-\(up.process.processIdentifier)-") }, [])
        XCTAssertFalse(try ChaosCleanupTests.processes().contains { $0.contains(up.directory + "/") }, "no process of the cluster is left")
    }
}
