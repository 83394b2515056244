import Foundation

/// One repetition of the zone-loss drill, as measured (times in ms since the drill began).
public struct DrillRepetition: Codable, Sendable {
    public var repetition: Int
    public var zone: String
    public var membersCut: [String]
    public var writerBefore: String
    public var writerAfter: String
    public var epochBefore: UInt64
    public var epochAfter: UInt64
    public var cutAtMs: Int64
    /// The first acknowledged write begun after the cut (nil: none within the drill's bound).
    public var resumedAtMs: Int64?
    public var restoredAtMs: Int64
    public var convergedAtMs: Int64
    /// Writes acknowledged during the repetition, and those of them missing afterwards.
    public var acknowledged: Int
    public var missing: [Int]
    public var attempts: Int
    public var failedAttempts: Int
    public var errors: [String]
    /// The attempts that did not end acknowledged (timed out, refused, unknown), with when:
    /// what the application saw during the loss (bounded).
    public var unacknowledgedAttempts: [String]
    public var checksumsEqual: Bool
    public var verification: String
    /// When each write was acknowledged, for the timeline.
    public var acknowledgements: [Int64]

    /// Recovery time: from the cut to the first acknowledged write begun after it.
    public var rtoMs: Int64? { resumedAtMs.map { $0 - cutAtMs } }
    public var passed: Bool { rtoMs != nil && missing.isEmpty && errors.isEmpty && checksumsEqual }
}

/// The evidence of a zone-loss drill: markdown for the auditors' folder, HTML with a timeline.
public struct DrillReport: Codable, Sendable {
    public var cluster: String
    public var startedAt: String
    public var version: String
    public var zoneArgument: String
    public var method: String
    public var repetitions: [DrillRepetition]
    /// Why the drill stopped early, if it did.
    public var failure: String?

    public var passed: Bool { failure == nil && !repetitions.isEmpty && repetitions.allSatisfy(\.passed) }

    /// p50, p99 and max of the RTOs measured (nearest rank).
    public var rtoSummary: (p50: Int64, p99: Int64, max: Int64)? {
        let sorted = repetitions.compactMap(\.rtoMs).sorted()
        guard !sorted.isEmpty else { return nil }
        func rank(_ q: Double) -> Int64 { sorted[min(sorted.count - 1, max(0, Int((q * Double(sorted.count)).rounded(.up)) - 1))] }
        return (rank(0.5), rank(0.99), sorted.last!)
    }

    public var summary: String {
        let rto = rtoSummary.map { "RTO p50 \($0.p50) ms, p99 \($0.p99) ms, max \($0.max) ms" } ?? "RTO not measured"
        let rpo = repetitions.reduce(0) { $0 + $1.missing.count }
        return "zone-loss drill on \(cluster): \(passed ? "PASSED" : "FAILED"); \(repetitions.count) repetition(s); \(rto); RPO \(rpo) acknowledged writes missing"
            + (failure.map { "; stopped: \($0)" } ?? "")
    }

