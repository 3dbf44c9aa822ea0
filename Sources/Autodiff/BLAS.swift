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
    let lda = transposeA ? m : k
    let ldb = transposeB ? k : n
    cblas_sgemm(
        CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
        Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(n))
}
