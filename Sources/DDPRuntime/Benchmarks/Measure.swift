import Foundation

/// Timing helpers shared by the benchmark commands.
enum Measure {
    /// Wall-clock seconds of `body`.
    static func seconds(_ body: () throws -> Void) rethrows -> Double {
        let start = DispatchTime.now().uptimeNanoseconds
        try body()
        return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    }

    /// Runs `operation` `warmup` times, then `repeats` blocks of enough iterations to last at least
    /// `minimumBlockSeconds`; returns the seconds per iteration of each block.
    static func perIteration(
        warmup: Int, repeats: Int, minimumBlockSeconds: Double, _ operation: () throws -> Void
    ) rethrows -> [Double] {
        for _ in 0..<warmup { try operation() }
        var iterations = 1
        while true {
            let t = try seconds { for _ in 0..<iterations { try operation() } }
            if t >= minimumBlockSeconds / 4 || iterations > 1 << 20 {
                iterations = max(1, Int(Double(iterations) * minimumBlockSeconds / max(t, 1e-9)))
                break
            }
            iterations *= 4
        }
        return try (0..<repeats).map { _ in
            try seconds { for _ in 0..<iterations { try operation() } } / Double(iterations)
        }
    }

    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        guard !sorted.isEmpty else { return .nan }
        return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
    }
}

/// One JSON object printed on one line, keys sorted, for benchmark and summary output.
public struct JSONLine {
    /// Encodes a flat dictionary of numbers, strings and booleans (and arrays of them).
    public static func encode(_ fields: [String: Any]) -> String {
        let data = try! JSONSerialization.data(withJSONObject: fields, options: [.sortedKeys, .fragmentsAllowed, .withoutEscapingSlashes])
        return String(decoding: data, as: UTF8.self)
    }
}