    public var markdown: String {
        var lines = [
            "# Zone-loss drill: \(cluster)", "",
            "- Result: **\(passed ? "passed" : "FAILED")**\(failure.map { " (stopped: \($0))" } ?? "")",
            "- Started: \(startedAt)",
            "- Software: \(version)",
            "- Zone: `\(zoneArgument)`; cut by \(method)",
            "- \(summary)", "",
            "| # | zone | cut | writer before → after | epoch | RTO | acknowledged | missing (RPO) | checksums |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in repetitions {
            lines.append("| \(r.repetition) | \(r.zone) | \(r.membersCut.joined(separator: ", ")) | \(r.writerBefore) → \(r.writerAfter) | \(r.epochBefore) → \(r.epochAfter) | \(r.rtoMs.map { "\($0) ms" } ?? "none") | \(r.acknowledged) | \(r.missing.count) | \(r.checksumsEqual ? "equal" : "DIFFER") |")
        }
        lines += ["", "RTO: from the cut to the first acknowledged write begun after it. RPO: writes the cluster acknowledged that are missing afterwards. Every write carried an idempotency key and was retried until acknowledged; the checksums compare every tenant's database on both nodes after the zone came back and the formation converged."]
        for r in repetitions where !r.errors.isEmpty || !r.missing.isEmpty {
            lines.append("")
            lines.append("Repetition \(r.repetition): missing \(r.missing.prefix(20)); errors \(r.errors.prefix(5))")
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The same, with a timeline per repetition: writes acknowledged per 100 ms, and the cut,
    /// the first write after it, the restore and the convergence.
    public var html: String {
        var body = ""
        for r in repetitions {
            let start = max(0, r.cutAtMs - 3_000), end = r.convergedAtMs + 1_000
            let buckets = Int((end - start) / 100) + 1
            var counts = [Int](repeating: 0, count: buckets)
            for t in r.acknowledgements where t >= start && t <= end { counts[Int((t - start) / 100)] += 1 }
            let peak = max(1, counts.max() ?? 1)
            let width = 900.0, height = 160.0, step = width / Double(buckets)
            var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(width))' height='\(Int(height) + 44)'>"
            for (i, c) in counts.enumerated() {
                let h = Double(c) / Double(peak) * height
                svg += "<rect x='\(Double(i) * step)' y='\(height - h)' width='\(max(1, step - 0.5))' height='\(h)' fill='#3a7'/>"
            }
            let marks: [(Int64?, String, String)] = [(r.cutAtMs, "cut", "#d33"), (r.resumedAtMs, "writes resume", "#36c"),
                                                     (r.restoredAtMs, "restored", "#333"), (r.convergedAtMs, "converged", "#777")]
            for (i, (t, label, colour)) in marks.enumerated() {
                guard let t else { continue }
                let x = Double(t - start) / 100 * step
                svg += "<line x1='\(x)' y1='0' x2='\(x)' y2='\(height)' stroke='\(colour)' stroke-dasharray='4'/>"
                svg += "<text x='\(x + 2)' y='\(height + 14 + Double(i % 2) * 14)' font-size='10' fill='\(colour)'>\(ChaosReport.escape(label))</text>"
            }
            svg += "</svg>"
            body += "<h2>Repetition \(r.repetition): zone \(ChaosReport.escape(r.zone)), RTO \(r.rtoMs.map { "\($0) ms" } ?? "none"), RPO \(r.missing.count)</h2>"
            body += "<p>Writes acknowledged per 100 ms, from 3 s before the cut to 1 s after the formation converged. Writer \(ChaosReport.escape(r.writerBefore)) → \(ChaosReport.escape(r.writerAfter)), epoch \(r.epochBefore) → \(r.epochAfter); \(r.acknowledged) acknowledged, \(r.missing.count) missing; checksums \(r.checksumsEqual ? "equal" : "DIFFER").</p>\(svg)"
        }
        let table = markdown.split(separator: "\n").filter { $0.hasPrefix("- ") }.map { "<li>\(ChaosReport.escape(String($0.dropFirst(2))))</li>" }.joined()
        return """
        <!doctype html><meta charset="utf-8"><title>Apiary zone-loss drill: \(ChaosReport.escape(cluster))</title>
        <style>body{font-family:sans-serif;margin:2em}</style>
        <h1>Zone-loss drill: \(ChaosReport.escape(cluster)) — \(passed ? "passed" : "FAILED")</h1><ul>\(table)</ul>\(body)
        """
    }

    /// Writes `<directory>/drill-<time>.md`, `.html` and `.json`; returns their paths.
    public func write(to directory: String) throws -> [String] {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let base = directory + "/drill-zone-loss-" + startedAt.replacingOccurrences(of: ":", with: "-")
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(self).write(to: URL(fileURLWithPath: base + ".json"))
        try Data(markdown.utf8).write(to: URL(fileURLWithPath: base + ".md"))
        try Data(html.utf8).write(to: URL(fileURLWithPath: base + ".html"))
        return [base + ".md", base + ".html", base + ".json"]
    }
}
