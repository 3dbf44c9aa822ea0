#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Element-wise functions. Each is one line pairing its forward `f(x)` with its derivative, written
/// in terms of the input `x` and the output `y = f(x)`.
extension Tensor {
    /// Applies `forward` to every element; the backward multiplies the output gradient by
    /// `derivative(x, y)`.
    func elementwise(
        forward: (Float) -> Float, derivative: @escaping (_ x: Float, _ y: Float) -> Float
    ) -> Tensor {
        let out = Tensor(uninitializedShape: shape)
        let x = storage.pointer, y = out.storage.pointer
        for i in 0..<count { y[i] = forward(x[i]) }
        out.record([self]) { [unowned out] g in
            let gp = g.storage.pointer, x = self.storage.pointer, y = out.storage.pointer
            self.accumulateGrad { dx, fresh in
                if fresh {
                    for i in 0..<self.count { dx[i] = gp[i] * derivative(x[i], y[i]) }
                } else {
                    for i in 0..<self.count { dx[i] += gp[i] * derivative(x[i], y[i]) }
                }
            }
        }
        return out
    }

    /// `-x`.
    public static prefix func - (x: Tensor) -> Tensor { x.elementwise(forward: { -$0 }, derivative: { _, _ in -1 }) }
    /// `factor * x` for a constant factor.
    public func scaled(by factor: Float) -> Tensor { elementwise(forward: { $0 * factor }, derivative: { _, _ in factor }) }
    /// `e^x`.
    public func exp() -> Tensor { elementwise(forward: { expf($0) }, derivative: { _, y in y }) }
    /// Natural logarithm.
    public func log() -> Tensor { elementwise(forward: { logf($0) }, derivative: { x, _ in 1 / x }) }
    /// Square root.
    public func sqrt() -> Tensor { elementwise(forward: { sqrtf($0) }, derivative: { _, y in 0.5 / y }) }
    /// `x^p` for a constant exponent.
    public func pow(_ p: Float) -> Tensor {
        elementwise(forward: { powf($0, p) }, derivative: { x, _ in p * powf(x, p - 1) })
    }
    /// `x^2`.
    public func squared() -> Tensor { elementwise(forward: { $0 * $0 }, derivative: { x, _ in 2 * x }) }
    /// `max(x, 0)`.
    public func relu() -> Tensor { elementwise(forward: { Swift.max($0, 0) }, derivative: { x, _ in x > 0 ? 1 : 0 }) }
    /// `x` for positive `x`, `slope * x` otherwise.
    public func leakyRelu(slope: Float = 0.01) -> Tensor {
        elementwise(forward: { $0 > 0 ? $0 : slope * $0 }, derivative: { x, _ in x > 0 ? 1 : slope })
    }
    /// `1 / (1 + e^-x)`.
    public func sigmoid() -> Tensor {
        elementwise(forward: { 1 / (1 + expf(-$0)) }, derivative: { _, y in y * (1 - y) })
    }
    /// Hyperbolic tangent.
    public func tanh() -> Tensor { elementwise(forward: { tanhf($0) }, derivative: { _, y in 1 - y * y }) }
    /// Gaussian error linear unit, exact form `x * Phi(x)` (as PyTorch's default).
    public func gelu() -> Tensor {
        elementwise(
            forward: { 0.5 * $0 * (1 + erff($0 * 0.707_106_77)) },
            derivative: { x, _ in 0.5 * (1 + erff(x * 0.707_106_77)) + x * 0.398_942_28 * expf(-0.5 * x * x) })
    }

    /// GELU in GPT-2's tanh form, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (PyTorch's
    /// `gelu(approximate="tanh")`).
    public func geluTanh() -> Tensor {
        elementwise(
            forward: { x in 0.5 * x * (1 + tanhf(0.797_884_56 * (x + 0.044_715 * x * x * x))) },
            derivative: { x, _ in
                let t = tanhf(0.797_884_56 * (x + 0.044_715 * x * x * x))
                return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.797_884_56 * (1 + 3 * 0.044_715 * x * x)
            })
    }
}
