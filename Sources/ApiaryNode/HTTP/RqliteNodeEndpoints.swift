import ApiaryCore
import Foundation
import NIOHTTP1

/// rqlite's `/readyz`, `/status` (for applications) and `/nodes`, from what a node says about
/// itself (`NodeSummary`). Pure: the routes fetch the summary and pass it in.
///
/// Apiary has one primary and one standby, not a Raft cluster; in rqlite's terms the primary
/// is the leader and the only node that serves (a standby serves no reads or writes), so it
/// is the only one that is ready. Answers carry no tenant's name or data.
enum RqliteNodeEndpoints {
    /// `/readyz` in rqlite's text form: 200 `[+]node ok\n[+]leader ok\n[+]store ok` on a
    /// primary; 503 with the first line that fails otherwise; `?noleader` asks only whether the
    /// node answers (200 `[+]node ok`); `?sync` adds `[+]sync ok` (a primary has applied all it
    /// committed when it says so).
    static func readyz(_ summary: NodeSummary?, _ query: RqliteQuery) -> APIResponse {
        func text(_ status: HTTPResponseStatus, _ lines: [String]) -> APIResponse {
            APIResponse(status: status, body: Array(lines.joined(separator: "\n").utf8), contentType: "text/plain; charset=utf-8")
        }
        if query.noLeader { return text(.ok, ["[+]node ok"]) }
        guard let summary else { return text(.serviceUnavailable, ["[+]node ok", "[+]leader does not exist"]) }
        switch summary.role {
        case "primary":
            return text(.ok, ["[+]node ok", "[+]leader ok", "[+]store ok"] + (query.sync ? ["[+]sync ok"] : []))
        case "standby":
            let reason = summary.error.map { ": \($0)" } ?? " (a standby serves no reads or writes; use the primary)"
            return text(.serviceUnavailable, ["[+]node ok", "[+]leader ok", "[+]store not ready" + reason])
        default:
            return text(.serviceUnavailable, ["[+]node ok", "[+]leader does not exist", "[+]store not ready (\(summary.role): a newer primary exists)"])
        }
    }

    /// `/status` for an application, in rqlite's layout (the parts clients read: `store` with
    /// the leader and Raft state, `node` with times, `http` with the queued writes' bounds,
    /// `build`), plus an `apiary` part. `?key=store.raft` answers one part, `?pretty` indents.
    /// Operators get Apiary's own status (every tenant's positions) instead.
    static func status(_ summary: NodeSummary?, _ query: RqliteQuery, host: String?, startedAt: Date, now: Date,
                       queue: QueuedWrites.Figures) -> APIResponse {
        let isPrimary = summary?.role == "primary"
        var store: [String: Any] = [
            "node_id": summary?.name ?? "",
            "ready": isPrimary,
            "raft": ["state": isPrimary ? "Leader" : (summary == nil ? "Shutdown" : "Follower")],
        ]
        if isPrimary, let summary {
            store["leader"] = ["node_id": summary.name, "addr": host ?? ""]
        } else {
            store["leader"] = ["node_id": "", "addr": ""]
        }
        var apiary: [String: Any] = ["role": summary?.role ?? "changing roles", "epoch": summary?.epoch ?? 0]
        if let error = summary?.error { apiary["error"] = error }
        let status: [String: Any] = [
            "build": ["version": ApiaryVersion.rqliteHeaderValue],
            "http": ["auth": "enabled", "bind_addr": host ?? "", "queue": ["_default": queueFigures(queue)]],
            "node": ["start_time": rfc3339(startedAt), "current_time": rfc3339(now), "uptime": goDuration(now.timeIntervalSince(startedAt))],
            "store": store,
            "apiary": apiary,
        ]
        var part: Any = status
        if let key = query.key, !key.isEmpty {
            // rqlite's getSubJSON: follow the path; a missing key is `{}`, a leaf ends the walk.
            for name in key.split(separator: ".", omittingEmptySubsequences: false) {
                guard let object = part as? [String: Any] else { break }
                guard let next = object[String(name)] else { part = [String: Any](); break }
                part = next
            }
        }
        return APIResponse(status: .ok, body: json(part, pretty: query.format.pretty))
    }

