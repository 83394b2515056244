import ApiaryNode
import ApiaryTLS
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import XCTest

/// The `apiary` binary next to the test bundle (`swift build --build-tests` builds both).
func apiaryExecutable() throws -> String {
    let testBinary = URL(fileURLWithPath: "/proc/self/exe".resolvingSymlink)
    let candidate = testBinary.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("apiary").path
    let sibling = testBinary.deletingLastPathComponent().appendingPathComponent("apiary").path
    for path in [sibling, candidate] where FileManager.default.isExecutableFile(atPath: path) { return path }
    throw XCTSkip("the apiary executable was not built next to the tests (run swift build --build-tests first)")
}

extension String {
    var resolvingSymlink: String { (try? FileManager.default.destinationOfSymbolicLink(atPath: self)) ?? self }
}

/// Ports for one test's cluster, spread so that runs rarely collide.
func freeBasePort() -> Int {
    for _ in 0..<50 {
        let base = 20_000 + Int.random(in: 0..<4_000) * 10
        if (0..<33).allSatisfy({ portIsFree(base + $0) }) { return base }
    }
    return 20_000 + Int.random(in: 0..<4_000) * 10
}

func portIsFree(_ port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0
}

/// HTTPS connections to a node's API with the cluster CA trusted, as the cluster operator (its
/// certificate: it may name any tenant by header, and its writes create tenants) or, with
/// `asOperator: false`, as an application with no certificate (which needs credentials).
struct APIClient {
    var host = "127.0.0.1"
    let port: Int
    let caPath: String
    var asOperator = true

    func connect() async throws -> HTTPSConnection {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(caPath)
        if asOperator {
            let operatorCredentials = try ClusterCredentials(directory: (caPath as NSString).deletingLastPathComponent, name: "operator")
            tls.certificateChain = operatorCredentials.certificateChain.map { .certificate($0) }
            tls.privateKey = .privateKey(operatorCredentials.privateKey)
        }
        return try await HTTPSConnection.connect(host: host, port: port, tls: tls, group: MultiThreadedEventLoopGroup.singleton)
    }
}

/// What a raw TLS client sees from a replication port.
struct RawTLSOutcome {
    var handshakeCompleted: Bool
    var bytes: [UInt8]
    /// The server hung up before the client's wait ran out.
    var closedByServer: Bool
}

final class RawCollector: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    var handshakeCompleted = false
    var bytes: [UInt8] = []
    let closed: EventLoopPromise<Void>
    init(closed: EventLoopPromise<Void>) { self.closed = closed }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event { handshakeCompleted = true }
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        bytes += buffer.readBytes(length: buffer.readableBytes) ?? []
    }
    func channelInactive(context: ChannelHandlerContext) { closed.succeed(()) }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

/// Connects to a replication port with `credentials` and waits (bounded) until the server closes.
func rawReplicationConnection(port: Int, credentials: ClusterCredentials, waitSeconds: Int64 = 5) async throws -> RawTLSOutcome {
    let group = MultiThreadedEventLoopGroup.singleton
    let context = try NIOSSLContext(configuration: credentials.clusterClient())
    let loop = group.next()
    let closed = loop.makePromise(of: Void.self)
    let collector = RawCollector(closed: closed)
    let channel = try await ClientBootstrap(group: loop)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: nil))
                try channel.pipeline.syncOperations.addHandler(collector)
            }
        }
        .connect(host: "127.0.0.1", port: port).get()
    let timedOut = loop.makePromise(of: Bool.self)
    let timeout = loop.scheduleTask(in: .seconds(waitSeconds)) {
        timedOut.succeed(true)
        channel.close(promise: nil)
    }
    try? await closed.futureResult.get()
    timeout.cancel()
    timedOut.succeed(false) // no effect if the timeout already fired
    let byServer = !(try await timedOut.futureResult.get())
    return try await loop.submit { RawTLSOutcome(handshakeCompleted: collector.handshakeCompleted, bytes: collector.bytes, closedByServer: byServer) }.get()
}

extension XCTestCase {
    /// A primary alone (`--mode single`) in a fresh directory; stopped and removed at teardown.
    func startSinglePrimary(_ label: String) throws -> (cluster: LocalCluster, directory: String, api: APIClient) {
        let directory = NSTemporaryDirectory() + "apiary-\(label)-" + UUID().uuidString
        let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort(), primaryArguments: ["--mode", "single"])
        addTeardownBlock {
            cluster.stopAll()
            try? FileManager.default.removeItem(atPath: directory)
        }
        try cluster.prepareCertificates()
        try cluster.start(cluster.primary)
        return (cluster, directory, APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem"))
    }
}

