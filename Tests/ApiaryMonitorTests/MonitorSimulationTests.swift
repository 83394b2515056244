import ApiaryCore
import ApiaryMonitor
import ApiaryReplication
import Foundation
import SimulationSupport
import XCTest

/// Drives the monitor core with random heartbeats, silences, faults, monitor restarts, bad input
/// and operator commands, checking after every step what ``SimCluster`` checks (one writer goal
/// per epoch, the epoch never going back, promotion only of a promotable standby unless forced,
/// every answer after the persist it depends on, no acknowledged write lost by a promotion);
/// then heals everything and checks that the formation converges to a primary and a promotable
/// secondary.
///
/// - `swift test --filter MonitorSimulationTests` runs `APIARY_MONITOR_SEEDS` seeds (default
///   3,000) from `APIARY_MONITOR_FIRST_SEED` (default 1).
/// - `APIARY_MONITOR_SEED=123 swift test --filter MonitorSimulationTests` replays one seed and
///   prints its trace.
final class MonitorSimulationTests: XCTestCase {
    func testRandomizedRuns() throws {
        let environment = ProcessInfo.processInfo.environment
        if let text = environment["APIARY_MONITOR_SEED"] {
            let seed = try XCTUnwrap(UInt64(text), "APIARY_MONITOR_SEED must be an unsigned integer")
            replay(seed, printAll: true)
            return
        }
        let seedCount = Int(environment["APIARY_MONITOR_SEEDS"] ?? "") ?? 3_000
        let firstSeed = UInt64(environment["APIARY_MONITOR_FIRST_SEED"] ?? "") ?? 1
        let started = Date()
        var failed: [(UInt64, [String])] = []
        var totals: [String: Int] = [:]
        CrashReporter.install(replay: "APIARY_MONITOR_SEED=<seed> swift test --filter MonitorSimulationTests")
        defer { CrashReporter.uninstall() }
        for seed in firstSeed..<(firstSeed + UInt64(seedCount)) {
            CrashReporter.running(seed, worker: 0)
            var run = MonitorRun(seed: seed, tracing: false)
            let violations = run.run()
            if !violations.isEmpty { failed.append((seed, violations)) }
            for (key, n) in run.cluster.stats { totals[key, default: 0] += n }
        }
        CrashReporter.finished(worker: 0)
        print("monitor simulation: \(seedCount) seeds from \(firstSeed) in \(String(format: "%.1f", Date().timeIntervalSince(started))) s")
        print("totals: " + totals.keys.sorted().map { "\($0)=\(totals[$0]!)" }.joined(separator: " "))
        for (seed, violations) in failed.prefix(5) {
            XCTFail("""
                seed \(seed) failed: \(violations.prefix(3).joined(separator: "; "))
                replay: APIARY_MONITOR_SEED=\(seed) swift test --filter MonitorSimulationTests
                """)
        }
        if let first = failed.first { replay(first.0, printAll: false) }

        // The runs must reach the paths they are meant to test.
        let mustHappen = [
            "epoch raised", "epoch raised (forced)", "became promotable", "goal wait_primary", "goal draining",
            "goal maintenance", "goal demoted", "rejoined", "promotion applied", "forced promotion applied",
            "heartbeat refused", "accepted switchover", "refused switchover", "accepted failover", "refused failover",
            "accepted maintenance", "refused maintenance", "accepted promote", "refused promote", "commit primary",
            "commit wait_primary", "monitor restarted", "converged", "stale heartbeat delivered",
        ]
        if failed.isEmpty && seedCount >= 1_000 {
            for key in mustHappen where (totals[key] ?? 0) == 0 {
                XCTFail("no run reached '\(key)': the randomized runs no longer cover that path")
            }
        }
    }

