import ArgumentParser
import DDPRuntime
import Foundation

/// The defaults the flags' help shows.
private let defaults = JobSpec()

/// The job keys as flags (every key of JobSpec, `--set KEY=VALUE` for any); any flag given overrides the job file.
struct JobOptions: ParsableArguments {
    @Option(help: "A job file (YAML or JSON) with the same keys as these flags (snake_case).") var config: String?
    @Option(help: "Set any job key: KEY=VALUE, the value read as JSON when it parses (repeatable; wins over the other flags).")
    var set: [String] = []
    @Option(help: "The job's id (default: a new one from the time).") var jobId: String?
    @Option(help: "digits (bundled), synthetic, csv, idx (MNIST files), npy, text (for --model gpt) (default: \(defaults.dataset); with --model gpt: text).") var dataset: String?
    @Option(help: "The CSV file, IDX image file, features .npy, or UTF-8 text file (text: empty for the bundled corpus).") var dataPath: String?
    @Option(help: "The IDX label file or labels .npy.") var labelsPath: String?
    @Option(parsing: .unconditional, help: "CSV: the label column, a header name or 0-based index; -1 is the last (default: \(defaults.labelColumn)).")
    var labelColumn: String?
    @Option(help: "CSV: the field separator, one character or 'tab' (default: \(defaults.delimiter)).") var delimiter: String?
    @Option(help: "Feature scaling with statistics of the training split: auto, none, max, minmax, standardize (default: \(defaults.scaling): standardize tables, max for images).")
    var scaling: String?
    @Option(help: "A model file whose parameters start the job (fine-tuning).") var initFrom: String?
    @Option(help: "Synthetic data: samples (default: \(defaults.syntheticSamples)).") var syntheticSamples: Int?
    @Option(help: "Synthetic data: features per sample (default: \(defaults.syntheticFeatures)).") var syntheticFeatures: Int?
    @Option(help: "Synthetic data: classes (default: \(defaults.syntheticClasses)).") var syntheticClasses: Int?
    @Option(help: "classification (labels), regression (a real-valued target, scored by MSE and R²) or language_model (default: \(defaults.task); with --model gpt: language_model).") var task: String?
    @Option(help: "mlp, cnn, logistic, linear (linear regression) or gpt (a language model; it also sets adamw, lr 1e-3, cosine, batch 32 unless given) (default: \(defaults.model)).") var model: String?
    @Option(help: "GPT: transformer blocks (default: \(defaults.nLayer)).") var nLayer: Int?
    @Option(help: "GPT: attention heads, dividing --n-embd (default: \(defaults.nHead)).") var nHead: Int?
    @Option(help: "GPT: embedding width (default: \(defaults.nEmbd)).") var nEmbd: Int?
    @Option(help: "GPT: context length in tokens (default: \(defaults.blockSize)).") var blockSize: Int?
    @Option(parsing: .unconditional, help: "GPT: dropout probability in training (default: \(defaults.dropout)).") var dropout: Float?
    @Option(help: "GPT: char (the text's characters) or byte (UTF-8 bytes) (default: \(defaults.vocabulary)).") var vocabulary: String?
    @Option(help: "Hidden layer sizes, comma-separated, e.g. 512,512 (default: \(defaults.hidden.map(String.init).joined(separator: ","))).") var hidden: String?
    @Option(help: "relu, leaky_relu, sigmoid, tanh, gelu (default: \(defaults.activation)).") var activation: String?
    @Option(help: "Your own training program (an executable built with the SwiftDDP library) as the workers; its arguments follow '--'.")
    var program: String?
    @Argument(parsing: .postTerminator, help: "Arguments for --program, after '--'.") var programArgs: [String] = []
    @Option(help: "Passes over the training data (default: \(defaults.epochs)).") var epochs: Int?
    @Option(help: "Samples per step over all workers together (default: \(defaults.batchSize)).") var batchSize: Int?
    @Option(help: "sgd, adam or adamw (default: \(defaults.optimizer)).") var optimizer: String?
    @Option(name: [.customLong("lr"), .customLong("learning-rate")], parsing: .unconditional,
            help: "Learning rate (default: \(defaults.learningRate)).") var learningRate: Float?
    @Option(parsing: .unconditional, help: "SGD momentum (default: \(defaults.momentum)).") var momentum: Float?
    @Flag(help: "Nesterov momentum.") var nesterov = false
    @Option(parsing: .unconditional, help: "Weight decay (default: \(defaults.weightDecay); adamw: 0.01 when 0).") var weightDecay: Float?
    @Option(help: "constant, step or cosine (default: \(defaults.schedule)).") var schedule: String?
    @Option(help: "Linear warm-up steps (default: \(defaults.warmupSteps)).") var warmupSteps: Int?
    @Option(help: "Schedule step: multiply the rate by --gamma every this many steps (default: \(defaults.stepEvery)).") var stepEvery: Int?
    @Option(parsing: .unconditional, help: "Schedule step: the factor (default: \(defaults.gamma)).") var gamma: Float?
    @Option(parsing: .unconditional, help: "Schedule cosine: the rate it ends at (default: \(defaults.minLearningRate)).") var minLearningRate: Float?
    @Option(parsing: .unconditional, help: "Clip the global gradient norm (0: off; default: \(defaults.clipNorm)).") var clipNorm: Float?
    @Option(help: "Random seed: data split, order, initial weights (default: \(defaults.seed)).") var seed: UInt64?
    @Option(parsing: .unconditional, help: "Held-out share evaluated after each epoch (default: \(defaults.testFraction)).") var testFraction: Double?
    @Option(help: "Worker processes (default: \(defaults.workers)).") var workers: Int?
    @Option(help: "Shares of a step's batch: equal, or speed (in proportion to each worker's measured throughput) (default: \(defaults.balance)).")
    var balance: String?
    @Option(help: "Steps complete with the first workers-minus-this pushes; the late ones' samples go to the next step (default: \(defaults.backupWorkers)).")
    var backupWorkers: Int?
    @Option(help: "With backup workers: apply a left-out worker's push up to this many steps late (default: \(defaults.staleness)).")
    var staleness: Int?
    @Option(help: "Local SGD / DiLoCo: steps each worker takes on its own between averages; 1: synchronous (default: \(defaults.syncEvery)).")
    var syncEvery: Int?
    @Option(help: "With --sync-every > 1, the coordinator's optimizer over the averaged changes: nesterov or sgd (default: \(defaults.outerOptimizer)).")
    var outerOptimizer: String?
    @Option(parsing: .unconditional, help: "The outer optimizer's step size (default: \(defaults.outerLR)).") var outerLr: Float?
    @Option(parsing: .unconditional, help: "The outer optimizer's momentum (default: \(defaults.outerMomentum)).") var outerMomentum: Float?
    @Option(help: "The job fails below this many live workers (default: \(defaults.minWorkers)).") var minWorkers: Int?
    @Option(help: "BLAS threads per process; 0: the CPUs shared among the workers (default: \(defaults.blasThreads)).") var blasThreads: Int?
    @Option(help: "Steps between checkpoints (0: every epoch; default: \(defaults.checkpointEvery)).") var checkpointEvery: Int?
    @Option(help: "Checkpoints to keep (default: \(defaults.keepCheckpoints)).") var keepCheckpoints: Int?
    @Option(help: "Checkpoints failing in a row before the job fails (0: never; default: \(defaults.checkpointFailureLimit)).") var checkpointFailureLimit: Int?
    @Option(help: "Milliseconds between heartbeats (default: \(defaults.heartbeatIntervalMs)).") var heartbeatIntervalMs: Int?
    @Option(help: "A worker silent this long is lost (default: \(defaults.heartbeatTimeoutMs)).") var heartbeatTimeoutMs: Int?
    @Option(help: "Seconds to wait for the workers to join (default: \(defaults.joinTimeoutSeconds)).") var joinTimeoutSeconds: Double?
    @Option(help: "The least seconds to wait for a step's gradients (default: \(defaults.stepTimeoutSeconds)).") var stepTimeoutSeconds: Double?
    @Option(help: "Wire type of gradients and updates: f32, bf16 or f16 (default: \(defaults.wireDtype)).") var wireDtype: String?
    @Option(name: .customLong("bucket-kb"), help: "Gradient bucket size in KiB, pushed during the backward pass (0: one message; default: \(defaults.bucketKB)).")
    var bucketKB: Int?
    @Flag(inversion: .prefixedNo, help: "Workers on the coordinator's host pass tensors through shared memory (default: on).")
    var sharedMemory: Bool?
    @Option(help: "Coordinator processes; with K > 1 each averages and steps its share of the parameters (default: \(defaults.coordinatorShards)).")
    var coordinatorShards: Int?
    @Option(help: "A folder of CURVE keys from 'ddpctl keygen': encrypted traffic, only authorised workers.") var keysDir: String?
    @Option(help: "Serve Prometheus metrics over HTTP at IPV4:PORT (port 0: any free one; '' for none; default: \(defaults.metricsAddress)).")
    var metricsAddress: String?

