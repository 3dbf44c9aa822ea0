import Foundation

/// `ddpctl bench train`: a real local job (coordinator and worker processes over ipc://) on the digits
/// (64-128-10) or an MNIST-sized synthetic set (784-512-512-10), global batch 128, or a GPT (n_layer 4,
/// n_head 4, n_embd 128, block_size 64, batch 32) on the bundled text; reports the median time per step,
/// the time from launch to the first finished step and the workers' peak resident memory.
public struct TrainBenchmark {
    public var workload: String
    public var workers: Int
    public var epochs: Int
    public var ddpd: String
    public var jobsRoot: String
    /// The gradient bucket size (nil: the job default).
    public var bucketKB: Int?
    public var coordinatorShards: Int?

    public init(workload: String, workers: Int, epochs: Int, ddpd: String, jobsRoot: String, bucketKB: Int? = nil, coordinatorShards: Int? = nil) {
        self.coordinatorShards = coordinatorShards
        self.workload = workload
        self.workers = workers
        self.epochs = epochs
        self.ddpd = ddpd
        self.jobsRoot = jobsRoot
        self.bucketKB = bucketKB
    }

    public func run() throws -> [String: Any] {
        var overrides: [String: Any] = ["workers": workers, "epochs": epochs, "batch_size": 128, "learning_rate": 0.1, "momentum": 0.9]
        switch workload {
        case "digits": overrides["hidden"] = [128]
        case "mnist":
            overrides.merge(["dataset": "synthetic", "synthetic_samples": 70000, "synthetic_features": 784, "synthetic_classes": 10,
                             "hidden": [512, 512], "test_fraction": 1.0 / 7]) { $1 }
        case "wide":  // 784-2048-2048-10: 5.8 M parameters, 23 MB a copy, where the exchange dominates
            overrides.merge(["dataset": "synthetic", "synthetic_samples": 14000, "synthetic_features": 784, "synthetic_classes": 10,
                             "hidden": [2048, 2048], "test_fraction": 1.0 / 7]) { $1 }
        case "gpt":
            overrides.merge(["model": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 32,
                             "learning_rate": 1e-3]) { $1 }
            overrides["momentum"] = nil
        default: throw JobSpecError.invalid("bench train: workload '\(workload)' is unknown (digits, mnist, wide, gpt)")
        }
        if let bucketKB { overrides["bucket_kb"] = bucketKB }
        if let coordinatorShards { overrides["coordinator_shards"] = coordinatorShards }
        var spec = try JobSpec.load(path: nil, overrides: overrides)
        spec.jobID = "bench-\(workload)-" + JobSpec.newJobID()
        let directory = JobDirectory(path: jobsRoot + "/" + spec.jobID)
        spec.output = directory.path
        defer { try? FileManager.default.removeItem(atPath: directory.path) }
        let job = try LocalJob(spec: spec, directory: directory, ddpd: ddpd, logLevel: "warning")
        let launched = Coordinator.now()
        try job.start()
        var firstStep: Double?
        let client = try ControlClient(endpoint: job.endpoints!.control, jobID: spec.jobID)
        while firstStep == nil, Coordinator.now() - launched < 60 {
            if let s = try? client.status(timeoutSeconds: 1), s.step >= 1 { firstStep = Coordinator.now() - launched; break }
            usleep(2000)
        }
        var workerPeakKB = 0
        let summary = try job.wait(interval: 0.5) { _, _ in workerPeakKB = max(workerPeakKB, Self.workersPeakKB(directory)) }
        guard summary.state == "completed" else { throw ControlError.failed("bench train: the job \(summary.state): \(summary.message)") }
        let stepSeconds = JobReport.stepSeconds(directory)
        let median = Measure.median(Array(stepSeconds.dropFirst(min(20, stepSeconds.count / 10))))
        // A long job's cost per epoch must stay constant (checkpoints and history do not grow with it):
        // the mean wall time of an epoch over the last tenth of the epochs against the first tenth.
        let ends = directory.history().map(\.elapsedSeconds)
        let tenth = max(ends.count / 10, 1)
        func epochSeconds(_ range: Range<Int>) -> Double {
            guard range.lowerBound >= 1, range.upperBound <= ends.count, !range.isEmpty else { return 0 }
            return (ends[range.upperBound - 1] - ends[range.lowerBound - 1]) / Double(range.count)
        }
        let early = epochSeconds(1..<(1 + tenth)), late = epochSeconds((ends.count - tenth)..<ends.count)
        return [
            "epoch_seconds_first_tenth": early, "epoch_seconds_last_tenth": late, "late_over_early": early > 0 ? late / early : 0,
            "benchmark": "train", "workload": workload, "workers": workers, "epochs": epochs, "steps": summary.steps, "bucket_kb": spec.bucketKB,
            "coordinator_shards": spec.coordinatorShards,
            "ms_per_step": median * 1e3, "samples_per_second": Double(spec.batchSize) / median, "first_step_seconds": firstStep ?? -1,
            "tokens_per_second": Double(spec.batchSize * spec.tokensPerSample) / median, "worker_peak_rss_mb": Double(workerPeakKB) / 1024,
            "test_accuracy": summary.testAccuracy, "train_loss": summary.trainLoss, "test_loss": summary.testLoss,
        ]
    }

    /// The largest peak resident set (VmHWM, KiB) among the job's live worker processes.
    static func workersPeakKB(_ directory: JobDirectory) -> Int {
        guard let data = FileManager.default.contents(atPath: directory.processesPath),
              let pids = try? JSONSerialization.jsonObject(with: data) as? [String: Int] else { return 0 }
        return pids.filter { $0.key.hasPrefix("worker-") }.values.map { pid in
            let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
            let line = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") } ?? ""
            return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
        }.max() ?? 0
    }
}
