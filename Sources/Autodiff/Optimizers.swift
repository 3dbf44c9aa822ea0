/// An optimizer updates parameters in place from their gradients. Its state (momentum buffers, moment
/// estimates, step count) is named after the parameters so that it can be checkpointed and restored.
public protocol Optimizer: AnyObject {
    /// The step size used by the next `step`; a schedule sets it before each step.
    var learningRate: Float { get set }
    /// How many updates have been applied.
    var stepCount: Int { get set }
    /// State tensors named `PARAMETER.SLOT` (for example `0.weight.momentum`), in a stable order.
    var state: [NamedParameter] { get }
    /// Replaces state tensors by name (from a checkpoint); unknown names are an error.
    func restoreState(_ tensors: [String: Tensor]) throws
    /// Starts one update: counts it and fixes its per-step constants. `update(_:range:)` then applies it.
    func beginStep()
    /// Applies the update begun by `beginStep()` to the elements `range` of `parameter`, from its
    /// gradient. An update may be applied in pieces (each element once), so that a caller can step a
    /// chunk while it is in cache.
    func update(_ parameter: NamedParameter, range: Range<Int>)
}

extension Optimizer {
    /// Applies one update to every parameter that has a gradient.
    public func step(_ parameters: [NamedParameter]) {
        beginStep()
        for p in parameters where p.tensor.grad != nil { update(p, range: 0..<p.tensor.count) }
    }
}

/// Per-parameter state slots shared by the optimizers.
public class OptimizerState {
    var slots: [String: Tensor] = [:]
    var slotOrder: [String] = []
    public var stepCount = 0

    /// The slot `name` of `parameter`, created as zeros on first use.
    func slot(_ name: String, for parameter: NamedParameter) -> UnsafeMutablePointer<Float> {
        let key = "\(parameter.name).\(name)"
        if let existing = slots[key] { return existing.storage.pointer }
        let created = Tensor.zeros(parameter.tensor.shape)
        slots[key] = created
        slotOrder.append(key)
        return created.storage.pointer
    }

    public var state: [NamedParameter] { slotOrder.map { NamedParameter(name: $0, tensor: slots[$0]!) } }

    public func restoreState(_ tensors: [String: Tensor]) throws {
        for (key, tensor) in tensors.sorted(by: { $0.key < $1.key }) {
            if slots[key] == nil { slotOrder.append(key) }
            slots[key] = tensor.detached()
        }
    }

    static func check(_ condition: Bool, _ message: @autoclosure () -> String) throws {
        if !condition { throw AutodiffError.invalidArgument(message()) }
    }
}

/// Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay, as in
/// PyTorch's `torch.optim.SGD` (Sutskever et al. 2013 for the momentum form).
public final class SGD: OptimizerState, Optimizer {
    public var learningRate: Float
    public let momentum: Float
    public let nesterov: Bool
    public let weightDecay: Float

    public init(learningRate: Float, momentum: Float = 0, nesterov: Bool = false, weightDecay: Float = 0) throws {
        try Self.check(learningRate > 0 && learningRate.isFinite, "SGD: learning rate \(learningRate) must be positive")
        try Self.check(momentum >= 0 && momentum < 1, "SGD: momentum \(momentum) must be in [0, 1)")
        try Self.check(!nesterov || momentum > 0, "SGD: Nesterov momentum needs momentum > 0")
        try Self.check(weightDecay >= 0, "SGD: weight decay \(weightDecay) must be >= 0")
        self.learningRate = learningRate
        self.momentum = momentum
        self.nesterov = nesterov
        self.weightDecay = weightDecay
    }

    public func beginStep() { stepCount += 1 }

