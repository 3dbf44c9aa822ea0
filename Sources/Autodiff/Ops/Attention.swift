#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Multi-head causal self-attention as one op: `softmax(mask(Q Kᵀ / sqrt(d))) V` for every sequence and
/// head, reading queries, keys and values where the input projection wrote them and writing each head's
/// output into its columns of the result, so that no split, permute or mask is materialised. The same
/// as composing `slice`, `permuted`, `matmul`, `scaled`, `causallyMasked` and `softmax`, faster.
extension Tensor {
    /// Attention over `self`, the `[batch, time, 3 * width]` projection holding the queries, keys and
    /// values of `heads` heads side by side (as nanoGPT's `c_attn` output); returns `[batch, time, width]`.
    public func causalSelfAttention(heads: Int) -> Tensor {
        precondition(rank == 3 && heads > 0 && shape[2] % (3 * heads) == 0,
                     "attention: needs [batch, time, 3 * width] with width divisible by \(heads) heads, got \(shape)")
        let (batch, time, width) = (shape[0], shape[1], shape[2] / 3)
        let headWidth = width / heads, qkvStride = 3 * width
        let scale = 1 / Float(headWidth).squareRoot()
        let out = Tensor(uninitializedShape: [batch, time, width])
        // The attention weights of every sequence and head, kept for the backward.
        let weights = Tensor(uninitializedShape: [batch, heads, time, time])
        let qkv = storage.pointer, y = out.storage.pointer, p = weights.storage.pointer
        for b in 0..<batch {
            for h in 0..<heads {
                let q = qkv + b * time * qkvStride + h * headWidth, k = q + width, v = q + 2 * width
                let ph = p + (b * heads + h) * time * time
                sgemm(q, rowStride: qkvStride, transposeA: false, k, rowStride: qkvStride, transposeB: true,
                      ph, rowStride: time, m: time, n: time, k: headWidth, alpha: scale)
                Self.causalSoftmaxRows(ph, length: time)
                sgemm(ph, rowStride: time, transposeA: false, v, rowStride: qkvStride, transposeB: false,
                      y + b * time * width + h * headWidth, rowStride: width, m: time, n: headWidth, k: time)
            }
        }
        out.record([self]) { g in
            let gp = g.storage.pointer, qkv = self.storage.pointer, p = weights.storage.pointer
            let gradientOfWeights = BufferPool.shared.take(time * time)
            defer { BufferPool.shared.give(gradientOfWeights, count: time * time) }
            self.accumulateGrad { dqkv, fresh in
                let beta: Float = fresh ? 0 : 1  // every element of dqkv is written by exactly one head's products
                for b in 0..<batch {
                    for h in 0..<heads {
                        let offset = b * time * qkvStride + h * headWidth
                        let q = qkv + offset, k = q + width, v = q + 2 * width
                        let dq = dqkv + offset, dk = dq + width, dv = dq + 2 * width
                        let ph = p + (b * heads + h) * time * time, dy = gp + b * time * width + h * headWidth
                        let dp = gradientOfWeights
                        // dP = dY Vᵀ; dV = Pᵀ dY
                        sgemm(dy, rowStride: width, transposeA: false, v, rowStride: qkvStride, transposeB: true,
                              dp, rowStride: time, m: time, n: time, k: headWidth)
                        sgemm(ph, rowStride: time, transposeA: true, dy, rowStride: width, transposeB: false,
                              dv, rowStride: qkvStride, m: time, n: headWidth, k: time, beta: beta)
                        // dS = P ⊙ (dP - rowsum(dP ⊙ P)) / sqrt(d), zero above the diagonal
                        for row in 0..<time {
                            let pr = ph + row * time, dr = dp + row * time
                            var dot: Float = 0
                            for j in 0...row { dot += pr[j] * dr[j] }
                            for j in 0...row { dr[j] = pr[j] * (dr[j] - dot) * scale }
                            (dr + row + 1).update(repeating: 0, count: time - row - 1)
                        }
                        // dQ = dS K; dK = dSᵀ Q
                        sgemm(dp, rowStride: time, transposeA: false, k, rowStride: qkvStride, transposeB: false,
                              dq, rowStride: qkvStride, m: time, n: headWidth, k: time, beta: beta)
                        sgemm(dp, rowStride: time, transposeA: true, q, rowStride: qkvStride, transposeB: false,
                              dk, rowStride: qkvStride, m: time, n: headWidth, k: time, beta: beta)
                    }
                }
            }
        }
        return out
    }

    /// Softmax of each row of the `length x length` scores in place over its first `row + 1` entries
    /// (the causal part); the entries after them become 0.
    private static func causalSoftmaxRows(_ scores: UnsafeMutablePointer<Float>, length: Int) {
        for row in 0..<length {
            let r = scores + row * length
            var top = -Float.infinity
            for j in 0...row { top = Swift.max(top, r[j]) }
            var total: Float = 0
            for j in 0...row {
                r[j] = expf(r[j] - top)
                total += r[j]
            }
            let inverse = 1 / total
            for j in 0...row { r[j] *= inverse }
            (r + row + 1).update(repeating: 0, count: length - row - 1)
        }
    }
}
