/// The fused affine map of a dense layer, `x · Wᵀ + b`, with `W` stored `[out, in]` as in PyTorch.
/// One sgemm forward, two backward, and the bias folded into the product's accumulator.
extension Tensor {
    /// `self · weightᵀ + bias` for `self` of shape `[..., in]` (`[batch, in]`, or `[batch, time, in]`:
    /// every row of the last axis), `weight` `[out, in]`, `bias` `[out]`; the result is `[..., out]`.
    public func linear(weight: Tensor, bias: Tensor?) -> Tensor {
        let x = self
        precondition(
            x.rank >= 2 && weight.rank == 2 && x.shape[x.rank - 1] == weight.shape[1],
            "linear: input \(x.shape) does not fit weight \(weight.shape) (expected [batch, \(weight.shape.last ?? 0)])")
        let inputs = weight.shape[1], outputs = weight.shape[0], batch = x.count / Swift.max(inputs, 1)
        if let bias {
            precondition(bias.shape == [outputs], "linear: bias \(bias.shape) does not fit weight \(weight.shape)")
        }
        let out = Tensor(uninitializedShape: x.shape.dropLast() + [outputs])
        let y = out.storage.pointer
        if let bias {
            for r in 0..<batch { (y + r * outputs).update(from: bias.storage.pointer, count: outputs) }
        }
        sgemm(x.storage.pointer, transposeA: false, weight.storage.pointer, transposeB: true,
              y, m: batch, n: outputs, k: inputs, beta: bias == nil ? 0 : 1)
        out.record(bias.map { [x, weight, $0] } ?? [x, weight]) { g in
            let gp = g.storage.pointer
            x.accumulateGrad { dx, fresh in  // dX = dY · W
                sgemm(gp, transposeA: false, weight.storage.pointer, transposeB: false,
                      dx, m: batch, n: inputs, k: outputs, beta: fresh ? 0 : 1)
            }
            weight.accumulateGrad { dw, fresh in  // dW = dYᵀ · X
                sgemm(gp, transposeA: true, x.storage.pointer, transposeB: false,
                      dw, m: outputs, n: inputs, k: batch, beta: fresh ? 0 : 1)
            }
            bias?.accumulateGrad { db, fresh in  // db = column sums of dY
                if fresh { db.update(from: gp, count: outputs) } else { for j in 0..<outputs { db[j] += gp[j] } }
                for r in 1..<Swift.max(batch, 1) {
                    let row = gp + r * outputs
                    for j in 0..<outputs { db[j] += row[j] }
                }
            }
        }
        return out
    }
}
