import Foundation

/// Finds job directories on this host and tells their state.
public enum JobLookup {
    /// Where job directories are made: `override`, else `$SWIFTDDP_HOME/jobs`, else `~/.swiftddp/jobs`.
    public static func root(_ override: String?) -> String {
        if let override { return override }
        if let home = ProcessInfo.processInfo.environment["SWIFTDDP_HOME"], !home.isEmpty { return home + "/jobs" }
        return FileManager.default.homeDirectoryForCurrentUser.path + "/.swiftddp/jobs"
    }

    /// Every job directory under `root`, oldest first (by the time its spec was written).
    public static func all(root: String) -> [JobDirectory] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return names.map { JobDirectory(path: root + "/" + $0) }
            .filter { FileManager.default.fileExists(atPath: $0.specPath) }
            .sorted { created($0) < created($1) }
    }

    /// When the job was made (its spec written).
    public static func created(_ job: JobDirectory) -> Date {
        ((try? FileManager.default.attributesOfItem(atPath: job.specPath))?[.modificationDate] as? Date) ?? .distantPast
    }

    /// The job named by `job` (an id under `root`, or a directory path); without one, the newest job
    /// that is running, or the newest job when none runs.
    public static func find(_ job: String?, root: String) throws -> JobDirectory {
        if let job {
            for candidate in [job, root + "/" + job] where FileManager.default.fileExists(atPath: candidate + "/spec.json") {
                return JobDirectory(path: candidate)
            }
            throw ControlError.failed("no job '\(job)' (looked for \(job)/spec.json and \(root)/\(job)/spec.json)")
        }
        let jobs = all(root: root)
        guard let latest = jobs.last else { throw ControlError.failed("no job found in \(root)") }
        return jobs.last(where: isRunning) ?? latest
    }

    /// Whether a job has not ended and one of its processes (coordinator or supervisor) is alive.
    public static func isRunning(_ job: JobDirectory) -> Bool {
        guard job.summary() == nil else { return false }
        if let endpoints = job.endpoints(), isAlive(endpoints.pid) { return true }
        return processes(of: job).contains { name, pid in (name == "supervisor" || name == "coordinator") && isProcess(pid, of: job) }
    }

    /// Whether a process with this id runs on this host (a zombie, dead but not yet reaped, does not).
    /// Whether `pid` is still a process of the job in `directory` (its command line names the directory,
    /// or it is the `ddpctl start` that supervises it): a recorded pid may since belong to another program.
    public static func isProcess(_ pid: Int32, of directory: JobDirectory) -> Bool {
        guard isAlive(pid), let raw = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        let arguments = raw.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        let program = (arguments.first as NSString?)?.lastPathComponent ?? ""
        guard program == "ddpd" || program == "ddpctl" else { return false }
        return arguments.contains { $0.contains(directory.path) } || arguments.dropFirst().first == "start"
    }

    public static func isAlive(_ pid: Int32) -> Bool {
        guard pid > 0, kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return true }
        return stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first != "Z"
    }

    /// The process ids a job recorded (`coordinator`, `worker-R`, `supervisor`).
    public static func processes(of job: JobDirectory) -> [String: Int32] {
        guard let data = FileManager.default.contents(atPath: job.processesPath) else { return [:] }
        return (try? JSONDecoder().decode([String: Int32].self, from: data)) ?? [:]
    }
}

/// `ddpctl status --json`: the stable description of a job's state.
public struct JobStatus: Codable, Sendable {
    /// One worker's row.
    public struct Worker: Codable, Sendable {
        public var rank: Int32
        public var host: String
        public var pid: UInt32
        public var state: String
        public var step: UInt64
        public var lastHeartbeatMs: UInt64
        public var lastStepSeconds: Double
        public var lagging: Bool
        public var restarts: UInt32
        /// The norm of its last accepted gradient, and the steps at which it was far above the others'.
        public var gradientNorm: Double
        public var outlierSteps: UInt32
        /// Its measured samples per second, and (backup workers) the steps completed without it.
        public var samplesPerSecond: Double
        public var leftOutSteps: UInt32
        public var lastLeftOutStep: UInt64