    private func replay(_ seed: UInt64, printAll: Bool) {
        CrashReporter.install(replay: "APIARY_MONITOR_SEED=<seed> swift test --filter MonitorSimulationTests")
        CrashReporter.running(seed, worker: 0)
        defer {
            CrashReporter.finished(worker: 0)
            CrashReporter.uninstall()
        }
        setvbuf(stdout, nil, _IOLBF, 0)
        var run = MonitorRun(seed: seed, tracing: true)
        print("seed \(seed): \(run.parameters)")
        let violations = run.run()
        let lines = printAll ? run.cluster.trace : Array(run.cluster.trace.suffix(150))
        for line in lines { print("  " + line) }
        print("stats: " + run.cluster.stats.keys.sorted().map { "\($0)=\(run.cluster.stats[$0]!)" }.joined(separator: " "))
        if violations.isEmpty { print("seed \(seed) passed") } else { XCTFail("seed \(seed): \(violations.joined(separator: "\n"))") }
    }
}

/// One seeded run. Its parameters (how often each kind of step happens) come from the seed too,
/// so that runs differ in character, not only in detail.
struct MonitorRun {
    let seed: UInt64
    private var random: SimRandom
    let cluster: SimCluster
    let parameters: String
    private let steps: Int
    private let faultPercent: Int
    private let commandPercent: Int
    private let badInputPercent: Int
    private let restartPerMille: Int

    init(seed: UInt64, tracing: Bool) {
        self.seed = seed
        var random = SimRandom(seed: seed)
        steps = random.int(150...600)
        faultPercent = random.int(1...8)
        commandPercent = random.int(0...5)
        badInputPercent = random.int(0...3)
        restartPerMille = random.int(0...8)
        var config = SimCluster.defaultConfig
        config.primaryTimeoutMs = random.int64(200...800)
        config.standbyTimeoutMs = random.int64(200...800)
        config.startupGraceMs = random.int64(500...3_000)
        config.catchUpLagMax = LSN(random.int(0...20))
        config.switchoverTimeoutMs = random.int64(1_000...6_000)
        config.lsnPersistIntervalMs = random.int64(0...2_000)
        cluster = SimCluster(config: config, lsns: LSN(random.int(0...3)))
        cluster.traceEnabled = tracing
        cluster.applyAnswersAtOnce = random.chance(0.3)
        parameters = "steps=\(steps) faults=\(faultPercent)% commands=\(commandPercent)% badInput=\(badInputPercent)% monitorRestarts=\(restartPerMille)‰ "
            + "atOnce=\(cluster.applyAnswersAtOnce) primaryTimeout=\(config.primaryTimeoutMs) standbyTimeout=\(config.standbyTimeoutMs) "
            + "grace=\(config.startupGraceMs) catchUpLag=\(config.catchUpLagMax) switchoverTimeout=\(config.switchoverTimeoutMs)"
        self.random = random
    }

    /// The violations found (empty: the run passed).
    mutating func run() -> [String] {
        for _ in 0..<steps {
            step()
            if !cluster.violations.isEmpty { return cluster.violations }
        }
        heal()
        return cluster.violations
    }

    private mutating func step() {
        cluster.now += random.int64(0...40)
        let node = random.pick(cluster.ids)
        var roll = random.int(0...999)
        if roll < restartPerMille {
            cluster.restartMonitor()
            cluster.bump("monitor restarted")
            return
        }
        roll = random.int(0...99)
        if roll < faultPercent { return fault(node) }
        roll -= faultPercent
        if roll < commandPercent { return command(node) }
        roll -= commandPercent
        if roll < badInputPercent { return badInput(node) }
        switch random.int(0...99) {
        case 0..<36: cluster.heartbeat(node)
        case 36..<38: cluster.delayHeartbeat(node)
        case 38..<40: cluster.deliverDelayedHeartbeat(node, index: random.int(0...3))
        case 40..<55: cluster.keeperStep(node)
        case 55..<72: cluster.commit(random.chance(0.7) ? acme : globex)
        case 72..<85: cluster.replicate(records: LSN(random.int(1...20)))
        case 85..<92: cluster.advance(ms: random.int64(1...600))
        default: cluster.tick()
        }
    }

