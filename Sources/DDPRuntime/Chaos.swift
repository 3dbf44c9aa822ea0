import Autodiff
import Foundation

/// A bounded chaos run: real local jobs with faults injected at random moments (from a seed it prints),
/// each checked against what the README promises: the job completes, every sample is counted exactly
/// once per epoch (the job's samples equal a clean run's), the final parameters equal the clean run's
/// bit for bit when only the coordinator was disturbed and its accuracy is within a point when workers
/// were, no process is left behind, and no process crashed (logs and exit statuses scanned for traps).
public struct ChaosRun {
    /// The faults a round may inject.
    public enum Fault: String, CaseIterable, Sendable {
        case killWorker = "SIGKILL worker"
        case pauseWorker = "SIGSTOP/SIGCONT worker (past the step deadline)"
        case killCoordinator = "SIGKILL coordinator"
        case pauseCoordinator = "SIGSTOP/SIGCONT coordinator (under the heartbeat timeout)"
        case corruptCheckpoint = "corrupt the newest checkpoint (when an older one remains), then SIGKILL coordinator"
        case pauseSupervisor = "SIGSTOP/SIGCONT supervisor"
        case killSupervisor = "SIGKILL supervisor (the round's last fault: nothing restarts after it)"
        case fullDisk = "a full disk under the job (a round of its own; needs root)"

        /// Whether a run with only such faults must end bitwise like a clean one.
        var keepsBitwise: Bool {
            switch self {
            case .killCoordinator, .pauseCoordinator, .corruptCheckpoint, .pauseSupervisor, .killSupervisor: true
            case .killWorker, .pauseWorker, .fullDisk: false
            }
        }

        /// The faults drawn within a running job.
        static let inJob: [Fault] = [.killWorker, .pauseWorker, .killCoordinator, .pauseCoordinator, .corruptCheckpoint,
                                     .pauseSupervisor, .killSupervisor]
    }

    /// One round's outcome.
    public struct Round: Sendable {
        public var faults: [Fault]
        public var failures: [String]
        public var seconds: Double
    }

    public let ddpctl: String
    public let jobsDir: String
    public let seed: UInt64
    public let workers: Int
    public let epochs: Int
    /// More job keys, `KEY=VALUE` as `ddpctl start --set` takes them (e.g. backup_workers=1, sync_every=4).
    public let keys: [String]
    /// Whether two runs of the job end bitwise alike (not with backup workers or `balance: speed`, whose
    /// steps depend on timing): only then is a round that disturbed only the coordinator held to the clean
    /// run's parameters bit for bit.
    public let repeatsBitwise: Bool
    /// The job as every run has it (the keys over the chaos job's own).
    private let spec: JobSpec
    /// The fault schedule (the seed is printed, so a run can be repeated).
    private var generator: SeededGenerator

    /// Fails when `keys` do not make a valid job.
    public init(ddpctl: String, jobsDir: String, seed: UInt64, workers: Int = 3, epochs: Int = 60, keys: [String] = []) throws {
        self.ddpctl = ddpctl
        self.jobsDir = jobsDir
        self.seed = seed
        self.keys = keys
        let base: [String: Any] = ["workers": workers, "epochs": epochs, "checkpoint_every": Self.checkpointEvery]
        spec = try JobSpec.load(path: nil, overrides: (Self.jobFileKeys as [String: Any]).merging(base) { $1 }.merging(try JobSpec.overrides(keys)) { $1 })
        self.workers = spec.workers  // a --set workers= or epochs= wins, as in the runs
        self.epochs = spec.epochs
        repeatsBitwise = spec.backupWorkers == 0 && spec.balance != "speed"
        generator = SeededGenerator(seed: seed)
    }

