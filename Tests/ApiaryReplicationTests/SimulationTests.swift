import ApiaryCore
import ApiaryReplication
import Foundation
import SimulationSupport
import XCTest

/// Runs the replication cores through thousands of seeded simulations (DESIGN §10).
///
/// - `swift test --filter ReplicationSimulationTests` runs `APIARY_SIM_SEEDS` seeds (default
///   2,000) from `APIARY_SIM_FIRST_SEED` (default 1), spread over the machine's cores.
/// - `APIARY_SIM_SEED=123 swift test --filter ReplicationSimulationTests` replays one seed
///   alone and prints its parameters, statistics and the tail of its trace.
final class ReplicationSimulationTests: XCTestCase {
    private struct Failure {
        let seed: UInt64
        let parameters: String
        let violation: String
    }

    func testSwarm() throws {
        let environment = ProcessInfo.processInfo.environment
        if let text = environment["APIARY_SIM_SEED"] {
            let seed = try XCTUnwrap(UInt64(text), "APIARY_SIM_SEED must be an unsigned integer")
            replay(seed)
            return
        }
        let seedCount = Int(environment["APIARY_SIM_SEEDS"] ?? "") ?? 2_000
        let firstSeed = UInt64(environment["APIARY_SIM_FIRST_SEED"] ?? "") ?? 1
        let workers = max(1, min(ProcessInfo.processInfo.activeProcessorCount, 8))

        let lock = NSLock()
        var failures: [Failure] = []
        var totals: [String: Int] = [:]
        let started = Date()
        CrashReporter.install(replay: "APIARY_SIM_SEED=<seed> swift test --filter ReplicationSimulationTests")
        defer { CrashReporter.uninstall() }
        var nextSeed = firstSeed
        var slowest: [(UInt64, Double)] = []
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            while true {
                // Seeds are handed out one by one: runs differ a lot in length.
                lock.lock()
                let seed = nextSeed
                nextSeed += 1
                lock.unlock()
                guard seed < firstSeed + UInt64(seedCount) else { break }
                CrashReporter.running(seed, worker: worker)
                let seedStarted = Date()
                let simulation = Simulation(seed: seed)
                var failure: Failure?
                do { try simulation.runSwarm() } catch {
                    failure = Failure(seed: seed, parameters: simulation.params.description, violation: "\(error)")
                }
                let seedSeconds = Date().timeIntervalSince(seedStarted)
                lock.lock()
                slowest.append((seed, seedSeconds))
                slowest.sort { $0.1 > $1.1 }
                if slowest.count > 3 { slowest.removeLast() }
                if let failure { failures.append(failure) }
                for (key, n) in simulation.stats { totals[key, default: 0] += n }
                lock.unlock()
            }
            CrashReporter.finished(worker: worker)
        }
        let elapsed = Date().timeIntervalSince(started)
        print("replication simulation: \(seedCount) seeds from \(firstSeed) on \(workers) workers in \(String(format: "%.1f", elapsed)) s")
        print("slowest seeds: " + slowest.map { "\($0.0) (\(String(format: "%.2f", $0.1)) s)" }.joined(separator: ", "))
        print("totals: " + totals.keys.sorted().map { "\($0)=\(totals[$0]!)" }.joined(separator: " "))

        for failure in failures.sorted(by: { $0.seed < $1.seed }).prefix(5) {
            XCTFail("""
                seed \(failure.seed) failed: \(failure.violation)
                parameters: \(failure.parameters)
                replay: APIARY_SIM_SEED=\(failure.seed) swift test --filter ReplicationSimulationTests
                """)
        }
        if let first = failures.min(by: { $0.seed < $1.seed }) { replay(first.seed, traceLines: 120) }

        // The swarm must actually reach the paths it is meant to test; a change that makes a
        // path unreachable weakens every seed silently.
        let mustHappen = [
            "acked", "failed.standby unavailable", "failed.outcome unknown", "failed.too many commits waiting for the standby",
            "failed.transaction too large to replicate", "readLog", "readLogSummaries", "rewind.handshake", "snapshot.installed",
            "snapshot.installFailed", "snapshot.failedToRead", "stepDown", "epochStale", "fault.staleToStandby",
            "fault.staleToPrimary", "fault.late", "rewind.drained", "close.standby.rejectedPeer.staleEpoch",
            "close.primary.rejectedPeer.staleEpoch", "close.primary.peerTimeout", "close.standby.peerTimeout", "lost",
            "fault.foreignStandby", "dropped",
        ]
        if failures.isEmpty && seedCount >= 1_000 {
            for key in mustHappen where (totals[key] ?? 0) == 0 {
                XCTFail("no simulation reached '\(key)': the swarm no longer covers that path")
            }
        }
    }

    /// Runs one seed with tracing and prints what happened.
    private func replay(_ seed: UInt64, traceLines: Int = 400) {
        CrashReporter.install(replay: "APIARY_SIM_SEED=<seed> swift test --filter ReplicationSimulationTests")
        CrashReporter.running(seed, worker: 0)
        defer {
            CrashReporter.finished(worker: 0)
            CrashReporter.uninstall()
        }
        let simulation = Simulation(seed: seed, tracing: true)
        let streaming = traceLines == 400
        simulation.streamingTrace = streaming
        setvbuf(stdout, nil, _IOLBF, 0) // a crash in a core must not swallow buffered trace lines
        print("seed \(seed) parameters: \(simulation.params)")
        do {
            try simulation.runSwarm()
            print("seed \(seed) passed")
        } catch {
            XCTFail("seed \(seed) failed: \(error)")
        }
        print("stats: " + simulation.stats.keys.sorted().map { "\($0)=\(simulation.stats[$0]!)" }.joined(separator: " "))
        guard !streaming else { return }
        print("last \(traceLines) trace lines:")
        for line in simulation.trace.suffix(traceLines) { print("  " + line) }
    }
}