        enum CodingKeys: String, CodingKey {
            case rank, host, pid, state, step, lagging, restarts
            case lastHeartbeatMs = "last_heartbeat_ms", lastStepSeconds = "last_step_seconds"
            case gradientNorm = "gradient_norm", outlierSteps = "outlier_steps", samplesPerSecond = "samples_per_second"
            case leftOutSteps = "left_out_steps", lastLeftOutStep = "last_left_out_step"
        }
    }

    public var jobID: String
    public var jobDir: String
    /// `waiting`, `training`, `stopping`, `completed`, `stopped`, `failed`, or `dead` (no coordinator, no summary).
    public var state: String
    /// `coordinator` (asked live) or `directory` (read from the job's files).
    public var source: String
    public var step: UInt64
    public var totalSteps: UInt64
    public var epoch: UInt64
    public var totalEpochs: UInt64
    public var elapsedSeconds: Double
    public var etaSeconds: Double?
    public var trainLoss: Float
    public var testLoss: Float
    public var testAccuracy: Float
    public var samplesPerSecond: Double
    public var rejectedMessages: UInt64
    public var recentLosses: [Float]
    public var message: String
    public var workers: [Worker]
    /// The worker endpoints of coordinator shards 1..K-1, while the job runs (empty with one coordinator).
    public var coordinatorShards: [String]
    /// `classification`, or `regression` (then `test_loss` is the mean squared error and `test_accuracy` R²).
    public var task = "classification"
    /// Where the running coordinator serves its Prometheus metrics over HTTP (empty when it does not).
    public var metricsURL = ""
    /// For a language model: the tokens of a sample (its window); 0 otherwise.
    public var tokensPerSample = 0

    enum CodingKeys: String, CodingKey {
        case state, source, step, epoch, message, workers, task, coordinatorShards = "coordinator_shards", metricsURL = "metrics_url"
        case jobID = "job_id", jobDir = "job_dir", totalSteps = "total_steps", totalEpochs = "total_epochs"
        case elapsedSeconds = "elapsed_seconds", etaSeconds = "eta_seconds", trainLoss = "train_loss", testLoss = "test_loss"
        case testAccuracy = "test_accuracy", samplesPerSecond = "samples_per_second", rejectedMessages = "rejected_messages"
        case recentLosses = "recent_losses", tokensPerSample = "tokens_per_sample"
    }

    /// From a live coordinator's reply.
    public init(reply s: StatusReply, jobID: String, jobDir: String) {
        self.jobID = jobID
        self.jobDir = jobDir
        state = s.jobState
        source = "coordinator"
        step = s.step
        totalSteps = s.totalSteps
        epoch = s.epoch
        totalEpochs = s.totalEpochs
        elapsedSeconds = s.elapsedSeconds
        let rate = s.step > 0 ? s.elapsedSeconds / Double(s.step) : 0
        etaSeconds = s.step > 0 && s.totalSteps >= s.step ? rate * Double(s.totalSteps - s.step) : nil
        trainLoss = s.trainLoss
        testLoss = s.testLoss
        testAccuracy = s.testAccuracy
        samplesPerSecond = s.samplesPerSecond
        rejectedMessages = s.rejectedMessages
        recentLosses = s.recentLosses
        message = s.message
        coordinatorShards = s.coordinatorShards
        workers = s.workers.map {
            Worker(rank: $0.rank, host: $0.host, pid: $0.pid, state: $0.state, step: $0.step, lastHeartbeatMs: $0.lastSeenMillisecondsAgo,
                   lastStepSeconds: $0.lastStepSeconds, lagging: $0.lagging, restarts: $0.restarts,
                   gradientNorm: $0.gradientNorm, outlierSteps: $0.outlierSteps, samplesPerSecond: $0.samplesPerSecond,
                   leftOutSteps: $0.leftOutSteps, lastLeftOutStep: $0.lastLeftOutStep)
        }
    }