    /// The job's arguments (the same for the clean run and every round).
    private var arguments: [String] {
        ["--config", jobsDir + "/chaos-job.yaml", "--workers", "\(workers)", "--epochs", "\(epochs)", "--seed", "7",
         "--checkpoint-every", "\(Self.checkpointEvery)", "--max-restarts", "5", "--jobs-dir", jobsDir] + keys.flatMap { ["--set", $0] }
    }
    private static let checkpointEvery = 50
    /// The chaos job file's keys: small batches, and deadlines short enough for faults to bite quickly.
    private static let jobFileKeys: [String: Int] = ["batch_size": 32, "step_timeout_seconds": 1, "heartbeat_interval_ms": 200,
                                                     "heartbeat_timeout_ms": 1500]

    /// Whether a round with `faults` must end bitwise like the clean run: the job's runs repeat bitwise and
    /// no fault disturbed a worker; with local SGD, also no resume from a checkpoint older than the last
    /// round (the workers' inner optimizer state has moved on: README, "Training semantics"), so a killed coordinator
    /// counts only with a checkpoint every round, and a corrupted checkpoint never.
    func holdsBitwise(_ faults: [Fault]) -> Bool {
        guard repeatsBitwise && faults.allSatisfy(\.keepsBitwise) else { return false }
        guard spec.isLocalSGD else { return true }
        return !faults.contains(.corruptCheckpoint) && (spec.checkpointEvery == 1 || !faults.contains(.killCoordinator))
    }

