import DDPWire
import Foundation

/// The files of one job in its directory: the resolved spec, endpoints, process ids, logs, the final
/// model, the summary and the per-epoch history.
public struct JobDirectory: Sendable {
    public let path: String

    public init(path: String) { self.path = path }

    public var specPath: String { path + "/spec.json" }
    public var endpointsPath: String { path + "/endpoints.json" }
    public var summaryPath: String { path + "/summary.json" }
    /// One JSON record per finished epoch, appended (a line per epoch; never rewritten but on resume).
    public var historyPath: String { path + "/history.jsonl" }
    public var modelPath: String { path + "/model.safetensors" }
    public var processesPath: String { path + "/processes.json" }
    public var logsPath: String { path + "/logs" }
    public var checkpointsPath: String { path + "/checkpoints" }
    public var metricsPath: String { path + "/metrics.prom" }
    public var stepLogPath: String { path + "/steps.jsonl" }
    /// TensorBoard event files of the training scalars (`tensorboard --logdir DIR/tensorboard`).
    public var tensorBoardPath: String { path + "/tensorboard" }
    /// Written by `ddpctl stop` (and Ctrl-C): a stop is final, the supervisor restarts nothing after it.
    public var stopRequestPath: String { path + "/stop-requested" }
    /// Present while the supervisor restarts a coordinator that was killed.
    public var restartingPath: String { path + "/restarting" }
    public var isStopRequested: Bool { FileManager.default.fileExists(atPath: stopRequestPath) }
    /// Records that the job's user asked it to stop (best effort).
    public func recordStopRequest(_ reason: String) { SafeOutput.append(reason + "\n", to: stopRequestPath) }
    /// CURVE keys made for a job over TCP that was given none.
    public var keysPath: String { path + "/keys" }
    public func logPath(_ process: String) -> String { "\(logsPath)/\(process).log" }

    /// Creates the directory, private to its owner (0700: the model, checkpoints with optimizer state,
    /// logs and endpoints are no other user's business; `chmod -R g+rX DIR` shares one), and its
    /// `logs` folder.
    public func create() throws {
        try PrivateFolder.create(path)
        try FileManager.default.createDirectory(atPath: logsPath, withIntermediateDirectories: true)
    }

    /// The coordinator's bound endpoints, once it has written them.
    public func endpoints() -> Endpoints? {
        guard let data = FileManager.default.contents(atPath: endpointsPath) else { return nil }
        return try? JSONDecoder().decode(Endpoints.self, from: data)
    }

    /// The summary, once the job has ended.
    public func summary() -> JobSummary? {
        guard let data = FileManager.default.contents(atPath: summaryPath) else { return nil }
        return try? JobJSON.decoder().decode(JobSummary.self, from: data)
    }

    /// The epochs finished so far (a line that does not decode, e.g. cut by a crash, is skipped).
    public func history() -> [EpochRecord] {
        guard let data = FileManager.default.contents(atPath: historyPath) else { return [] }
        let decoder = JobJSON.decoder()
        return data.split(separator: UInt8(ascii: "\n")).compactMap { try? decoder.decode(EpochRecord.self, from: Data($0)) }
    }

    /// The steps logged so far (a line that does not decode, e.g. cut by a crash, is skipped).
    func loggedSteps() -> [LoggedStep] {
        guard let data = FileManager.default.contents(atPath: stepLogPath) else { return [] }
        let decoder = JobJSON.decoder()
        return data.split(separator: UInt8(ascii: "\n")).compactMap { try? decoder.decode(LoggedStep.self, from: Data($0)) }
    }

