#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The learning rate as a function of the step number (0-based).
public enum LearningRateSchedule: Equatable, Sendable {
    /// Always `base`.
    case constant
    /// `base * gamma^(step / every)`.
    case step(every: Int, gamma: Float)
    /// Cosine annealing from `base` to `minimum` over `totalSteps`, then `minimum`.
    case cosine(totalSteps: Int, minimum: Float)
    /// Ramps linearly from `base / warmupSteps` to `base` over `warmupSteps`, then follows `then`
    /// shifted by the warm-up.
    indirect case warmup(steps: Int, then: LearningRateSchedule)

    /// The rate at `step` for base rate `base`.
    public func rate(base: Float, at step: Int) -> Float {
        switch self {
        case .constant:
            return base
        case .step(let every, let gamma):
            return base * powf(gamma, Float(step / max(every, 1)))
        case .cosine(let total, let minimum):
            let progress = min(Float(step) / Float(max(total, 1)), 1)
            return minimum + (base - minimum) * 0.5 * (1 + cosf(Float.pi * progress))
        case .warmup(let steps, let then):
            if step < steps { return base * Float(step + 1) / Float(steps) }
            return then.rate(base: base, at: step - steps)
        }
    }
}
