import Autodiff

/// Decides which samples each rank trains on at each step: a seeded permutation per epoch, cut into
/// global batches, each global batch cut into contiguous per-rank shards. The sequence of global
/// batches depends only on the seed, so any number of workers sees the same samples per step.
public struct EpochSampler: Sendable {
    public let sampleCount: Int
    public let globalBatchSize: Int
    public let seed: UInt64

    public init(sampleCount: Int, globalBatchSize: Int, seed: UInt64) throws {
        guard sampleCount > 0 else { throw DataError.invalidOption("no samples to sample from") }
        guard globalBatchSize > 0 else { throw DataError.invalidOption("batch size \(globalBatchSize) must be positive") }
        self.sampleCount = sampleCount
        self.globalBatchSize = globalBatchSize
        self.seed = seed
    }

    /// Steps per epoch; the last batch of an epoch may be smaller.
    public var stepsPerEpoch: Int { (sampleCount + globalBatchSize - 1) / globalBatchSize }

    /// The order of samples in `epoch` (see `Permutation`).
    public func permutation(epoch: Int) -> [Int] {
        Permutation.of(count: sampleCount, seed: Permutation.epochSeed(seed, epoch: epoch))
    }

    /// The positions in the epoch's permutation of global batch `step` (0-based within the epoch).
    public func batchRange(step: Int) -> Range<Int> {
        let start = min(step * globalBatchSize, sampleCount)
        return start..<min(start + globalBatchSize, sampleCount)
    }

    /// Rank `rank`'s contiguous share of the positions `batch` split over `worldSize` ranks: the first
    /// `count % worldSize` ranks take one extra sample.
    public static func shard(_ batch: Range<Int>, rank: Int, worldSize: Int) -> Range<Int> {
        let base = batch.count / worldSize, extra = batch.count % worldSize
        let start = batch.lowerBound + rank * base + min(rank, extra)
        return start..<start + shardCount(batch.count, rank: rank, worldSize: worldSize)
    }

    /// Contiguous shares of the positions `batch`, one per weight in order, sized in proportion to the
    /// weights (largest remainders take the leftover samples, the earlier share on a tie); every share
    /// holds at least one sample while the batch has one for each. The shares cover `batch` exactly.
    public static func shards(_ batch: Range<Int>, weights: [Double]) -> [Range<Int>] {
        precondition(!weights.isEmpty && weights.allSatisfy { $0 > 0 && $0.isFinite }, "shards: weights must be positive, got \(weights)")
        let count = batch.count, total = weights.reduce(0, +)
        let exact = weights.map { Double(count) * $0 / total }
        var sizes = exact.map { Int($0) }
        let leftover = count - sizes.reduce(0, +)
        let order = exact.indices.sorted { (exact[$0] - exact[$0].rounded(.down), $1) > (exact[$1] - exact[$1].rounded(.down), $0) }
        for i in order.prefix(leftover) { sizes[i] += 1 }
        if count >= weights.count {  // a share of none would leave a worker unmeasured: the largest gives it one
            for i in sizes.indices where sizes[i] == 0 { sizes[sizes.indices.max { sizes[$0] < sizes[$1] }!] -= 1; sizes[i] = 1 }
        }
        var start = batch.lowerBound
        return sizes.map { size in
            defer { start += size }
            return start..<start + size
        }
    }

    /// The samples of global batch `step` (0-based within the epoch) given that epoch's permutation.
    public func globalBatch(step: Int, of permutation: [Int]) -> ArraySlice<Int> {
        let start = step * globalBatchSize
        return permutation[start..<min(start + globalBatchSize, sampleCount)]
    }

    /// How many samples rank `rank`'s share of a batch of `count` split over `worldSize` ranks holds
    /// (the size of `shard`'s slice).
    public static func shardCount(_ count: Int, rank: Int, worldSize: Int) -> Int {
        count / worldSize + (rank < count % worldSize ? 1 : 0)
    }

    /// Rank `rank`'s contiguous share of a batch split over `worldSize` ranks (as for positions).
    public static func shard(_ batch: ArraySlice<Int>, rank: Int, worldSize: Int) -> ArraySlice<Int> {
        precondition(worldSize > 0 && rank >= 0 && rank < worldSize, "shard: rank \(rank) of \(worldSize)")
        return batch[shard(batch.indices, rank: rank, worldSize: worldSize)]
    }
}
