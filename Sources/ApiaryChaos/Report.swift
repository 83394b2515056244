import Foundation

public struct FaultRecord: Codable, Sendable, Hashable {
    public var atMs: Int64
    public var text: String
}

/// What a run found: the checks, availability both ways, the faults as applied, and every
/// operation (for a later look).
public struct ChaosReport: Codable, Sendable {
    public var scenario: String
    public var startedAt: String
    public var durationMs: Int64
    public var network: String
    public var checks: [CheckResult]
    public var availability: Availability
    public var faults: [FaultRecord]
    public var operations: [WorkloadOperation]

    public var passed: Bool { checks.allSatisfy(\.passed) }

    /// The lines a terminal shows.
    public var summary: String {
        var lines = ["scenario \(scenario): \(passed ? "PASSED" : "FAILED") (\(network))"]
        for check in checks { lines.append("  [\(check.passed ? "ok" : "FAIL")] \(check.name): \(check.detail.prefix(300))") }
        lines.append(String(format: "  availability: %.4f%% of %d requests, %.4f%% of %d one-second windows",
                            availability.byRequests * 100, availability.requests, availability.byTime * 100, availability.windows))
        return lines.joined(separator: "\n")
    }

    /// Writes `<directory>/<scenario>-<time>.json` and `.html`; returns their paths.
    public func write(to directory: String) throws -> (json: String, html: String) {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let stamp = startedAt.replacingOccurrences(of: ":", with: "-")
        let base = directory + "/\(scenario)-\(stamp)"
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(self).write(to: URL(fileURLWithPath: base + ".json"))
        try Data(html.utf8).write(to: URL(fileURLWithPath: base + ".html"))
        return (base + ".json", base + ".html")
    }

    /// One page: the verdicts, and a timeline (operations per second that succeeded and that
    /// did not, and the faults) as SVG.
    var html: String {
        let seconds = Int(max(1, (durationMs + 999) / 1000))
        var ok = [Int](repeating: 0, count: seconds), bad = [Int](repeating: 0, count: seconds)
        for op in operations {
            let s = Int(op.completedMs / 1000)
            guard s >= 0, s < seconds else { continue }
            if op.outcome == .ok { ok[s] += 1 } else { bad[s] += 1 }
        }
        let peak = max(1, (0..<seconds).map { ok[$0] + bad[$0] }.max() ?? 1)
        let width = 900.0, height = 220.0, step = width / Double(seconds)
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(width))' height='\(Int(height) + 40)'>"
        for s in 0..<seconds {
            let hOk = Double(ok[s]) / Double(peak) * height, hBad = Double(bad[s]) / Double(peak) * height
            svg += "<rect x='\(Double(s) * step)' y='\(height - hOk)' width='\(max(1, step - 1))' height='\(hOk)' fill='#3a7'/>"
            svg += "<rect x='\(Double(s) * step)' y='\(height - hOk - hBad)' width='\(max(1, step - 1))' height='\(hBad)' fill='#d33'/>"
        }
        for (i, f) in faults.enumerated() {
            let x = Double(f.atMs) / 1000 * step
            svg += "<line x1='\(x)' y1='0' x2='\(x)' y2='\(height)' stroke='#333' stroke-dasharray='4'/>"
            svg += "<text x='\(x + 2)' y='\(height + 14 + Double(i % 2) * 14)' font-size='10'>\(Self.escape(f.text))</text>"
        }
        svg += "</svg>"
        let rows = checks.map { "<tr><td>\($0.passed ? "ok" : "<b>FAIL</b>")</td><td>\(Self.escape($0.name))</td><td>\(Self.escape($0.detail))</td></tr>" }.joined()
        return """
        <!doctype html><meta charset="utf-8"><title>Apiary chaos: \(Self.escape(scenario))</title>
        <style>body{font-family:sans-serif;margin:2em}td{padding:2px 8px;vertical-align:top}</style>
        <h1>\(Self.escape(scenario)): \(passed ? "passed" : "FAILED")</h1>
        <p>Started \(startedAt), \(durationMs / 1000) s of workload; \(Self.escape(network)).</p>
        <p>Availability: \(String(format: "%.4f", availability.byRequests * 100))% of \(availability.requests) requests,
        \(String(format: "%.4f", availability.byTime * 100))% of \(availability.windows) one-second windows.</p>
        <table>\(rows)</table>
        <h2>Timeline</h2><p>Operations completed per second: green succeeded, red failed or unknown; dashed lines: faults.</p>
        \(svg)
        """
    }

    static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
            .replacingOccurrences(of: "'", with: "&#39;")
    }
}
