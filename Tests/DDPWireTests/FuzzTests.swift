import Foundation
import Testing
@testable import DDPWire

/// A seeded fuzz loop over the decoder: random, truncated, bit-flipped and reordered frames must all end
/// in a decoded message or a `WireError`, never a crash. `DDP_FUZZ_ITERATIONS` runs it longer
/// (scripts/fuzz-wire.sh).
struct FuzzTests {
    struct Generator: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    static var iterations: Int { Int(ProcessInfo.processInfo.environment["DDP_FUZZ_ITERATIONS"] ?? "") ?? 100_000 }

    @Test func decoderSurvivesHostileFrames() {
        var rng = Generator(state: UInt64(ProcessInfo.processInfo.environment["DDP_FUZZ_SEED"] ?? "") ?? 12345)
        let seeds: [[UInt8]] = CodecTests.bodies.map { body in
            let frames = WireCodec.encode(WireMessage(
                jobID: "job", step: 3, rank: 0, body: body,
                tensors: [WireTensor(name: "w", shape: [2, 2], payload: Payload(floats: [1, 2, 3, 4]))]))
            guard case .bytes(let head) = frames[0] else { return [] }
            return head
        }
        var decoded = 0, rejected = 0
        for i in 0..<Self.iterations {
            var head: [UInt8]
            switch i % 4 {
            case 0:  // random bytes
                head = (0..<Int.random(in: 0..<64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            case 1:  // truncated valid envelope
                let seed = seeds.randomElement(using: &rng)!
                head = Array(seed.prefix(Int.random(in: 0...seed.count, using: &rng)))
            case 2:  // bit flips and byte overwrites
                head = seeds.randomElement(using: &rng)!
                for _ in 0..<Int.random(in: 1...4, using: &rng) where !head.isEmpty {
                    head[Int.random(in: 0..<head.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
                }
            default:  // spliced envelopes
                let a = seeds.randomElement(using: &rng)!, b = seeds.randomElement(using: &rng)!
                head = Array(a.prefix(Int.random(in: 0...a.count, using: &rng))) + b.suffix(Int.random(in: 0...b.count, using: &rng))
            }
            var frames = [Payload(bytes: head)]
            for _ in 0..<Int.random(in: 0...2, using: &rng) {
                frames.append(Payload(bytes: (0..<Int.random(in: 0...20, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }))
            }
            if Bool.random(using: &rng) { frames.shuffle(using: &rng) }  // reordered frames
            var limits = DecodeLimits()
            limits.requireFinite = Bool.random(using: &rng)
            do {
                _ = try WireCodec.decode(frames, expectedJobID: Bool.random(using: &rng) ? "job" : nil, limits: limits)
                decoded += 1
            } catch {
                rejected += 1
            }
        }
        #expect(decoded + rejected == Self.iterations)
        #expect(rejected > Self.iterations / 2)
    }
}
