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

    /// Softmax cross-entropy of `logits` `[..., classes]` (each row of the last axis one prediction:
    /// `[batch, classes]`, or `[batch, time, vocabulary]` for a language model) against one integer label
    /// per row, averaged over the rows whose label is not `ignoreIndex` (PyTorch's `ignore_index`; 0 when
    /// every row is ignored). Fused: the backward is `(softmax - onehot) / rows`, stable for large logits.
    public static func softmaxCrossEntropy(_ logits: Tensor, labels: [Int32], ignoreIndex: Int32? = nil) -> Tensor {
        precondition(logits.rank >= 2, "softmaxCrossEntropy: logits need [..., classes], got \(logits.shape)")
        let classes = logits.shape[logits.rank - 1], rows = logits.count / Swift.max(classes, 1)
        precondition(rows == labels.count, "softmaxCrossEntropy: logits \(logits.shape) do not fit \(labels.count) labels")
        if let bad = labels.firstIndex(where: { ($0 < 0 || Int($0) >= classes) && $0 != ignoreIndex }) {
            preconditionFailure("softmaxCrossEntropy: label \(labels[bad]) of row \(bad) is outside 0..<\(classes)")
        }
        let counted = ignoreIndex.map { ignored in labels.reduce(0) { $0 + ($1 == ignored ? 0 : 1) } } ?? rows
        let probabilities = Tensor(uninitializedShape: logits.shape)
        let p = probabilities.storage.pointer
        Tensor.logSoftmaxRows(logits.storage.pointer, p, rows: rows, length: classes)
        var total: Double = 0
        for (r, label) in labels.enumerated() where label != ignoreIndex { total -= Double(p[r * classes + Int(label)]) }
        for i in 0..<logits.count { p[i] = expf(p[i]) }
        let out = Tensor(Float(total / Double(Swift.max(counted, 1))))
        out.record([logits]) { g in
            let p = probabilities.storage.pointer  // the closure keeps the probabilities alive until backward
            let scale = g.storage.pointer[0] / Float(Swift.max(counted, 1))
            logits.accumulateGrad { dx, fresh in
                for (r, label) in labels.enumerated() {
                    let row = r * classes
                    guard label != ignoreIndex else {
                        if fresh { (dx + row).update(repeating: 0, count: classes) }
                        continue
                    }
                    for j in 0..<classes {
                        let d = (p[row + j] - (j == Int(label) ? 1 : 0)) * scale
                        dx[row + j] = fresh ? d : dx[row + j] + d
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
