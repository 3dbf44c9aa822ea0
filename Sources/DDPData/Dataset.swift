import Autodiff

/// A labelled classification data set held in memory: `count` samples of `featureShape` floats each,
/// row-major, with a class label per sample.
public struct Dataset: Sendable {
    /// Where the data came from (a path or a generator's name), for messages.
    public let name: String
    /// The shape of one sample, e.g. `[64]` or `[1, 8, 8]`.
    public private(set) var featureShape: [Int]
    /// All samples' features, one after another.
    public private(set) var features: [Float]
    /// Class labels in `0..<classCount`.
    public let labels: [Int32]
    /// The number of classes (1 for a regression set).
    public let classCount: Int
    /// For a regression set: one real-valued target per sample (`labels` are then all 0).
    public private(set) var targets: [Float]?
    /// The label of each class as the data wrote it (`"0"`..., or words); empty for a regression set.
    public let classNames: [String]

    /// Validates and wraps samples; throws when sizes disagree or a label is out of range. Rows in
    /// messages are 1-based. `classNames` default to the ids as text.
    public init(name: String, featureShape: [Int], features: [Float], labels: [Int32], classCount: Int? = nil,
                classNames: [String]? = nil) throws {
        let perSample = featureShape.reduce(1, *)
        guard perSample > 0 else { throw DataError.malformed(name, "empty feature shape \(featureShape)") }
        guard features.count == perSample * labels.count else {
            throw DataError.malformed(
                name, "\(features.count) feature values do not make \(labels.count) samples of \(featureShape)")
        }
        guard !labels.isEmpty else { throw DataError.malformed(name, "no samples") }
        if let bad = labels.firstIndex(where: { $0 < 0 }) {
            throw DataError.malformed(name, "sample \(bad + 1) has negative label \(labels[bad])")
        }
        let classes = classCount ?? classNames?.count ?? Int(labels.max()!) + 1
        if let bad = labels.firstIndex(where: { Int($0) >= classes }) {
            throw DataError.malformed(name, "sample \(bad + 1) has label \(labels[bad]), outside 0..<\(classes)")
        }
        if let bad = features.firstIndex(where: { !$0.isFinite }) {
            throw DataError.malformed(name, "feature value \(bad % perSample + 1) of sample \(bad / perSample + 1) is not finite")
        }
        if let classNames, classNames.count != classes {
            throw DataError.malformed(name, "\(classNames.count) class names for \(classes) classes")
        }
        self.name = name
        self.featureShape = featureShape
        self.features = features
        self.labels = labels
        self.classCount = classes
        self.classNames = classNames ?? (classes > 1 || classCount == nil ? (0..<classes).map { "\($0)" } : [])
    }

    /// A regression set: real-valued `targets`, one per sample.
    public init(name: String, featureShape: [Int], features: [Float], targets: [Float]) throws {
        if let bad = targets.firstIndex(where: { !$0.isFinite }) {
            throw DataError.malformed(name, "target of sample \(bad + 1) is not finite")
        }
        try self.init(name: name, featureShape: featureShape, features: features,
                      labels: [Int32](repeating: 0, count: targets.count), classCount: 1)
        self.targets = targets
    }

    /// Whether the samples have real-valued targets instead of classes.
    public var isRegression: Bool { targets != nil }

    /// The regression targets at `indices` as an `[n, 1]` tensor.
    public func targetTensor<C: Collection<Int>>(_ indices: C) -> Tensor {
        guard let targets else { preconditionFailure("targetTensor: \(name) is a classification set") }
        return Tensor(shape: [indices.count, 1], values: indices.map { targets[$0] })
    }

    /// The number of samples.
    public var count: Int { labels.count }
    /// Floats per sample.
    public var featuresPerSample: Int { featureShape.reduce(1, *) }

    /// The samples at `indices` as a `[n] + featureShape` tensor and their labels.
    public func batch<C: Collection<Int>>(_ indices: C) -> (inputs: Tensor, labels: [Int32]) {
        let width = featuresPerSample
        var values = [Float](repeating: 0, count: indices.count * width)
        var batchLabels: [Int32] = []
        batchLabels.reserveCapacity(indices.count)
        values.withUnsafeMutableBufferPointer { dst in
            features.withUnsafeBufferPointer { src in
                for (row, i) in indices.enumerated() {
                    precondition(i >= 0 && i < count, "batch: sample \(i) outside 0..<\(count)")
                    (dst.baseAddress! + row * width).update(from: src.baseAddress! + i * width, count: width)
                    batchLabels.append(labels[i])
                }
            }
        }
        return (Tensor(shape: [indices.count] + featureShape, values: values), batchLabels)
    }

    /// The samples at `indices` as a new data set.
    public func subset<C: Collection<Int>>(_ indices: C, name suffix: String) -> Dataset {
        let (inputs, subsetLabels) = batch(indices)
        var subset = try! Dataset(
            name: "\(name) (\(suffix))", featureShape: featureShape, features: inputs.scalars, labels: subsetLabels,
            classCount: classCount, classNames: classNames.isEmpty ? nil : classNames)
        subset.targets = targets.map { t in indices.map { t[$0] } }
        return subset
    }

    /// A seeded random split into a training and a held-out part (SAMPLES in proto/ddp.proto): with
    /// `order = Permutation.of(count, seed)` and `t = max(1, round(count * testFraction))` (halves away from
    /// zero), the held-out samples are rows `order[0..<t]` and training sample i is row `order[t + i]`.
    public func split(testFraction: Double, seed: UInt64) throws -> (train: Dataset, test: Dataset) {
        guard testFraction > 0 && testFraction < 1 else {
            throw DataError.invalidOption("test fraction \(testFraction) must be between 0 and 1")
        }
        let order = Permutation.of(count: count, seed: seed)
        let testCount = max(1, Int((Double(count) * testFraction).rounded()))
        guard testCount < count else { throw DataError.invalidOption("\(count) samples are too few to split") }
        return (subset(order[testCount...], name: "train"), subset(order[..<testCount], name: "test"))
    }

    /// Divides every feature by the largest absolute value, so features lie in [-1, 1] (pixel data in [0, 1]).
    public func scaledToUnitRange() -> Dataset { Preprocessing.fit(.max, to: self).apply(to: self) }

    /// The same samples with other feature values (as many).
    func withFeatures(_ values: [Float]) -> Dataset {
        precondition(values.count == features.count, "withFeatures: \(values.count) values for \(features.count)")
        var copy = self
        copy.features = values
        return copy
    }

    /// The same samples viewed with another per-sample shape of the same size (e.g. `[64]` as `[1, 8, 8]`).
    public func reshaped(featureShape newShape: [Int]) throws -> Dataset {
        guard newShape.reduce(1, *) == featuresPerSample else {
            throw DataError.invalidOption("cannot view samples of \(featureShape) as \(newShape)")
        }
        var copy = self
        copy.featureShape = newShape
        return copy
    }
}

/// What can go wrong reading or preparing data; each case names the file or option at fault.
public enum DataError: Error, Equatable, CustomStringConvertible {
    case fileNotFound(String)
    case malformed(String, String)
    case unsupported(String, String)
    case invalidOption(String)

    public var description: String {
        switch self {
        case .fileNotFound(let path): "data file not found: \(path)"
        case .malformed(let source, let why): "malformed data in \(source): \(why)"
        case .unsupported(let source, let why): "unsupported data in \(source): \(why)"
        case .invalidOption(let why): "invalid data option: \(why)"
        }
    }
}