    /// Cuts the history and the step log back to what a checkpoint at `step` had seen (a resumed job
    /// computes the later steps again); returns the history kept.
    func cutBack(toStep step: Int) throws -> [EpochRecord] {
        let kept = history().filter { $0.step <= step }
        let encoder = JobJSON.encoder([.sortedKeys])
        let lines = try kept.map { String(decoding: try encoder.encode($0), as: UTF8.self) + "\n" }.joined()
        if FileManager.default.fileExists(atPath: historyPath) { try AtomicFile.write(lines, to: historyPath) }
        if let log = FileManager.default.contents(atPath: stepLogPath) {
            let steps = log.split(separator: UInt8(ascii: "\n")).filter { line in
                guard let object = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any], let s = object["step"] as? Int else { return false }
                return s < step
            }
            try AtomicFile.write(Data(steps.map { Data($0) + Data([UInt8(ascii: "\n")]) }.joined()), to: stepLogPath)
        }
        return kept
    }

    /// Writes (best effort) and returns the summary of a job whose coordinator ended without one: failed,
    /// with `message`, the progress its history shows.
    @discardableResult
    public func writeFailedSummary(spec: JobSpec, message: String) -> JobSummary {
        let last = history().last
        let summary = JobSummary(
            state: "failed", jobID: spec.jobID, workers: spec.workers, epochs: last?.epoch ?? 0, steps: last?.step ?? 0,
            trainLoss: last?.trainLoss ?? 0, testLoss: last?.testLoss ?? 0, testAccuracy: last?.testAccuracy ?? 0, wallSeconds: 0,
            samplesPerSecond: 0, modelPath: "", message: message, rejectedMessages: 0, lostWorkers: [], task: spec.task)
        try? write(summary, to: summaryPath)
        return summary
    }

    /// Removes temporary files (`NAME.tmp-PID`) that a process killed while writing left behind.
    func removeStaleTemporaries() {
        for folder in [path, checkpointsPath] {
            for name in (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? [] {
                guard let range = name.range(of: ".tmp-"), let pid = Int32(name[range.upperBound...]), pid != getpid(),
                      kill(pid, 0) != 0 else { continue }
                try? FileManager.default.removeItem(atPath: folder + "/" + name)
            }
        }
    }

    func write<T: Encodable>(_ value: T, to file: String) throws {
        try AtomicFile.write(try JobJSON.encoder([.sortedKeys, .prettyPrinted]).encode(value), to: file)
    }
}

/// JSON of job files and output. A diverged job has losses that are not numbers: they are written as
/// the strings "nan", "inf" and "-inf" (plain JSON has no such numbers) and read back.
enum JobJSON {
    static func encoder(_ formatting: JSONEncoder.OutputFormatting) -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = formatting
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return encoder
    }

    /// A number as JSON text, or the quoted strings above for the values that are not numbers.
    static func number<F: BinaryFloatingPoint & CustomStringConvertible>(_ value: F) -> String {
        value.isNaN ? "\"nan\"" : value.isInfinite ? (value < 0 ? "\"-inf\"" : "\"inf\"") : value.description
    }

    static func decoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return decoder
    }
}

/// Where a coordinator listens.
public struct Endpoints: Codable, Sendable, Equatable {
    public var workers: String
    public var control: String
    public var pid: Int32
    /// The URL serving the Prometheus metrics (`metrics_address`), when one does.
    public var metrics: String? = nil
}

/// A line of `steps.jsonl`, as far as the totals of a resumed epoch need it.
struct LoggedStep: Decodable {
    let step: Int
    let loss: Float
    /// The samples whose gradients the step used (absent from lines written before the log had them).
    let trained: Int?
    /// How many of them were classified right (absent likewise).
    let correct: Int?
    /// The ranks the step was completed without (backup workers).
    let leftOut: [Int32]?

    enum CodingKeys: String, CodingKey { case step, loss, trained, correct, leftOut = "left_out" }
}

/// One finished epoch.
public struct EpochRecord: Codable, Sendable, Equatable {
    public var epoch: Int
    public var step: Int
    public var trainLoss: Float
    public var trainAccuracy: Float
    public var testLoss: Float
    public var testAccuracy: Float
    public var elapsedSeconds: Double
    public var workers: Int
    /// With backup workers: how many of the epoch's steps completed without each rank (absent when none).
    public var leftOutSteps: [String: Int]?

    enum CodingKeys: String, CodingKey {
        case epoch, step, workers, leftOutSteps = "left_out_steps"
        case trainLoss = "train_loss", trainAccuracy = "train_accuracy", testLoss = "test_loss"
        case testAccuracy = "test_accuracy", elapsedSeconds = "elapsed_seconds"
    }
}

