@_exported import Autodiff
@_exported import DDPRuntime
import DDPWire
import Foundation
import Logging

/// Turns a user's executable into the workers of a SwiftDDP job.
///
/// ```swift
/// import SwiftDDP
///
/// var generator = SeededGenerator(seed: 1)
/// let model = MyNet(generator: &generator)          // any Module
/// DataParallel.runWorker(name: "my-net", model: model, data: MyData()) { model, batch in
///     Loss.softmaxCrossEntropy(model(batch.inputs), labels: batch.labels)
/// }
/// ```
///
/// `ddpctl start --program .build/release/my-trainer -- ARGS` runs the executable as each worker with
/// `DDP_CONNECT` (the coordinator's endpoint), `DDP_CONFIG` (the job file), `DDP_RANK` and
/// `DDP_LOG_LEVEL` set. The coordinator learns the model's tensors from the first worker to join and
/// steps them with the job's optimizer; every worker must build the same model (the same parameter
/// names and shapes) and the same data set (the same count), or it is refused.
public enum DataParallel {
    /// Whether this process was started as a job's worker (`DDP_CONNECT` is set).
    public static var isWorker: Bool { ProcessInfo.processInfo.environment["DDP_CONNECT"] != nil }

    /// Runs this process as a worker until the coordinator ends the job, then exits 0 (the job's outcome
    /// is the coordinator's to report); 1 with the reason on standard error when it cannot take part. `loss` gives a batch's loss (on the tape) and how many
    /// samples it classified correctly.
    public static func runWorker<Model: Module, Samples: IndexedDataset>(
        name: String = ProcessInfo.processInfo.processName, configuration: [String: String] = [:],
        model: Model, data: Samples, loss: @escaping (Model, Samples.Batch) throws -> (loss: Tensor, correct: Int)
    ) -> Never {
        do {
            let task = try ProgramTask(name: name, configuration: configuration, model: model, data: data, loss: loss)
            try run(task)
            exit(0)
        } catch {
            FileHandle.standardError.write(Data("\(name): \(error)\n".utf8))
            exit(1)
        }
    }

    /// As `runWorker(name:configuration:model:data:loss:)` for a loss without an accuracy.
    public static func runWorker<Model: Module, Samples: IndexedDataset>(
        name: String = ProcessInfo.processInfo.processName, configuration: [String: String] = [:],
        model: Model, data: Samples, loss: @escaping (Model, Samples.Batch) throws -> Tensor
    ) -> Never {
        runWorker(name: name, configuration: configuration, model: model, data: data) { model, batch in (try loss(model, batch), 0) }
    }

    /// Joins the coordinator named by the environment and trains `task` until the job ends.
    private static func run(_ task: some WorkerTask) throws {
        let environment = ProcessInfo.processInfo.environment
        guard let endpoint = environment["DDP_CONNECT"], !endpoint.isEmpty else {
            throw JobSpecError.invalid("DDP_CONNECT is not set: start this program with `ddpctl start --program PATH` (or a deploy/ script)")
        }
        let spec = try environment["DDP_CONFIG"].map { try JobSpec.load(path: $0) }
        DDPLogging.bootstrap(level: environment["DDP_LOG_LEVEL"].flatMap { Logger.Level(rawValue: $0) } ?? .info)
        Worker.leaveOnTerminationSignals()
        let keys = try environment["DDP_KEYS"].flatMap { $0.isEmpty ? nil : try JobKeys.load(from: $0) }
        let worker = try Worker(endpoint: endpoint, spec: spec, task: task, keys: keys, requestedRank: Int32(environment["DDP_RANK"] ?? "") ?? -1,
                                ownsProcess: true, logger: Logger(label: "worker"))
        _ = try worker.run()
    }
}
