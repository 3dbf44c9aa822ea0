/// Which coordinator shard owns each parameter: whole tensors, largest first, each to the shard with
/// the fewest elements so far (the lowest index on a tie). Every process computes the same plan from
/// the model's parameter sizes, so it never travels.
public struct ShardPlan: Equatable, Sendable {
    /// The owning shard of each parameter, in parameter order.
    public let owner: [Int]
    public let shards: Int

    public init(elementCounts: [Int], shards: Int) {
        precondition(shards >= 1)
        var load = [Int](repeating: 0, count: shards)
        var owner = [Int](repeating: 0, count: elementCounts.count)
        let order = elementCounts.indices.sorted { (elementCounts[$0], $1) > (elementCounts[$1], $0) }
        for index in order {
            let shard = load.indices.min { (load[$0], $0) < (load[$1], $1) }!
            owner[index] = shard
            load[shard] += elementCounts[index]
        }
        self.owner = owner
        self.shards = shards
    }

    /// The parameter indices shard `shard` owns, in parameter order.
    public func indices(of shard: Int) -> [Int] { owner.indices.filter { owner[$0] == shard } }
}
