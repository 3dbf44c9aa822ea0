import Autodiff

/// The seeded permutations of SwiftDDP's sample order, defined step by step in SAMPLES in
/// proto/ddp.proto so that a worker in any language computes the same: Fisher-Yates from the last
/// position down, drawing with `SeededGenerator` (SplitMix64) and its unbiased `uniform(below:)`.
/// No standard-library shuffle: its algorithm is not promised to stay the same.
public enum Permutation {
    /// The permutation of `0..<count` for `seed`: start from the identity; for i = count-1 down to 1,
    /// swap positions i and `uniform(below: i + 1)`.
    public static func of(count: Int, seed: UInt64) -> [Int] {
        var order = Array(0..<count)
        var generator = SeededGenerator(seed: seed)
        var i = count - 1
        while i > 0 {
            let j = Int(generator.uniform(below: UInt64(i + 1)))
            order.swapAt(i, j)
            i -= 1
        }
        return order
    }

    /// The seed of epoch `epoch`'s permutation of the training samples of a job with `seed`:
    /// seed + 0x5DEECE66 * (epoch + 1), modulo 2^64.
    public static func epochSeed(_ seed: UInt64, epoch: Int) -> UInt64 { seed &+ 0x5DEE_CE66 &* UInt64(epoch + 1) }
}
