// swift-tools-version:6.1
// The target graph is the architecture: pure cores (ApiaryCore, ApiaryReplication, ApiaryMonitor,
// ApiaryKeeper) import
// no NIO, no SQLite and no networking; shells (ApiaryStorage, ApiaryNode) own I/O.
import PackageDescription

let package = Package(
    name: "apiary",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "apiary", targets: ["apiary"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.0"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.7.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
    ],
    targets: [
        // MARK: Pure cores
        /// The CPU's CRC-32C instruction (C, since Swift cannot reach it), with a table fallback in ApiaryCore.
        .target(name: "CApiaryCRC"),
        /// Value types shared by every component: records, pages, checksums, byte codecs.
        .target(name: "ApiaryCore", dependencies: ["CApiaryCRC"]),
        /// Primary⇄standby replication protocol: messages and state machines. Events in, actions out.
        .target(name: "ApiaryReplication", dependencies: ["ApiaryCore"]),
        /// The health monitor's decisions (DESIGN §6): node goals, promotion, the epoch. Events in, actions out.
        .target(name: "ApiaryMonitor", dependencies: ["ApiaryCore", "ApiaryReplication"]),
        /// The node's half of the monitor protocol: from a goal to the steps that reach it. Events in, steps out.
        .target(name: "ApiaryKeeper", dependencies: ["ApiaryCore", "ApiaryReplication", "ApiaryMonitor"]),
        /// The gateway's decisions (DESIGN §7): where a request goes, when it is held, when it may be sent again.
        .target(name: "ApiaryGateway", dependencies: ["ApiaryCore"]),

        // MARK: Storage
        .systemLibrary(
            name: "CSQLite",
            pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]
        ),
        /// Apiary's C side of SQLite: the VFS (wraps the default unix VFS; the one seam for page
        /// capture) and the connection hardening Swift cannot call (variadic sqlite3_db_config).
        .target(name: "CApiaryVFS", dependencies: ["CSQLite"]),
        /// Append-only per-tenant replication log (segment files, CRC32C-framed records).
        .target(name: "ApiaryLog", dependencies: ["ApiaryCore"]),
        /// Tenant databases: group-commit writer, readers, WAL capture, standby apply.
        .target(name: "ApiaryStorage", dependencies: ["ApiaryCore", "CSQLite", "CApiaryVFS"]),

        // MARK: Shells
        /// libsystemd (sd_notify): readiness, status, stopping and watchdog pings.
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        /// Process lifecycle every role shares: telling systemd how the process is doing.
        .target(name: "ApiaryLifecycle", dependencies: ["CSystemd"]),
        /// The cluster's CA, certificates and every TLS configuration, in one place.
        .target(name: "ApiaryTLS", dependencies: [
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
        ]),
        /// A node process: storage + log + replication over mTLS + the HTTPS client endpoint.
        .target(name: "ApiaryNode", dependencies: [
            "ApiaryCore", "ApiaryReplication", "ApiaryMonitor", "ApiaryKeeper", "ApiaryGateway", "ApiaryLog", "ApiaryStorage", "ApiaryTLS", "ApiaryLifecycle",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Logging", package: "swift-log"),
            // scrypt for stored passwords (memory-hard, BoringSSL's implementation).
            .product(name: "_CryptoExtras", package: "swift-crypto"),
        ]),
        /// The chaos harness: a real local cluster, workloads, faults, history checkers, reports (docs/chaos.md).
        .target(name: "ApiaryChaos", dependencies: [
            "ApiaryNode", "ApiaryMonitor", "ApiaryTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ]),
        /// The monitor process: the SQLite store, the mTLS heartbeat/status endpoint, the tick.
        .target(name: "ApiaryMonitorService", dependencies: [
            "ApiaryMonitor", "ApiaryCore", "ApiaryReplication", "ApiaryTLS", "ApiaryLifecycle", "CSQLite",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "apiary", dependencies: [
            "ApiaryCore", "ApiaryNode", "ApiaryTLS", "ApiaryMonitor", "ApiaryMonitorService", "ApiaryChaos",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ]),

        // MARK: Tests
        .testTarget(name: "ApiaryCoreTests", dependencies: ["ApiaryCore"]),
        .testTarget(name: "ApiaryLogTests", dependencies: ["ApiaryLog"]),
        /// What every simulation's tests share: the seeded generator, the crash reporter naming seeds.
        .target(name: "SimulationSupport", path: "Tests/SimulationSupport"),
        .testTarget(name: "ApiaryReplicationTests", dependencies: ["ApiaryReplication", "SimulationSupport"]),
        .testTarget(name: "ApiaryMonitorTests", dependencies: ["ApiaryMonitor", "ApiaryReplication", "ApiaryCore", "SimulationSupport"]),
        .testTarget(name: "ApiaryKeeperTests", dependencies: ["ApiaryKeeper", "ApiaryMonitor", "ApiaryReplication", "ApiaryCore"]),
        .testTarget(name: "ApiaryGatewayTests", dependencies: ["ApiaryGateway", "ApiaryCore"]),
        .testTarget(name: "ApiaryChaosTests", dependencies: ["ApiaryChaos"]),
        .testTarget(name: "ApiaryFormationTests", dependencies: ["ApiaryKeeper", "ApiaryMonitor", "ApiaryReplication", "ApiaryCore", "SimulationSupport"]),
        .testTarget(name: "ApiaryMonitorServiceTests", dependencies: [
            "ApiaryMonitorService", "ApiaryMonitor", "ApiaryCore", "ApiaryReplication", "ApiaryTLS", "ApiaryNode", "ApiaryLifecycle", "CSQLite",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ]),
        .testTarget(name: "ApiaryStorageTests", dependencies: ["ApiaryStorage", "CSQLite"]),
        .testTarget(name: "ApiaryLifecycleTests", dependencies: ["ApiaryLifecycle"]),
        .testTarget(name: "ApiaryTLSTests", dependencies: [
            "ApiaryTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ]),
        .testTarget(name: "ApiaryNodeTests", dependencies: [
            "ApiaryNode", "ApiaryStorage", "ApiaryTLS", "ApiaryLog", "ApiaryCore",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "ApiaryIntegrationTests", dependencies: [
            "ApiaryNode", "ApiaryStorage", "ApiaryTLS", "ApiaryReplication", "ApiaryMonitor", "ApiaryChaos",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ]),
    ],
    swiftLanguageModes: [.v5]
)
