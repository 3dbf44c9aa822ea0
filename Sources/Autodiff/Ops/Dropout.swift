/// Inverted dropout: each element is zeroed with probability `p` and the rest scaled by `1 / (1 - p)`,
/// so evaluation needs no rescaling. The mask comes from a seeded generator: runs repeat exactly.
extension Tensor {
    /// Applies dropout with drop probability `p` in `[0, 1)`.
    public func dropout(_ p: Float, generator: inout SeededGenerator) -> Tensor {
        precondition(p >= 0 && p < 1, "dropout: probability \(p) must be in [0, 1)")
        let mask = [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            let keep = 1 / (1 - p)
            for i in 0..<count { buffer[i] = generator.nextUnit() < p ? 0 : keep }
            initialized = count
        }
        let out = Tensor(uninitializedShape: shape)
        for i in 0..<count { out.storage.pointer[i] = storage.pointer[i] * mask[i] }
        out.record([self]) { g in
            let gp = g.storage.pointer
            self.accumulateGrad { dx, fresh in
                for i in 0..<self.count { dx[i] = (fresh ? 0 : dx[i]) + gp[i] * mask[i] }
            }
        }
        return out
    }
}
