/// Matrix products through `cblas_sgemm`: of 2-D tensors, and batched over leading dimensions (one
/// sgemm per matrix of the batch). Transposed operands are read in place, never copied.
extension Tensor {
    /// `op(self) · op(other)` where `op` transposes the last two dimensions when asked. Shapes: `op(self)`
    /// is `[..., m, k]` and `op(other)` is `[..., k, n]`; the leading dimensions (the batch) must be equal,
    /// or `other` is 2-D and multiplies every matrix of `self` (as `x · W` for `x` of shape `[B, T, k]`).
    /// The result is `[..., m, n]`.
    public func matmul(_ other: Tensor, transposeSelf: Bool = false, transposeOther: Bool = false) -> Tensor {
        let a = self, b = other
        precondition(a.rank >= 2 && b.rank >= 2, "matmul: needs tensors of 2 or more dimensions, got \(a.shape) and \(b.shape)")
        let batchShape = Array(a.shape.dropLast(2))
        let sharesOther = b.rank == 2
        precondition(
            sharesOther || Array(b.shape.dropLast(2)) == batchShape,
            "matmul: batch dimensions differ: \(a.shape) · \(b.shape)")
        let (rowsA, colsA) = (a.shape[a.rank - 2], a.shape[a.rank - 1])
        let (rowsB, colsB) = (b.shape[b.rank - 2], b.shape[b.rank - 1])
        var (m, k) = transposeSelf ? (colsA, rowsA) : (rowsA, colsA)
        let (k2, n) = transposeOther ? (colsB, rowsB) : (rowsB, colsB)
        precondition(
            k == k2,
            "matmul: inner dimensions differ: \(a.shape)\(transposeSelf ? "ᵀ" : "") · \(b.shape)\(transposeOther ? "ᵀ" : "")")
        var batches = batchShape.reduce(1, *)
        if sharesOther && !transposeSelf {  // the batch's rows follow one another: one product of batches * m rows
            m *= batches
            batches = 1
        }
        let strideA = m * k, strideB = sharesOther ? 0 : k * n, strideC = m * n
        let out = Tensor(uninitializedShape: batchShape + [transposeSelf ? colsA : rowsA, n])
        let pa = a.storage.pointer, pb = b.storage.pointer, pc = out.storage.pointer
        for i in 0..<batches {
            sgemm(pa + i * strideA, transposeA: transposeSelf, pb + i * strideB, transposeB: transposeOther,
                  pc + i * strideC, m: m, n: n, k: k)
        }
        out.record([a, b]) { g in
            let gp = g.storage.pointer, pa = a.storage.pointer, pb = b.storage.pointer
            a.accumulateGrad { da, fresh in
                for i in 0..<batches {
                    let dai = da + i * strideA, bi = pb + i * strideB, gi = gp + i * strideC
                    if transposeSelf {  // dA (k x m) = op(B) · dCᵀ
                        sgemm(bi, transposeA: transposeOther, gi, transposeB: true, dai, m: k, n: m, k: n, beta: fresh ? 0 : 1)
                    } else {  // dA (m x k) = dC · op(B)ᵀ
                        sgemm(gi, transposeA: false, bi, transposeB: !transposeOther, dai, m: m, n: k, k: n, beta: fresh ? 0 : 1)
                    }
                }
            }
            b.accumulateGrad { db, fresh in
                for i in 0..<batches {
                    // A shared `other` sums the batch's contributions into one gradient.
                    let dbi = db + i * strideB, ai = pa + i * strideA, gi = gp + i * strideC
                    let beta: Float = fresh && (i == 0 || !sharesOther) ? 0 : 1
                    if transposeOther {  // dB (n x k) = dCᵀ · op(A)
                        sgemm(gi, transposeA: true, ai, transposeB: transposeSelf, dbi, m: n, n: k, k: m, beta: beta)
                    } else {  // dB (k x n) = op(A)ᵀ · dC
                        sgemm(ai, transposeA: !transposeSelf, gi, transposeB: false, dbi, m: k, n: n, k: m, beta: beta)
                    }
                }
            }
        }
        return out
    }
}
