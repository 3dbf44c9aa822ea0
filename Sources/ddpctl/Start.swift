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
    @Option(help: "classification (labels) or regression (a real-valued target; R² is reported as accuracy).") var task: String?
    @Option(help: "mlp, cnn, logistic, or linear (linear regression).") var model: String?
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
    @Option(help: "Steps between checkpoints (0: every epoch).") var checkpointEvery: Int?
    @Option(help: "Checkpoints failing in a row before the job fails (0: never; default 3).") var checkpointFailureLimit: Int?
    @Option(help: "Wire type of gradients and updates: f32, bf16 or f16.") var wireDtype: String?
    @Option(name: .customLong("bucket-kb"), help: "Gradient bucket size in KiB, pushed during the backward pass (0: one message).")
    var bucketKB: Int?
    @Flag(inversion: .prefixedNo, help: "Workers on the coordinator's host pass tensors through shared memory (default: on).")
    var sharedMemory: Bool?
    @Option(help: "Coordinator processes; with K > 1 each averages and steps its share of the parameters.") var coordinatorShards: Int?
    @Option(help: "A folder of CURVE keys from 'ddpctl keygen': encrypted traffic, only authorised workers.") var keysDir: String?

    /// The flags that were given, keyed as in a job file.
    var overrides: [String: Any] {
        var o: [String: Any] = [:]
        o["dataset"] = dataset; o["data_path"] = dataPath; o["labels_path"] = labelsPath
        o["synthetic_samples"] = syntheticSamples; o["synthetic_features"] = syntheticFeatures
        o["synthetic_classes"] = syntheticClasses; o["task"] = task; o["model"] = model; o["activation"] = activation
        o["epochs"] = epochs; o["batch_size"] = batchSize; o["optimizer"] = optimizer
        o["learning_rate"] = learningRate.map { Double($0) }; o["momentum"] = momentum.map { Double($0) }
        if nesterov { o["nesterov"] = true }
        o["weight_decay"] = weightDecay.map { Double($0) }; o["schedule"] = schedule; o["warmup_steps"] = warmupSteps
        o["clip_norm"] = clipNorm.map { Double($0) }; o["seed"] = seed; o["test_fraction"] = testFraction
        o["workers"] = workers; o["min_workers"] = minWorkers; o["checkpoint_every"] = checkpointEvery
        o["checkpoint_failure_limit"] = checkpointFailureLimit
        o["wire_dtype"] = wireDtype; o["bucket_kb"] = bucketKB; o["shared_memory"] = sharedMemory
        o["coordinator_shards"] = coordinatorShards
        o["keys_dir"] = keysDir.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
        if let hidden { o["hidden"] = hidden.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) ?? -1 } }
        return o
    }

    /// The job from the file and flags; an invalid one is reported in one line with exit status 64.
    func resolve() throws -> JobSpec {
        do { return try JobSpec.load(path: config, overrides: overrides) } catch let error as JobSpecError {
            SafeOutput.print("Error: \(error)\n", to: 2)
            throw ExitCode(64)
        }
    }
}

