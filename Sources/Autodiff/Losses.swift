#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Loss functions: each returns a scalar tensor averaged over the batch.
public enum Loss {
    /// `mean((prediction - target)^2)`.
    public static func meanSquaredError(_ prediction: Tensor, _ target: Tensor) -> Tensor {
        precondition(prediction.shape == target.shape,
                     "meanSquaredError: prediction \(prediction.shape) and target \(target.shape) differ")
        return (prediction - target).squared().mean()
    }

    /// `mean(1/2 (prediction - target)^2)`: the squared error whose derivative is `prediction - target`.
    public static func halfSquaredError(_ prediction: Tensor, _ target: Tensor) -> Tensor {
        meanSquaredError(prediction, target) * 0.5
    }

    /// Softmax cross-entropy of `logits` `[batch, classes]` against integer class labels, averaged over
    /// the batch. Fused: the backward is `(softmax - onehot) / batch`, stable for large logits.
    public static func softmaxCrossEntropy(_ logits: Tensor, labels: [Int32]) -> Tensor {
        precondition(logits.rank == 2 && logits.shape[0] == labels.count,
                     "softmaxCrossEntropy: logits \(logits.shape) do not fit \(labels.count) labels")
        let batch = logits.shape[0], classes = logits.shape[1]
        precondition(labels.allSatisfy { $0 >= 0 && Int($0) < classes },
                     "softmaxCrossEntropy: a label is outside 0..<\(classes)")
        let logProbabilities = BufferPool.shared.take(logits.count)
        Tensor.logSoftmaxRows(logits.storage.pointer, logProbabilities, rows: batch, length: classes)
        var total: Double = 0
        for (r, label) in labels.enumerated() { total -= Double(logProbabilities[r * classes + Int(label)]) }
        let out = Tensor(Float(total / Double(Swift.max(batch, 1))))
        let probabilities = Tensor(uninitializedShape: logits.shape)
        for i in 0..<logits.count { probabilities.storage.pointer[i] = expf(logProbabilities[i]) }
        BufferPool.shared.give(logProbabilities, count: logits.count)
        out.record([logits]) { g in
            let scale = g.storage.pointer[0] / Float(Swift.max(batch, 1))
            let p = probabilities.storage.pointer
            logits.accumulateGrad { dx, fresh in
                for r in 0..<batch {
                    for j in 0..<classes {
                        let target: Float = j == Int(labels[r]) ? 1 : 0
                        let d = (p[r * classes + j] - target) * scale
                        dx[r * classes + j] = fresh ? d : dx[r * classes + j] + d
                    }
                }
            }
        }
        return out
    }

    /// Binary cross-entropy of `logits` against targets in [0, 1] (same shape), averaged. Computed as
    /// `max(x, 0) - x t + log(1 + e^-|x|)`, which never overflows.
    public static func binaryCrossEntropyWithLogits(_ logits: Tensor, _ targets: Tensor) -> Tensor {
        precondition(logits.shape == targets.shape,
                     "binaryCrossEntropyWithLogits: logits \(logits.shape) and targets \(targets.shape) differ")
        let n = logits.count, x = logits.storage.pointer, t = targets.storage.pointer
        var total: Double = 0
        for i in 0..<n { total += Double(Swift.max(x[i], 0) - x[i] * t[i] + log1pf(expf(-abs(x[i])))) }
        let out = Tensor(Float(total / Double(Swift.max(n, 1))))
        out.record([logits, targets]) { g in
            let scale = g.storage.pointer[0] / Float(Swift.max(n, 1))
            logits.accumulateGrad { dx, fresh in
                for i in 0..<n {
                    let d = (1 / (1 + expf(-x[i])) - t[i]) * scale
                    dx[i] = fresh ? d : dx[i] + d
                }
            }
            targets.accumulateGrad { dt, fresh in
                for i in 0..<n { dt[i] = (fresh ? 0 : dt[i]) - x[i] * scale }
            }
        }
        return out
    }
}
