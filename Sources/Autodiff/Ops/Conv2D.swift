/// 2-D convolution (cross-correlation, as in PyTorch) by im2col and one sgemm per image.
extension Tensor {
    /// Convolves `self` `[n, c, h, w]` with `weight` `[o, c, kh, kw]`, adds `bias` `[o]`, and gives
    /// `[n, o, (h + 2p - kh) / s + 1, (w + 2p - kw) / s + 1]`.
    public func conv2d(weight: Tensor, bias: Tensor?, stride: Int = 1, padding: Int = 0) -> Tensor {
        let x = self
        precondition(
            x.rank == 4 && weight.rank == 4 && x.shape[1] == weight.shape[1],
            "conv2d: input \(x.shape) does not fit weight \(weight.shape) (expected [n, \(weight.shape.count > 1 ? weight.shape[1] : 0), h, w])")
        precondition(stride >= 1 && padding >= 0, "conv2d: stride \(stride) and padding \(padding) must be >= 1 and >= 0")
        let geometry = ConvGeometry(
            channels: x.shape[1], height: x.shape[2], width: x.shape[3],
            kernelHeight: weight.shape[2], kernelWidth: weight.shape[3], stride: stride, padding: padding)
        precondition(
            geometry.outHeight > 0 && geometry.outWidth > 0,
            "conv2d: kernel \(weight.shape) larger than padded input \(x.shape)")
        let n = x.shape[0], filters = weight.shape[0]
        if let bias { precondition(bias.shape == [filters], "conv2d: bias \(bias.shape) does not fit weight \(weight.shape)") }
        let plane = geometry.outHeight * geometry.outWidth, patch = geometry.patchSize
        let imageSize = geometry.channels * geometry.height * geometry.width
        let out = Tensor(uninitializedShape: [n, filters, geometry.outHeight, geometry.outWidth])
        let cols = BufferPool.shared.take(patch * plane)
        defer { BufferPool.shared.give(cols, count: patch * plane) }
        for i in 0..<n {
            geometry.im2col(x.storage.pointer + i * imageSize, cols)
            let y = out.storage.pointer + i * filters * plane
            if let bias {
                for f in 0..<filters { (y + f * plane).update(repeating: bias.storage.pointer[f], count: plane) }
            }
            sgemm(weight.storage.pointer, transposeA: false, cols, transposeB: false, y,
                  m: filters, n: plane, k: patch, beta: bias == nil ? 0 : 1)
        }
        out.record(bias.map { [x, weight, $0] } ?? [x, weight]) { g in
            let cols = BufferPool.shared.take(patch * plane)
            defer { BufferPool.shared.give(cols, count: patch * plane) }
            for i in 0..<n {
                let gi = g.storage.pointer + i * filters * plane
                if weight.requiresGrad {
                    geometry.im2col(x.storage.pointer + i * imageSize, cols)
                    weight.accumulateGrad { dw, fresh in  // dW += dY_i · colsᵀ
                        sgemm(gi, transposeA: false, cols, transposeB: true, dw,
                              m: filters, n: patch, k: plane, beta: fresh ? 0 : 1)
                    }
                }
                bias?.accumulateGrad { db, fresh in
                    if fresh { db.update(repeating: 0, count: filters) }
                    for f in 0..<filters { for p in 0..<plane { db[f] += gi[f * plane + p] } }
                }
                if x.requiresGrad {  // dcols = Wᵀ · dY_i, then col2im into dx
                    sgemm(weight.storage.pointer, transposeA: true, gi, transposeB: false, cols,
                          m: patch, n: plane, k: filters)
                    x.accumulateGrad { dx, fresh in
                        if fresh { dx.update(repeating: 0, count: x.count) }
                        geometry.col2imAdding(cols, dx + i * imageSize)
                    }
                }
            }
        }
        return out
    }
}

/// Sizes of one convolution and the im2col transforms between an image and its patch matrix.
struct ConvGeometry {
    let channels, height, width, kernelHeight, kernelWidth, stride, padding: Int
    var outHeight: Int { (height + 2 * padding - kernelHeight) / stride + 1 }
    var outWidth: Int { (width + 2 * padding - kernelWidth) / stride + 1 }
    var patchSize: Int { channels * kernelHeight * kernelWidth }

    /// Calls `body(row, column, pixel)` for every cell of the patch matrix; `pixel` is -1 in the padding.
    @inline(__always)
    private func forEachCell(_ body: (Int, Int, Int) -> Void) {
        let oh = outHeight, ow = outWidth
        for c in 0..<channels {
            for ky in 0..<kernelHeight {
                for kx in 0..<kernelWidth {
                    let row = (c * kernelHeight + ky) * kernelWidth + kx
                    for oy in 0..<oh {
                        let iy = oy * stride - padding + ky
                        for ox in 0..<ow {
                            let ix = ox * stride - padding + kx
                            let inside = iy >= 0 && iy < height && ix >= 0 && ix < width
                            body(row, oy * ow + ox, inside ? (c * height + iy) * width + ix : -1)
                        }
                    }
                }
            }
        }
    }

    func im2col(_ image: UnsafePointer<Float>, _ cols: UnsafeMutablePointer<Float>) {
        let plane = outHeight * outWidth
        forEachCell { row, col, pixel in cols[row * plane + col] = pixel >= 0 ? image[pixel] : 0 }
    }

    func col2imAdding(_ cols: UnsafePointer<Float>, _ image: UnsafeMutablePointer<Float>) {
        let plane = outHeight * outWidth
        forEachCell { row, col, pixel in if pixel >= 0 { image[pixel] += cols[row * plane + col] } }
    }
}
