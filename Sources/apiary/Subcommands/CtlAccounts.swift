import ApiaryNode
import ArgumentParser
import Foundation
import NIOHTTP1

extension Ctl {
    /// `apiary ctl tenant create|list|drop`.
    struct Tenant: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create, list or drop tenants (on the primary).",
            subcommands: [Create.self, List.self, Drop.self]
        )

        struct Create: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Create a tenant: its own database, replicated.")
            @Argument(help: "The tenant's name: 1...64 of a-z, 0-9, '_', '-'.") var name: String
            @Option(help: "The primary's HTTPS API (host:port).") var node: Address
            @OptionGroup var options: OperatorOptions

            func run() async throws {
                try await Ctl.show(try options.accounts(node).request(.POST, "/admin/tenants", json: ["name": name]), expecting: 201)
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List the tenants (JSON).")
            @Option(help: "The primary's HTTPS API (host:port).") var node: Address
            @OptionGroup var options: OperatorOptions

            func run() async throws {
                try await Ctl.show(try options.accounts(node).request(.GET, "/admin/tenants"), expecting: 200)
            }
        }

        struct Drop: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Drop a tenant: every request to it is refused from now on, its users and tokens are removed, and its data is deleted.",
                discussion: "The primary deletes its files before it answers; the standby once it has applied the drop. The name is never reused. Refused as not executed (try again) when the drop cannot be replicated."
            )
            @Argument(help: "The tenant's name.") var name: String
            @Option(help: "The primary's HTTPS API (host:port).") var node: Address
            @OptionGroup var options: OperatorOptions

            func run() async throws {
                try await Ctl.show(try options.accounts(node).request(.DELETE, "/admin/tenants/\(name)"), expecting: 200)
            }
        }
    }

    /// `apiary ctl user create|list`.
    struct User: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create, list or drop a tenant's users (on the primary).",
                                                        subcommands: [Create.self, List.self, Drop.self])

        struct Drop: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Drop a user and its tokens: its credentials stop working at once.")
            @Argument(help: "The user's name.") var name: String
            @Option(help: "The tenant the user belongs to.") var tenant: String
            @Option(help: "The primary's HTTPS API (host:port).") var node: Address
            @OptionGroup var options: OperatorOptions

            func run() async throws {
                try await Ctl.show(try options.accounts(node).request(.DELETE, "/admin/tenants/\(tenant)/users/\(name)"), expecting: 200)
            }
        }

        struct Create: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Create a user of a tenant.",
                discussion: "The password is read from standard input (one line); without --password-stdin a random one is made and printed once."
            )
            @Argument(help: "The user's name, unique in the cluster: 1...64 of a-z, 0-9, '.', '_', '@', '-'.") var name: String
            @Option(help: "The tenant the user belongs to.") var tenant: String
            @Option(help: "admin, writer or reader.") var role = "writer"
            @Flag(help: "Read the password from standard input instead of making one.") var passwordStdin = false
            @Option(help: "The primary's HTTPS API (host:port).") var node: Address
            @OptionGroup var options: OperatorOptions

            func run() async throws {
                let password: String
                if passwordStdin {
                    guard let line = readLine(strippingNewline: true), !line.isEmpty else { throw ValidationError("no password on standard input") }
                    password = line
                } else {
                    password = AccountsClient.randomPassword()
                }
                let response = try await options.accounts(node).request(.POST, "/admin/tenants/\(tenant)/users",
                                                                        json: ["name": name, "role": role, "password": password])
                try Ctl.show(response, expecting: 201)
                if !passwordStdin { Swift.print("password: \(password)") }
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List a tenant's users and roles (JSON).")
            @Option(help: "The tenant.") var tenant: String
            @Option(help: "The primary's HTTPS API (host:port).") var node: Address
            @OptionGroup var options: OperatorOptions

            func run() async throws {
                try await Ctl.show(try options.accounts(node).request(.GET, "/admin/tenants/\(tenant)/users"), expecting: 200)
            }
        }
    }

    /// `apiary ctl token create|revoke`.
    struct Token: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Make or revoke a user's bearer tokens (on the primary).",
                                                        subcommands: [Create.self, Revoke.self])

        struct Create: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Make a bearer token for a user: clients send 'Authorization: Bearer TOKEN' instead of a password.",
                discussion: "Prints the token once (it is stored only as a hash) with its id, which revokes it."
            )
            @Option(help: "The user the token signs in as.") var user: String
            @Option(help: "The user's tenant.") var tenant: String
            @Option(help: "Days until it expires (at most 365).") var ttlDays = 30
            @Option(help: "The primary's HTTPS API (host:port).") var node: Address
            @OptionGroup var options: OperatorOptions

            func run() async throws {
                guard (1...365).contains(ttlDays) else { throw ValidationError("--ttl-days must be 1...365") }
                let response = try await options.accounts(node).request(.POST, "/admin/tenants/\(tenant)/users/\(user)/tokens",
                                                                        jsonObject: ["ttl_seconds": ttlDays * 86_400])
                try Ctl.show(response, expecting: 201)
            }
        }

        struct Revoke: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Revoke a bearer token by its id.")
            @Argument(help: "The token's id (printed when it was made).") var id: String
            @Option(help: "The tenant of the token's user.") var tenant: String
            @Option(help: "The primary's HTTPS API (host:port).") var node: Address
            @OptionGroup var options: OperatorOptions

            func run() async throws {
                try await Ctl.show(try options.accounts(node).request(.DELETE, "/admin/tenants/\(tenant)/tokens/\(id)"), expecting: 200)
            }
        }
    }

    static func show(_ response: HTTPSConnection.Response, expecting status: Int) throws {
        Swift.print(response.text)
        if response.status != status { throw ExitCode(1) }
    }
}

extension Ctl.OperatorOptions {
    func accounts(_ node: Address) throws -> AccountsClient {
        _ = try credentials() // checks the certificate's role
        return try AccountsClient(certificatesDirectory: certs, operatorName: `operator`, host: node.host, port: node.port)
    }
}
