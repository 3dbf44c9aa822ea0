#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Softmax and log-softmax over the last axis, each with its fused, numerically stable backward.
extension Tensor {
    /// Rows of the last axis: (number of rows, row length).
    private var rows: (count: Int, length: Int) {
        precondition(rank >= 1, "softmax: needs at least one dimension, got a scalar")
        let length = shape[rank - 1]
        return (length == 0 ? 0 : count / length, length)
    }

    /// Writes `log(softmax(row))` of each row of `x` to `y`.
    static func logSoftmaxRows(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, length: Int) {
        for r in 0..<rows {
            let xr = x + r * length, yr = y + r * length
            var top = -Float.infinity
            for j in 0..<length { top = Swift.max(top, xr[j]) }
            var total: Float = 0
            for j in 0..<length { total += expf(xr[j] - top) }
            let logTotal = logf(total)  // subtracted after the shift: precise for large logits too
            for j in 0..<length { yr[j] = (xr[j] - top) - logTotal }
        }
    }

    /// `e^x / sum(e^x)` along the last axis.
    public func softmax() -> Tensor {
        let (rowCount, length) = rows
        let out = Tensor(uninitializedShape: shape)
        let y = out.storage.pointer
        Tensor.logSoftmaxRows(storage.pointer, y, rows: rowCount, length: length)
        for i in 0..<count { y[i] = expf(y[i]) }
        out.record([self]) { [unowned out] g in
            let gp = g.storage.pointer, y = out.storage.pointer
            self.accumulateGrad { dx, fresh in  // dx = y * (g - sum(g * y))
                for r in 0..<rowCount {
                    let o = r * length
                    var dot: Float = 0
                    for j in 0..<length { dot += gp[o + j] * y[o + j] }
                    for j in 0..<length { dx[o + j] = (fresh ? 0 : dx[o + j]) + y[o + j] * (gp[o + j] - dot) }
                }
            }
        }
        return out
    }

    /// `x - log(sum(e^x))` along the last axis.
    public func logSoftmax() -> Tensor {
        let (rowCount, length) = rows
        let out = Tensor(uninitializedShape: shape)
        Tensor.logSoftmaxRows(storage.pointer, out.storage.pointer, rows: rowCount, length: length)
        out.record([self]) { [unowned out] g in
            let gp = g.storage.pointer, y = out.storage.pointer
            self.accumulateGrad { dx, fresh in  // dx = g - softmax * sum(g)
                for r in 0..<rowCount {
                    let o = r * length
                    var total: Float = 0
                    for j in 0..<length { total += gp[o + j] }
                    for j in 0..<length { dx[o + j] = (fresh ? 0 : dx[o + j]) + gp[o + j] - expf(y[o + j]) * total }
                }
            }
        }
        return out
    }
}
