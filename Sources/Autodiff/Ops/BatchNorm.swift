/// Batch normalisation over axis 1 of `[n, c]` or `[n, c, h, w]` tensors (per channel, over the batch
/// and the spatial positions).
extension Tensor {
    /// (batch, channels, positions per channel) of a `[n, c, ...]` tensor.
    private func channelLayout(_ op: String, features: Int) -> (outer: Int, channels: Int, inner: Int) {
        precondition(rank >= 2 && shape[1] == features,
                     "\(op): expected [n, \(features)] or [n, \(features), h, w] inputs, got \(shape)")
        return (shape[0], shape[1], shape[2...].reduce(1, *))
    }

    /// Normalises each channel with this batch's mean and biased variance, then scales by `weight` and
    /// shifts by `bias` (both `[c]`). `updating` moves running statistics towards the batch's (the
    /// variance unbiased, as PyTorch does) without recording anything.
    public func batchNormalized(
        weight: Tensor, bias: Tensor, epsilon: Float, updating running: (mean: Tensor, variance: Tensor, momentum: Float)? = nil
    ) -> Tensor {
        let (outer, channels, inner) = channelLayout("batch norm", features: weight.count)
        let m = outer * inner
        precondition(m > 1, "batch norm: needs more than one value per channel in training, got shape \(shape)")
        let x = storage.pointer
        var mean = [Float](repeating: 0, count: channels), invStd = [Float](repeating: 0, count: channels)
        for c in 0..<channels {
            var sum: Double = 0
            for n in 0..<outer { let row = x + (n * channels + c) * inner; for i in 0..<inner { sum += Double(row[i]) } }
            let mu = sum / Double(m)
            var squares: Double = 0
            for n in 0..<outer {
                let row = x + (n * channels + c) * inner
                for i in 0..<inner { let d = Double(row[i]) - mu; squares += d * d }
            }
            mean[c] = Float(mu)
            invStd[c] = Float(1 / (squares / Double(m) + Double(epsilon)).squareRoot())
            if let running {
                let rm = running.mean.storage.pointer, rv = running.variance.storage.pointer
                rm[c] = (1 - running.momentum) * rm[c] + running.momentum * Float(mu)
                rv[c] = (1 - running.momentum) * rv[c] + running.momentum * Float(squares / Double(m - 1))
            }
        }
        let normalized = Tensor(uninitializedShape: shape)
        let out = Tensor(uninitializedShape: shape)
        let xh = normalized.storage.pointer, y = out.storage.pointer, w = weight.storage.pointer, b = bias.storage.pointer
        for n in 0..<outer {
            for c in 0..<channels {
                let base = (n * channels + c) * inner
                for i in 0..<inner {
                    xh[base + i] = (x[base + i] - mean[c]) * invStd[c]
                    y[base + i] = xh[base + i] * w[c] + b[c]
                }
            }
        }
        out.record([self, weight, bias]) { g in
            let gp = g.storage.pointer, xh = normalized.storage.pointer  // keeps the normalised values alive
            var sumG = [Double](repeating: 0, count: channels), sumGX = [Double](repeating: 0, count: channels)
            for n in 0..<outer {
                for c in 0..<channels {
                    let base = (n * channels + c) * inner
                    for i in 0..<inner { sumG[c] += Double(gp[base + i]); sumGX[c] += Double(gp[base + i] * xh[base + i]) }
                }
            }
            bias.accumulateGrad { db, fresh in for c in 0..<channels { db[c] = (fresh ? 0 : db[c]) + Float(sumG[c]) } }
            weight.accumulateGrad { dw, fresh in for c in 0..<channels { dw[c] = (fresh ? 0 : dw[c]) + Float(sumGX[c]) } }
            self.accumulateGrad { dx, fresh in
                for n in 0..<outer {
                    for c in 0..<channels {
                        let base = (n * channels + c) * inner
                        let scale = w[c] * invStd[c], meanG = Float(sumG[c] / Double(m)), meanGX = Float(sumGX[c] / Double(m))
                        for i in 0..<inner {
                            let v = scale * (gp[base + i] - meanG - xh[base + i] * meanGX)
                            dx[base + i] = (fresh ? 0 : dx[base + i]) + v
                        }
                    }
                }
            }
        }
        return out
    }

    /// `(x - mean) / sqrt(variance + epsilon) * weight + bias` per channel with fixed statistics (batch
    /// norm in evaluation); differentiable in `x`, `weight` and `bias`.
    public func channelAffine(mean: Tensor, variance: Tensor, weight: Tensor, bias: Tensor, epsilon: Float) -> Tensor {
        let (outer, channels, inner) = channelLayout("batch norm", features: weight.count)
        let mu = mean.storage.pointer, v = variance.storage.pointer, w = weight.storage.pointer, b = bias.storage.pointer
        let invStd = (0..<channels).map { 1 / (v[$0] + epsilon).squareRoot() }
        let x = storage.pointer
        let out = Tensor(uninitializedShape: shape)
        let y = out.storage.pointer
        for n in 0..<outer {
            for c in 0..<channels {
                let base = (n * channels + c) * inner
                for i in 0..<inner { y[base + i] = (x[base + i] - mu[c]) * invStd[c] * w[c] + b[c] }
            }
        }
        out.record([self, weight, bias]) { g in
            let gp = g.storage.pointer, mu = mean.storage.pointer
            bias.accumulateGrad { db, fresh in
                for c in 0..<channels {
                    var s: Float = 0
                    for n in 0..<outer { let base = (n * channels + c) * inner; for i in 0..<inner { s += gp[base + i] } }
                    db[c] = (fresh ? 0 : db[c]) + s
                }
            }
            weight.accumulateGrad { dw, fresh in
                for c in 0..<channels {
                    var s: Float = 0
                    for n in 0..<outer {
                        let base = (n * channels + c) * inner
                        for i in 0..<inner { s += gp[base + i] * (x[base + i] - mu[c]) * invStd[c] }
                    }
                    dw[c] = (fresh ? 0 : dw[c]) + s
                }
            }
            self.accumulateGrad { dx, fresh in
                for n in 0..<outer {
                    for c in 0..<channels {
                        let base = (n * channels + c) * inner
                        for i in 0..<inner { dx[base + i] = (fresh ? 0 : dx[base + i]) + gp[base + i] * invStd[c] * w[c] }
                    }
                }
            }
        }
        return out
    }
}
