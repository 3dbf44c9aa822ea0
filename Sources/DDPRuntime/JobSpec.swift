import Autodiff
import Foundation
import DDPData
import DDPWire
import Yams

/// Everything that defines a training job. Read from flags and from a job file (`--config job.yaml` or
/// `.json`) with the same snake_case keys; every value is checked before a process starts.
public struct JobSpec: Codable, Equatable, Sendable {
    public var jobID = ""
    /// `digits` (bundled), `synthetic`, `csv`, `idx` (MNIST files), `npy`, or `text` (a UTF-8 file for
    /// `model: gpt`; `model: gpt` alone means `text`).
    public var dataset = "digits"
    /// The CSV file, the IDX image file, the features `.npy`, or the text file (empty for `text`: the
    /// bundled corpus).
    public var dataPath = ""
    /// The IDX label file or the labels `.npy`.
    public var labelsPath = ""
    /// CSV: the label (or target) column, a header name or a 0-based index (-1: the last column).
    public var labelColumn = "0"
    /// CSV: the field separator (`,`, `;`, `tab`).
    public var delimiter = ","
    /// How features are scaled before training, with statistics of the training split (stored in the model
    /// file): `none`, `max`, `minmax`, `standardize`, or `auto` (standardize tabular data, divide images by
    /// their largest value).
    public var scaling = "auto"
    /// A model file (`model.safetensors` of an earlier job) whose parameters start this job: fine-tuning.
    public var initFrom = ""
    public var syntheticSamples = 60000
    public var syntheticFeatures = 784
    public var syntheticClasses = 10
    /// `classification` (integer labels, softmax cross-entropy), `regression` (a real-valued target,
    /// mean squared error; `test_accuracy` then reports R²), or `language_model` (`model: gpt`, which
    /// implies it: next-token cross-entropy; `test_accuracy` is the share of next tokens predicted).
    public var task = "classification"
    /// `mlp`, `cnn` (LeNet-style, for image data), `logistic` (softmax regression), `linear` (linear
    /// regression), `gpt` (a GPT-2-style language model on `dataset: text`), or a list of layers (`LayerSpec`).
    /// Left unset by the job, `model: gpt` trains with nanoGPT's kind of settings: adamw at 1e-3, weight
    /// decay 0.1, batch 32, 5 epochs, cosine decay after 20 warm-up steps, clip_norm 1, test_fraction 0.1.
    public var model: ModelChoice = "mlp"
    /// GPT: transformer blocks.
    public var nLayer = 4
    /// GPT: attention heads per block (they divide `n_embd`).
    public var nHead = 4
    /// GPT: the width of a token's vector.
    public var nEmbd = 128
    /// GPT: the context in tokens; the text is cut into windows of this many (plus the next token).
    public var blockSize = 64
    /// GPT: the probability of dropping an activation in training (0: off).
    public var dropout: Float = 0
    /// GPT: `char` (the text's distinct characters) or `byte` (its 256 UTF-8 byte values).
    public var vocabulary = "char"
    /// Hidden layer sizes of the MLP (and the CNN's dense layer).
    public var hidden = [128]
    /// A user's executable (built with the `SwiftDDP` library) that runs as the job's workers with its
    /// own model, loss and data; `dataset`, `model` and their keys are then the program's business.
    public var program = ""
    /// Arguments for `program`.
    public var programArgs: [String] = []
    public var activation = "relu"
    public var epochs = 30
    /// Samples per step over all workers together.
    public var batchSize = 128
    /// `sgd`, `adam` or `adamw`.
    public var optimizer = "sgd"
    public var learningRate: Float = 0.1
    public var momentum: Float = 0.9
    public var nesterov = false
    public var weightDecay: Float = 0
    /// `constant`, `step`, or `cosine`; `warmup_steps` ramps up first.
    public var schedule = "constant"
    public var warmupSteps = 0
    /// For `step`: multiply the rate by `gamma` every `step_every` steps.
    public var stepEvery = 1000
    public var gamma: Float = 0.1
    public var minLearningRate: Float = 0
    /// Clip the global gradient norm to this value (0: off).
    public var clipNorm: Float = 0
    public var seed: UInt64 = 0
    /// The held-out share of the data, evaluated after every epoch.
    public var testFraction = 0.2
    /// Workers the job trains with.
    public var workers = 2
    /// How a step's global batch is cut among the workers: `equal` shares, or `speed`: shares in
    /// proportion to each worker's measured samples per second (the same samples and the same global
    /// batch; the update equals the equal-share one up to the order of summation).
    public var balance = "equal"
    /// Backup workers: each step completes with the first `workers - backup_workers` pushes; the late
    /// workers' samples go into the next step's batch (an epoch's last step waits for every worker, so that
    /// each sample is still trained once an epoch). 0 waits for every worker at every step.
    public var backupWorkers = 0
    /// Bounded staleness, with backup workers: a left-out worker's push is still applied when it arrives at
    /// most this many steps late (a later step's update then holds a gradient computed on older parameters);
    /// later, it is refused with the reason and its samples are trained again. 0: late pushes are dropped.
    public var staleness = 0
    /// Local SGD / DiLoCo: workers take this many steps of the job's optimizer on their own shares (a
    /// round), then push their parameter change; the coordinator averages the changes and takes one step of
    /// the outer optimizer. 1 is synchronous SGD.
    public var syncEvery = 1
    /// The coordinator's optimizer over the averaged parameter changes of a round (`sync_every` > 1):
    /// `nesterov` (DiLoCo's) or `sgd`; its step size and momentum (`sgd` with `outer_lr` 1 averages the
    /// workers' parameters, as federated averaging does).
    public var outerOptimizer = "nesterov"
    public var outerLR: Float = 0.7
    public var outerMomentum: Float = 0.9
    /// Whether a coordinator step is a round of local steps (`sync_every` > 1).
    public var isLocalSGD: Bool { syncEvery > 1 }
    /// The job fails when fewer workers than this remain.
    public var minWorkers = 1
    public var heartbeatIntervalMs = 1000
    public var heartbeatTimeoutMs = 5000
    /// How long the coordinator waits for the workers to join before the job fails.
    public var joinTimeoutSeconds = 60.0
    /// The least time the coordinator waits for a step's gradients (it adapts upwards to measured steps).
    public var stepTimeoutSeconds = 10.0
    /// Write a checkpoint every this many steps (0: at the end of every epoch), and at the end.
    public var checkpointEvery = 0
    /// How many checkpoints to keep.
    public var keepCheckpoints = 3
    /// The job fails after this many checkpoints in a row could not be written (a full disk: a coordinator
    /// that died then would fall back far); 0 never fails for it. The failures show in status either way.
    public var checkpointFailureLimit = 3
    /// A folder of CURVE keys (`ddpctl keygen`): with it all traffic is encrypted and only authorised
    /// workers can join.
    public var keysDir = ""
    /// How gradients and parameter updates travel: `f32`, or `bf16`/`f16` (half the bytes; the coordinator
    /// keeps f32 master parameters and sends changes, so every worker holds the same replica).
    public var wireDtype = "f32"
    /// BLAS threads per process; 0 (the default) leaves it to `TrainingSetup.automaticBLASThreads`: the
    /// CPUs this process may use shared among the workers on its host.
    public var blasThreads = 0
    /// Workers push gradients in buckets of about this many KiB while the backward pass goes on (last
    /// layers first), so that sending and averaging overlap the rest of it; 0 sends each push whole.
    public var bucketKB = 1024
    /// Workers on the coordinator's host pass gradients and updates through shared memory (only the
    /// messages describing them go through ZeroMQ); false sends every tensor in frames.
    public var sharedMemory = true
    /// Coordinator processes: the leader and K-1 followers, each averaging and stepping the parameters
    /// `ShardPlan` gives it (an equal span of the model's elements); results are identical to one coordinator.
    public var coordinatorShards = 1
    /// Where the coordinator serves its Prometheus metrics over HTTP (`HOST:PORT`, port 0: any free one;
    /// the URL is in `endpoints.json` and `status`); empty: not served.
    public var metricsAddress = "127.0.0.1:0"
    /// Where the job writes its model, summary, checkpoints and logs.
    public var output = ""

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case jobID = "job_id", dataset, dataPath = "data_path", labelsPath = "labels_path"
        case labelColumn = "label_column", delimiter, scaling, initFrom = "init_from"
        case syntheticSamples = "synthetic_samples", syntheticFeatures = "synthetic_features"
        case syntheticClasses = "synthetic_classes", task, model, nLayer = "n_layer", nHead = "n_head", nEmbd = "n_embd"
        case blockSize = "block_size", dropout, vocabulary, hidden, program, programArgs = "program_args", activation, epochs, batchSize = "batch_size"
        case optimizer, learningRate = "learning_rate", momentum, nesterov, weightDecay = "weight_decay", schedule
        case warmupSteps = "warmup_steps", stepEvery = "step_every", gamma, minLearningRate = "min_learning_rate"
        case clipNorm = "clip_norm", seed, testFraction = "test_fraction", workers, balance, backupWorkers = "backup_workers", staleness, minWorkers = "min_workers"
        case syncEvery = "sync_every", outerOptimizer = "outer_optimizer", outerLR = "outer_lr", outerMomentum = "outer_momentum"
        case heartbeatIntervalMs = "heartbeat_interval_ms", heartbeatTimeoutMs = "heartbeat_timeout_ms"
        case joinTimeoutSeconds = "join_timeout_seconds", stepTimeoutSeconds = "step_timeout_seconds", output
        case checkpointEvery = "checkpoint_every", keepCheckpoints = "keep_checkpoints", checkpointFailureLimit = "checkpoint_failure_limit", keysDir = "keys_dir", wireDtype = "wire_dtype", blasThreads = "blas_threads"
        case bucketKB = "bucket_kb", sharedMemory = "shared_memory", coordinatorShards = "coordinator_shards"
        case metricsAddress = "metrics_address"
    }

    /// Every key a job file may hold.
    public static var keys: [String] { CodingKeys.allCases.map(\.rawValue) }

    /// Decodes with defaults for missing keys; unknown keys are an error (a typo must not pass silently).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: AnyKey.self)
        for key in c.allKeys where CodingKeys(rawValue: key.stringValue) == nil {
            let near = Self.keys.min { Self.distance($0, key.stringValue) < Self.distance($1, key.stringValue) }!
            throw JobSpecError.invalid("unknown key '\(key.stringValue)'" + (Self.distance(near, key.stringValue) <= 3 ? " (did you mean '\(near)'?)" : ""))
        }
        let k = try decoder.container(keyedBy: CodingKeys.self)
        func read<T: Decodable>(_ key: CodingKeys, _ value: inout T) throws {
            do {
                if let v = try k.decodeIfPresent(T.self, forKey: key) { value = v }
            } catch let error as JobSpecError { throw error } catch {
                throw JobSpecError.invalid("key '\(key.rawValue)' must be \(Self.describe(T.self))")
            }
        }
        try read(.jobID, &jobID); try read(.dataset, &dataset); try read(.dataPath, &dataPath)
        try read(.labelsPath, &labelsPath); try read(.syntheticSamples, &syntheticSamples)
        if let index = try? k.decodeIfPresent(Int.self, forKey: .labelColumn) { labelColumn = "\(index)" } else { try read(.labelColumn, &labelColumn) }
        try read(.delimiter, &delimiter); try read(.scaling, &scaling); try read(.initFrom, &initFrom)
        try read(.syntheticFeatures, &syntheticFeatures); try read(.syntheticClasses, &syntheticClasses)
        try read(.task, &task); try read(.model, &model); try read(.hidden, &hidden); try read(.program, &program); try read(.programArgs, &programArgs); try read(.activation, &activation)
        try read(.epochs, &epochs); try read(.batchSize, &batchSize); try read(.optimizer, &optimizer)
        try read(.learningRate, &learningRate); try read(.momentum, &momentum); try read(.nesterov, &nesterov)
        try read(.weightDecay, &weightDecay); try read(.schedule, &schedule); try read(.warmupSteps, &warmupSteps)
        try read(.stepEvery, &stepEvery); try read(.gamma, &gamma); try read(.minLearningRate, &minLearningRate)
        try read(.clipNorm, &clipNorm); try read(.seed, &seed); try read(.testFraction, &testFraction)
        try read(.workers, &workers); try read(.balance, &balance); try read(.backupWorkers, &backupWorkers); try read(.staleness, &staleness)
        try read(.syncEvery, &syncEvery); try read(.outerOptimizer, &outerOptimizer); try read(.outerLR, &outerLR); try read(.outerMomentum, &outerMomentum)
        try read(.minWorkers, &minWorkers)
        try read(.heartbeatIntervalMs, &heartbeatIntervalMs); try read(.heartbeatTimeoutMs, &heartbeatTimeoutMs)
        try read(.joinTimeoutSeconds, &joinTimeoutSeconds); try read(.stepTimeoutSeconds, &stepTimeoutSeconds)
        try read(.output, &output); try read(.checkpointEvery, &checkpointEvery); try read(.keepCheckpoints, &keepCheckpoints)
        try read(.checkpointFailureLimit, &checkpointFailureLimit)
        try read(.keysDir, &keysDir); try read(.wireDtype, &wireDtype); try read(.blasThreads, &blasThreads)
        try read(.bucketKB, &bucketKB); try read(.sharedMemory, &sharedMemory); try read(.coordinatorShards, &coordinatorShards)
        try read(.metricsAddress, &metricsAddress)
        try read(.nLayer, &nLayer); try read(.nHead, &nHead); try read(.nEmbd, &nEmbd); try read(.blockSize, &blockSize)
        try read(.dropout, &dropout); try read(.vocabulary, &vocabulary)
        if model == "gpt" { applyLanguageModelDefaults(given: Set(k.allKeys)) }
    }

    /// What `model: gpt` changes of the keys the job leaves unset (see `model`).
    private mutating func applyLanguageModelDefaults(given: Set<CodingKeys>) {
        func fill<T>(_ key: CodingKeys, _ value: inout T, _ languageModelValue: T) { if !given.contains(key) { value = languageModelValue } }
        fill(.dataset, &dataset, "text"); fill(.task, &task, "language_model"); fill(.optimizer, &optimizer, "adamw")
        fill(.learningRate, &learningRate, 1e-3); fill(.weightDecay, &weightDecay, 0.1); fill(.batchSize, &batchSize, 32)
        fill(.epochs, &epochs, 5); fill(.schedule, &schedule, "cosine"); fill(.warmupSteps, &warmupSteps, 20)
        fill(.clipNorm, &clipNorm, 1)
        fill(.testFraction, &testFraction, 0.1)
    }

    /// Tokens in one sample: `block_size` for a language model, else 0 (samples are not text).
    public var tokensPerSample: Int { model == "gpt" ? blockSize : 0 }

    /// The GPT's sizes for a vocabulary of `vocabularySize` tokens.
    public func gptConfiguration(vocabularySize: Int) -> GPTConfiguration {
        GPTConfiguration(vocabularySize: vocabularySize, blockSize: blockSize, layers: nLayer, heads: nHead, embedding: nEmbd, dropout: dropout)
    }

    private static func describe(_ type: Any.Type) -> String {
        switch type {
        case is Int.Type, is UInt64.Type: "an integer"
        case is Float.Type, is Double.Type: "a number"
        case is Bool.Type: "true or false"
        case is [Int].Type: "a list of integers"
        case is [String].Type: "a list of text"
        default: "text"
        }
    }

    private static func distance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        var row = Array(0...b.count)
        for i in 1...max(a.count, 1) where !a.isEmpty {
            var previous = row[0]
            row[0] = i
            for j in stride(from: 1, through: b.count, by: 1) {
                let old = row[j]
                row[j] = min(row[j] + 1, row[j - 1] + 1, previous + (a[i - 1] == b[j - 1] ? 0 : 1))
                previous = old
            }
        }
        return row[b.count]
    }

    /// Reads a job file: YAML (`.yaml`, `.yml`) or JSON; `overrides` (from flags) win over the file.
    public static func load(path: String?, overrides: [String: Any] = [:]) throws -> JobSpec {
        var fields: [String: Any] = [:]
        if let path {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { throw JobSpecError.invalid("job file not found: \(path)") }
            guard !isDirectory.boolValue else { throw JobSpecError.invalid("job file \(path) is a directory, not a YAML or JSON file") }
            guard let data = FileManager.default.contents(atPath: path) else { throw JobSpecError.invalid("job file \(path) cannot be read (permissions?)") }
            let text = String(decoding: data, as: UTF8.self)
            do {
                let parsed = path.hasSuffix(".json") ? try JSONSerialization.jsonObject(with: data) : try Yams.load(yaml: text) as Any
                guard let dict = parsed as? [String: Any] else { throw JobSpecError.invalid("\(path): the top level must be a mapping of keys to values") }
                fields = dict
            } catch let error as JobSpecError { throw error } catch {
                throw JobSpecError.invalid("\(path): cannot parse: \(error)")
            }
        }
        fields.merge(overrides) { _, flag in flag }
        do {
            let data = try JSONSerialization.data(withJSONObject: fields)
            let spec = try JSONDecoder().decode(JobSpec.self, from: data)
            try spec.validate()
            return spec
        } catch let error as JobSpecError {
            throw path.map { JobSpecError.invalid("\($0): \(error.reason)") } ?? error
        }
    }

    /// Parses `KEY=VALUE` overrides (from `--set`): the value is read as JSON (numbers, true/false, lists)
    /// and taken as text when it is not valid JSON.
    public static func overrides(_ assignments: [String]) throws -> [String: Any] {
        var result: [String: Any] = [:]
        for assignment in assignments {
            guard let equals = assignment.firstIndex(of: "="), equals != assignment.startIndex else {
                throw JobSpecError.invalid("--set '\(assignment)' is not KEY=VALUE")
            }
            let key = String(assignment[..<equals]).replacingOccurrences(of: "-", with: "_")
            let text = String(assignment[assignment.index(after: equals)...])
            result[key] = (try? JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])) ?? text
        }
        return result
    }

    /// Checks every value; the error names the key and what it must be.
    public func validate() throws {
        func check(_ ok: Bool, _ message: String) throws { if !ok { throw JobSpecError.invalid(message) } }
        try check(["digits", "synthetic", "csv", "idx", "npy", "text"].contains(dataset),
                  "dataset '\(dataset)' is unknown (digits, synthetic, csv, idx, npy, text)")
        try check((dataset == "text") == (model == "gpt") || !program.isEmpty,
                  model == "gpt" ? "model 'gpt' trains on dataset 'text', not '\(dataset)'" : "dataset 'text' is for model 'gpt', not '\(model)'")
        try check((task == "language_model") == (model == "gpt") || !program.isEmpty,
                  model == "gpt" ? "model 'gpt' is a language model: task must be 'language_model', not '\(task)'"
                      : "task 'language_model' is for model 'gpt'")
        if model == "gpt" {
            try check(nLayer >= 1 && nHead >= 1 && nEmbd >= 1 && blockSize >= 1,
                      "n_layer, n_head, n_embd and block_size must be positive, got \(nLayer), \(nHead), \(nEmbd), \(blockSize)")
            try check(nEmbd % nHead == 0, "n_embd \(nEmbd) is not divisible by n_head \(nHead)")
            try check(dropout >= 0 && dropout < 1, "dropout must be in [0, 1), got \(dropout)")
            try check(TextVocabulary.Kind(rawValue: vocabulary) != nil, "vocabulary '\(vocabulary)' is unknown (char, byte)")
        }
        try check(!["csv", "idx", "npy"].contains(dataset) || !dataPath.isEmpty, "dataset '\(dataset)' needs data_path")
        try check(!["idx", "npy"].contains(dataset) || !labelsPath.isEmpty, "dataset '\(dataset)' needs labels_path")
        try check(csvDelimiter != nil, "delimiter '\(delimiter)' must be one character (or 'tab')")
        try check(scaling == "auto" || Preprocessing.Kind(rawValue: scaling) != nil,
                  "scaling '\(scaling)' is unknown (auto, \(Preprocessing.Kind.allCases.map(\.rawValue).joined(separator: ", ")))")
        try check(syntheticSamples > 0 && syntheticFeatures > 0 && syntheticClasses > 1,
                  "synthetic_samples and synthetic_features must be positive and synthetic_classes at least 2")
        if case .preset(let name) = model {
            try check(["mlp", "cnn", "logistic", "linear", "gpt"].contains(name), "model '\(name)' is unknown (mlp, cnn, logistic, linear, gpt, or a list of layers)")
        }
        try check(program.isEmpty || initFrom.isEmpty, "init_from is for the built-in models; a program loads its own (Module.load(from:))")
        try check(["classification", "regression", "language_model"].contains(task), "task '\(task)' is unknown (classification, regression, language_model)")
        try check(model.name == "layers" || model == "gpt" || (task == "regression" ? ["mlp", "linear"].contains(model) : model != "linear"),
                  task == "regression" ? "task 'regression' needs model 'linear' or 'mlp', not '\(model)'"
                      : "model 'linear' is linear regression: set task to 'regression'")
        try check(hidden.allSatisfy { $0 > 0 }, "hidden sizes must be positive, got \(hidden)")
        try check(["relu", "leaky_relu", "sigmoid", "tanh", "gelu"].contains(activation),
                  "activation '\(activation)' is unknown (relu, leaky_relu, sigmoid, tanh, gelu)")
        try check(epochs > 0, "epochs must be positive, got \(epochs)")
        try check(batchSize > 0, "batch_size must be positive, got \(batchSize)")
        try check(["sgd", "adam", "adamw"].contains(optimizer), "optimizer '\(optimizer)' is unknown (sgd, adam, adamw)")
        try check(learningRate > 0 && learningRate.isFinite, "learning_rate must be positive, got \(learningRate)")
        try check(momentum >= 0 && momentum < 1, "momentum must be in [0, 1), got \(momentum)")
        try check(weightDecay >= 0, "weight_decay must be >= 0, got \(weightDecay)")
        try check(["constant", "step", "cosine"].contains(schedule), "schedule '\(schedule)' is unknown (constant, step, cosine)")
        try check(warmupSteps >= 0 && stepEvery > 0, "warmup_steps must be >= 0 and step_every positive")
        try check(clipNorm >= 0, "clip_norm must be >= 0")
        try check(testFraction > 0 && testFraction < 1, "test_fraction must be between 0 and 1, got \(testFraction)")
        try check(workers >= 1 && workers <= 1024, "workers must be between 1 and 1024, got \(workers)")
        try check(["equal", "speed"].contains(balance), "balance '\(balance)' is unknown (equal, speed)")
        try check(backupWorkers >= 0 && backupWorkers < workers,
                  "backup_workers must be at least 0 and below workers (\(workers)), got \(backupWorkers)")
        try check(minWorkers >= 1 && minWorkers <= workers, "min_workers must be between 1 and workers (\(workers)), got \(minWorkers)")
        try check(heartbeatIntervalMs > 0 && heartbeatTimeoutMs > heartbeatIntervalMs,
                  "heartbeat_timeout_ms must exceed heartbeat_interval_ms > 0")
        try check(blasThreads >= 0 && blasThreads <= 256, "blas_threads must be between 0 (automatic) and 256, got \(blasThreads)")
        try check(bucketKB >= 0, "bucket_kb must be >= 0, got \(bucketKB)")
        try check(coordinatorShards >= 1 && coordinatorShards <= 64, "coordinator_shards must be between 1 and 64, got \(coordinatorShards)")
        try check(syncEvery >= 1, "sync_every must be at least 1 (1: synchronous SGD), got \(syncEvery)")
        try check(["nesterov", "sgd"].contains(outerOptimizer), "outer_optimizer '\(outerOptimizer)' is unknown (nesterov, sgd)")
        try check(outerLR > 0 && outerLR.isFinite, "outer_lr must be positive, got \(outerLR)")
        try check(outerMomentum >= 0 && outerMomentum < 1, "outer_momentum must be in [0, 1), got \(outerMomentum)")
        try check(staleness >= 0, "staleness must be >= 0, got \(staleness)")
        try check(staleness == 0 || coordinatorShards == 1,
                  "staleness needs coordinator_shards = 1 (a late push is applied by the leader alone)")
        try check(staleness == 0 || syncEvery == 1, "staleness needs sync_every = 1 (a round of local steps is waited for whole)")
        try check(staleness == 0 || backupWorkers > 0,
                  "staleness needs backup_workers >= 1 (only a step completed without a worker leaves a push to come late)")
        try check(syncEvery == 1 || backupWorkers == 0,
                  "backup_workers needs sync_every = 1 (a round of local steps is waited for whole)")
        try check(coordinatorShards == 1 || backupWorkers == 0,
                  "backup_workers needs coordinator_shards = 1 (the leader alone decides which pushes a step uses)")
        try check(DType(rawValue: wireDtype) != nil, "wire_dtype '\(wireDtype)' is unknown (f32, bf16, f16)")
        try check(checkpointEvery >= 0 && keepCheckpoints >= 1, "checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        try check(checkpointFailureLimit >= 0, "checkpoint_failure_limit must be >= 0, got \(checkpointFailureLimit)")
        _ = try metricsHostAndPort()
        try check(joinTimeoutSeconds > 0 && stepTimeoutSeconds > 0, "join_timeout_seconds and step_timeout_seconds must be positive")
    }

    /// `metrics_address` as an IPv4 host and a port, or nil when the metrics are not served.
    public func metricsHostAndPort() throws -> (host: String, port: UInt16)? {
        guard !metricsAddress.isEmpty else { return nil }
        let parts = metricsAddress.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let port = UInt16(parts[1]), inet_addr(String(parts[0])) != INADDR_NONE || parts[0] == "255.255.255.255" else {
            throw JobSpecError.invalid("metrics_address '\(metricsAddress)' is not IPV4:PORT (e.g. 127.0.0.1:9464, 0.0.0.0:0; empty: off)")
        }
        return (String(parts[0]), port)
    }

    /// The CSV field separator `delimiter` names.
    public var csvDelimiter: Character? { Self.delimiterCharacter(delimiter) }

    /// The field separator a `delimiter` value names: one character, or `tab`.
    public static func delimiterCharacter(_ text: String) -> Character? {
        if ["tab", "\\t", "\t"].contains(text) { return "\t" }
        guard text.count == 1, let c = text.first, c != "\"", c != "\n", c != "\r" else { return nil }
        return c
    }

    /// The scaling `scaling` names for data of `featureShape` from `dataset`: `auto` standardizes tabular
    /// data (columns in unrelated units) and divides images (one unit, pixel intensity) by their largest value.
    public func scalingKind(featureShape: [Int]) -> Preprocessing.Kind {
        if let kind = Preprocessing.Kind(rawValue: scaling) { return kind }
        switch dataset {
        case "digits", "idx": return .max
        case "synthetic": return .none
        default: return featureShape.count > 1 ? .max : .standardize
        }
    }

    /// The job's keys, when it has a keys folder. `clientKey` picks another client key file.
    public func keys(clientKey: String? = nil) throws -> JobKeys? {
        keysDir.isEmpty ? nil : try JobKeys.load(from: keysDir, clientKey: clientKey)
    }

    /// The spec as JSON text (the Welcome carries it; job directories keep it).
    public func json() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return String(decoding: try! encoder.encode(self), as: UTF8.self)
    }

    /// Parses the JSON that `json()` wrote.
    public static func fromJSON(_ text: String) throws -> JobSpec {
        do { return try JSONDecoder().decode(JobSpec.self, from: Data(text.utf8)) } catch let error as JobSpecError { throw error } catch {
            throw JobSpecError.invalid("job spec JSON: \(error)")
        }
    }
}

/// A job specification that cannot run, with the reason.
public enum JobSpecError: Error, CustomStringConvertible, Equatable {
    case invalid(String)
    public var reason: String { switch self { case .invalid(let r): r } }
    public var description: String { "invalid job: \(reason)" }
}

struct AnyKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}
