import Autodiff
import DDPData
import Foundation

/// The pieces of a job that coordinator and workers build alike from its spec: the data split, the
/// model, the optimizer and the learning-rate schedule. The same spec gives the same objects everywhere.
public struct TrainingSetup {
    public let spec: JobSpec
    public let train: Dataset
    public let test: Dataset
    public let model: Sequential
    public let sampler: EpochSampler
    /// The feature transform fitted to the training split (applied to both splits already).
    public let preprocessing: Preprocessing

    public init(spec: JobSpec) throws {
        self.spec = spec
        let all = try Self.loadDataset(spec)
        var (train, test) = try all.split(testFraction: spec.testFraction, seed: spec.seed)
        preprocessing = Preprocessing.fit(spec.scalingKind(featureShape: all.featureShape), to: train)
        train = preprocessing.apply(to: train)
        test = preprocessing.apply(to: test)
        let wantsImages = switch spec.model {
        case .preset(let name): name == "cnn"
        case .layers(let layers): ModelBuilder.takesImages(layers)
        }
        if wantsImages && train.featureShape.count != 3 {
            let shape = try Self.imageShape(of: train)
            train = try train.reshaped(featureShape: shape)
            test = try test.reshaped(featureShape: shape)
        }
        self.train = train
        self.test = test
        model = try Self.buildModel(spec, inputShape: train.featureShape, classes: all.isRegression ? 1 : all.classCount)
        sampler = try EpochSampler(sampleCount: train.count, globalBatchSize: spec.batchSize, seed: spec.seed)
    }

    /// Sets this process's BLAS threads to the job's `blas_threads`, or to `automaticBLASThreads()` when it
    /// leaves them to SwiftDDP. Only a process's entry point calls it (ddpd's coordinator and worker):
    /// OpenBLAS's thread count is process-wide, and changing it while another thread multiplies is unsafe.
    public static func useBLASThreads(of spec: JobSpec) {
        BLAS.threads = spec.blasThreads > 0 ? spec.blasThreads : automaticBLASThreads()
    }

    /// BLAS threads when the job leaves them to SwiftDDP: the CPUs this process may use, divided among
    /// the workers on its host (`DDP_LOCAL_WORKERS`, which `ddpctl start` sets; 1 when unset, as with one
    /// worker per node). One worker on two cores gets two threads; two workers get one each.
    public static func automaticBLASThreads(environment: [String: String] = ProcessInfo.processInfo.environment) -> Int {
        let sharing = max(1, Int(environment["DDP_LOCAL_WORKERS"] ?? "") ?? 1)
        return max(1, availableCPUs() / sharing)
    }

