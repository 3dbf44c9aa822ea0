import Autodiff
import Foundation

/// Data sets that need no file: the bundled digits and a seeded synthetic generator.
public enum BundledData {
    /// The 1,797 handwritten 8x8 digits (UCI "Optical Recognition of Handwritten Digits", CC BY 4.0),
    /// features scaled to [0, 1] (`scaled: false`: as the file has them, 0 to 16).
    public static func digits(scaled: Bool = true) throws -> Dataset {
        guard let url = Bundle.module.url(forResource: "digits", withExtension: "csv") else {
            throw DataError.fileNotFound("digits.csv in the DDPData resource bundle")
        }
        let raw = try DataReader.csv(path: url.path)
        return scaled ? raw.scaledToUnitRange() : raw
    }

    /// A synthetic regression set: Gaussian inputs, targets `x · w + 0.5 + 0.1 · noise` for a seeded `w`.
    public static func syntheticRegression(samples: Int, features: Int, seed: UInt64) throws -> Dataset {
        guard samples > 0, features > 0 else { throw DataError.invalidOption("synthetic data needs samples > 0 and features > 0") }
        var generator = SeededGenerator(seed: seed)
        let weights = (0..<features).map { _ in generator.nextNormal() }
        var values = [Float](repeating: 0, count: samples * features)
        var targets = [Float](repeating: 0, count: samples)
        for s in 0..<samples {
            var y: Float = 0.5
            for f in 0..<features {
                let x = generator.nextNormal()
                values[s * features + f] = x
                y += x * weights[f]
            }
            targets[s] = y + 0.1 * generator.nextNormal()
        }
        return try Dataset(name: "synthetic regression(\(samples)x\(features), seed \(seed))", featureShape: [features],
                           features: values, targets: targets)
    }

    /// A learnable synthetic classification set: Gaussian inputs labelled by a random linear teacher
    /// (argmax of `x · T`), the same for the same seed.
    public static func synthetic(samples: Int, features: Int, classes: Int, seed: UInt64) throws -> Dataset {
        guard samples > 0, features > 0, classes > 1 else {
            throw DataError.invalidOption("synthetic data needs samples > 0, features > 0 and classes > 1")
        }
        var generator = SeededGenerator(seed: seed)
        let teacher = Tensor(shape: [features, classes], values: (0..<features * classes).map { _ in generator.nextNormal() })
        let inputs = Tensor(shape: [samples, features], values: (0..<samples * features).map { _ in generator.nextNormal() })
        let scores = Tensor.zeros([samples, classes])
        BLAS.multiply(inputs, teacher, into: scores)  // one sgemm: the 60000x784 set labels in milliseconds
        let values = inputs.scalars, allScores = scores.scalars
        let labels = (0..<samples).map { s in
            Int32((0..<classes).max { allScores[s * classes + $0] < allScores[s * classes + $1] }!)
        }
        return try Dataset(
            name: "synthetic(\(samples)x\(features), \(classes) classes, seed \(seed))", featureShape: [features],
            features: values, labels: labels, classCount: classes)
    }
}
