import Foundation

/// How a job's held-out score reads: loss and accuracy for classification; mean squared error and R²
/// (not an accuracy) for regression.
public enum ScoreText {
    /// "test loss 0.1234, test accuracy 97.21%" or "test MSE 0.0123, test R² 0.9876".
    /// A job of a user's program (task `program`) has no held-out split at the coordinator: it says so.
    public static func test(loss: Float, accuracy: Float, regression: Bool, program: Bool = false, separator: String = ", ") -> String {
        program ? "no held-out split (a program's data stays with its workers)" : regression ? "test MSE \(fixed(loss))\(separator)test R² \(fixed(accuracy))"
            : "test loss \(fixed(loss))\(separator)test accuracy \(percent(accuracy))"
    }

    /// "5120 samples/s", or for a language model (`tokensPerSample` > 0) "81920 tokens/s".
    public static func throughput(_ samplesPerSecond: Double, tokensPerSample: Int = 0) -> String {
        tokensPerSample > 0 ? String(format: "%.0f tokens/s", samplesPerSecond * Double(tokensPerSample))
            : String(format: "%.0f samples/s", samplesPerSecond)
    }

    /// Four decimals, or the word for a value that is not a number.
    public static func fixed(_ value: Float) -> String { value.isFinite ? String(format: "%.4f", value) : "\(value)" }

    /// A fraction as a percentage with two decimals.
    public static func percent(_ value: Float) -> String { value.isFinite ? String(format: "%.2f%%", value * 100) : "\(value)" }
}
