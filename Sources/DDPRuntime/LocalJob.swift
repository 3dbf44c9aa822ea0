import DDPWire
import Foundation
import Logging

/// A job run on this host: a coordinator and `workers` worker processes of the `ddpd` executable,
/// with their logs and process ids in the job directory.
public final class LocalJob {
    public private(set) var spec: JobSpec
    public let directory: JobDirectory
    private let ddpd: String
    private let transport: String
    private let logLevel: String
    private var coordinator: Process?
    /// Follower coordinator shards 1..K-1 (with `coordinator_shards` K > 1).
    private var followers: [Process] = []
    private var workers: [Process] = []
    private var restarts: [Int] = []
    private var coordinatorRestarts = 0
    private let maxRestarts: Int
    public private(set) var endpoints: Endpoints?

    /// `transport` is `ipc` (sockets in the job directory) or `tcp` (loopback, ephemeral ports).
    /// A worker that exits with an error while the job runs is started again, up to `maxRestarts`
    /// times per rank, and rejoins at the next step boundary.
    public init(
        spec: JobSpec, directory: JobDirectory, ddpd: String, transport: String = "ipc", logLevel: String = "info",
        maxRestarts: Int = 3
    ) throws {
        guard FileManager.default.isExecutableFile(atPath: ddpd) else {
            throw ControlError.failed("ddpd not found at \(ddpd); build it with 'swift build' or pass --ddpd")
        }
        guard ["ipc", "tcp"].contains(transport) else { throw JobSpecError.invalid("transport '\(transport)' is unknown (ipc, tcp)") }
        self.spec = spec
        self.directory = directory
        self.ddpd = ddpd
        self.transport = transport
        self.logLevel = logLevel
        self.maxRestarts = maxRestarts
    }

    /// Writes the job directory, starts the coordinator, waits (at most 10 s) for its endpoints, then
    /// starts the workers. Over TCP without `keys_dir` the job gets CURVE keys of its own in the (private)
    /// job directory: a loopback port is open to every user of the host, a key folder only to its owner.
    /// With `resuming`, the directory is an earlier run's and the coordinator continues from its newest checkpoint.
    public func start(resuming: Bool = false) throws {
        try directory.create()
        if resuming { try? FileManager.default.removeItem(atPath: directory.endpointsPath) }
        if transport == "tcp" && spec.keysDir.isEmpty {
            try JobKeys.generate(into: directory.keysPath)
            spec.keysDir = directory.keysPath
        }
        try AtomicFile.write(spec.json(), to: directory.specPath)
        let (workerEndpoint, controlEndpoint) = transport == "ipc"
            ? ("ipc://\(directory.path)/workers.sock", "ipc://\(directory.path)/control.sock")
            : ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
        if transport == "ipc", directory.path.utf8.count + 20 > 107 {
            throw JobSpecError.invalid("job directory path too long for ipc:// sockets; use --transport tcp or a shorter --jobs-dir")
        }
        coordinator = try launchCoordinator(workers: workerEndpoint, control: controlEndpoint, resume: resuming ? .withNewWorkers : nil)
        let deadline = Coordinator.now() + 10
        while endpoints == nil {
            endpoints = directory.endpoints()
            if endpoints != nil { break }
            guard coordinator!.isRunning else {
                throw ControlError.failed("the coordinator exited with status \(coordinator!.terminationStatus) before listening: \(lastLines(of: "coordinator"))")
            }
            guard Coordinator.now() < deadline else { throw ControlError.failed("the coordinator did not start listening within 10 s") }
            usleep(5000)
        }
        for shard in 1..<max(spec.coordinatorShards, 1) {
            let (bind, control) = transport == "ipc"
                ? ("ipc://\(directory.path)/shard-\(shard).sock", "ipc://\(directory.path)/shard-\(shard)-control.sock")
                : ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
            followers.append(try launch(["coordinator", "--config", directory.specPath, "--shard", "\(shard)", "--leader", endpoints!.workers,
                                         "--bind", bind, "--control", control], log: "coordinator-shard-\(shard)"))
        }
        for rank in 0..<spec.workers { workers.append(try launchWorker(rank)) }
        restarts = Array(repeating: 0, count: spec.workers)
        try recordProcesses()
    }

    private func launchCoordinator(workers: String, control: String, resume: Coordinator.Resume?) throws -> Process {
        let resumeFlags = switch resume { case nil: [String](); case .afterRestart: ["--resume"]; case .withNewWorkers: ["--resume", "--new-workers"] }
        return try launch(["coordinator", "--config", directory.specPath, "--bind", workers, "--control", control,
                           "--job-dir", directory.path] + resumeFlags, log: "coordinator")
    }

