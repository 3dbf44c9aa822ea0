/// Layer normalisation over the last axis (per row), with a learned scale and shift of that width.
extension Tensor {
    /// `(x - mean) / sqrt(variance + epsilon) * weight + bias` over the last axis of this tensor, the
    /// variance biased (as PyTorch's `LayerNorm`); `weight` and `bias` have the last axis's size.
    public func layerNormalized(weight: Tensor, bias: Tensor, epsilon: Float = 1e-5) -> Tensor {
        let width = shape.last ?? 1
        precondition(rank >= 1 && weight.count == width && bias.count == width,
                     "layer norm: weight and bias must have the last axis's size \(width), got \(weight.shape) and \(bias.shape)")
        let rows = count / Swift.max(width, 1)
        let x = storage.pointer
        let normalized = Tensor(uninitializedShape: shape), out = Tensor(uninitializedShape: shape)
        let xh = normalized.storage.pointer, y = out.storage.pointer, w = weight.storage.pointer, b = bias.storage.pointer
        var invStd = [Float](repeating: 0, count: rows)
        for r in 0..<rows {
            let row = x + r * width
            var sum: Double = 0
            for i in 0..<width { sum += Double(row[i]) }
            let mean = sum / Double(width)
            var squares: Double = 0
            for i in 0..<width { let d = Double(row[i]) - mean; squares += d * d }
            invStd[r] = Float(1 / (squares / Double(width) + Double(epsilon)).squareRoot())
            for i in 0..<width {
                xh[r * width + i] = (row[i] - Float(mean)) * invStd[r]
                y[r * width + i] = xh[r * width + i] * w[i] + b[i]
            }
        }
        out.record([self, weight, bias]) { g in
            let gp = g.storage.pointer, xh = normalized.storage.pointer  // keeps the normalised values alive
            bias.accumulateGrad { db, fresh in
                if fresh { db.update(repeating: 0, count: width) }
                for r in 0..<rows { for i in 0..<width { db[i] += gp[r * width + i] } }
            }
            weight.accumulateGrad { dw, fresh in
                if fresh { dw.update(repeating: 0, count: width) }
                for r in 0..<rows { for i in 0..<width { dw[i] += gp[r * width + i] * xh[r * width + i] } }
            }
            self.accumulateGrad { dx, fresh in
                for r in 0..<rows {
                    var meanG: Float = 0, meanGX: Float = 0
                    for i in 0..<width {
                        let gh = gp[r * width + i] * w[i]
                        meanG += gh
                        meanGX += gh * xh[r * width + i]
                    }
                    meanG /= Float(width)
                    meanGX /= Float(width)
                    for i in 0..<width {
                        let v = invStd[r] * (gp[r * width + i] * w[i] - meanG - xh[r * width + i] * meanGX)
                        dx[r * width + i] = (fresh ? 0 : dx[r * width + i]) + v
                    }
                }
            }
        }
        return out
    }
}
