import Foundation

public struct FaultRecord: Codable, Sendable, Hashable {
    public var atMs: Int64
    public var text: String
}

/// Who the monitor named as the writer, and in which epoch, when the runner asked (twice a
/// second; nothing while the monitor could not be reached).
public struct RoleSample: Codable, Sendable, Hashable {
    public var atMs: Int64
    public var epoch: UInt64
    /// The node with the writer's goal; nil while there is none.
    public var writer: String?
    /// It reported reaching its goal: it takes writes.
    public var writerReady: Bool
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
    /// The writer and the epoch through the run, as the monitor said.
    public var roles: [RoleSample] = []

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

    /// Per second of the run: operations completed that succeeded and that did not, and the
    /// median and 99th percentile of their latency (ms).
    var perSecond: [(ok: Int, bad: Int, p50Ms: Int64, p99Ms: Int64)] {
        let seconds = Int(max(1, (durationMs + 999) / 1000))
        var ok = [Int](repeating: 0, count: seconds), bad = [Int](repeating: 0, count: seconds)
        var latencies = [[Int64]](repeating: [], count: seconds)
        for op in operations {
            let s = Int(op.completedMs / 1000)
            guard s >= 0, s < seconds else { continue }
            if op.outcome == .ok { ok[s] += 1 } else { bad[s] += 1 }
            latencies[s].append(op.completedMs - op.invokedMs)
        }
        return (0..<seconds).map { s in
            let sorted = latencies[s].sorted()
            func at(_ q: Double) -> Int64 { sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * q))] }
            return (ok[s], bad[s], at(0.5), at(0.99))
        }
    }

    /// One page: the verdicts, and a timeline as SVG: operations per second that succeeded and
    /// that did not, their latency, the writer and the epoch, and the faults.
    var html: String {
        let seconds = perSecond
        let width = 900.0, height = 220.0, latencyHeight = 120.0, rolesHeight = 24.0, step = width / Double(seconds.count)
        let peak = max(1, seconds.map { $0.ok + $0.bad }.max() ?? 1)
        let top = height + 20, rolesTop = top + latencyHeight + 20, total = rolesTop + rolesHeight + 40
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(width) + 60)' height='\(Int(total))'>"
        // Throughput.
        for (s, second) in seconds.enumerated() {
            let hOk = Double(second.ok) / Double(peak) * height, hBad = Double(second.bad) / Double(peak) * height
            svg += "<rect x='\(Double(s) * step)' y='\(height - hOk)' width='\(max(1, step - 1))' height='\(hOk)' fill='#3a7'/>"
            svg += "<rect x='\(Double(s) * step)' y='\(height - hOk - hBad)' width='\(max(1, step - 1))' height='\(hBad)' fill='#d33'/>"
        }
        svg += "<text x='\(width + 4)' y='12' font-size='10'>\(peak)/s</text>"
        // Latency: p50 and p99 per second, on a log scale (a failover's seconds dwarf the rest).
        let latencyMax = max(10, seconds.map(\.p99Ms).max() ?? 10)
        func y(_ ms: Int64) -> Double { top + latencyHeight - log10(Double(max(1, ms))) / log10(Double(latencyMax)) * latencyHeight }
        for (latencies, color) in [(seconds.map(\.p50Ms), "#36c"), (seconds.map(\.p99Ms), "#c63")] {
            let points = latencies.enumerated().map { "\(Double($0.offset) * step + step / 2),\(y($0.element))" }.joined(separator: " ")
            svg += "<polyline points='\(points)' fill='none' stroke='\(color)' stroke-width='1.5'/>"
        }
        svg += "<text x='\(width + 4)' y='\(top + 10)' font-size='10'>\(latencyMax) ms</text><text x='\(width + 4)' y='\(top + latencyHeight)' font-size='10'>1 ms</text>"
        // The writer and the epoch, as the monitor named them.
        let colors = ["#69c", "#e94", "#9c6", "#c6c"]
        var names: [String] = []
        for (i, sample) in roles.enumerated() {
            let end = i + 1 < roles.count ? roles[i + 1].atMs : durationMs
            let x = Double(sample.atMs) / 1000 * step, w = max(0, Double(end - sample.atMs) / 1000 * step)
            var color = "#bbb"
            if let writer = sample.writer, sample.writerReady {
                if !names.contains(writer) { names.append(writer) }
                color = colors[names.firstIndex(of: writer)! % colors.count]
            }
            svg += "<rect x='\(x)' y='\(rolesTop)' width='\(w)' height='\(rolesHeight)' fill='\(color)'/>"
            if i == 0 || roles[i - 1].epoch != sample.epoch || roles[i - 1].writer != sample.writer {
                svg += "<text x='\(x + 2)' y='\(rolesTop + 15)' font-size='10'>e\(sample.epoch) \(Self.escape(sample.writer ?? "none"))</text>"
            }
        }
        // Faults, across every panel.
        for (i, f) in faults.enumerated() {
            let x = Double(f.atMs) / 1000 * step
            svg += "<line x1='\(x)' y1='0' x2='\(x)' y2='\(rolesTop + rolesHeight)' stroke='#333' stroke-dasharray='4'/>"
            svg += "<text x='\(x + 2)' y='\(rolesTop + rolesHeight + 14 + Double(i % 2) * 14)' font-size='10'>\(Self.escape(f.text))</text>"
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
        <h2>Timeline</h2><p>Top: operations completed per second, green succeeded, red failed or unknown. Middle: their
        latency per second, blue the median, orange the 99th percentile (log scale). Bottom: the writer the monitor named
        (a colour per node, grey while none was ready) and the epoch. Dashed lines: faults.</p>
        \(svg)
        """
    }

    static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
            .replacingOccurrences(of: "'", with: "&#39;")
    }
}
