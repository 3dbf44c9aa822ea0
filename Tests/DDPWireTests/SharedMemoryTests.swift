import Foundation
import Testing
@testable import DDPWire

/// Tensors described by offset in a shared-memory segment instead of sent in frames.
struct SharedMemoryTests {
    @Test func aSegmentIsOpenedByPathAndProvenByItsNonce() throws {
        let created = try SharedSegment(creating: 4096)
        #expect(created.path.hasPrefix("/proc/\(getpid())/fd/"))
        let opened = try SharedSegment(opening: created.path, byteCount: 4096, nonce: created.nonce)
        // Both map the same memory: what one writes the other reads.
        let written = try #require(created.region(offset: 64, count: 16))
        written.withUnsafeMutableBytes { $0.copyBytes(from: Array(1...16) as [UInt8]) }
        #expect(try #require(opened.region(offset: 64, count: 16)).bytes == Array(1...16))

        var other = created.nonce
        other[0] ^= 1
        #expect(throws: SharedMemoryError.nonceMismatch(path: created.path)) {
            try SharedSegment(opening: created.path, byteCount: 4096, nonce: other)
        }
        #expect(throws: SharedMemoryError.wrongSize(path: created.path, expected: 8192, got: 4096)) {
            try SharedSegment(opening: created.path, byteCount: 8192, nonce: created.nonce)
        }
        #expect(throws: (any Error).self) { try SharedSegment(opening: "/proc/\(getpid())/fd/999999", byteCount: 4096, nonce: created.nonce) }
        // Regions stay inside the tensor area, aligned.
        #expect(created.region(offset: 0, count: 4) == nil)
        #expect(created.region(offset: 66, count: 4) == nil)
        #expect(created.region(offset: 4092, count: 8) == nil)
        #expect(created.region(offset: 4092, count: 4) != nil)
    }

    /// A peer offering anything but a SwiftDDP memfd (a regular file whose first bytes it could read, by
    /// path or through /proc/PID/fd, or another program's memfd) is refused before anything is mapped, and
    /// the file is left as it was.
    @Test func onlyASwiftDDPMemfdIsMapped() throws {
        let path = "/tmp/ddp-victim-\(getpid())"
        let original = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try Data(original).write(to: URL(fileURLWithPath: path))
        defer { unlink(path) }
        let nonce = Array(original.prefix(32))
        let reader = open(path, O_RDONLY)
        defer { close(reader) }
        for offered in [path, "/proc/\(getpid())/fd/\(reader)", "/proc/self/../\(getpid())/fd/\(reader)", "/etc/../\(path)"] {
            #expect(throws: SharedMemoryError.self) { try SharedSegment(opening: offered, byteCount: 4096, nonce: nonce) }
        }
        #expect(throws: SharedMemoryError.notASegment(path: path, reason: "only /proc/PID/fd/N of a worker's memfd is accepted")) {
            try SharedSegment(opening: path, byteCount: 4096, nonce: nonce)
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(original))

        // Another program's anonymous memory, even with the right bytes in front: refused by its name.
        typealias MemfdCreate = @convention(c) (UnsafePointer<CChar>, UInt32) -> Int32
        let memfdCreate = unsafeBitCast(try #require(dlsym(UnsafeMutableRawPointer(bitPattern: 0), "memfd_create")), to: MemfdCreate.self)
        let foreign = memfdCreate("someone-else", 1)
        defer { close(foreign) }
        #expect(original.withUnsafeBytes { write(foreign, $0.baseAddress, 4096) } == 4096)
        #expect { try SharedSegment(opening: "/proc/\(getpid())/fd/\(foreign)", byteCount: 4096, nonce: nonce) } throws: {
            "\($0)".contains("is not a SwiftDDP memfd (/memfd:someone-else")
        }
        // A genuine segment still opens.
        let genuine = try SharedSegment(creating: 4096)
        #expect(try SharedSegment(opening: genuine.path, byteCount: 4096, nonce: genuine.nonce).byteCount == 4096)
    }

    @Test func sharedTensorsTravelWithoutFrames() throws {
        let segment = try SharedSegment(creating: 1 << 16)
        let layout = SharedLayout(start: SharedSegment.headerBytes, byteCounts: [12 * 4, 5 * 2])
        #expect(layout.offsets == [64, 128] && layout.end == 192)
        let weights = try #require(segment.region(offset: layout.offsets[0], count: 48))
        let bias = try #require(segment.region(offset: layout.offsets[1], count: 10))
        let values = (0..<12).map { Float($0) * 0.5 - 2 }
        values.withUnsafeBufferPointer { TensorEncoding.write($0, as: .f32, into: weights) }
        [Float](repeating: 1.5, count: 5).withUnsafeBufferPointer { TensorEncoding.write($0, as: .bf16, into: bias) }
        let message = WireMessage(
            jobID: "j", step: 3, rank: 1, body: .gradientPush(GradientPush(sampleCount: 8, localLoss: 0.1)),
            tensors: [WireTensor(name: "w", shape: [3, 4], payload: weights),
                      WireTensor(name: "framed", shape: [2], payload: Payload(floats: [7, 8])),
                      WireTensor(name: "b", shape: [5], dtype: .bf16, payload: bias)])
        let frames = received(WireCodec.encode(message))
        #expect(frames.count == 2, "only the envelope and the one framed tensor are frames")

        let peer = try SharedSegment(opening: segment.path, byteCount: segment.byteCount, nonce: segment.nonce)
        let decoded = try WireCodec.decode(frames, sharedMemory: peer)
        #expect(decoded.tensors.map(\.name) == ["w", "framed", "b"])
        #expect(TensorEncoding.floats(decoded.tensors[0].payload) == values)
        #expect(TensorEncoding.floats(decoded.tensors[1].payload) == [7, 8])
        #expect(TensorEncoding.floats(decoded.tensors[2].payload, dtype: .bf16) == [Float](repeating: 1.5, count: 5))

        // Without a segment, or with one too small for the offsets, the message is refused, named.
        #expect { try WireCodec.decode(frames) } throws: { "\($0)".contains("'w' is in shared memory, but none is mapped") }
        let small = try SharedSegment(creating: 128)
        #expect { try WireCodec.decode(frames, sharedMemory: small) } throws: { "\($0)".contains("lies outside the 128-byte segment") }
    }
}