    private mutating func fault(_ node: NodeID) {
        let who: Who = node == "a" ? .a : .b
        switch random.int(0...5) {
        case 0: cluster.nodes[node]!.alive ? cluster.kill(who) : cluster.revive(who)
        case 1: cluster.streamUp ? cluster.cutStream() : cluster.healStream()
        case 2: cluster.nodes[node]!.monitorLink ? cluster.cutFromMonitor(who) : cluster.healMonitorLink(who)
        case 3: // a quick restart of the node process
            cluster.kill(who)
            cluster.revive(who)
        case 4: if !cluster.nodes[node]!.alive { cluster.revive(who) }
        default: cluster.advance(ms: random.int64(100...2_000))
        }
    }

    private mutating func command(_ node: NodeID) {
        let who: Who = node == "a" ? .a : .b
        switch random.int(0...4) {
        case 0: cluster.switchover()
        case 1: cluster.failover()
        case 2: cluster.maintenance(who, true)
        case 3: cluster.maintenance(who, false)
        default: cluster.promote(node, force: random.chance(0.6), acceptDataLoss: random.chance(0.6))
        }
    }

    /// A heartbeat the monitor MUST refuse; `SimCluster.heartbeat` checks that it changed nothing.
    private mutating func badInput(_ node: NodeID) {
        var report = cluster.report(of: node)
        let state = cluster.state
        var role: PeerRole = .node
        var id = node
        switch random.int(0...5) {
        case 0: id = random.pick(["z", "gateway-1", ""])
        case 1: role = .other(random.pick(["gateway", "operator", "monitor"]))
        case 2: report.epoch = Epoch(state.epoch.rawValue + UInt64(random.int(1...3)))
        case 3:
            report.role = .standby
            report.reached = ReachedGoal(random.pick([.primary, .waitPrimary, .demoted]), sequence: 1)
        case 4:
            guard let writer = state.writer, let other = state.other(than: writer.id) else { return }
            id = other.id
            report = cluster.report(of: other.id)
            report.epoch = state.epoch
            report.role = .primary
            report.reached = nil
        default:
            report.epoch = state.epoch
            report.reached = ReachedGoal(state.node(node)!.goal, sequence: state.lastGoalSequence + UInt64(random.int(1...5)))
        }
        let actions = cluster.heartbeat(id, report: report, role: role)
        guard case .refuse? = actions.last else {
            cluster.check(false, "bad input accepted: \(id) \(role) \(report): \(actions)")
            return
        }
    }

    /// Everything heals; the formation MUST converge to a primary and a promotable secondary.
    private mutating func heal() {
        for i in cluster.ids {
            let who: Who = i == "a" ? .a : .b
            if !cluster.nodes[i]!.alive { cluster.revive(who) }
            if !cluster.nodes[i]!.monitorLink { cluster.healMonitorLink(who) }
        }
        if !cluster.streamUp { cluster.healStream() }
        for _ in 0..<1_500 {
            cluster.bump("heal rounds")
            for i in cluster.ids {
                let record = cluster.state.node(i)!
                if record.maintenanceRequested || record.goal == .maintenance { cluster.maintenance(i == "a" ? .a : .b, false) }
            }
            cluster.now += 50
            for i in cluster.ids {
                cluster.heartbeat(i)
                cluster.keeperStep(i)
            }
            if random.chance(0.5) { cluster.commit(acme) }
            cluster.replicate()
            cluster.tick()
            if !cluster.violations.isEmpty { return }
            if isConverged {
                cluster.bump("converged")
                return
            }
        }
        cluster.check(false, "did not converge after healing: \(cluster.state.nodes) nodes \(cluster.nodes.values.sorted { $0.id < $1.id })")
    }

    private var isConverged: Bool {
        guard let w = cluster.state.writer, let s = cluster.state.other(than: w.id) else { return false }
        return w.goal == .primary && w.reported == .primary && s.goal == .secondary && s.promotable && s.reported == .secondary
    }
}