    public func update(_ p: NamedParameter, range: Range<Int>) {
        guard let grad = p.tensor.grad else { return }
        let w = p.tensor.storage.pointer + range.lowerBound, g = grad.storage.pointer + range.lowerBound, n = range.count
        let lr = learningRate, mu = momentum, wd = weightDecay
        if mu == 0 {
            for i in 0..<n { w[i] -= lr * (g[i] + wd * w[i]) }
            return
        }
        // A new momentum buffer is zeros, so its first update is v = g (+ wd w), as in PyTorch.
        let v = slot("momentum", for: p) + range.lowerBound
        // The cases are separate loops so that each vectorises.
        if nesterov {
            for i in 0..<n { let d = g[i] + wd * w[i]; v[i] = mu * v[i] + d; w[i] -= lr * (d + mu * v[i]) }
        } else {
            for i in 0..<n { v[i] = mu * v[i] + g[i] + wd * w[i]; w[i] -= lr * v[i] }
        }
    }
}

/// Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019): with `decoupledWeightDecay` the
/// decay shrinks the weights directly instead of being added to the gradient.
public final class Adam: OptimizerState, Optimizer {
    public var learningRate: Float
    public let beta1: Float
    public let beta2: Float
    public let epsilon: Float
    public let weightDecay: Float
    public let decoupledWeightDecay: Bool

    public init(
        learningRate: Float = 1e-3, beta1: Float = 0.9, beta2: Float = 0.999, epsilon: Float = 1e-8,
        weightDecay: Float = 0, decoupledWeightDecay: Bool = false
    ) throws {
        try Self.check(learningRate > 0 && learningRate.isFinite, "Adam: learning rate \(learningRate) must be positive")
        try Self.check(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "Adam: betas (\(beta1), \(beta2)) must be in [0, 1)")
        try Self.check(epsilon > 0, "Adam: epsilon \(epsilon) must be positive")
        try Self.check(weightDecay >= 0, "Adam: weight decay \(weightDecay) must be >= 0")
        self.learningRate = learningRate
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self.weightDecay = weightDecay
        self.decoupledWeightDecay = decoupledWeightDecay
    }

    /// AdamW with PyTorch's default decay of 0.01.
    public static func adamW(learningRate: Float = 1e-3, weightDecay: Float = 0.01) throws -> Adam {
        try Adam(learningRate: learningRate, weightDecay: weightDecay, decoupledWeightDecay: true)
    }

    private var corrections: (first: Float, second: Float) = (1, 1)

    public func beginStep() {
        stepCount += 1
        corrections = (1 - powf(beta1, Float(stepCount)), 1 - powf(beta2, Float(stepCount)))
    }

    public func update(_ p: NamedParameter, range: Range<Int>) {
        guard let grad = p.tensor.grad else { return }
        let offset = range.lowerBound, n = range.count
        let w = p.tensor.storage.pointer + offset, g = grad.storage.pointer + offset
        let m = slot("exp_avg", for: p) + offset, v = slot("exp_avg_sq", for: p) + offset
        let lr = learningRate, b1 = beta1, b2 = beta2, wd = weightDecay, eps = epsilon
        let (correction1, correction2) = corrections
        for i in 0..<n {
            var d = g[i]
            if decoupledWeightDecay { w[i] -= lr * wd * w[i] } else { d += wd * w[i] }
            m[i] = b1 * m[i] + (1 - b1) * d
            v[i] = b2 * v[i] + (1 - b2) * d * d
            w[i] -= lr * (m[i] / correction1) / ((v[i] / correction2).squareRoot() + eps)
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The factor that brings gradients of global L2 norm `norm` down to `maxNorm`, or nil when they are
/// within it (as `clipGradientNorm` scales).
public func clipScale(norm: Float, maxNorm: Float) -> Float? {
    norm > maxNorm && norm > 0 ? maxNorm / (norm + 1e-6) : nil
}

/// Scales all gradients down together so that their global L2 norm is at most `maxNorm`; returns
/// the norm before clipping.
@discardableResult
public func clipGradientNorm(_ parameters: [NamedParameter], maxNorm: Float) -> Float {
    var total: Double = 0
    for p in parameters {
        guard let g = p.tensor.grad else { continue }
        g.withUnsafeBufferPointer { for x in $0 { total += Double(x) * Double(x) } }
    }
    let norm = Float(total.squareRoot())
    if let scale = clipScale(norm: norm, maxNorm: maxNorm) {
        for p in parameters { p.tensor.grad?.withUnsafeMutableBufferPointer { for i in $0.indices { $0[i] *= scale } } }
    }
    return norm
}
