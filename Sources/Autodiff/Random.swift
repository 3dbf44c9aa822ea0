#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A small, fast, seedable random number generator (SplitMix64): the same seed gives the same
/// numbers on every machine, which the distributed runtime relies on.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    /// The generator's whole state; saving and restoring it resumes the stream exactly.
    public var state: UInt64

    /// A generator whose stream is fixed by `seed`.
    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// An integer uniform in `0..<n` without bias, as SAMPLES in proto/ddp.proto defines it: draw x, take
    /// r = x mod n, and draw again while x - r > 2^64 - n.
    public mutating func uniform(below n: UInt64) -> UInt64 {
        precondition(n > 0, "uniform(below: 0)")
        while true {
            let x = next(), r = x % n
            if x &- r <= 0 &- n { return r }
        }
    }

    /// A float uniform in [0, 1).
    public mutating func nextUnit() -> Float {
        Float(next() >> 40) * (1.0 / Float(1 << 24))
    }

    /// A standard normal sample (Box-Muller).
    public mutating func nextNormal() -> Float {
        let u1 = max(Double(next() >> 11) * 0x1.0p-53, Double.leastNonzeroMagnitude)
        let u2 = Double(next() >> 11) * 0x1.0p-53
        return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
    }
}