    /// Starts a coordinator that died without a summary again, from its newest checkpoint, on the same
    /// endpoints (the workers reconnect by themselves). Returns false when none is left to try.
    private func restartCoordinator() -> Bool {
        // Only a coordinator killed by a signal is restarted: one that exited on its own decided to (a
        // failed bind, or a summary it could not write on a full disk).
        guard let old = coordinator, old.terminationReason == .uncaughtSignal, let endpoints, directory.summary() == nil,
              !directory.isStopRequested, coordinatorRestarts < maxRestarts else { return false }
        coordinatorRestarts += 1
        SafeOutput.append("\(coordinatorRestarts)\n", to: directory.restartingPath)  // status says "restarting" meanwhile
        defer { try? FileManager.default.removeItem(atPath: directory.restartingPath) }
        let how = Self.exitDescription(old)
        appendLog("coordinator", "supervisor: the coordinator exited with \(how); restart \(coordinatorRestarts) of \(maxRestarts) from the newest checkpoint")
        try? FileManager.default.removeItem(atPath: directory.endpointsPath)
        guard let replacement = try? launchCoordinator(workers: endpoints.workers, control: endpoints.control, resume: .afterRestart) else { return false }
        coordinator = replacement
        let deadline = Coordinator.now() + 10
        while directory.endpoints() == nil && replacement.isRunning && Coordinator.now() < deadline { usleep(5000) }
        try? recordProcesses()
        return replacement.isRunning
    }

    /// A worker: `ddpd worker`, or the job's program with the coordinator, job file and rank in its
    /// environment (see `DataParallel.runWorker` of the SwiftDDP library).
    private func launchWorker(_ rank: Int) throws -> Process {
        guard !spec.program.isEmpty else {
            return try launch(["worker", "--connect", endpoints!.workers, "--config", directory.specPath, "--rank", "\(rank)"], log: "worker-\(rank)")
        }
        return try launch(spec.programArgs, log: "worker-\(rank)", executable: spec.program, environment: [
            "DDP_CONNECT": endpoints!.workers, "DDP_CONFIG": directory.specPath, "DDP_RANK": "\(rank)", "DDP_LOG_LEVEL": logLevel,
        ])
    }

    /// Why the job cannot start: a program's worker that exited with an error before training began
    /// (it would not join, and restarting it would fail alike). Nil otherwise.
    private func programFailedBeforeJoining(_ status: StatusReply?) -> String? {
        guard !spec.program.isEmpty, status?.jobState ?? "waiting" == "waiting" else { return nil }
        for (rank, worker) in workers.enumerated() where !worker.isRunning && worker.terminationStatus != 0 {
            return "the program \(spec.program) (worker \(rank), pid \(worker.processIdentifier)) exited with \(Self.exitDescription(worker)) "
                + "before joining: \(lastLines(of: "worker-\(rank)", count: 3))"
        }
        return nil
    }

    /// Writes the process ids (this supervisor's too) to the job directory.
    private func recordProcesses() throws {
        var pids = ["coordinator": coordinator!.processIdentifier, "supervisor": getpid()]
        for (index, follower) in followers.enumerated() { pids["coordinator-shard-\(index + 1)"] = follower.processIdentifier }
        for (rank, worker) in workers.enumerated() { pids["worker-\(rank)"] = worker.processIdentifier }
        try directory.write(pids, to: directory.processesPath)
    }

    /// Starts again each worker that died with an error while the coordinator runs.
    private func restartFailedWorkers() {
        guard !directory.isStopRequested else { return }  // a stop is final: nothing is restarted after it
        for (rank, worker) in workers.enumerated() where !worker.isRunning && worker.terminationStatus != 0 {
            guard restarts[rank] < maxRestarts else { continue }
            restarts[rank] += 1
            let how = Self.exitDescription(worker)
            appendLog("worker-\(rank)", "supervisor: worker \(rank) exited with \(how); restart \(restarts[rank]) of \(maxRestarts)")
            if let replacement = try? launchWorker(rank) {
                workers[rank] = replacement
                try? recordProcesses()
            }
        }
    }

    private func appendLog(_ process: String, _ line: String) {
        SafeOutput.append(line + "\n", to: directory.logPath(process))  // on a full disk the line is lost, nothing else
    }

