import ApiaryGateway
import Foundation
import Logging
import NIOHTTP1
import XCTest
@testable import ApiaryNode

/// The gateway's responder on requests it must not forward.
final class GatewayForwarderTests: XCTestCase {
    func forwarder() -> GatewayForwarder {
        var config = GatewayConfig()
        config.holdMs = 1 // no writer is known here: a request that is held ends at once
        return GatewayForwarder(name: "gateway-test", state: GatewayState(core: GatewayCore(config: config)), pools: [:], bodyBytesMax: 1 << 20,
                                limits: RequestLimits(perAddress: .init(perSecond: 1_000, burst: 1_000)), logger: Logger(label: "test"))
    }

    func answer(_ request: APIRequest) async -> APIResponse {
        await withCheckedContinuation { continuation in
            forwarder().respond(to: request) { make in continuation.resume(returning: make()) }
        }
    }

    /// The gateway's memory budget had no room for the body, so it was dropped unread: the
    /// request must be refused as not executed, not forwarded without its body (a POST
    /// /db/query would then run its `q=` instead, an execute fail falsely).
    func testABodyDroppedForWantOfMemoryIsRefusedNotForwardedWithoutIt() async {
        var request = APIRequest(method: .POST, uri: "/db/query?q=SELECT%201", headers: ["Authorization": "Basic YTpi"], body: [])
        request.memoryShort = true
        let response = await answer(request)
        XCTAssertEqual(response.status, .serviceUnavailable)
        let text = String(decoding: response.body, as: UTF8.self)
        XCTAssertTrue(text.contains("short of memory") && text.contains("not_executed"), text)
        XCTAssertTrue(response.headers.contains { $0.0 == "Retry-After" })
    }

    func testABodyOverTheLimitIs413() async {
        var request = APIRequest(method: .POST, uri: "/db/execute", headers: [:], body: [])
        request.bodyTooLarge = true
        let response = await answer(request)
        XCTAssertEqual(response.status, .payloadTooLarge)
    }
}
