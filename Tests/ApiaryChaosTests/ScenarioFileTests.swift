@testable import ApiaryChaos
import Foundation
import XCTest

/// A malformed scenario is refused with a message that names the file's line (issue 11: "the
/// runner refuses an unknown fault or a malformed scenario with a clear message naming the line").
final class ScenarioFileTests: XCTestCase {
    var directory = ""

    override func setUp() {
        directory = NSTemporaryDirectory() + "apiary-scenarios-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: directory) }

    /// Loads `text` as a scenario file; the error's text when it is refused.
    func refusal(_ text: String) -> String? {
        let path = directory + "/s.json"
        FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
        do {
            _ = try Scenario.load(path, directory: directory)
            return nil
        } catch {
            return "\(error)"
        }
    }

    func scenario(faults: [String], extra: String = "") -> String {
        """
        {
          "name": "t",
          "description": "d",
          "seconds": 30,\(extra)
          "setClients": 1,
          "bankClients": 1,
          "faults": [
        \(faults.map { "    " + $0 }.joined(separator: ",\n"))
          ]
        }
        """
    }

    func testAGoodFileLoads() throws {
        XCTAssertNil(refusal(scenario(faults: [#"{"at": 1, "kind": "isolate", "target": "primary", "seconds": 2}"#,
                                               #"{"at": 5, "kind": "cut_one_way", "target": "standby", "seconds": 2}"#,
                                               #"{"at": 8, "kind": "loss", "target": "primary", "seconds": 2, "percent": 30}"#,
                                               #"{"at": 9, "kind": "fill_disk", "target": "standby", "seconds": 2}"#])))
    }

    func testAnUnknownFaultNamesItsLineAndTheFaultsThereAre() throws {
        let message = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 1, "kind": "kill", "target": "primary"}"#,
                                                              #"{"at": 2, "kind": "explode", "target": "primary"}"#])))
        XCTAssertTrue(message.contains("s.json:9:"), message)
        XCTAssertTrue(message.contains("explode") && message.contains("faults: kill, restart, pause, isolate, cut, cut_one_way, loss, delay, fill_disk"), message)
    }

    func testAnUnknownTargetNamesItsLine() throws {
        let message = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 1, "kind": "kill", "target": "the-moon"}"#])))
        XCTAssertTrue(message.contains("s.json:8:") && message.contains("the-moon") && message.contains("targets: primary"), message)
    }

    func testAFaultTheRulesRefuseNamesItsLine() throws {
        let missingSeconds = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 1, "kind": "kill", "target": "primary"}"#,
                                                                     #"{"at": 1, "kind": "pause", "target": "primary"}"#,
                                                                     #"{"at": 2, "kind": "kill", "target": "monitor"}"#])))
        XCTAssertTrue(missingSeconds.contains("s.json:9:") && missingSeconds.contains("'pause' needs seconds > 0"), missingSeconds)
        let late = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 31, "kind": "kill", "target": "primary"}"#])))
        XCTAssertTrue(late.contains("s.json:8:") && late.contains("outside the run"), late)
        let cutMonitor = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 3, "kind": "cut", "target": "monitor", "seconds": 1}"#])))
        XCTAssertTrue(cutMonitor.contains("s.json:8:") && cutMonitor.contains("takes primary or standby"), cutMonitor)
        let noPercent = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 3, "kind": "loss", "target": "primary", "seconds": 1}"#])))
        XCTAssertTrue(noPercent.contains("s.json:8:") && noPercent.contains("'loss' needs percent 1...100"), noPercent)
        let overlap = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 3, "kind": "isolate", "target": "monitor", "seconds": 5}"#,
                                                              #"{"at": 6, "kind": "cut", "target": "primary", "seconds": 1}"#])))
        XCTAssertTrue(overlap.contains("s.json:9:") && overlap.contains("one network fault at a time"), overlap)
        let fillMonitor = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 3, "kind": "fill_disk", "target": "monitor", "seconds": 1}"#])))
        XCTAssertTrue(fillMonitor.contains("s.json:8:") && fillMonitor.contains("takes primary or standby"), fillMonitor)
    }

    func testADelayFaultIsCheckedAndNamesItsLine() throws {
        XCTAssertNil(refusal(scenario(faults: [#"{"at": 3, "kind": "delay", "target": "primary", "seconds": 2, "delayMs": 40, "jitterMs": 10, "reorderPercent": 5}"#])))
        let noDelay = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 3, "kind": "delay", "target": "primary", "seconds": 2}"#])))
        XCTAssertTrue(noDelay.contains("s.json:8:") && noDelay.contains("'delay' needs delayMs 1...10000"), noDelay)
        let jitterPastDelay = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 3, "kind": "delay", "target": "standby", "seconds": 2, "delayMs": 10, "jitterMs": 11}"#])))
        XCTAssertTrue(jitterPastDelay.contains("jitterMs must be 0...delayMs"), jitterPastDelay)
        let reorder = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 3, "kind": "delay", "target": "primary", "seconds": 2, "delayMs": 10, "reorderPercent": 101}"#])))
        XCTAssertTrue(reorder.contains("reorderPercent must be 0...100"), reorder)
        let strayField = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 3, "kind": "cut", "target": "primary", "seconds": 2, "delayMs": 10}"#])))
        XCTAssertTrue(strayField.contains("go with delay only"), strayField)
        let delayMonitor = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 3, "kind": "delay", "target": "monitor", "seconds": 2, "delayMs": 10}"#])))
        XCTAssertTrue(delayMonitor.contains("takes primary or standby"), delayMonitor)
    }

    func testAMissingOrMistypedFieldNamesItsLine() throws {
        let noTarget = try XCTUnwrap(refusal(scenario(faults: [#"{"at": 1, "kind": "kill"}"#])))
        XCTAssertTrue(noTarget.contains("s.json:8:") && noTarget.contains("'target' is missing"), noTarget)
        let text = try XCTUnwrap(refusal(scenario(faults: [], extra: "\n  \"registerKeys\": \"five\",")))
        XCTAssertTrue(text.contains("s.json:5:") && text.contains("registerKeys"), text)
    }

    func testNotJSONAtAllSaysSo() throws {
        let message = try XCTUnwrap(refusal("{ \"name\": \"t\", "))
        XCTAssertTrue(message.contains("is not valid JSON"), message)
    }

    func testTheLocatorFindsNestedValues() {
        let text = Array("{\n \"a\": [1, {\"x\": \"}\"},\n  {\"y\": [\n 2]}],\n \"b\": true\n}".utf8)
        XCTAssertEqual(JSONLocation.line(of: [.key("a"), .index(2), .key("y"), .index(0)], in: text), 4)
        XCTAssertEqual(JSONLocation.line(of: [.key("a"), .index(1)], in: text), 2)
        XCTAssertEqual(JSONLocation.line(of: [.key("b")], in: text), 5)
        XCTAssertNil(JSONLocation.line(of: [.key("c")], in: text))
    }
}