/// Creates `tenant` through `connection` (an operator's): a write never creates one. One that
/// exists already is fine.
func createTenant(_ tenant: String, on connection: HTTPSConnection, file: StaticString = #filePath, line: UInt = #line) async throws {
    let r = try await connection.request(.POST, "/admin/tenants", headers: [("Content-Type", "application/json")],
                                         body: Array("{\"name\": \"\(tenant)\"}".utf8))
    XCTAssertTrue(r.status == 201 || r.status == 409, "creating tenant \(tenant): \(r.status) \(r.text)", file: file, line: line)
}

/// Sends each statement as a request of its own to `tenant`; every one must succeed.
func executeEach(_ statements: [String], tenant: String, on connection: HTTPSConnection,
                 file: StaticString = #filePath, line: UInt = #line) async throws {
    for sql in statements {
        let r = try await connection.request(.POST, "/db/execute", headers: [("X-Apiary-Tenant", tenant)], body: Array("[\"\(sql)\"]".utf8))
        XCTAssertEqual(r.status, 200, r.text, file: file, line: line)
    }
}

extension LocalCluster {
    /// Creates `tenant` as the operator on `spec` (the bootstrap primary by default): a write
    /// never creates one.
    func createTenant(_ tenant: String, on spec: NodeSpec? = nil) async throws {
        let node = spec ?? primary
        try await AccountsClient(certificatesDirectory: certificates, host: node.host, port: node.apiPort).createTenant(tenant)
    }

    /// `apiary ctl promote` on `spec`, as an operator's failover drill runs it: its exit status
    /// and what it printed.
    func promoteWithCtl(_ spec: NodeSpec) throws -> (status: Int32, output: String) {
        try runApiary(["ctl", "promote", "--node", "127.0.0.1:\(spec.apiPort)", "--certs", certificates])
    }
}

/// Tests with real node processes: a working directory and a cluster per test. At teardown the
/// nodes stop, a failed test prints each node's last log lines, and the directory goes (kept,
/// with `APIARY_KEEP_FAILED`, when the test failed). Subclasses set both in `setUp` or the test.
class NodeProcessTestCase: XCTestCase {
    var directory: String!
    var cluster: LocalCluster!

    override func tearDown() async throws {
        cluster?.stopAll()
        // totalFailureCount also counts thrown errors, which failureCount misses on Linux.
        let failed = (testRun?.totalFailureCount ?? 0) > 0
        if failed, let directory {
            for name in ["node-a", "node-b", "monitor"] where FileManager.default.fileExists(atPath: directory + "/logs/\(name).log") {
                let log = (try? String(contentsOfFile: directory + "/logs/\(name).log", encoding: .utf8)) ?? ""
                print("---- \(name) log (last lines) ----\n" + log.split(separator: "\n").suffix(40).joined(separator: "\n"))
            }
        }
        cluster = nil
        if let directory {
            if failed, ProcessInfo.processInfo.environment["APIARY_KEEP_FAILED"] != nil {
                print("kept \(directory) for inspection")
            } else {
                try? FileManager.default.removeItem(atPath: directory)
            }
        }
    }
}

/// `executable ARGS` to its end, with nothing on its input: its exit status and what it
/// printed (both streams). The output is read before waiting for the exit, so a tool that
/// prints more than a pipe holds cannot block on a full pipe.
func runTool(_ executable: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    process.standardInput = FileHandle(forReadingAtPath: "/dev/null")
    let output = Pipe()
    process.standardOutput = output
    process.standardError = output
    try process.run()
    let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    return (process.terminationStatus, text)
}

/// `apiary ARGS` to its end: its exit status and what it printed (both streams).
func runApiary(_ arguments: [String]) throws -> (status: Int32, output: String) {
    try runTool(try apiaryExecutable(), arguments)
}

extension NodeProcessTestCase {
    /// `apiary ctl ARGS --monitor … --certs …`: its exit status and what it printed (both streams).
    func ctl(_ arguments: [String]) throws -> (status: Int32, output: String) {
        try runApiary(["ctl"] + arguments + ["--monitor", "127.0.0.1:\(cluster.monitor!.apiPort)", "--certs", cluster.certificates])
    }
}
