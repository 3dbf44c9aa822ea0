import Autodiff
import DDPData
import DDPWire
import Foundation

/// The model of a job whose workers bring it (a user's program): what the program declares about it,
/// sent in every Join and kept in model files and checkpoints.
public struct ProgramModel: Codable, Equatable, Sendable {
    /// The program's name (its executable's, unless it says otherwise).
    public var program: String
    /// What the program declares about its model (sizes, options), as text.
    public var configuration: [String: String]
    /// Every tensor's name and shape, parameters first, in the model's order.
    public var tensors: [TensorShape]
    /// The names of the tensors that are buffers.
    public var buffers: [String]
    /// The training samples of the program's data set.
    public var sampleCount: Int

    public struct TensorShape: Codable, Equatable, Sendable {
        public var name: String
        public var shape: [Int]
    }

    enum CodingKeys: String, CodingKey {
        case program, configuration, tensors, buffers, sampleCount = "sample_count"
    }

    /// The description of a program's model of `tensors` (parameters then buffers).
    public init(program: String, configuration: [String: String], tensors: [NamedParameter], buffers: Set<String>, sampleCount: Int) {
        self.program = program
        self.configuration = configuration
        self.tensors = tensors.map { TensorShape(name: $0.name, shape: $0.tensor.shape) }
        self.buffers = tensors.map(\.name).filter(buffers.contains)
        self.sampleCount = sampleCount
    }

    public func json() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: (try? encoder.encode(self)) ?? Data(), as: UTF8.self)
    }

    /// The first difference between two programs' models, or nil: names, shapes, buffers, samples.
    public func firstDifference(from other: ProgramModel) -> String? {
        for (mine, theirs) in zip(tensors, other.tensors) where mine != theirs {
            return mine.name == theirs.name ? "parameter '\(mine.name)' has shape \(theirs.shape), the job's \(mine.shape)"
                : "parameter \(tensors.firstIndex(of: mine)!) is '\(theirs.name)' \(theirs.shape), the job's is '\(mine.name)' \(mine.shape)"
        }
        if tensors.count != other.tensors.count {
            let extra = tensors.count > other.tensors.count ? "the job's model has '\(tensors[other.tensors.count].name)' more"
                : "it has '\(other.tensors[tensors.count].name)' more"
            return "\(other.tensors.count) tensors against the job's \(tensors.count) (\(extra))"
        }
        if buffers != other.buffers { return "buffers \(other.buffers), the job's \(buffers)" }
        if sampleCount != other.sampleCount { return "its data set has \(other.sampleCount) training samples, the job's \(sampleCount)" }
        return nil
    }

    /// A hash of names, shapes and dtype, as `TrainingSetup.modelFingerprint` computes it.
    public var fingerprint: String {
        TrainingSetup.fingerprint(tensors.map { ($0.name, $0.shape) })
    }
}

/// The model a coordinator serves, as far as it needs to know it: the named tensors it averages and
/// steps (and which of them are buffers), a fingerprint every joiner must match, the samples of an epoch,
/// and where the coordinator can build the model itself (presets and job-file layers), the setup that
/// evaluates it and describes it in model files. A program's model is learned from its first Join (or,
/// on resume, from the newest checkpoint): the coordinator holds no model code for it.
final class ServedModel {
    let tensors: [NamedParameter]
    let buffers: Set<String>
    let fingerprint: String
    let sampler: EpochSampler
    /// How the data's steps group into the coordinator's steps, and how many of those the job has.
    let rounds: RoundPlan
    let totalSteps: Int
    /// Nil for a program's model.
    let setup: (any BuiltInTask)?
    let program: ProgramModel?

    /// A preset or job-file model, built by the coordinator.
    init(setup: any BuiltInTask) {
        self.setup = setup
        program = nil
        tensors = setup.wireTensors
        buffers = setup.bufferNames
        fingerprint = setup.modelFingerprint
        sampler = setup.sampler
        rounds = setup.rounds
        totalSteps = setup.totalSteps
    }

    /// A program's model: `program` with the values of `values` (by name).
    init(program: ProgramModel, values: [String: Tensor], spec: JobSpec) throws {
        setup = nil
        self.program = program
        tensors = try program.tensors.map { t in
            guard let value = values[t.name], value.shape == t.shape else {
                throw JobSpecError.invalid("the program's model declares '\(t.name)' \(t.shape) but its values are \(values[t.name].map { "\($0.shape)" } ?? "missing")")
            }
            guard value.isFinite else { throw JobSpecError.invalid("the program's initial '\(t.name)' holds NaN or infinite values") }
            let tensor = value.detached()
            tensor.requiresGrad = !program.buffers.contains(t.name)
            return NamedParameter(name: t.name, tensor: tensor)
        }
        guard !tensors.isEmpty else { throw JobSpecError.invalid("the program's model has no parameters") }
        buffers = Set(program.buffers)
        fingerprint = program.fingerprint
        sampler = try EpochSampler(sampleCount: program.sampleCount, globalBatchSize: spec.batchSize, seed: spec.seed)
        rounds = RoundPlan(stepsPerEpoch: sampler.stepsPerEpoch, syncEvery: spec.syncEvery)
        totalSteps = rounds.roundsPerEpoch * spec.epochs
    }

    /// A program's model from a Join that carries it.
    convenience init(join: Join, tensors: [WireTensor], spec: JobSpec) throws {
        let program: ProgramModel
        do { program = try JSONDecoder().decode(ProgramModel.self, from: Data(join.modelJSON.utf8)) } catch {
            throw JobSpecError.invalid("the Join of \(join.workerID) does not describe a model: \(error)")
        }
        guard program.sampleCount == Int(clamping: join.sampleCount), program.sampleCount > 0 else {
            throw JobSpecError.invalid("the program of \(join.workerID) has a data set of \(join.sampleCount) samples")
        }
        var values: [String: Tensor] = [:]
        for t in tensors {
            guard t.dtype == .f32 else { throw JobSpecError.invalid("the program's tensor '\(t.name)' is \(t.dtype.rawValue), not f32") }
            values[t.name] = Tensor(shape: t.shape, values: TensorEncoding.floats(t.payload))
        }
        try self.init(program: program, values: values, spec: spec)
    }

    /// A program's model from the newest checkpoint of `directory` (a restarted or resumed coordinator),
    /// or nil when there is none.
    static func fromCheckpoint(in directory: JobDirectory, spec: JobSpec) throws -> ServedModel? {
        guard let checkpoint = Checkpoint.latest(in: directory).checkpoint else { return nil }
        let contents = try SafeTensors.read(path: checkpoint.path)
        guard let json = contents.metadata[ModelDescription.metadataKey],
              let description = try? JSONDecoder().decode(ModelDescription.self, from: Data(json.utf8)), let program = description.program else {
            throw SafeTensorsError.invalid(checkpoint.path, "does not describe a program's model")
        }
        return try ServedModel(program: program, values: checkpoint.parameters, spec: spec)
    }

    /// Loss and accuracy on the held-out split; nil for a program's model (its data stays with its workers).
    func evaluate() -> (loss: Float, accuracy: Float)? { setup?.evaluateHeldOut() }

    /// The description for model files and checkpoints at `step`.
    func description(step: Int, spec: JobSpec) -> ModelDescription {
        if let setup { return setup.modelDescription(step: step) }
        return ModelDescription(program: program!, spec: spec, step: step)
    }
}
