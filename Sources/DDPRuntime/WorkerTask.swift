import Autodiff
import DDPData
import Foundation

/// What a worker trains: the model's tensors and the loss of any of its training samples. The built-in
/// models (`TrainingSetup`) and a user's program (`ProgramTask`) are tasks.
public protocol WorkerTask {
    /// The parameters, then the buffers, as they travel and are checkpointed.
    var wireTensors: [NamedParameter] { get }
    /// The names of the buffers among `wireTensors`.
    var bufferNames: Set<String> { get }
    /// A hash of the tensors' names and shapes: every worker of a job has the same.
    var modelFingerprint: String { get }
    /// The training samples (indices 0..<count are what the coordinator assigns).
    var trainingSampleCount: Int { get }
    /// For a model the coordinator cannot build itself (a program): its description, sent with the
    /// tensors in the Join. Nil for the built-in models.
    var programModel: ProgramModel? { get }
    /// Forgets the parameters' gradients.
    func zeroGrad()
    /// The loss of `samples` (indices of training samples) in training mode, on the tape, and how many
    /// of them it classified correctly (0 where that does not apply).
    func loss(_ samples: [Int]) throws -> (loss: Tensor, correct: Int)
}

/// A model SwiftDDP builds from the job spec alone, so that the coordinator builds it too: it evaluates
/// the held-out split after every epoch and describes the model in model files. The classifiers and
/// regressors (`TrainingSetup`) and the language model (`LanguageModelSetup`) are built-in tasks.
public protocol BuiltInTask: WorkerTask {
    var spec: JobSpec { get }
    /// The model.
    var module: Module { get }
    /// The order of the training samples in every epoch.
    var sampler: EpochSampler { get }
    /// The held-out split's evaluation batches (the unit its scoring is shared out in).
    var heldOutBatches: Int { get }
    /// The scores of held-out batches `batches`, in evaluation mode, one per batch in order.
    func scoreHeldOut(_ batches: Range<Int>) -> [HeldOutScore]
    /// Loss and accuracy (for a language model: per token) from the scores of every held-out batch.
    func heldOutMetrics(_ scores: [HeldOutScore]) -> (loss: Float, accuracy: Float)
    /// The model's description at `step`, for the metadata of model files and checkpoints.
    func modelDescription(step: Int) -> ModelDescription
}

/// What one held-out batch scored: its summed loss (squared error for regression) and its hits.
public struct HeldOutScore: Equatable, Sendable {
    public var lossSum: Double
    public var correct: Int
    public init(lossSum: Double, correct: Int) {
        self.lossSum = lossSum
        self.correct = correct
    }
}

extension BuiltInTask {
    /// Loss and accuracy on the whole held-out split.
    public func evaluateHeldOut() -> (loss: Float, accuracy: Float) { heldOutMetrics(scoreHeldOut(0..<heldOutBatches)) }
    public var programModel: ProgramModel? { nil }
    public var wireTensors: [NamedParameter] { module.parameters + module.buffers }
    public var bufferNames: Set<String> { Set(module.buffers.map(\.name)) }
    /// A hash of the model's parameter and buffer names, shapes and dtype: equal models, equal fingerprints.
    public var modelFingerprint: String { TrainingSetup.fingerprint(wireTensors.map { ($0.name, $0.tensor.shape) }) }
    /// The total number of parameter elements.
    public var parameterCount: Int { module.parameterCount }
    public func zeroGrad() { module.zeroGrad() }
    /// How the data's steps group into the coordinator's steps (rounds of `sync_every`).
    public var rounds: RoundPlan { RoundPlan(stepsPerEpoch: sampler.stepsPerEpoch, syncEvery: spec.syncEvery) }
    /// The coordinator's steps in the whole job (with `sync_every` > 1, its rounds).
    public var totalSteps: Int { rounds.roundsPerEpoch * spec.epochs }

    /// Loads the parameters of the model file `spec.init_from` into the model (fine-tuning): every
    /// parameter by name and shape. The coordinator does it; workers receive the values with their Welcome.
    public func loadInitialParameters() throws {
        guard !spec.initFrom.isEmpty else { return }
        let contents = try SafeTensors.read(path: spec.initFrom)
        do { try TrainedModel.load(contents.tensors, into: wireTensors, from: spec.initFrom) } catch let error as SafeTensorsError {
            throw JobSpecError.invalid("init_from: \(error) (the job's model is \(modelDescription(step: 0).summary))")
        }
    }
}

/// The built-in task of a job spec.
public enum BuiltInTasks {
    /// The language model for `model: gpt`, else the classifier or regressor of the spec.
    public static func make(_ spec: JobSpec) throws -> any BuiltInTask {
        spec.model == "gpt" ? try LanguageModelSetup(spec: spec) : try TrainingSetup(spec: spec)
    }
}

extension TrainingSetup: BuiltInTask {
    public var module: Module { model }
    public var trainingSampleCount: Int { train.count }
    public func loss(_ samples: [Int]) throws -> (loss: Tensor, correct: Int) { loss(samples, in: train) }
    public var heldOutBatches: Int { evaluationBatches(of: test) }
    public func scoreHeldOut(_ batches: Range<Int>) -> [HeldOutScore] { score(batches, of: test) }
    public func heldOutMetrics(_ scores: [HeldOutScore]) -> (loss: Float, accuracy: Float) { metrics(scores, of: test) }
}

/// The samples of a user's data set, by index: what a program hands SwiftDDP.
public protocol IndexedDataset {
    /// What one batch is (for example inputs and labels).
    associatedtype Batch
    /// The training samples.
    var count: Int { get }
    /// The samples at `indices`, in that order, as one batch.
    func batch(_ indices: [Int]) throws -> Batch
}

/// A user's model, loss and data as a worker's task.
public final class ProgramTask<Model: Module, Data: IndexedDataset>: WorkerTask {
    public let model: Model
    public let data: Data
    public let programModel: ProgramModel?
    private let lossOfBatch: (Model, Data.Batch) throws -> (loss: Tensor, correct: Int)
    public let wireTensors: [NamedParameter]
    public let bufferNames: Set<String>

    /// `name` and `configuration` describe the model in the job's model file (sizes, options: what is
    /// needed to build it again). Throws when the model cannot be trained (see `Module.checkStructure`).
    public init(name: String, configuration: [String: String] = [:], model: Model, data: Data,
                loss: @escaping (Model, Data.Batch) throws -> (loss: Tensor, correct: Int)) throws {
        try model.checkStructure()
        guard data.count > 0 else { throw JobSpecError.invalid("the program's data set has no samples") }
        self.model = model
        self.data = data
        lossOfBatch = loss
        wireTensors = model.parameters + model.buffers
        bufferNames = Set(model.buffers.map(\.name))
        programModel = ProgramModel(program: name, configuration: configuration, tensors: wireTensors, buffers: bufferNames, sampleCount: data.count)
    }

    public var modelFingerprint: String { programModel!.fingerprint }
    public var trainingSampleCount: Int { data.count }
    public func zeroGrad() { model.zeroGrad() }
    public func loss(_ samples: [Int]) throws -> (loss: Tensor, correct: Int) {
        model.setTraining(true)
        return try lossOfBatch(model, data.batch(samples))
    }
}
