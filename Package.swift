// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "SwiftDDP",
    products: [
        .library(name: "Autodiff", targets: ["Autodiff"]),
        .library(name: "DDPData", targets: ["DDPData"]),
        .library(name: "DDPWire", targets: ["DDPWire"]),
        .library(name: "DDPRuntime", targets: ["DDPRuntime"]),
        // What a user's own training program imports: the Module API and the worker entry point.
        .library(name: "SwiftDDP", targets: ["SwiftDDP"]),
        .executable(name: "ddpd", targets: ["ddpd"]),
        .executable(name: "ddpctl", targets: ["ddpctl"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.0.0"),
    ],
    targets: [
        // C shims: system libraries from Debian.
        .systemLibrary(name: "COpenBLAS", providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CZeroMQ", providers: [.apt(["libzmq3-dev"])]),
        .systemLibrary(name: "CProtobufC", providers: [.apt(["libprotobuf-c-dev"])]),
        // protoc-c output of proto/*.proto; regenerate with scripts/generate-proto.sh.
        .target(name: "CDDPProto", dependencies: ["CProtobufC"]),

        // Autodiff core and data sets.
        .target(name: "Autodiff", dependencies: ["COpenBLAS"]),
        .target(name: "DDPData", dependencies: ["Autodiff"], exclude: ["Resources/README.md"], resources: [.copy("Resources/digits.csv"), .copy("Resources/genesis.txt")]),
        // The only module that sees ZeroMQ and protobuf-c.
        .target(name: "DDPWire", dependencies: ["CZeroMQ", "CDDPProto"]),
        // Coordinator, worker, jobs.
        .target(
            name: "DDPRuntime",
            dependencies: [
                "Autodiff", "DDPData", "DDPWire",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),
        // A user's program as a job's workers.
        .target(name: "SwiftDDP", dependencies: ["Autodiff", "DDPRuntime", "DDPWire", .product(name: "Logging", package: "swift-log")]),
        .executableTarget(
            name: "ddpd",
            dependencies: ["DDPRuntime", "DDPWire", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "ddpctl",
            dependencies: ["DDPRuntime", "DDPWire", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),

        .testTarget(name: "AutodiffTests", dependencies: ["Autodiff"]),
        .testTarget(name: "DDPDataTests", dependencies: ["DDPData", "Autodiff"]),
        .testTarget(name: "DDPWireTests", dependencies: ["DDPWire"]),
        .testTarget(
            name: "DDPRuntimeTests",
            dependencies: ["DDPRuntime", "DDPWire", "Autodiff", .product(name: "Logging", package: "swift-log")]
        ),
    ]
)