    /// Runs rounds until `rounds` are done or `seconds` have passed (whichever first), calling `report`
    /// after each; returns them.
    public mutating func run(rounds: Int, seconds: Double, report: (Int, Round) -> Void) throws -> [Round] {
        try FileManager.default.createDirectory(atPath: jobsDir, withIntermediateDirectories: true)
        try Self.jobFileKeys.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)\n" }.joined()
            .write(toFile: jobsDir + "/chaos-job.yaml", atomically: true, encoding: .utf8)
        let clean = try runClean()
        var done: [Round] = []
        let deadline = Coordinator.now() + seconds
        while done.count < rounds && Coordinator.now() < deadline {
            let round = try runRound(clean: clean)
            done.append(round)
            report(done.count, round)
        }
        return done
    }

    private struct Clean {
        let summary: JobSummary
        let samples: String
        let parameters: [String: [Float]]
    }

    private func runClean() throws -> Clean {
        let result = try Self.run(ddpctl, ["start", "--json"] + arguments, timeout: 300)
        guard let summary = try? JobJSON.decoder().decode(JobSummary.self, from: Data((result.output.split(separator: "\n").last ?? "").utf8)),
              summary.state == "completed" else {
            throw ControlError.failed("chaos: the clean run did not complete: \(result.output.suffix(300))")
        }
        let job = JobDirectory(path: (summary.modelPath as NSString).deletingLastPathComponent)
        return Clean(summary: summary, samples: Self.metric("ddp_samples_total", in: job), parameters: try Self.parameters(job))
    }

    private mutating func runRound(clean: Clean) throws -> Round {
        if getuid() == 0 && generator.next() % 8 == 0 { return try fullDiskRound() }
        let started = Coordinator.now()
        let count = 1 + Int(generator.next() % 3)
        var faults = (0..<count).map { _ in Fault.inJob[Int(generator.next() % UInt64(Fault.inJob.count))] }
        let result = try Self.run(ddpctl, ["start", "--detach", "--json"] + arguments, timeout: 30)
        guard let object = try? JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any],
              let path = object["job_dir"] as? String else {
            return Round(faults: faults, failures: ["the job did not start: \(result.output.suffix(300))"], seconds: 0)
        }
        let job = JobDirectory(path: path)
        let totalSteps = clean.summary.steps
        var failures: [String] = []
        var injected: [Fault] = []
        for fault in faults {
            let at = Int(generator.next() % UInt64(max(totalSteps * 8 / 10, 1)))
            guard Self.waitUntil(seconds: 120, { Self.step(job) >= at || job.summary() != nil }), job.summary() == nil else { break }
            inject(fault, into: job)
            injected.append(fault)
            if fault == .killSupervisor { break }
        }
        faults = injected
        if !Self.waitUntil(seconds: 240, { job.summary() != nil }) { failures.append("no summary within 240 s (hung)") }
        let summary = job.summary()
        if summary?.state != "completed" { failures.append("ended \(summary?.state ?? "without a summary"): \(summary?.message ?? "")") }
        if let summary, summary.state == "completed" {
            if summary.steps != totalSteps { failures.append("\(summary.steps) steps, the clean run \(totalSteps)") }
            let samples = Self.metric("ddp_samples_total", in: job)
            if samples != clean.samples { failures.append("ddp_samples_total \(samples), the clean run \(clean.samples): a sample lost or seen twice") }
            if holdsBitwise(faults) {
                if (try? Self.parameters(job)) != clean.parameters { failures.append("final parameters differ from the clean run's") }
            } else if abs(summary.testAccuracy - clean.summary.testAccuracy) > 0.01 {
                failures.append("test accuracy \(summary.testAccuracy), the clean run \(clean.summary.testAccuracy)")
            }
        }
        if !Self.waitUntil(seconds: 15, { Self.processes(of: job).isEmpty }) {
            failures.append("processes left behind: \(Self.processes(of: job).joined(separator: ", "))")
            for pid in JobLookup.processes(of: job).values where JobLookup.isProcess(pid, of: job) { kill(pid, SIGKILL) }
        }
        for name in (try? FileManager.default.contentsOfDirectory(atPath: job.logsPath)) ?? [] {
            let log = (try? String(contentsOfFile: job.logsPath + "/" + name, encoding: .utf8)) ?? ""
            for trap in ["Fatal error", "Illegal instruction", "with signal 4", "with signal 5", "with signal 6", "with signal 11",
                         "Segmentation fault"] where log.contains(trap) {
                failures.append("\(name): \(trap)")
            }
        }
        if failures.isEmpty { try? FileManager.default.removeItem(atPath: job.path) }  // kept when it has something to show
        return Round(faults: faults, failures: failures, seconds: Coordinator.now() - started)
    }

    /// A job whose jobs directory is a small tmpfs that fills while it trains: it must fail with the
    /// reason, crash nothing and leave nothing behind.
    private mutating func fullDiskRound() throws -> Round {
        let started = Coordinator.now()
        let disk = jobsDir + "/disk-\(generator.next() % 1_000_000)"
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: true)
        guard try Self.run("/bin/mount", ["-t", "tmpfs", "-o", "size=320k", "tmpfs", disk], timeout: 30).status == 0 else {
            return Round(faults: [.fullDisk], failures: ["could not mount a tmpfs at \(disk)"], seconds: 0)
        }
        defer { _ = try? Self.run("/bin/umount", ["-l", disk], timeout: 30) }
        var failures: [String] = []
        let args = ["start", "--json", "--config", jobsDir + "/chaos-job.yaml", "--workers", "\(workers)", "--epochs", "\(epochs)",
                    "--jobs-dir", disk + "/j"] + keys.flatMap { ["--set", $0] }
        let result = try Self.run(ddpctl, args, timeout: 240)
        let summary = try? JobJSON.decoder().decode(JobSummary.self, from: Data((result.output.split(separator: "\n").last ?? "").utf8))
        if ![0, 1].contains(result.status) { failures.append("ddpctl start exited with \(result.status) (a crash?)") }
        if let summary {
            if summary.state == "failed" && !summary.message.contains("could not be written") && !summary.message.contains("summary") {
                failures.append("failed without naming the disk: \(summary.message)")
            }
        } else {
            failures.append("no summary printed: \(result.output.suffix(300))")
        }
        let leftover = try Self.run("/usr/bin/pgrep", ["-f", disk], timeout: 10)
        if !leftover.output.isEmpty { failures.append("processes left behind: \(leftover.output)") }
        return Round(faults: [.fullDisk], failures: failures, seconds: Coordinator.now() - started)
    }

    private mutating func inject(_ fault: Fault, into job: JobDirectory) {
        let processes = JobLookup.processes(of: job)
        let worker = processes["worker-\(generator.next() % UInt64(workers))"] ?? -1
        let coordinator = job.endpoints()?.pid ?? -1
        switch fault {
        case .killWorker:
            kill(worker, SIGKILL)
        case .pauseWorker:
            kill(worker, SIGSTOP)
            usleep(2_500_000)
            kill(worker, SIGCONT)
        case .killCoordinator:
            kill(coordinator, SIGKILL)
            _ = Self.waitUntil(seconds: 30) { Self.step(job) > 0 || job.summary() != nil }
        case .pauseCoordinator:
            kill(coordinator, SIGSTOP)
            usleep(500_000)
            kill(coordinator, SIGCONT)
        case .corruptCheckpoint:
            // With a single checkpoint nothing could be resumed: that the job then fails, naming it, is all it could do.
            let checkpoints = Checkpoint.list(in: job)
            if checkpoints.count >= 2, let newest = checkpoints.last, var bytes = FileManager.default.contents(atPath: newest), bytes.count > 8192 {
                for i in (bytes.count - 4096)..<bytes.count { bytes[i] ^= 0x5A }
                try? bytes.write(to: URL(fileURLWithPath: newest))
            }
            kill(coordinator, SIGKILL)
            _ = Self.waitUntil(seconds: 30) { Self.step(job) > 0 || job.summary() != nil }
        case .pauseSupervisor:
            kill(processes["supervisor"] ?? -1, SIGSTOP)
            usleep(1_000_000)
            kill(processes["supervisor"] ?? -1, SIGCONT)
        case .killSupervisor:
            kill(processes["supervisor"] ?? -1, SIGKILL)
        case .fullDisk:
            break  // a round of its own
        }
    }

    // MARK: Helpers

    private static func step(_ job: JobDirectory) -> Int { Int((try? job.status(timeoutSeconds: 1))?.step ?? 0) }

    private static func processes(of job: JobDirectory) -> [String] {
        JobLookup.processes(of: job).filter { JobLookup.isProcess($0.value, of: job) }.map { "\($0.key) (pid \($0.value))" }.sorted()
    }

    private static func metric(_ name: String, in job: JobDirectory) -> String {
        let text = (try? String(contentsOfFile: job.metricsPath, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").first { $0.hasPrefix(name + "{") }.map { String($0.split(separator: " ").last ?? "") } ?? ""
    }

    private static func parameters(_ job: JobDirectory) throws -> [String: [Float]] {
        Dictionary(uniqueKeysWithValues: try SafeTensors.read(path: job.modelPath).tensors.map { ($0.name, $0.tensor.scalars) })
    }

    private static func waitUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
        let deadline = Coordinator.now() + seconds
        while Coordinator.now() < deadline {
            if condition() { return true }
            usleep(50_000)
        }
        return condition()
    }

    /// Runs `executable` to its end (killed after `timeout`), its output through a file.
    private static func run(_ executable: String, _ arguments: [String], timeout: Double) throws -> (status: Int32, output: String) {
        let output = NSTemporaryDirectory() + "chaos-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: output) }
        let pid = try Detach.spawn(executable, arguments, standardOutput: output, standardError: "/dev/null",
                                   environment: ProcessInfo.processInfo.environment)
        let deadline = Coordinator.now() + timeout
        var status: Int32 = 0
        while waitpid(pid, &status, WNOHANG) == 0 {
            if Coordinator.now() > deadline { kill(-pid, SIGKILL); _ = waitpid(pid, &status, 0); break }
            usleep(20_000)
        }
        return ((status >> 8) & 0xff, (try? String(contentsOfFile: output, encoding: .utf8)) ?? "")
    }
}
