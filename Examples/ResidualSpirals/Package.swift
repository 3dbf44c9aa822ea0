// swift-tools-version:6.0
// An example of training your own model with SwiftDDP: a residual MLP on generated spirals.
//   swift build -c release
//   ddpctl start --program .build/release/residual-spirals --workers 2 --epochs 20 -- --hidden 32 --blocks 2
import PackageDescription

let package = Package(
    name: "ResidualSpirals",
    dependencies: [.package(name: "SwiftDDP", path: "../..")],
    targets: [
        .executableTarget(
            name: "residual-spirals",
            dependencies: [.product(name: "SwiftDDP", package: "SwiftDDP")],
            path: "Sources/ResidualSpirals"
        ),
    ]
)