    /// The flags that were given, keyed as in a job file (`--set` last, so it wins).
    func overrides() throws -> [String: Any] {
        var o: [String: Any] = [:]
        o["job_id"] = jobId
        o["dataset"] = dataset; o["data_path"] = dataPath.map(Self.absolute); o["labels_path"] = labelsPath.map(Self.absolute)
        o["label_column"] = labelColumn; o["delimiter"] = delimiter; o["scaling"] = scaling; o["init_from"] = initFrom.map(Self.absolute)
        o["synthetic_samples"] = syntheticSamples; o["synthetic_features"] = syntheticFeatures
        o["synthetic_classes"] = syntheticClasses; o["task"] = task; o["model"] = model; o["activation"] = activation
        o["n_layer"] = nLayer; o["n_head"] = nHead; o["n_embd"] = nEmbd; o["block_size"] = blockSize
        o["dropout"] = dropout.map { Double($0) }; o["vocabulary"] = vocabulary
        o["epochs"] = epochs; o["batch_size"] = batchSize; o["optimizer"] = optimizer
        o["learning_rate"] = learningRate.map { Double($0) }; o["momentum"] = momentum.map { Double($0) }
        if nesterov { o["nesterov"] = true }
        o["weight_decay"] = weightDecay.map { Double($0) }; o["schedule"] = schedule; o["warmup_steps"] = warmupSteps
        o["step_every"] = stepEvery; o["gamma"] = gamma.map { Double($0) }; o["min_learning_rate"] = minLearningRate.map { Double($0) }
        o["clip_norm"] = clipNorm.map { Double($0) }; o["seed"] = seed; o["test_fraction"] = testFraction
        o["workers"] = workers; o["balance"] = balance; o["backup_workers"] = backupWorkers; o["staleness"] = staleness
        o["sync_every"] = syncEvery; o["outer_optimizer"] = outerOptimizer
        o["outer_lr"] = outerLr.map { Double($0) }; o["outer_momentum"] = outerMomentum.map { Double($0) }
        o["min_workers"] = minWorkers; o["blas_threads"] = blasThreads
        o["checkpoint_every"] = checkpointEvery; o["keep_checkpoints"] = keepCheckpoints
        o["checkpoint_failure_limit"] = checkpointFailureLimit
        o["heartbeat_interval_ms"] = heartbeatIntervalMs; o["heartbeat_timeout_ms"] = heartbeatTimeoutMs
        o["join_timeout_seconds"] = joinTimeoutSeconds; o["step_timeout_seconds"] = stepTimeoutSeconds
        o["wire_dtype"] = wireDtype; o["bucket_kb"] = bucketKB; o["shared_memory"] = sharedMemory
        o["coordinator_shards"] = coordinatorShards
        o["keys_dir"] = keysDir.map(Self.absolute); o["metrics_address"] = metricsAddress
        o["program"] = program.map(Self.absolute); o["program_args"] = programArgs.isEmpty ? nil : programArgs
        if let hidden {
            let parts = hidden.split(separator: ",", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
            let sizes = parts.compactMap { Int($0) }
            guard sizes.count == parts.count, !sizes.isEmpty else {
                throw JobSpecError.invalid("--hidden '\(hidden)' is not a comma-separated list of layer sizes (e.g. 128 or 512,256)")
            }
            o["hidden"] = sizes
        }
        return o.merging(try JobSpec.overrides(set)) { _, assignment in assignment }
    }

    /// A path as given, made absolute (the job's processes run elsewhere).
    static func absolute(_ path: String) -> String { URL(fileURLWithPath: path).standardizedFileURL.path }

    /// The job from the file and flags; an invalid one is reported in one line with exit status 64.
    func resolve() throws -> JobSpec {
        do { return try JobSpec.load(path: config, overrides: try overrides()) } catch let error as JobSpecError {
            SafeOutput.print("Error: \(error)\n", to: 2)
            throw ExitCode(64)
        }
    }

    /// Whether any job key was given as a flag.
    var anyKeyGiven: Bool { (try? overrides().isEmpty == false) ?? true }
}

/// Loads the job's data and builds its model (and reads `init_from`) before anything is made on disk:
/// an invalid job exits 64 with the reason and leaves no job directory.
func checkBeforeStarting(_ spec: JobSpec) throws {
    guard spec.program.isEmpty else {  // the program brings its model and data; it must at least be there to run
        guard FileManager.default.isExecutableFile(atPath: spec.program) else {
            SafeOutput.print("Error: invalid job: program \(spec.program) \(FileManager.default.fileExists(atPath: spec.program) ? "is not executable" : "not found")\n", to: 2)
            throw ExitCode(64)
        }
        return
    }
    do {
        let setup = try BuiltInTasks.make(spec)
        try setup.loadInitialParameters()
    } catch {
        throw invalidJob(error)
    }
}

/// Reports a job that cannot run in one line ("Error: invalid job: ...") and gives exit status 64.
func invalidJob(_ error: any Error) -> ExitCode {
    SafeOutput.print("Error: invalid job: \((error as? JobSpecError)?.reason ?? Readable.message(error))\n", to: 2)
    return ExitCode(64)
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
    @Option(help: "Continue a stopped or failed job (its id or directory) from its newest checkpoint; --epochs may make it longer.")
    var resume: String?
    @Flag(help: "Start the job in the background and return, printing its id and directory.") var detach = false
    @Flag(help: "Print the summary (or, with --detach, the job) as one JSON line; progress goes to standard error.")
    var json = false

    func run() throws {
        let (spec, directory) = try resume.map { try resumedJob($0) } ?? newJob()
        if detach {
            try startDetached(spec, directory)
            return
        }
        let localJob = try launch.localJob(spec, directory)
        let display = ProgressDisplay(toStandardError: json, regression: spec.task == "regression", program: !spec.program.isEmpty,
                                      tokensPerSample: spec.tokensPerSample)
        display.line("job \(spec.jobID): \(resume == nil ? "" : "resumed, ")\(spec.workers) workers, \(spec.dataset) \(spec.model), \(spec.epochs) epochs; directory \(directory.path)")
        let interrupts = InterruptHandler { count in
            if count == 1 {
                display.line("stopping the job after the current step (Ctrl-C again to kill it)")
                localJob.requestStop(reason: "interrupted from ddpctl start")
            } else {
                localJob.kill()
            }
        }
        try localJob.start(resuming: resume != nil)
        let summary = try localJob.wait { display.show($0, epochs: $1) }
        withExtendedLifetime(interrupts) {}
        display.finish()
        print(json ? summary.jsonLine : summary.humanReadable(directory: directory.path, tokensPerSample: spec.tokensPerSample))
        if summary.state != "completed" { throw ExitCode.failure }
    }

    /// A new job from the flags and job file, checked (data, model) before its directory is made.
    private func newJob() throws -> (JobSpec, JobDirectory) {
        var spec = try job.resolve()
        if spec.jobID.isEmpty { spec.jobID = JobSpec.newJobID() }
        let directory = JobDirectory(path: JobLookup.root(launch.jobsDir) + "/" + spec.jobID)
        if FileManager.default.fileExists(atPath: directory.specPath) {
            SafeOutput.print("Error: invalid job: job '\(spec.jobID)' exists already in \(directory.path) (resume it with --resume, or choose another job_id)\n", to: 2)
            throw ExitCode(64)
        }
        spec.output = directory.path
        try checkBeforeStarting(spec)
        return (spec, directory)
    }

    /// A stopped or failed job to continue in its directory from its newest checkpoint: its spec, with
    /// `--epochs` if given; its summary is kept as `previous-summary.json`.
    private func resumedJob(_ name: String) throws -> (JobSpec, JobDirectory) {
        func invalid(_ reason: String) -> ExitCode {
            SafeOutput.print("Error: cannot resume: \(reason)\n", to: 2)
            return ExitCode(64)
        }
        let directory: JobDirectory
        do { directory = try JobLookup.find(name, root: JobLookup.root(launch.jobsDir)) } catch { throw invalid("\(error)") }
        var given = try job.overrides()
        let epochs = given.removeValue(forKey: "epochs") as? Int
        guard given.isEmpty && job.config == nil else {
            throw invalid("with --resume only --epochs may change (the job's keys are in \(directory.specPath)); given: \(given.keys.sorted().joined(separator: ", "))")
        }
        guard !JobLookup.isRunning(directory) else { throw invalid("job \(directory.path) is running") }
        var spec: JobSpec
        do { spec = try JobSpec.fromJSON(try String(contentsOfFile: directory.specPath, encoding: .utf8)) } catch {
            throw invalid("\(directory.specPath): \(Readable.message(error))")
        }
        let (latest, skipped) = Checkpoint.latest(in: directory)
        guard let checkpoint = latest else {
            throw invalid("job \(spec.jobID) has no checkpoint to continue from" + (skipped.isEmpty ? "" : " (\(skipped.count) did not verify: \(skipped[0].reason))"))
        }
        if let epochs { spec.epochs = epochs }
        do { try spec.validate() } catch { throw invalid("\(error)") }
        let total = try BuiltInTasks.make(spec).totalSteps
        guard checkpoint.step < total else {
            throw invalid("job \(spec.jobID) has trained all \(spec.epochs) epochs (checkpoint at step \(checkpoint.step)); give --epochs N to train longer")
        }
        if let old = directory.summary() {
            try? FileManager.default.removeItem(atPath: directory.path + "/previous-summary.json")
            try FileManager.default.moveItem(atPath: directory.summaryPath, toPath: directory.path + "/previous-summary.json")
            if !json { print("resuming job \(spec.jobID) (\(old.state) at step \(old.steps)) from \(checkpoint.path)") }
        }
        try? FileManager.default.removeItem(atPath: directory.stopRequestPath)
        return (spec, directory)
    }

    /// Writes the job directory and hands the job to a background supervisor; returns once the
    /// coordinator listens.
    private func startDetached(_ spec: JobSpec, _ directory: JobDirectory) throws {
        try directory.create()
        try spec.json().write(toFile: directory.specPath, atomically: true, encoding: .utf8)
        try? FileManager.default.removeItem(atPath: directory.endpointsPath)  // a resumed job's old ones
        var arguments = ["supervise", "--job-dir", directory.path, "--transport", launch.transport, "--log-level", launch.logLevel,
                         "--max-restarts", "\(launch.maxRestarts)"] + (resume == nil ? [] : ["--resume"])
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
    @Flag(help: "Continue from the newest checkpoint.") var resume = false

    func run() throws {
        let directory = JobDirectory(path: jobDir)
        let spec = try JobSpec.fromJSON(try String(contentsOfFile: directory.specPath, encoding: .utf8))
        let localJob = try launch.localJob(spec, directory)
        let interrupts = InterruptHandler { count in
            if count == 1 { localJob.requestStop(reason: "the supervisor was asked to stop") } else { localJob.kill() }
        }
        try localJob.start(resuming: resume)
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
    func humanReadable(directory: String, tokensPerSample: Int = 0) -> String {
        let scores = epochs > 0 ? ScoreText.test(loss: testLoss, accuracy: testAccuracy, regression: isRegression, program: task == "program") : "no epoch finished"
        return """
            \(state): \(epochs) epochs, \(steps) steps in \(String(format: "%.1f", wallSeconds)) s \
            (\(ScoreText.throughput(samplesPerSecond, tokensPerSample: tokensPerSample))) with \(workers) workers
            train loss \(ScoreText.fixed(trainLoss)), \(scores)
            model \(modelPath.isEmpty ? "(none)" : modelPath)\(message.isEmpty ? "" : "\n\(message)")
            """
    }
}
