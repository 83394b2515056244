import Foundation
import XCTest
@testable import ApiaryNode

final class OpenFileLimitTests: XCTestCase {
    /// Tenants hold many descriptors each: a node starts with its soft limit at the hard one.
    func testTheSoftOpenFileLimitIsRaisedToTheHardOne() throws {
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        var limit = rlimit()
        XCTAssertEqual(getrlimit(resource, &limit), 0)
        guard limit.rlim_max > 256 else { throw XCTSkip("hard limit \(limit.rlim_max): nothing to raise") }
        // Start as a login shell often does: a soft limit well below the hard one.
        var lowered = limit
        lowered.rlim_cur = 256
        XCTAssertEqual(setrlimit(resource, &lowered), 0)
        let raised = NodeServer.raiseOpenFileLimit()
        XCTAssertEqual(raised?.0, 256)
        XCTAssertEqual(getrlimit(resource, &limit), 0)
        XCTAssertEqual(limit.rlim_cur, limit.rlim_max)
    }
}
