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
        let out = Tensor(uninitializedShape: shape)
        let slope = Tensor(uninitializedShape: shape)  // the derivative at each element, made in the same pass
        let x = storage.pointer, y = out.storage.pointer, d = slope.storage.pointer
        let lanes = SIMD8<Float>.scalarCount, whole = count / lanes * lanes
        for i in stride(from: 0, to: whole, by: lanes) {
            let (value, derivative) = Self.geluAndDerivative(UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self))
            UnsafeMutableRawPointer(y + i).storeBytes(of: value, as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(d + i).storeBytes(of: derivative, as: SIMD8<Float>.self)
        }
        if whole < count {
            var rest = SIMD8<Float>(repeating: 0)
            for j in whole..<count { rest[j - whole] = x[j] }
            let (value, derivative) = Self.geluAndDerivative(rest)
            for j in whole..<count { y[j] = value[j - whole]; d[j] = derivative[j - whole] }
        }
        out.record([self]) { g in
            let gp = g.storage.pointer, d = slope.storage.pointer
            self.accumulateGrad { dx, fresh in
                if fresh { for i in 0..<self.count { dx[i] = gp[i] * d[i] } } else { for i in 0..<self.count { dx[i] += gp[i] * d[i] } }
            }
        }
        return out
    }

    /// `x Phi(x)` and its derivative `Phi(x) + x phi(x)` for eight values at once. Phi comes from erf by
    /// Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7), whose `e^(-x^2/2)` is also phi's.
    @inline(__always)
    static func geluAndDerivative(_ x: SIMD8<Float>) -> (value: SIMD8<Float>, derivative: SIMD8<Float>) {
        let z = x.replacing(with: -x, where: x .< 0) * 0.707_106_77
        let t = 1 / (1 + 0.327_591_1 * z)
        var poly = SIMD8<Float>(repeating: 1.061_405_429)
        poly = poly * t - 1.453_152_027
        poly = poly * t + 1.421_413_741
        poly = poly * t - 0.284_496_736
        poly = poly * t + 0.254_829_592
        let gaussian = Self.exponential(SIMD8<Float>(repeating: 0) - z * z)  // e^(-x^2/2)
        let erfAbs = 1 - poly * t * gaussian
        let erf = erfAbs.replacing(with: -erfAbs, where: x .< 0)
        let cdf = 0.5 * (1 + erf)
        return (x * cdf, cdf + x * 0.398_942_28 * gaussian)
    }

    /// `e^x` for eight values (x <= 0 here): `2^n · p(r)` with `x = n ln 2 + r`, `|r| <= ln 2 / 2`, and a
    /// degree-6 polynomial for `e^r` (relative error about 2e-7); 0 below -87.
    @inline(__always)
    static func exponential(_ x: SIMD8<Float>) -> SIMD8<Float> {
        let clamped = x.replacing(with: -87, where: x .< -87)
        // Adding 1.5 * 2^23 rounds to an integer that lands in the low bits of the sum's representation.
        let shifted = clamped * 1.442_695_04 + 12_582_912
        let n = shifted - 12_582_912
        let r = clamped - n * 0.693_359_375 + n * 2.121_944_4e-4
        var p = SIMD8<Float>(repeating: 1.0 / 720)
        p = p * r + 1.0 / 120
        p = p * r + 1.0 / 24
        p = p * r + 1.0 / 6
        p = p * r + 0.5
        p = p * r + 1
        p = p * r + 1
        let bits = (unsafeBitCast(shifted, to: SIMD8<Int32>.self) &- 0x4B40_0000 &+ 127) &<< 23
        let scale = unsafeBitCast(bits, to: SIMD8<Float>.self)
        return (p * scale).replacing(with: 0, where: x .< -87)
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