struct Start: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a training job on this host: a coordinator and N worker processes.",
        discussion: """
            Shows progress while the job runs and ends with a summary; with --detach it returns at once and
            'ddpctl status', 'watch', 'logs' and 'stop' find the job. Exit status: 0 the job completed (or, with
            --detach, started); 1 it failed or was stopped; 64 the job is invalid.
            Examples:
              ddpctl start                                   # digits, MLP 64-128-10, 2 workers
              ddpctl start --workers 3 --epochs 50 --json
              ddpctl start --detach --config job.yaml
              ddpctl start --dataset idx --data-path train-images-idx3-ubyte --labels-path train-labels-idx1-ubyte \\
                           --model cnn --optimizer adam --lr 0.001
            """)

    @OptionGroup var job: JobOptions
    @OptionGroup var launch: LaunchOptions
    @Flag(help: "Start the job in the background and return, printing its id and directory.") var detach = false
    @Flag(help: "Print the summary (or, with --detach, the job) as one JSON line; progress goes to standard error.")
    var json = false

    func run() throws {
        var spec = try job.resolve()
        if spec.jobID.isEmpty { spec.jobID = JobSpec.newJobID() }
        let directory = JobDirectory(path: JobLookup.root(launch.jobsDir) + "/" + spec.jobID)
        spec.output = directory.path
        if detach {
            try startDetached(spec, directory)
            return
        }
        let localJob = try launch.localJob(spec, directory)
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
        print(json ? summary.jsonLine : summary.humanReadable(directory: directory.path))
        if summary.state != "completed" { throw ExitCode.failure }
    }

    /// Writes the job directory and hands the job to a background supervisor; returns once the
    /// coordinator listens.
    private func startDetached(_ spec: JobSpec, _ directory: JobDirectory) throws {
        try directory.create()
        try spec.json().write(toFile: directory.specPath, atomically: true, encoding: .utf8)
        var arguments = ["supervise", "--job-dir", directory.path, "--transport", launch.transport, "--log-level", launch.logLevel,
                         "--max-restarts", "\(launch.maxRestarts)"]
        if let ddpd = launch.ddpd { arguments += ["--ddpd", ddpd] }
        let pid = try Detach.spawn(currentExecutable(), arguments, logPath: directory.logPath("supervisor"))
        let deadline = Date().addingTimeInterval(15)
        while directory.endpoints() == nil {
            guard JobLookup.isAlive(pid) || directory.endpoints() != nil else {
                let log = (try? String(contentsOfFile: directory.logPath("supervisor"), encoding: .utf8)) ?? ""
                throw ValidationError("the job did not start: \(log.split(separator: "\n").suffix(3).joined(separator: " | "))")
            }
            guard Date() < deadline else { throw ValidationError("the job's coordinator did not start listening within 15 s") }
            usleep(10_000)
        }
        if json {
            print("{\"job_dir\":\"\(directory.path)\",\"job_id\":\"\(spec.jobID)\",\"supervisor_pid\":\(pid)}")
        } else {
            print("started job \(spec.jobID) in the background\ndirectory \(directory.path)")
            print("follow it with: ddpctl watch --job \(spec.jobID)")
        }
    }
}

/// How a local job's processes are started.
struct LaunchOptions: ParsableArguments {
    @Option(help: "Where job directories are made (default: $SWIFTDDP_HOME/jobs or ~/.swiftddp/jobs).") var jobsDir: String?
    @Option(help: "ipc (Unix sockets in the job directory) or tcp (loopback).") var transport = "ipc"
    @Option(help: "The ddpd executable (default: beside ddpctl).") var ddpd: String?
    @Option(help: "Log level of the job's processes: trace, debug, info, notice, warning, error.") var logLevel = "info"
    @Option(help: "Restarts of a failed worker before its rank is given up.") var maxRestarts = 3

    func localJob(_ spec: JobSpec, _ directory: JobDirectory) throws -> LocalJob {
        try LocalJob(spec: spec, directory: directory, ddpd: ddpd ?? sibling("ddpd"), transport: transport, logLevel: logLevel,
                     maxRestarts: maxRestarts)
    }
}

/// The background side of `start --detach`: runs the job in its directory to the end.
struct Supervise: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Supervise a detached job (started by 'start --detach').", shouldDisplay: false)
    @Option(help: "The job directory with spec.json.") var jobDir: String
    @OptionGroup var launch: LaunchOptions

    func run() throws {
        let directory = JobDirectory(path: jobDir)
        let spec = try JobSpec.fromJSON(try String(contentsOfFile: directory.specPath, encoding: .utf8))
        let localJob = try launch.localJob(spec, directory)
        let interrupts = InterruptHandler { count in
            if count == 1 { localJob.requestStop(reason: "the supervisor was asked to stop") } else { localJob.kill() }
        }
        try localJob.start()
        let summary = try localJob.wait { _, _ in }
        withExtendedLifetime(interrupts) {}
        print(summary.jsonLine)
    }
}

/// The path of an executable beside this one.
func sibling(_ name: String) -> String {
    URL(fileURLWithPath: currentExecutable()).deletingLastPathComponent().appendingPathComponent(name).path
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
        \(task == "regression" ? String(format: "test R² %.4f", testAccuracy) : String(format: "test accuracy %.2f%%", testAccuracy * 100))
        model \(modelPath.isEmpty ? "(none)" : modelPath)\(message.isEmpty ? "" : "\n\(message)")
        """
    }
}
