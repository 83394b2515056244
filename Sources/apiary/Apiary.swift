import ApiaryCore
import ArgumentParser

/// One binary for every role; each subcommand is a thin layer over a library target.
@main
struct Apiary: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apiary",
        abstract: "A multi-zone replicated SQL database.",
        version: ApiaryVersion.current,
        subcommands: [Certs.self, Node.self, Monitor.self, Gateway.self, Up.self, Ctl.self, Bench.self, Chaos.self, Drill.self]
    )
}
