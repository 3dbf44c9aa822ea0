/// Matrix product of 2-D tensors through `cblas_sgemm`; transposed operands are read in place.
extension Tensor {
    /// `op(self) · op(other)` where `op` transposes when asked. Shapes: `op(self)` is m x k and
    /// `op(other)` is k x n.
    public func matmul(_ other: Tensor, transposeSelf: Bool = false, transposeOther: Bool = false) -> Tensor {
        let a = self, b = other
        precondition(
            a.rank == 2 && b.rank == 2,
            "matmul: needs 2-D tensors, got \(a.shape) and \(b.shape)")
        let (m, k) = transposeSelf ? (a.shape[1], a.shape[0]) : (a.shape[0], a.shape[1])
        let (k2, n) = transposeOther ? (b.shape[1], b.shape[0]) : (b.shape[0], b.shape[1])
        precondition(
            k == k2,
            "matmul: inner dimensions differ: \(a.shape)\(transposeSelf ? "ᵀ" : "") · \(b.shape)\(transposeOther ? "ᵀ" : "")")
        let out = Tensor(uninitializedShape: [m, n])
        sgemm(a.storage.pointer, transposeA: transposeSelf, b.storage.pointer, transposeB: transposeOther,
              out.storage.pointer, m: m, n: n, k: k)
        out.record([a, b]) { g in
            let gp = g.storage.pointer
            a.accumulateGrad { da, fresh in
                if transposeSelf {  // dA (k x m) = op(B) · dCᵀ
                    sgemm(b.storage.pointer, transposeA: transposeOther, gp, transposeB: true,
                          da, m: k, n: m, k: n, beta: fresh ? 0 : 1)
                } else {  // dA (m x k) = dC · op(B)ᵀ
                    sgemm(gp, transposeA: false, b.storage.pointer, transposeB: !transposeOther,
                          da, m: m, n: k, k: n, beta: fresh ? 0 : 1)
                }
            }
            b.accumulateGrad { db, fresh in
                if transposeOther {  // dB (n x k) = dCᵀ · op(A)
                    sgemm(gp, transposeA: true, a.storage.pointer, transposeB: transposeSelf,
                          db, m: n, n: k, k: m, beta: fresh ? 0 : 1)
                } else {  // dB (k x n) = op(A)ᵀ · dC
                    sgemm(a.storage.pointer, transposeA: !transposeSelf, gp, transposeB: false,
                          db, m: k, n: n, k: m, beta: fresh ? 0 : 1)
                }
            }
        }
        return out
    }
}
