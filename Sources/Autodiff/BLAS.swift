private import COpenBLAS

/// Settings of the BLAS library behind matrix products.
public enum BLAS {
    /// The number of threads OpenBLAS uses for one product. Set it to 1 when several processes
    /// share the cores (one worker per core), higher for one process on many cores.
    public static var threads: Int {
        get { Int(openblas_get_num_threads()) }
        set { openblas_set_num_threads(Int32(max(1, newValue))) }
    }
}

/// `C = alpha * op(A) * op(B) + beta * C` for row-major matrices; `m, n, k` are the sizes of
/// `op(A)` (m x k) and `op(B)` (k x n). Pointers are used only for the call.
@inline(__always)
func sgemm(
    _ a: UnsafePointer<Float>, transposeA: Bool, _ b: UnsafePointer<Float>, transposeB: Bool,
    _ c: UnsafeMutablePointer<Float>, m: Int, n: Int, k: Int, alpha: Float = 1, beta: Float = 0
) {
    sgemm(a, rowStride: transposeA ? m : k, transposeA: transposeA, b, rowStride: transposeB ? k : n, transposeB: transposeB,
          c, rowStride: n, m: m, n: n, k: k, alpha: alpha, beta: beta)
}

/// `sgemm` on matrices inside larger ones: each operand's rows lie `rowStride` floats apart (a head's
/// columns of a `[time, 3 * width]` projection, for example).
@inline(__always)
func sgemm(
    _ a: UnsafePointer<Float>, rowStride lda: Int, transposeA: Bool, _ b: UnsafePointer<Float>, rowStride ldb: Int, transposeB: Bool,
    _ c: UnsafeMutablePointer<Float>, rowStride ldc: Int, m: Int, n: Int, k: Int, alpha: Float = 1, beta: Float = 0
) {
    cblas_sgemm(
        CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
        Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
}

extension BLAS {
    /// `c = op(a) · op(b)` written into `c` without allocating; for benchmarks and runtime code that
    /// must not go through the tape.
    public static func multiply(_ a: Tensor, transposeA: Bool = false, _ b: Tensor, transposeB: Bool = false, into c: Tensor) {
        let m = transposeA ? a.shape[1] : a.shape[0], k = transposeA ? a.shape[0] : a.shape[1]
        let n = transposeB ? b.shape[0] : b.shape[1]
        precondition(c.shape == [m, n] && (transposeB ? b.shape[1] : b.shape[0]) == k,
                     "BLAS.multiply: \(a.shape) · \(b.shape) into \(c.shape)")
        sgemm(a.storage.pointer, transposeA: transposeA, b.storage.pointer, transposeB: transposeB,
              c.storage.pointer, m: m, n: n, k: k)
    }
}