    private func launch(_ arguments: [String], log name: String, executable: String? = nil, environment: [String: String] = [:]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable ?? ddpd)
        process.arguments = executable == nil ? arguments + ["--log-level", logLevel] : arguments
        let path = directory.logPath(name)
        if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        handle.seekToEndOfFile()
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        process.environment = ProcessInfo.processInfo.environment.merging(environment.merging(["DDP_LOCAL_WORKERS": "\(spec.workers)"]) { $1 }) { $1 }
        do { try process.run() } catch {
            throw ControlError.failed("\(executable ?? ddpd) could not be started: \(Readable.message(error))")
        }
        return process
    }

    /// "signal N" or "status N" for an exited process.
    static func exitDescription(_ process: Process) -> String {
        process.terminationReason == .uncaughtSignal ? "signal \(process.terminationStatus)" : "status \(process.terminationStatus)"
    }

    /// The last lines of a process's log, for error messages.
    public func lastLines(of process: String, count: Int = 3) -> String {
        let text = (try? String(contentsOfFile: directory.logPath(process), encoding: .utf8)) ?? ""
        return text.split(separator: "\n").suffix(count).joined(separator: " | ")
    }

    /// Polls the coordinator's status every `interval` seconds, passing each, with the epochs finished
    /// since the last call, to `progress` until the coordinator exits; then collects the workers and
    /// returns the summary.
    public func wait(interval: Double = 0.25, progress: (StatusReply, [EpochRecord]) -> Void) throws -> JobSummary {
        guard coordinator != nil, let endpoints else { throw ControlError.failed("the job was not started") }
        let client = try ControlClient(endpoint: endpoints.control, jobID: spec.jobID, keys: try? spec.keys())
        var epochsShown = 0
        func newEpochs() -> [EpochRecord] {
            let history = directory.history()
            defer { epochsShown = max(epochsShown, history.count) }
            return Array(history.dropFirst(epochsShown))
        }
        while coordinator!.isRunning || restartCoordinator() {
            let status = try? client.status(timeoutSeconds: 2)
            if let status { progress(status, newEpochs()) }
            if let failure = programFailedBeforeJoining(status) {
                for process in [coordinator!] + followers + workers where process.isRunning { Foundation.kill(process.processIdentifier, SIGKILL) }
                coordinator!.waitUntilExit()
                appendLog("coordinator", "supervisor: \(failure)")
                return directory.writeFailedSummary(spec: spec, message: failure)
            }
            restartFailedWorkers()
            var waited = 0.0
            while coordinator!.isRunning && waited < interval { usleep(10_000); waited += 0.01 }
        }
        let coordinator = coordinator!
        let deadline = Coordinator.now() + 5
        for worker in followers + workers {
            while worker.isRunning && Coordinator.now() < deadline { usleep(10_000) }
            if worker.isRunning { worker.terminate() }
        }
        if let status = try? client.status(timeoutSeconds: 0.1) { progress(status, newEpochs()) }
        if let summary = directory.summary() {
            let remaining = newEpochs()
            if !remaining.isEmpty, let last = remaining.last {
                progress(StatusReply(jobState: summary.state, step: UInt64(last.step), totalSteps: UInt64(last.step),
                                     epoch: UInt64(last.epoch), totalEpochs: UInt64(spec.epochs)), remaining)
            }
            return summary
        }
        let how = Self.exitDescription(coordinator)
        let killed = coordinator.terminationReason == .uncaughtSignal
        let lastWords = lastLines(of: "coordinator", count: 6).split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            .last { !$0.hasPrefix("workers=") && !$0.hasPrefix("control=") && !$0.hasPrefix("supervisor:") } ?? ""
        if directory.isStopRequested {
            let summary = directory.writeFailedSummary(spec: spec, message: "stopped by request; the coordinator (pid \(coordinator.processIdentifier)) ended with \(how) before writing its summary")
            var stopped = summary
            stopped.state = "stopped"
            try? directory.write(stopped, to: directory.summaryPath)
            return stopped
        }
        let message = killed
            ? "the coordinator (pid \(coordinator.processIdentifier)) was killed by \(how) after \(coordinatorRestarts) restart(s): "
                + "the restart budget (--max-restarts \(maxRestarts), shared by workers' and coordinator's restarts per process) is used up"
            : "the coordinator (pid \(coordinator.processIdentifier)) exited with \(how) without writing a summary (a full disk?): \(lastWords)"
        return directory.writeFailedSummary(spec: spec, message: message)
    }

    /// Asks the coordinator to stop the job gracefully.
    public func requestStop(reason: String) {
        directory.recordStopRequest(reason)
        guard let endpoints, let client = try? ControlClient(endpoint: endpoints.control, jobID: spec.jobID, keys: try? spec.keys()) else { return }
        _ = try? client.stop(reason: reason)
    }

    /// Kills every process of the job at once.
    public func kill() {
        for process in [coordinator].compactMap({ $0 }) + followers + workers where process.isRunning { process.terminate() }
    }
}
