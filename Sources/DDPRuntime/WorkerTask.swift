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

extension TrainingSetup: WorkerTask {
    public var trainingSampleCount: Int { train.count }
    public var programModel: ProgramModel? { nil }
    public func zeroGrad() { model.zeroGrad() }
    public func loss(_ samples: [Int]) throws -> (loss: Tensor, correct: Int) { loss(samples, in: train) }
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
