import ArgumentParser
import DDPRuntime
import Foundation

/// The job keys as flags; any flag given overrides the job file.
struct JobOptions: ParsableArguments {
    @Option(help: "A job file (YAML or JSON) with the same keys as these flags (snake_case).") var config: String?
    @Option(help: "digits (bundled), synthetic, csv, idx (MNIST files), npy.") var dataset: String?
    @Option(help: "The CSV file, IDX image file or features .npy.") var dataPath: String?
    @Option(help: "The IDX label file or labels .npy.") var labelsPath: String?
    @Option(help: "Synthetic data: samples.") var syntheticSamples: Int?
    @Option(help: "Synthetic data: features per sample.") var syntheticFeatures: Int?
    @Option(help: "Synthetic data: classes.") var syntheticClasses: Int?
    @Option(help: "mlp, cnn or logistic.") var model: String?
    @Option(help: "Hidden layer sizes, comma-separated (e.g. 512,512).") var hidden: String?
    @Option(help: "relu, leaky_relu, sigmoid, tanh, gelu.") var activation: String?
    @Option(help: "Passes over the training data.") var epochs: Int?
    @Option(help: "Samples per step over all workers together.") var batchSize: Int?
    @Option(help: "sgd, adam or adamw.") var optimizer: String?
    @Option(name: [.customLong("lr"), .customLong("learning-rate")], help: "Learning rate.") var learningRate: Float?
    @Option(help: "SGD momentum.") var momentum: Float?
    @Flag(help: "Nesterov momentum.") var nesterov = false
    @Option(help: "Weight decay.") var weightDecay: Float?
    @Option(help: "constant, step or cosine.") var schedule: String?
    @Option(help: "Linear warm-up steps.") var warmupSteps: Int?
    @Option(help: "Clip the global gradient norm (0: off).") var clipNorm: Float?
    @Option(help: "Random seed (data split, order, initial weights).") var seed: UInt64?
    @Option(help: "Held-out share evaluated after each epoch.") var testFraction: Double?
    @Option(help: "Worker processes.") var workers: Int?
    @Option(help: "The job fails below this many live workers.") var minWorkers: Int?

    /// The flags that were given, keyed as in a job file.
    var overrides: [String: Any] {
        var o: [String: Any] = [:]
        o["dataset"] = dataset; o["data_path"] = dataPath; o["labels_path"] = labelsPath
        o["synthetic_samples"] = syntheticSamples; o["synthetic_features"] = syntheticFeatures
        o["synthetic_classes"] = syntheticClasses; o["model"] = model; o["activation"] = activation
        o["epochs"] = epochs; o["batch_size"] = batchSize; o["optimizer"] = optimizer
        o["learning_rate"] = learningRate.map { Double($0) }; o["momentum"] = momentum.map { Double($0) }
        if nesterov { o["nesterov"] = true }
        o["weight_decay"] = weightDecay.map { Double($0) }; o["schedule"] = schedule; o["warmup_steps"] = warmupSteps
        o["clip_norm"] = clipNorm.map { Double($0) }; o["seed"] = seed; o["test_fraction"] = testFraction
        o["workers"] = workers; o["min_workers"] = minWorkers
        if let hidden { o["hidden"] = hidden.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) ?? -1 } }
        return o
    }

    func resolve() throws -> JobSpec {
        do { return try JobSpec.load(path: config, overrides: overrides) } catch let error as JobSpecError {
            throw ValidationError(error.description)
        }
    }
}

struct Start: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a training job on this host: a coordinator and N worker processes.",
        discussion: """
            Shows progress while the job runs and ends with a summary. Exit status 0 only when the job completed.
            Examples:
              ddpctl start                                   # digits, MLP 64-128-10, 2 workers
              ddpctl start --workers 3 --epochs 50 --json
              ddpctl start --dataset idx --data-path train-images-idx3-ubyte --labels-path train-labels-idx1-ubyte \\
                           --model cnn --optimizer adam --lr 0.001
            """)

    @OptionGroup var job: JobOptions
    @Option(help: "Where job directories are made (default: $SWIFTDDP_HOME/jobs or ~/.swiftddp/jobs).") var jobsDir: String?
    @Option(help: "ipc (Unix sockets in the job directory) or tcp (loopback).") var transport = "ipc"
    @Option(help: "The ddpd executable (default: beside ddpctl).") var ddpd: String?
    @Option(help: "Log level of the job's processes.") var logLevel = "info"
    @Flag(help: "Print the summary as one JSON line (progress goes to standard error).") var json = false

    func run() throws {
        var spec = try job.resolve()
        if spec.jobID.isEmpty { spec.jobID = JobSpec.newJobID() }
        let directory = JobDirectory(path: Jobs.root(jobsDir) + "/" + spec.jobID)
        spec.output = directory.path
        let localJob = try LocalJob(spec: spec, directory: directory, ddpd: ddpd ?? sibling("ddpd"), transport: transport, logLevel: logLevel)
        let display = ProgressDisplay(toStandardError: json)
        display.line("job \(spec.jobID): \(spec.workers) workers, \(spec.dataset) \(spec.model), \(spec.epochs) epochs; directory \(directory.path)")
        let interrupts = InterruptHandler { count in
            if count == 1 {
                display.line("stopping the job after the current step (Ctrl-C again to kill it)")
                localJob.requestStop(reason: "interrupted from ddpctl start")
            } else {
                localJob.kill()
            }
        }
        try localJob.start()
        let summary = try localJob.wait { display.show($0, epochs: $1) }
        withExtendedLifetime(interrupts) {}
        display.finish()
        if json {
            print(summary.jsonLine)
        } else {
            print(summary.humanReadable(directory: directory.path))
        }
        if summary.state != "completed" { throw ExitCode.failure }
    }
}

/// The path of an executable beside this one.
func sibling(_ name: String) -> String {
    URL(fileURLWithPath: currentExecutable()).deletingLastPathComponent().appendingPathComponent(name).path
}

/// Where job directories live.
enum Jobs {
    static func root(_ flag: String?) -> String {
        if let flag { return flag }
        if let home = ProcessInfo.processInfo.environment["SWIFTDDP_HOME"], !home.isEmpty { return home + "/jobs" }
        return FileManager.default.homeDirectoryForCurrentUser.path + "/.swiftddp/jobs"
    }
}

/// Calls `handler` with a running count on each SIGINT or SIGTERM while alive.
final class InterruptHandler {
    private var sources: [DispatchSourceSignal] = []
    private var count = 0

    init(_ handler: @escaping (Int) -> Void) {
        for signalNumber in [SIGINT, SIGTERM] {
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
            source.setEventHandler { [unowned self] in
                count += 1
                handler(count)
            }
            source.resume()
            sources.append(source)
        }
    }

    deinit { for source in sources { source.cancel() } }
}

extension JobSummary {
    func humanReadable(directory: String) -> String {
        """
        \(state): \(epochs) epochs, \(steps) steps in \(String(format: "%.1f", wallSeconds)) s \
        (\(Int(samplesPerSecond)) samples/s) with \(workers) workers
        train loss \(String(format: "%.4f", trainLoss)), test loss \(String(format: "%.4f", testLoss)), \
        test accuracy \(String(format: "%.2f%%", testAccuracy * 100))
        model \(modelPath.isEmpty ? "(none)" : modelPath)\(message.isEmpty ? "" : "\n\(message)")
        """
    }
}
