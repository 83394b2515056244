import ApiaryCore
import ApiaryNode
import ApiaryReplication
import Foundation
import XCTest

/// A node's role and epoch belong to the cluster (its durable state), not to a flag or a peer
/// (issue: a promoted node restarted with its old flags came back as a standby; a standby took
/// whatever epoch its primary announced; a primary that saw a newer epoch went on serving).
final class RoleAndEpochTests: NodeProcessTestCase {

    override func setUp() async throws {
        directory = NSTemporaryDirectory() + "apiary-roles-" + UUID().uuidString
        cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(),
                               primaryArguments: ["--standby-wait-ms", "1000"])
        try cluster.prepareCertificates()
    }

    func stateFile(_ spec: LocalCluster.NodeSpec) -> String { directory + "/\(spec.name)/node-state" }

    func writeState(_ state: NodeState, for spec: LocalCluster.NodeSpec) throws {
        try FileManager.default.createDirectory(atPath: directory + "/\(spec.name)", withIntermediateDirectories: true)
        try state.text.write(toFile: stateFile(spec), atomically: true, encoding: .utf8)
    }

    func write(_ spec: LocalCluster.NodeSpec, _ sql: String) async throws -> HTTPSConnection.Response {
        let c = try await APIClient(port: spec.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        defer { Task { await c.close() } }
        let body = try JSONSerialization.data(withJSONObject: [sql])
        return try await c.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", "acme")], body: Array(body))
    }

    func testAPromotedNodeRestartedWithItsOldFlagsIsStillPrimaryOfItsEpoch() async throws {
        try cluster.startBoth()
        try await cluster.createTenant("acme")
        let created = try await write(cluster.primary, "CREATE TABLE t (x)")
        XCTAssertEqual(created.status, 200, created.text)
        cluster.kill(cluster.primary)
        let promoted = try cluster.promoteWithCtl(cluster.standby)
        XCTAssertEqual(promoted.status, 0, promoted.output)

        cluster.kill(cluster.standby) // kill -9: no chance to tidy up
        try cluster.start(cluster.standby) // still `--role standby --primary …` on its command line
        let state = try DurableNodeState(text: String(contentsOfFile: stateFile(cluster.standby), encoding: .utf8))
        XCTAssertEqual(state, .full(NodeState(role: .primary, epoch: Epoch(2), mode: .single)))
        let response = try await write(cluster.standby, "INSERT INTO t VALUES (1)")
        XCTAssertEqual(response.status, 200, "the promoted node must serve writes after a restart: \(response.text)")
    }

    func testAPrimaryThatSeesANewerEpochStepsDownAndStaysDemoted() async throws {
        try cluster.start(cluster.primary)
        // A standby that the monitor (simulated here by its state file) already moved to epoch 5.
        try writeState(NodeState(role: .standby, epoch: Epoch(5), mode: .sync), for: cluster.standby)
        try cluster.start(cluster.standby)

        // The primary meets epoch 5 in the standby's hello: from then on it commits nothing.
        var last: HTTPSConnection.Response?
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            last = try await write(cluster.primary, "CREATE TABLE IF NOT EXISTS t (x)")
            if last?.text.contains("demoted") == true { break }
        }
        XCTAssertEqual(last?.status, 503, last?.text ?? "")
        XCTAssertTrue(last?.text.contains("demoted") ?? false, last?.text ?? "")
        let demoted = try DurableNodeState(text: String(contentsOfFile: stateFile(cluster.primary), encoding: .utf8))
        XCTAssertEqual(demoted, .full(NodeState(role: .demoted, epoch: Epoch(1), mode: .sync)), "demoted in its own epoch, durably")

        // Strong reads stop too, and a restart (with --role primary) does not undo it.
        let c = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        let read = try await c.request(.GET, "/db/query?q=SELECT+1&level=strong", headers: [("X-Apiary-Tenant", "acme")])
        XCTAssertEqual(read.status, 503, read.text)
        await c.close()
        cluster.kill(cluster.primary)
        try cluster.start(cluster.primary)
        let again = try await write(cluster.primary, "CREATE TABLE IF NOT EXISTS t (x)")
        XCTAssertEqual(again.status, 503, again.text)
        XCTAssertTrue(again.text.contains("demoted"), again.text)
    }

    func testAStandbyDoesNotAdoptTheEpochItsPrimaryClaims() async throws {
        // The primary claims epoch 3; nothing the cluster decided says so.
        try writeState(NodeState(role: .primary, epoch: Epoch(3), mode: .sync), for: cluster.primary)
        try cluster.start(cluster.primary)
        try cluster.start(cluster.standby)
        let refused = cluster.waitForOutput(of: cluster.standby, containing: "the primary claims epoch 3")
        XCTAssertTrue(refused, "the standby never met the primary's claim")
        let state = try DurableNodeState(text: String(contentsOfFile: stateFile(cluster.standby), encoding: .utf8))
        XCTAssertEqual(state, .full(NodeState(role: .standby, epoch: Epoch(1), mode: .sync)), "the standby moved its epoch on a peer's word")
        // So the primary has no standby, and in sync mode commits nothing: not even a tenant's
        // first commit.
        let response = try await AccountsClient(certificatesDirectory: cluster.certificates, host: "127.0.0.1", port: cluster.primary.apiPort)
            .request(.POST, "/admin/tenants", json: ["name": "acme"])
        XCTAssertEqual(response.status, 503, response.text)
        // Found in review: promoting this standby would make it primary of epoch 2 — or of an
        // epoch its primary already holds. It is refused, and the standby goes on as it was.
        let promoted = try cluster.promoteWithCtl(cluster.standby)
        XCTAssertNotEqual(promoted.status, 0, promoted.output)
        XCTAssertTrue(promoted.output.contains("second primary"), promoted.output)
        let after = try DurableNodeState(text: String(contentsOfFile: stateFile(cluster.standby), encoding: .utf8))
        XCTAssertEqual(after, .full(NodeState(role: .standby, epoch: Epoch(1), mode: .sync)))
        XCTAssertTrue(cluster.isRunning(cluster.standby))
    }
}
