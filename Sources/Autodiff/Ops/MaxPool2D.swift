/// 2-D max pooling over `[n, c, h, w]`; the gradient flows to each window's maximum.
extension Tensor {
    /// Max over `size x size` windows moved by `stride` (default: `size`).
    public func maxPool2d(size: Int, stride: Int? = nil) -> Tensor {
        let step = stride ?? size
        precondition(rank == 4, "maxPool2d: needs [n, c, h, w], got \(shape)")
        precondition(size >= 1 && step >= 1, "maxPool2d: size \(size) and stride \(step) must be >= 1")
        let planes = shape[0] * shape[1], h = shape[2], w = shape[3]
        precondition(h >= size && w >= size, "maxPool2d: window \(size) larger than input \(shape)")
        let oh = (h - size) / step + 1, ow = (w - size) / step + 1
        let out = Tensor(uninitializedShape: [shape[0], shape[1], oh, ow])
        var winners = [Int](repeating: 0, count: out.count)
        let x = storage.pointer, y = out.storage.pointer
        for p in 0..<planes {
            for oy in 0..<oh {
                for ox in 0..<ow {
                    var best = p * h * w + oy * step * w + ox * step
                    for ky in 0..<size {
                        for kx in 0..<size {
                            let j = p * h * w + (oy * step + ky) * w + ox * step + kx
                            if x[j] > x[best] { best = j }
                        }
                    }
                    let k = (p * oh + oy) * ow + ox
                    winners[k] = best
                    y[k] = x[best]
                }
            }
        }
        out.record([self]) { g in
            let gp = g.storage.pointer
            self.accumulateGrad { dx, fresh in
                if fresh { dx.update(repeating: 0, count: self.count) }
                for (k, j) in winners.enumerated() { dx[j] += gp[k] }
            }
        }
        return out
    }
}