    /// From a job's directory (a finished or dead job).
    public init(directory: JobDirectory, state fallback: String, message fallbackMessage: String) {
        let spec = (try? JobSpec.fromJSON((try? String(contentsOfFile: directory.specPath, encoding: .utf8)) ?? "")) ?? JobSpec()
        let summary = directory.summary()
        let history = directory.history()
        jobID = spec.jobID
        jobDir = directory.path
        task = spec.program.isEmpty ? spec.task : "program"
        tokensPerSample = spec.tokensPerSample
        state = summary?.state ?? fallback
        source = "directory"
        step = UInt64(summary?.steps ?? history.last?.step ?? 0)
        totalSteps = 0
        epoch = UInt64(summary?.epochs ?? history.last?.epoch ?? 0)
        totalEpochs = UInt64(spec.epochs)
        elapsedSeconds = summary?.wallSeconds ?? history.last?.elapsedSeconds ?? 0
        etaSeconds = nil
        trainLoss = summary?.trainLoss ?? history.last?.trainLoss ?? 0
        testLoss = summary?.testLoss ?? history.last?.testLoss ?? 0
        testAccuracy = summary?.testAccuracy ?? history.last?.testAccuracy ?? 0
        samplesPerSecond = summary?.samplesPerSecond ?? 0
        rejectedMessages = summary?.rejectedMessages ?? 0
        recentLosses = history.map(\.trainLoss)
        message = summary?.message ?? fallbackMessage
        workers = []
        coordinatorShards = []
    }

    public var isRegression: Bool { task == "regression" }
    /// A job of a user's program: no held-out score at the coordinator.
    public var isProgram: Bool { task == "program" }

    /// Whether the job has ended.
    public var isFinal: Bool { ["completed", "stopped", "failed", "dead"].contains(state) }

    /// One JSON line, sorted keys.
    public var jsonLine: String {
        String(decoding: (try? JobJSON.encoder([.sortedKeys, .withoutEscapingSlashes]).encode(self)) ?? Data(), as: UTF8.self)
    }
}

extension JobDirectory {
    /// The job's status: asked from its coordinator when it runs, read from the directory when it has
    /// ended. A coordinator whose process is gone is reported at once, one that does not answer after
    /// `timeoutSeconds`.
    public func status(timeoutSeconds: Double = 2) throws -> JobStatus {
        if summary() != nil { return JobStatus(directory: self, state: "completed", message: "") }
        guard let endpoints = endpoints() else {
            if JobLookup.isRunning(self) { return JobStatus(directory: self, state: "starting", message: "the coordinator is starting") }
            let log = ((try? String(contentsOfFile: logPath("coordinator"), encoding: .utf8)) ?? "").split(separator: "\n").last.map(String.init)
            return JobStatus(directory: self, state: "failed",
                             message: "the job did not start: " + (log ?? "the coordinator never started listening") + " (see \(logPath("coordinator")))")
        }
        guard JobLookup.isAlive(endpoints.pid) else {
            if FileManager.default.fileExists(atPath: restartingPath), JobLookup.isAlive(JobLookup.processes(of: self)["supervisor"] ?? -1) {
                return JobStatus(directory: self, state: "restarting", message: "the supervisor restarts the coordinator from its newest checkpoint")
            }
            return JobStatus(directory: self, state: "dead",
                             message: "the coordinator (pid \(endpoints.pid)) is not running and left no summary; see \(logPath("coordinator"))")
        }
        let spec = try JobSpec.fromJSON(try String(contentsOfFile: specPath, encoding: .utf8))
        let reply = try ControlClient(endpoint: endpoints.control, jobID: spec.jobID, keys: try? spec.keys()).status(timeoutSeconds: timeoutSeconds)
        var status = JobStatus(reply: reply, jobID: spec.jobID, jobDir: path)
        status.task = spec.program.isEmpty ? spec.task : "program"
        status.tokensPerSample = spec.tokensPerSample
        status.metricsURL = endpoints.metrics ?? ""
        return status
    }
}
