import Foundation
import Testing

/// The committed protobuf-c code is what protoc-c makes of proto/ today.
struct GeneratedCodeTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static var hasProtocC: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/protoc-c") }

    @Test(.enabled(if: hasProtocC, "protoc-c is not installed (apt-get install protobuf-c-compiler)"))
    func committedCodeIsFresh() throws {
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("proto-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: out) }
        let process = Process()
        process.executableURL = Self.root.appendingPathComponent("scripts/generate-proto.sh")
        process.arguments = [out.path]
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        let committed = Self.root.appendingPathComponent("Sources/CDDPProto")
        for file in ["ddp.pb-c.c", "include/ddp.pb-c.h"] {
            let fresh = try Data(contentsOf: out.appendingPathComponent(file))
            let old = try Data(contentsOf: committed.appendingPathComponent(file))
            #expect(fresh == old, "\(file) is stale: run scripts/generate-proto.sh")
        }
    }
}
