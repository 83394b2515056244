import Foundation
import XCTest
@testable import ApiaryNode

final class CPUTimeTests: XCTestCase {
    func testThisProcessesCPUTimeGrowsWithWork() throws {
        #if os(Linux)
        let before = try XCTUnwrap(CPUTime.ticks(of: getpid()))
        // About 100 ms of CPU: ten ticks at Linux's usual 100 per second.
        let start = ProcessInfo.processInfo.systemUptime
        var x: UInt64 = 1
        while ProcessInfo.processInfo.systemUptime - start < 0.2 { x = x &* 6364136223846793005 &+ 1442695040888963407 }
        XCTAssertNotEqual(x, 0)
        let after = try XCTUnwrap(CPUTime.ticks(of: getpid()))
        XCTAssertGreaterThanOrEqual(Double(after - before) * CPUTime.microsecondsPerTick, 100_000)
        XCTAssertNil(CPUTime.ticks(of: -1))
        #else
        throw XCTSkip("/proc is Linux's")
        #endif
    }
}