/// What a job ended with; `ddpctl start --json` prints it.
public struct JobSummary: Codable, Sendable, Equatable {
    /// `completed`, `stopped` or `failed`.
    public var state: String
    public var jobID: String
    public var workers: Int
    public var epochs: Int
    public var steps: Int
    public var trainLoss: Float
    public var testLoss: Float
    public var testAccuracy: Float
    public var wallSeconds: Double
    public var samplesPerSecond: Double
    public var modelPath: String
    public var message: String
    public var rejectedMessages: UInt64
    public var lostWorkers: [Int32]
    /// `classification`, or `regression`: then `testLoss` is the mean squared error and `testAccuracy` R²,
    /// written as `test_mse` and `test_r2` (not `test_loss`, `test_accuracy`).
    public var task: String? = "classification"

    public var isRegression: Bool { task == "regression" }

    enum CodingKeys: String, CodingKey {
        case state, workers, epochs, steps, message, task
        case jobID = "job_id", trainLoss = "train_loss", testLoss = "test_loss", testAccuracy = "test_accuracy"
        case testMSE = "test_mse", testR2 = "test_r2"
        case wallSeconds = "wall_seconds", samplesPerSecond = "samples_per_second", modelPath = "model_path"
        case rejectedMessages = "rejected_messages", lostWorkers = "lost_workers"
    }

    public init(state: String, jobID: String, workers: Int, epochs: Int, steps: Int, trainLoss: Float, testLoss: Float, testAccuracy: Float,
                wallSeconds: Double, samplesPerSecond: Double, modelPath: String, message: String, rejectedMessages: UInt64,
                lostWorkers: [Int32], task: String?) {
        self.state = state; self.jobID = jobID; self.workers = workers; self.epochs = epochs; self.steps = steps
        self.trainLoss = trainLoss; self.testLoss = testLoss; self.testAccuracy = testAccuracy; self.wallSeconds = wallSeconds
        self.samplesPerSecond = samplesPerSecond; self.modelPath = modelPath; self.message = message
        self.rejectedMessages = rejectedMessages; self.lostWorkers = lostWorkers; self.task = task
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        state = try c.decode(String.self, forKey: .state); jobID = try c.decode(String.self, forKey: .jobID)
        workers = try c.decode(Int.self, forKey: .workers); epochs = try c.decode(Int.self, forKey: .epochs)
        steps = try c.decode(Int.self, forKey: .steps); trainLoss = try c.decode(Float.self, forKey: .trainLoss)
        testLoss = try c.decodeIfPresent(Float.self, forKey: .testLoss) ?? c.decode(Float.self, forKey: .testMSE)
        testAccuracy = try c.decodeIfPresent(Float.self, forKey: .testAccuracy) ?? c.decode(Float.self, forKey: .testR2)
        wallSeconds = try c.decode(Double.self, forKey: .wallSeconds); samplesPerSecond = try c.decode(Double.self, forKey: .samplesPerSecond)
        modelPath = try c.decode(String.self, forKey: .modelPath); message = try c.decode(String.self, forKey: .message)
        rejectedMessages = try c.decode(UInt64.self, forKey: .rejectedMessages); lostWorkers = try c.decode([Int32].self, forKey: .lostWorkers)
        task = try c.decodeIfPresent(String.self, forKey: .task)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(state, forKey: .state); try c.encode(jobID, forKey: .jobID); try c.encode(workers, forKey: .workers)
        try c.encode(epochs, forKey: .epochs); try c.encode(steps, forKey: .steps); try c.encode(trainLoss, forKey: .trainLoss)
        try c.encode(testLoss, forKey: isRegression ? .testMSE : .testLoss)
        try c.encode(testAccuracy, forKey: isRegression ? .testR2 : .testAccuracy)
        try c.encode(wallSeconds, forKey: .wallSeconds); try c.encode(samplesPerSecond, forKey: .samplesPerSecond)
        try c.encode(modelPath, forKey: .modelPath); try c.encode(message, forKey: .message)
        try c.encode(rejectedMessages, forKey: .rejectedMessages); try c.encode(lostWorkers, forKey: .lostWorkers)
        try c.encodeIfPresent(task, forKey: .task)
    }

    /// One line of JSON with sorted keys.
    public var jsonLine: String {
        String(decoding: (try? JobJSON.encoder([.sortedKeys, .withoutEscapingSlashes]).encode(self)) ?? Data(), as: UTF8.self)
    }
}
