import ArgumentParser

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Measure replicated insert throughput and latency (see docs/benchmarks.md).")
    func run() async throws {
        throw ValidationError("not built yet: see docs/benchmarks.md")
    }
}
