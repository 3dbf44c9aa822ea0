import Autodiff
import DDPData
import Foundation

/// What a model file says it is, in its safetensors metadata under `swiftddp_model` (JSON): the model
/// (preset, sizes, activation), the task, the shape of one input, the preprocessing of raw feature values
/// with its statistics, and the class names. Enough to rebuild the model for predict and evaluate, and
/// for a PyTorch user to rebuild it (README, "Using a trained model").
public struct ModelDescription: Codable, Sendable, Equatable {
    /// `swiftddp-model/1`.
    public var format = ModelDescription.currentFormat
    /// The preset's name, or `layers`.
    public var model: String
    /// The model as a list of layers (a preset expanded), as a job file writes it.
    public var layers: [LayerSpec]?
    public var hidden: [Int]
    public var activation: String
    public var task: String
    /// One sample's shape as the model takes it (`[64]`, or `[1, 28, 28]` for `cnn`).
    public var inputShape: [Int]
    /// The transform of raw feature values, applied before the model.
    public var preprocessing: Preprocessing
    /// The label of each class id (empty for regression).
    public var classNames: [String]
    /// Where the data came from and how its CSV was read, so that the same kind of file reads alike.
    public var dataset: String
    public var labelColumn: String
    public var delimiter: String
    public var jobID: String
    public var step: Int
    /// For a model a user's program trained (`model` is then `program`): what the program declared.
    public var program: ProgramModel?
    /// For a language model (`model` is then `gpt`): its sizes and its vocabulary.
    public var gpt: GPTConfiguration?
    public var vocabulary: TextVocabulary?

    public static let currentFormat = "swiftddp-model/1"
    static let metadataKey = "swiftddp_model"

    enum CodingKeys: String, CodingKey {
        case format, model, layers, program, gpt, vocabulary, hidden, activation, task, preprocessing, dataset, delimiter, step
        case inputShape = "input_shape", classNames = "class_names", labelColumn = "label_column", jobID = "job_id"
    }

    /// The description of the model `setup` trains, at `step`.
    init(setup: TrainingSetup, step: Int) {
        let spec = setup.spec
        model = spec.model.name
        layers = try? TrainingSetup.layers(spec, inputShape: setup.train.featureShape)
        hidden = spec.hidden
        activation = spec.activation
        task = spec.task
        inputShape = setup.train.featureShape
        preprocessing = setup.preprocessing
        classNames = setup.train.classNames
        dataset = spec.dataset
        labelColumn = spec.labelColumn
        delimiter = spec.delimiter
        jobID = spec.jobID
        self.step = step
    }

    /// The description of a program's model (its data and preprocessing are the program's own).
    init(program: ProgramModel, spec: JobSpec, step: Int) {
        model = "program"
        self.program = program
        hidden = []
        activation = ""
        task = spec.task
        inputShape = []
        preprocessing = Preprocessing(kind: .none, shift: [], divisor: [])
        classNames = []
        dataset = "program"
        labelColumn = ""
        delimiter = ""
        jobID = spec.jobID
        self.step = step
    }

    /// The description of a language model trained on `corpus`.
    init(languageModel configuration: GPTConfiguration, vocabulary: TextVocabulary, spec: JobSpec, step: Int) {
        model = "gpt"
        gpt = configuration
        self.vocabulary = vocabulary
        hidden = []
        activation = "gelu"
        task = "language_model"
        inputShape = [configuration.blockSize]
        preprocessing = Preprocessing(kind: .none, shift: [], divisor: [])
        classNames = []
        dataset = spec.dataset
        labelColumn = ""
        delimiter = ""
        jobID = spec.jobID
        self.step = step
    }

    /// The model in a few words, for messages: `mlp [128] on inputs [64]`, `gpt n_layer 4 ...`.
    public var summary: String {
        if let gpt {
            return "gpt n_layer \(gpt.layers), n_head \(gpt.heads), n_embd \(gpt.embedding), block_size \(gpt.blockSize), \(gpt.vocabularySize) tokens"
        }
        if let program { return "the program '\(program.program)'s model" }
        return "\(model) \(model == "layers" ? "" : "\(hidden) ")on inputs \(inputShape)"
    }

    public var isRegression: Bool { task == "regression" }
    /// Raw feature values per sample.
    public var featuresPerSample: Int { inputShape.reduce(1, *) }

    /// The description in the metadata of a model file or checkpoint read from `path`; errors name the file.
    init(metadataOf contents: SafeTensors.Contents, path: String) throws {
        guard let json = contents.metadata[Self.metadataKey] else {
            throw SafeTensorsError.invalid(path, "has no '\(Self.metadataKey)' metadata: not a model file of this version of SwiftDDP")
        }
        do { self = try JSONDecoder().decode(ModelDescription.self, from: Data(json.utf8)) } catch {
            throw SafeTensorsError.invalid(path, "its '\(Self.metadataKey)' metadata does not describe a model: \(error)")
        }
        guard format == Self.currentFormat else {
            throw SafeTensorsError.invalid(path, "model format '\(format)'; this SwiftDDP reads \(Self.currentFormat)")
        }
    }

