/// The outcome of comparing back-propagated gradients with central finite differences.
public struct GradientCheckReport: Sendable {
    /// The largest `|analytic - numeric| / max(|analytic|, |numeric|, floor)` over all elements.
    public let worstRelativeError: Float
    /// Which tensor (index into the list checked) and element gave the worst error.
    public let worstTensor: Int
    public let worstElement: Int
    /// The two gradients at the worst element.
    public let analytic: Float
    public let numeric: Float
    /// How many elements were compared.
    public let elementsChecked: Int
}

/// Checks the gradients of `loss()` with respect to `tensors` against central finite differences
/// ("nudge w_i by ±epsilon and watch the loss"): `(L(w + e) - L(w - e)) / 2e`.
///
/// `loss` must rebuild the computation from the tensors each time it is called. Relative errors use a
/// denominator of at least `floor` so that tiny gradients are judged by absolute error.
public func checkGradients(
    of tensors: [Tensor], epsilon: Float = 1e-2, floor: Float = 1e-2, loss: () -> Tensor
) throws -> GradientCheckReport {
    for (index, tensor) in tensors.enumerated() where !tensor.requiresGrad {
        throw AutodiffError.tensorDoesNotRequireGradient(index: index, shape: tensor.shape)
    }
    for t in tensors { t.zeroGrad() }
    try loss().backward()
    let analytic = tensors.map { $0.grad?.scalars ?? Array(repeating: 0, count: $0.count) }
    for t in tensors { t.zeroGrad() }

    var worst: (error: Float, tensor: Int, element: Int, analytic: Float, numeric: Float) = (0, 0, 0, 0, 0)
    var checked = 0
    try GradMode.withoutGradients {
        for (t, tensor) in tensors.enumerated() {
            let w = tensor.storage.pointer
            for i in 0..<tensor.count {
                let original = w[i]
                w[i] = original + epsilon
                let up = Double(loss().item)
                w[i] = original - epsilon
                let down = Double(loss().item)
                w[i] = original
                let numeric = Float((up - down) / (2 * Double(epsilon)))
                guard numeric.isFinite else {
                    throw AutodiffError.invalidArgument("gradient check: loss is not finite near tensor \(t) element \(i)")
                }
                let a = analytic[t][i]
                let error = abs(a - numeric) / max(abs(a), abs(numeric), floor)
                if error > worst.error || checked == 0 { worst = (error, t, i, a, numeric) }
                checked += 1
            }
        }
    }
    return GradientCheckReport(
        worstRelativeError: worst.error, worstTensor: worst.tensor, worstElement: worst.element,
        analytic: worst.analytic, numeric: worst.numeric, elementsChecked: checked)
}
