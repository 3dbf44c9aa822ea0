/// Which coordinator shard owns which elements of each parameter: the model's elements laid end to end
/// in parameter order and cut into `shards` equal spans (cuts on multiples of `alignment` elements into a tensor), so
/// that every shard averages, steps and sends about as many values however the model's sizes fall. A
/// tensor across a cut is split: each shard owns one contiguous slice of it. Every process computes the
/// same plan from the model's parameter sizes, so it never travels.
public struct ShardPlan: Equatable, Sendable {
    public let shards: Int
    /// `ranges[shard][parameter]`: the elements of the parameter the shard owns (empty when none).
    private let ranges: [[Range<Int>]]
    /// A cut falls this many elements (64 bytes of f32) apart from a tensor's start, so slices start cache-aligned.
    public static let alignment = 16

    public init(elementCounts: [Int], shards: Int) {
        precondition(shards >= 1)
        let total = elementCounts.reduce(0, +)
        let starts = elementCounts.reduce(into: [0]) { $0.append($0.last! + $1) }
        // Shard s owns flat elements cuts[s]..<cuts[s + 1]; a cut inside a tensor moves to the nearest
        // multiple of the alignment from that tensor's start (or its end).
        let cuts = (0...shards).map { s -> Int in
            let even = total * s / shards
            guard s > 0 && s < shards, let tensor = starts.indices.dropLast().last(where: { starts[$0] <= even }) else { return even }
            let offset = (even - starts[tensor] + Self.alignment / 2) / Self.alignment * Self.alignment
            return min(starts[tensor] + offset, starts[tensor + 1])
        }
        var ranges = [[Range<Int>]](repeating: [], count: shards)
        var start = 0
        for count in elementCounts {
            for s in 0..<shards {
                let lower = max(start, cuts[s]), upper = min(start + count, cuts[s + 1])
                ranges[s].append(lower < upper ? (lower - start)..<(upper - start) : 0..<0)
            }
            start += count
        }
        self.ranges = ranges
        self.shards = shards
    }

    /// The elements of parameter `index` that shard `shard` owns (empty when none).
    public func range(of index: Int, in shard: Int) -> Range<Int> { ranges[shard][index] }

    /// Shard `shard`'s elements of parameter `index` as a wire slice: nil when it owns the whole tensor.
    public func slice(of index: Int, in shard: Int) -> Range<Int>? { owners(of: index).count == 1 ? nil : ranges[shard][index] }

    /// The shards that own a part of parameter `index`, in shard order.
    public func owners(of index: Int) -> [Int] { (0..<shards).filter { !ranges[$0][index].isEmpty } }

    /// The parameter indices shard `shard` owns a part of, in parameter order.
    public func indices(of shard: Int) -> [Int] { ranges[shard].indices.filter { !ranges[shard][$0].isEmpty } }
}
