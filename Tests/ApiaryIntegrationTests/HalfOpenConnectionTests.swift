import ApiaryNode
import Foundation
import XCTest

/// Replication connections whose TCP is up but whose TLS stalls or fails, on either side:
/// nothing may hang (issue: a standby that dialled a silent peer waited forever).
final class HalfOpenConnectionTests: XCTestCase {
    /// Peers that connect to the primary's replication port and send nothing are dropped
    /// (past the handshake limit at once, the rest when their handshake time runs out), and
    /// the real standby's stream is unaffected meanwhile.
    func testSilentPeersAreDroppedAndTheStandbyStreamGoesOn() async throws {
        let directory = NSTemporaryDirectory() + "apiary-half-open-" + UUID().uuidString
        let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort())
        defer {
            cluster.stopAll()
            try? FileManager.default.removeItem(atPath: directory)
        }
        try cluster.prepareCertificates()
        try cluster.startBoth()
        let api = try await APIClient(port: cluster.primary.apiPort, caPath: cluster.certificates + "/ca.pem").connect()
        try await createTenant("acme", on: api)
        try await executeEach(["CREATE TABLE t (x)"], tenant: "acme", on: api)

        let silent = (0..<24).map { _ in SilentSocket(port: cluster.primary.replicationPort) }
        defer { silent.forEach { $0.close() } }
        XCTAssertTrue(silent.allSatisfy(\.connected), "could not open the silent connections")
        // Sync mode: these commit only while the standby's stream works.
        try await executeEach((0..<20).map { "INSERT INTO t VALUES (\($0))" }, tenant: "acme", on: api)
        // Every silent connection is closed by the primary, none waits forever (bounded wait:
        // the handshake limit is 5 s; 60 s only guards against a hang).
        let deadline = Date().addingTimeInterval(60)
        for (i, socket) in silent.enumerated() {
            let left = max(1, Int(deadline.timeIntervalSinceNow.rounded(.up)))
            XCTAssertTrue(socket.waitForClose(seconds: left), "silent connection \(i) was never closed by the primary")
        }
        try await executeEach(["INSERT INTO t VALUES (100)"], tenant: "acme", on: api)
        await api.close()
    }

    /// A standby whose primary accepts TCP but never finishes TLS, or hangs up at once,
    /// dials again instead of waiting forever.
    func testAStandbyRedialsAfterAStalledOrFailedHandshake() async throws {
        for behaviour in [FakePrimary.Behaviour.stall, .hangUp] {
            let directory = NSTemporaryDirectory() + "apiary-half-open-standby-" + UUID().uuidString
            let cluster = LocalCluster(directory: directory, executable: try apiaryExecutable(), basePort: freeBasePort())
            defer {
                cluster.stopAll()
                try? FileManager.default.removeItem(atPath: directory)
            }
            try cluster.prepareCertificates()
            let fake = try FakePrimary(port: cluster.primary.replicationPort, behaviour: behaviour)
            defer { fake.stop() }
            try cluster.start(cluster.standby)
            XCTAssertTrue(fake.waitForAccepts(3, seconds: 60), "\(behaviour): the standby dialled \(fake.accepts) times and then waited")
        }
    }
}

/// A TCP connection that sends nothing.
final class SilentSocket {
    let fd: Int32
    let connected: Bool

    init(port: Int) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        connected = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Foundation.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
        self.fd = fd
    }

    /// Blocks until the peer closes (true) or `seconds` pass (false).
    func waitForClose(seconds: Int) -> Bool {
        var timeout = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var byte: UInt8 = 0
        while true {
            let n = recv(fd, &byte, 1, 0)
            if n == 0 { return true }                      // orderly close
            if n < 0 { return errno == ECONNRESET }        // reset counts as closed; a timeout does not
        }
    }

    func close() { Foundation.close(fd) }
}

/// Listens where a primary would and either keeps accepted connections open without a word
/// (a stalled TLS handshake) or closes them at once (a failed one); counts the dials.
final class FakePrimary: @unchecked Sendable {
    enum Behaviour { case stall, hangUp }
    private let listener: Int32
    private let condition = NSCondition()
    private var accepted: [Int32] = []
    private var stopped = false

    init(port: Int, behaviour: Behaviour) throws {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.listener = listener
        var yes: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(listener, 16) == 0 else { throw XCTSkip("cannot listen on \(port)") }
        Thread.detachNewThread { [self] in
            while true {
                let fd = accept(listener, nil, nil)
                guard fd >= 0 else { return } // closed by stop()
                condition.lock()
                if behaviour == .hangUp { Foundation.close(fd); accepted.append(-1) } else { accepted.append(fd) }
                condition.broadcast()
                condition.unlock()
            }
        }
    }

    var accepts: Int { condition.lock(); defer { condition.unlock() }; return accepted.count }

    func waitForAccepts(_ count: Int, seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        condition.lock()
        defer { condition.unlock() }
        while accepted.count < count {
            if !condition.wait(until: deadline) { return accepted.count >= count }
        }
        return true
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        Foundation.close(listener)
        condition.lock()
        for fd in accepted where fd >= 0 { Foundation.close(fd) }
        accepted.removeAll()
        condition.unlock()
    }
}