    /// The metadata entries that carry it.
    var metadata: [String: String] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return [Self.metadataKey: String(decoding: (try? encoder.encode(self)) ?? Data(), as: UTF8.self)]
    }
}

/// A trained model loaded from its file: the description and the model with its parameters.
public struct TrainedModel {
    public let description: ModelDescription
    public let model: Sequential
    public let path: String

    /// Reads a model file (`model.safetensors`, or a checkpoint) that SwiftDDP wrote.
    public init(path: String) throws {
        let contents = try SafeTensors.read(path: path)
        let description = try ModelDescription(metadataOf: contents, path: path)
        if let program = description.program {
            throw SafeTensorsError.invalid(path, "holds a model of the program '\(program.program)': load it in that program (Module.load(from:))")
        }
        if description.gpt != nil {
            throw SafeTensorsError.invalid(path, "holds a language model (\(description.summary)): sample from it with 'ddpctl generate --model \(path) --prompt TEXT'")
        }
        try description.preprocessing.check(width: description.featuresPerSample)
        var spec = JobSpec()
        spec.model = description.layers.map { .layers($0) } ?? .preset(description.model)
        spec.hidden = description.hidden
        spec.activation = description.activation
        spec.task = description.task
        let classes = description.isRegression ? 1 : description.classNames.count
        let model = try TrainingSetup.buildModel(spec, inputShape: description.inputShape, classes: classes)
        try Self.load(contents.tensors, into: model.parameters + model.buffers, from: path)
        self.description = description
        self.model = model
        self.path = path
    }

    /// Copies `tensors` into `parameters` by name; a missing name or another shape is an error naming it.
    static func load(_ tensors: [(name: String, tensor: Tensor)], into parameters: [NamedParameter], from path: String) throws {
        let byName = Dictionary(tensors.map { ($0.name, $0.tensor) }, uniquingKeysWith: { first, _ in first })
        for p in parameters {
            guard let saved = byName[p.name] else {
                throw SafeTensorsError.invalid(path, "has no tensor '\(p.name)' (it has \(tensors.map(\.name).filter { !$0.hasPrefix("optimizer/") }.joined(separator: ", ")))")
            }
            guard saved.shape == p.tensor.shape else {
                throw SafeTensorsError.invalid(path, "tensor '\(p.name)' has shape \(saved.shape); the model's is \(p.tensor.shape)")
            }
            guard saved.isFinite else { throw SafeTensorsError.invalid(path, "tensor '\(p.name)' holds NaN or infinite values") }
            p.tensor.assign(saved)
        }
    }

    /// The model's outputs for raw feature rows (`values`, `featuresPerSample` each): class probabilities
    /// `[n, classes]` (softmax) for classification, values `[n, 1]` for regression. Evaluation mode, no tape.
    public func outputs(rawFeatures values: [Float]) -> Tensor {
        var values = values
        description.preprocessing.apply(to: &values, perSample: description.featuresPerSample)
        let count = values.count / max(description.featuresPerSample, 1)
        model.setTraining(false)
        defer { model.setTraining(true) }
        var rows: [Float] = []
        rows.reserveCapacity(count * (description.isRegression ? 1 : description.classNames.count))
        let chunk = 1024
        GradMode.withoutGradients {
            for start in stride(from: 0, to: count, by: chunk) {
                let end = min(start + chunk, count)
                let width = description.featuresPerSample
                let x = Tensor(shape: [end - start] + description.inputShape, values: Array(values[start * width..<end * width]))
                let y = model(x)
                rows += description.isRegression ? y.scalars : Self.softmax(y)
            }
        }
        return Tensor(shape: [count, description.isRegression ? 1 : description.classNames.count], values: rows)
    }

    /// Row-wise softmax of `[n, classes]` logits, computed stably.
    static func softmax(_ logits: Tensor) -> [Float] {
        let classes = logits.shape[1]
        var values = logits.scalars
        for r in 0..<logits.shape[0] {
            let row = r * classes..<(r + 1) * classes
            let top = values[row].max() ?? 0
            var sum: Float = 0
            for i in row { values[i] = exp(values[i] - top); sum += values[i] }
            for i in row { values[i] /= sum }
        }
        return values
    }
}

extension TrainingSetup {
    /// The model's description at `step`, for the metadata of model files and checkpoints.
    public func modelDescription(step: Int) -> ModelDescription { ModelDescription(setup: self, step: step) }
}

extension Module {
    /// Loads this model's parameters and buffers by name from a model file or checkpoint SwiftDDP wrote
    /// (a job's `model.safetensors`): every tensor must be there with its shape.
    public func load(from path: String) throws {
        try TrainedModel.load(SafeTensors.read(path: path).tensors, into: parameters + buffers, from: path)
    }
}
