import DDPData
import DDPWire

/// The positions (in the epoch's permutation) that one step trains: the samples of earlier steps of the
/// epoch whose workers were left out (`backup_workers`), then the step's own global batch; and how they
/// are cut into one contiguous share per live worker.
struct StepBatch: Equatable {
    /// Ranges of positions, in training order.
    let ranges: [Range<Int>]
    var count: Int { ranges.reduce(0) { $0 + $1.count } }

    init(carried: [Range<Int>], batch: Range<Int>) { ranges = (carried + [batch]).filter { !$0.isEmpty } }

    /// One share per live worker, in rank order: equal (the first `count mod workers` take one more), or
    /// in proportion to `weights`. The shares cover the batch exactly, each a run of consecutive positions
    /// of it (several ranges where it crosses from carried samples to the step's own).
    func shares(workers: Int, weights: [Double]?) -> [[SampleRange]] {
        let all = 0..<count
        let pieces = weights.map { EpochSampler.shards(all, weights: $0) }
            ?? (0..<workers).map { EpochSampler.shard(all, rank: $0, worldSize: workers) }
        return pieces.map { positions($0).map { SampleRange(start: UInt64($0.lowerBound), count: UInt64($0.count)) } }
    }

    /// The positions at places `piece` of this batch's sequence of positions.
    func positions(_ piece: Range<Int>) -> [Range<Int>] {
        var result: [Range<Int>] = [], offset = 0
        for range in ranges {
            let low = max(piece.lowerBound, offset), high = min(piece.upperBound, offset + range.count)
            if low < high { result.append(range.lowerBound + low - offset..<range.lowerBound + high - offset) }
            offset += range.count
        }
        return result
    }
}