    /// The CPUs this process may run on (its affinity, as `taskset` or Slurm's --cpus-per-task set it,
    /// from /proc/self/status), or the online CPUs where that cannot be read.
    static func availableCPUs() -> Int {
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed_list:") }) else {
            return ProcessInfo.processInfo.activeProcessorCount
        }
        let ranges = line.dropFirst("Cpus_allowed_list:".count).split(separator: ",").map { item in
            item.split(separator: "-").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        }
        let count = ranges.reduce(0) { total, bounds in total + (bounds.count == 2 ? bounds[1] - bounds[0] + 1 : bounds.count) }
        return count > 0 ? count : ProcessInfo.processInfo.activeProcessorCount
    }

    static func loadDataset(_ spec: JobSpec) throws -> Dataset {
        let regression = spec.task == "regression"
        switch spec.dataset {
        case "digits":
            guard !regression else { throw JobSpecError.invalid("dataset 'digits' has classes, not regression targets") }
            return try BundledData.digits(scaled: false)
        case "synthetic" where regression:
            return try BundledData.syntheticRegression(samples: spec.syntheticSamples, features: spec.syntheticFeatures, seed: spec.seed)
        case "synthetic":
            return try BundledData.synthetic(
                samples: spec.syntheticSamples, features: spec.syntheticFeatures, classes: spec.syntheticClasses, seed: spec.seed)
        case "csv":
            return try DataReader.csv(
                path: spec.dataPath, options: CSVOptions(labelColumn: spec.labelColumn, delimiter: spec.csvDelimiter ?? ",", regression: regression))
        case "idx":
            guard !regression else { throw JobSpecError.invalid("dataset 'idx' has classes, not regression targets") }
            return try DataReader.idx(images: spec.dataPath, labels: spec.labelsPath)
        case "npy": return try DataReader.npy(features: spec.dataPath, labels: spec.labelsPath, regression: regression)
        default: throw JobSpecError.invalid("dataset '\(spec.dataset)' is unknown")
        }
    }

    /// `[channels, height, width]` of image samples: kept if already 3-D, a square side if flat.
    static func imageShape(of data: Dataset) throws -> [Int] {
        if data.featureShape.count == 3 { return data.featureShape }
        let side = Int(Double(data.featuresPerSample).squareRoot().rounded())
        guard side * side == data.featuresPerSample, side >= 4 else {
            throw JobSpecError.invalid("the model's conv and pooling layers need image data; \(data.name) has samples of shape \(data.featureShape)")
        }
        return [1, side, side]
    }

    /// The layers of the spec's model (a preset expanded, or the job file's list) for samples of `inputShape`.
    public static func layers(_ spec: JobSpec, inputShape: [Int]) throws -> [LayerSpec] {
        switch spec.model {
        case .preset(let name): try ModelBuilder.presetLayers(name, hidden: spec.hidden, activation: spec.activation, inputShape: inputShape)
        case .layers(let layers): layers
        }
    }

    /// The model of the spec for inputs of `inputShape` and `classes` outputs.
    public static func buildModel(_ spec: JobSpec, inputShape: [Int], classes: Int) throws -> Sequential {
        var builder = ModelBuilder(outputs: classes, seed: spec.seed)
        return try builder.build(try layers(spec, inputShape: inputShape), inputShape: inputShape)
    }

    /// The optimizer named by the spec.
    public func makeOptimizer() throws -> any Optimizer { try Self.makeOptimizer(spec) }

    /// The optimizer named by `spec`.
    public static func makeOptimizer(_ spec: JobSpec) throws -> any Optimizer {
        switch spec.optimizer {
        case "adam": try Adam(learningRate: spec.learningRate, weightDecay: spec.weightDecay)
        case "adamw": try Adam.adamW(learningRate: spec.learningRate, weightDecay: spec.weightDecay == 0 ? 0.01 : spec.weightDecay)
        default: try SGD(learningRate: spec.learningRate, momentum: spec.momentum, nesterov: spec.nesterov, weightDecay: spec.weightDecay)
        }
    }

    /// The optimizer the coordinator steps with: the job's, or with `sync_every` > 1 the outer optimizer
    /// over the averaged parameter changes of a round (SGD, with Nesterov momentum for `nesterov`).
    public static func makeCoordinatorOptimizer(_ spec: JobSpec) throws -> any Optimizer {
        guard spec.isLocalSGD else { return try makeOptimizer(spec) }
        return try SGD(learningRate: spec.outerLR, momentum: spec.outerMomentum, nesterov: spec.outerOptimizer == "nesterov")
    }

    /// The learning-rate schedule named by the spec.
    public var schedule: LearningRateSchedule { Self.schedule(spec, totalSteps: totalSteps) }

    /// The learning-rate schedule named by `spec` for a job of `totalSteps`.
    public static func schedule(_ spec: JobSpec, totalSteps: Int) -> LearningRateSchedule {
        let main: LearningRateSchedule = switch spec.schedule {
        case "step": .step(every: spec.stepEvery, gamma: spec.gamma)
        case "cosine": .cosine(totalSteps: max(totalSteps - spec.warmupSteps, 1), minimum: spec.minLearningRate)
        default: .constant
        }
        return spec.warmupSteps > 0 ? .warmup(steps: spec.warmupSteps, then: main) : main
    }

    /// FNV-1a 64 over `NAME:[SHAPE]:f32;` of every tensor in order (docs/PROTOCOL.md, section 3).
    static func fingerprint(_ tensors: [(name: String, shape: [Int])]) -> String {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for t in tensors {
            for byte in "\(t.name):\(t.shape):f32;".utf8 {
                hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3
            }
        }
        return String(hash, radix: 16)
    }

    /// The loss of a batch (cross-entropy, or mean squared error for regression) and how many samples it
    /// classified correctly (0 for regression).
    public func loss(_ indices: some Collection<Int>, in data: Dataset) -> (loss: Tensor, correct: Int) {
        let (x, labels) = data.batch(indices)
        let output = model(x)
        if data.isRegression { return (Loss.meanSquaredError(output, data.targetTensor(indices)), 0) }
        let loss = Loss.softmaxCrossEntropy(output, labels: labels)
        return (loss, GradMode.withoutGradients { Self.correctCount(output, labels) })
    }

    /// Samples per evaluation batch: the unit held-out data is scored in, by the coordinator or shared out
    /// to the workers (`ParameterUpdate.evaluate`), so that the sums come out the same either way.
    public static let evaluationBatch = 1024

    /// Loss and accuracy of the model on `data`, in evaluation mode; for regression the mean squared
    /// error and R² (1 - residual / total sum of squares).
    public func evaluate(on data: Dataset) -> (loss: Float, accuracy: Float) {
        metrics(score(0..<evaluationBatches(of: data), of: data), of: data)
    }

    /// How many evaluation batches `data` has.
    public func evaluationBatches(of data: Dataset) -> Int { (data.count + Self.evaluationBatch - 1) / Self.evaluationBatch }

    /// The scores of evaluation batches `batches` of `data`, in evaluation mode: per batch its summed loss
    /// (squared error for regression) and its hits.
    public func score(_ batches: Range<Int>, of data: Dataset) -> [HeldOutScore] {
        model.setTraining(false)
        defer { model.setTraining(true) }
        return GradMode.withoutGradients {
            batches.map { batch in
                let samples = (batch * Self.evaluationBatch)..<min((batch + 1) * Self.evaluationBatch, data.count)
                let (x, labels) = data.batch(samples)
                let output = model(x)
                if let targets = data.targets {
                    var residual: Double = 0
                    for (p, y) in zip(output.scalars, targets[samples]) { residual += Double((p - y) * (p - y)) }
                    return HeldOutScore(lossSum: residual, correct: 0)
                }
                return HeldOutScore(lossSum: Double(Loss.softmaxCrossEntropy(output, labels: labels).item) * Double(labels.count),
                                    correct: Self.correctCount(output, labels))
            }
        }
    }

    /// Loss and accuracy (for regression the mean squared error and R²) from the scores of every
    /// evaluation batch of `data`, summed in batch order.
    public func metrics(_ scores: [HeldOutScore], of data: Dataset) -> (loss: Float, accuracy: Float) {
        let lossSum = scores.reduce(0.0) { $0 + $1.lossSum }
        if let targets = data.targets {
            let mean = targets.reduce(0, +) / Float(targets.count)
            let total = targets.reduce(0.0) { $0 + Double(($1 - mean) * ($1 - mean)) }
            return (Float(lossSum / Double(targets.count)), total > 0 ? Float(1 - lossSum / total) : 0)
        }
        return (Float(lossSum / Double(data.count)), Float(scores.reduce(0) { $0 + $1.correct }) / Float(data.count))
    }

    /// How many rows of `logits` have their largest value at the label.
    static func correctCount(_ logits: Tensor, _ labels: [Int32]) -> Int {
        let classes = logits.shape[1]
        return logits.withUnsafeBufferPointer { v in
            var correct = 0
            for (r, label) in labels.enumerated() {
                var best = 0
                for c in 1..<classes where v[r * classes + c] > v[r * classes + best] { best = c }
                if best == Int(label) { correct += 1 }
            }
            return correct
        }
    }
}
