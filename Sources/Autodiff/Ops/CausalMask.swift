/// The causal mask of self-attention: a position attends to itself and to earlier positions only.
extension Tensor {
    /// This tensor of attention scores `[..., T, T]` (query position by key position) with every score
    /// of a later key (column > row) set to -infinity, so that a softmax over the last axis gives it no
    /// weight. The backward passes the gradient of the kept scores and none to the masked ones.
    public func causallyMasked() -> Tensor {
        precondition(rank >= 2 && shape[rank - 1] == shape[rank - 2],
                     "causal mask: needs square scores [..., T, T], got \(shape)")
        let length = shape[rank - 1], matrices = count / Swift.max(length * length, 1)
        let out = Tensor(uninitializedShape: shape)
        let x = storage.pointer, y = out.storage.pointer
        for m in 0..<matrices {
            for row in 0..<length {
                let o = (m * length + row) * length
                (y + o).update(from: x + o, count: row + 1)
                (y + o + row + 1).update(repeating: -.infinity, count: length - row - 1)
            }
        }
        out.record([self]) { g in
            let gp = g.storage.pointer
            self.accumulateGrad { dx, fresh in
                for m in 0..<matrices {
                    for row in 0..<length {
                        let o = (m * length + row) * length
                        if fresh {
                            (dx + o).update(from: gp + o, count: row + 1)
                            (dx + o + row + 1).update(repeating: 0, count: length - row - 1)
                        } else {
                            for j in 0...row { dx[o + j] += gp[o + j] }
                        }
                    }
                }
            }
        }
        return out
    }
}
