/// Layer normalisation over the last axis (per row), with a learned scale and shift of that width.
extension Tensor {
    /// `(x - mean) / sqrt(variance + epsilon) * weight + bias` over the last axis of this tensor, the
    /// variance biased (as PyTorch's `LayerNorm`); `weight` and `bias` have the last axis's size.
    public func layerNormalized(weight: Tensor, bias: Tensor, epsilon: Float = 1e-5) -> Tensor {
        let width = shape.last ?? 1
        precondition(rank >= 1 && weight.count == width && bias.count == width,
                     "layer norm: weight and bias must have the last axis's size \(width), got \(weight.shape) and \(bias.shape)")
        let rows = count / Swift.max(width, 1)
        let normalized = Tensor(uninitializedShape: shape), out = Tensor(uninitializedShape: shape)
        let x = storage.pointer, xh = normalized.storage.pointer, y = out.storage.pointer
        let w = weight.storage.pointer, b = bias.storage.pointer
        var invStd = [Float](repeating: 0, count: rows)
        for r in 0..<rows {
            let row = x + r * width, xr = xh + r * width, yr = y + r * width
            let mean = Self.sum(row, width) / Float(width)
            for i in 0..<width { xr[i] = row[i] - mean }
            let inverse = 1 / (Self.dot(xr, xr, width) / Float(width) + epsilon).squareRoot()
            invStd[r] = inverse
            for i in 0..<width {
                xr[i] *= inverse
                yr[i] = xr[i] * w[i] + b[i]
            }
        }
        out.record([self, weight, bias]) { g in
            let gp = g.storage.pointer, xh = normalized.storage.pointer  // keeps the normalised values alive
            bias.accumulateGrad { db, fresh in
                if fresh { db.update(repeating: 0, count: width) }
                for r in 0..<rows { let gr = gp + r * width; for i in 0..<width { db[i] += gr[i] } }
            }
            weight.accumulateGrad { dw, fresh in
                if fresh { dw.update(repeating: 0, count: width) }
                for r in 0..<rows { let gr = gp + r * width, xr = xh + r * width; for i in 0..<width { dw[i] += gr[i] * xr[i] } }
            }
            self.accumulateGrad { dx, fresh in
                let scaled = BufferPool.shared.take(width)  // g * weight of one row
                defer { BufferPool.shared.give(scaled, count: width) }
                for r in 0..<rows {
                    let gr = gp + r * width, xr = xh + r * width, dr = dx + r * width
                    for i in 0..<width { scaled[i] = gr[i] * w[i] }
                    let meanG = Self.sum(scaled, width) / Float(width), meanGX = Self.dot(scaled, xr, width) / Float(width)
                    let inverse = invStd[r]
                    if fresh {
                        for i in 0..<width { dr[i] = inverse * (scaled[i] - meanG - xr[i] * meanGX) }
                    } else {
                        for i in 0..<width { dr[i] += inverse * (scaled[i] - meanG - xr[i] * meanGX) }
                    }
                }
            }
        }
        return out
    }

    /// The sum of `n` floats, in eight lanes.
    @inline(__always)
    static func sum(_ p: UnsafePointer<Float>, _ n: Int) -> Float {
        var lanes = SIMD8<Float>(repeating: 0)
        let whole = n / 8 * 8
        for i in stride(from: 0, to: whole, by: 8) { lanes += UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<Float>.self) }
        var total = lanes.sum()
        for i in whole..<n { total += p[i] }
        return total
    }

    /// The dot product of `n` floats, in eight lanes.
    @inline(__always)
    static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var lanes = SIMD8<Float>(repeating: 0)
        let whole = n / 8 * 8
        for i in stride(from: 0, to: whole, by: 8) {
            lanes += UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self) * UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)
        }
        var total = lanes.sum()
        for i in whole..<n { total += a[i] * b[i] }
        return total
    }
}