    /// rqlite's queue stats (`max_size`, `batch_size`, `timeout` as a Go duration), and `depth`:
    /// the asking tenant's requests queued (an operator, who names no tenant, gets none).
    private static func queueFigures(_ queue: QueuedWrites.Figures) -> [String: Any] {
        var figures: [String: Any] = ["max_size": queue.maxSize, "batch_size": queue.batchSize,
                                      "timeout": goDuration(Double(queue.timeoutMs) / 1000)]
        if let depth = queue.depth { figures["depth"] = depth }
        return figures
    }

    /// `/nodes`: this node, in rqlite's legacy map form by default (`{"id": {...}}`) or its
    /// list form with `?ver=2` (`{"nodes": [...]}`). Only the node answering is listed: a
    /// client reaches the other through its own address, and a standby is not a voter that
    /// serves reads.
    static func nodes(_ summary: NodeSummary?, _ query: RqliteQuery, host: String?) -> APIResponse {
        var node: [String: Any] = [
            "id": summary?.name ?? "",
            "version": ApiaryVersion.rqliteHeaderValue,
            "voter": true,
            "reachable": summary != nil,
            "leader": summary?.role == "primary",
        ]
        if let host { node["api_addr"] = "https://" + host }
        if let error = summary?.error { node["error"] = error }
        let body: Any = query.version == "2" ? ["nodes": [node]] : [summary?.name ?? "": node]
        return APIResponse(status: .ok, body: json(body, pretty: query.format.pretty))
    }

    private static func json(_ value: Any, pretty: Bool) -> [UInt8] {
        let compact = (try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .fragmentsAllowed, .withoutEscapingSlashes])).map(Array.init) ?? Array("{}".utf8)
        return pretty ? RqliteJSON.indent(compact) : compact
    }

    static func rfc3339(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: date)
    }

    /// Go's `time.Duration.String()` for a non-negative duration: `1h2m3.5s`, `42.1s`, `0s`,
    /// and below a second `100ms`, `1.5µs`, `7ns`.
    static func goDuration(_ seconds: Double) -> String {
        guard seconds > 0 else { return "0s" }
        var nanos = Int64((seconds * 1e9).rounded())
        if nanos < 1_000 { return "\(nanos)ns" }
        if nanos < 1_000_000_000 {
            let (unit, perUnit): (String, Int64) = nanos < 1_000_000 ? ("µs", 1_000) : ("ms", 1_000_000)
            return decimal(nanos / perUnit, fraction: nanos % perUnit, digits: perUnit == 1_000 ? 3 : 6) + unit
        }
        let hours = nanos / 3_600_000_000_000
        nanos -= hours * 3_600_000_000_000
        let minutes = nanos / 60_000_000_000
        nanos -= minutes * 60_000_000_000
        let secondsText = decimal(nanos / 1_000_000_000, fraction: nanos % 1_000_000_000, digits: 9)
        if hours > 0 { return "\(hours)h\(minutes)m\(secondsText)s" }
        if minutes > 0 { return "\(minutes)m\(secondsText)s" }
        return secondsText + "s"
    }

    /// `whole.fraction` with the fraction's `digits` places, trailing zeros dropped.
    private static func decimal(_ whole: Int64, fraction: Int64, digits: Int) -> String {
        guard fraction > 0 else { return String(whole) }
        var text = String(fraction)
        text = String(repeating: "0", count: digits - text.count) + text
        while text.hasSuffix("0") { text.removeLast() }
        return "\(whole).\(text)"
    }
}

/// The node's summary, fetched at most once a second however often `/readyz` is asked (it
/// needs no credentials, and the default summary costs replication-loop work per tenant).
/// Concurrent askers share one fetch.
actor NodeSummaryCache {
    static let maxAgeNs: UInt64 = 1_000_000_000
    /// When the routes were made: the node's start, for `/status`.
    nonisolated let startedAt = Date()
    private var cached: (summary: NodeSummary?, atNs: UInt64)?
    private var inFlight: Task<NodeSummary?, Never>?

    func summary(_ fetch: @escaping @Sendable () async -> NodeSummary?) async -> NodeSummary? {
        let now = DispatchTime.now().uptimeNanoseconds
        if let cached, now &- cached.atNs < Self.maxAgeNs { return cached.summary }
        if let inFlight { return await inFlight.value }
        let task = Task { await fetch() }
        inFlight = task
        let summary = await task.value
        cached = (summary, DispatchTime.now().uptimeNanoseconds)
        inFlight = nil
        return summary
    }
}
