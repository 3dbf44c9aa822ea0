import ArgumentParser
import DDPRuntime
import DDPWire
import Foundation
import Logging

@main
struct DDPD: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ddpd",
        abstract: "The SwiftDDP daemon: a job's coordinator or one of its workers.",
        discussion: """
            ddpctl start runs these for a job on one host. On a cluster, run one coordinator and any number of
            workers yourself (see deploy/):
              ddpd coordinator --config job.yaml --bind tcp://0.0.0.0:5555 --control tcp://0.0.0.0:5556
              ddpd worker --connect tcp://COORDINATOR:5555 --config job.yaml
            With coordinator_shards K > 1, also run K-1 follower shards (each binds its own worker endpoint):
              ddpd coordinator --config job.yaml --shard 1 --leader tcp://COORDINATOR:5555 --bind tcp://0.0.0.0:5557
            """,
        version: SwiftDDPVersion.text,
        subcommands: [CoordinatorCommand.self, WorkerCommand.self])
}

struct LoggingOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func bootstrap() throws {
        guard let level = Logger.Level(flag: logLevel) else { throw ValidationError("--log-level: '\(logLevel)' is not a level") }
        DDPLogging.bootstrap(level: level)
    }
}

struct CoordinatorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "coordinator",
        abstract: "Run a job's coordinator: admit workers, average gradients, update parameters.",
        discussion: "Exit status: 0 the job completed, 2 it was stopped by request, 1 it failed.")

    @Option(help: "The job file (YAML or JSON); missing keys take their defaults.") var config: String?
    @Option(name: .customLong("set"), help: "Override a job key: --set workers=4 (repeatable).") var assignments: [String] = []
    @Option(help: "Endpoint for workers (tcp://HOST:PORT, port 0 for any; ipc://PATH).") var bind = "tcp://127.0.0.1:0"
    @Option(help: "Endpoint for control clients (ddpctl status/stop).") var control = "tcp://127.0.0.1:0"
    @Option(help: "The job directory for the model, summary, history and checkpoints.") var jobDir: String?
    @Flag(help: "Continue from the newest checkpoint in the job directory (its workers live on: their ranks are kept for them a while).") var resume = false
    @Flag(help: "With --resume: the workers are new processes (a job continued later), so no rank is kept for an old holder.")
    var newWorkers = false
    @Flag(help: "Accept plain-text traffic from anyone on TCP endpoints (without keys_dir); ipc:// needs no keys.") var insecure = false
    @Option(help: "Run follower shard N (1...coordinator_shards-1) of the leader at --leader instead of the leader.") var shard: Int?
    @Option(help: "The leader coordinator's worker endpoint (with --shard).") var leader: String?
    @Option(help: "The endpoint workers reach this shard at (default: --bind, a wildcard address replaced by this host's name).")
    var advertise: String?
    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if (shard == nil) != (leader == nil) { throw ValidationError("--shard and --leader go together") }
    }

    func run() throws {
        try logging.bootstrap()
        ProcessLimits.raiseOpenFiles()
        var spec = try JobSpec.load(path: config, overrides: try JobSpec.overrides(assignments))
        if let jobDir { spec.output = jobDir }
        let role: Coordinator.Role = shard.map { .follower(index: $0, leader: leader!, advertise: advertise) } ?? .leader
        let directory = spec.output.isEmpty || role != .leader ? nil : JobDirectory(path: spec.output)
        try directory?.create()
        TrainingSetup.useBLASThreads(of: spec)
        let coordinator: Coordinator
        do {
            coordinator = try Coordinator(
                spec: spec, workerEndpoint: bind, controlEndpoint: control, directory: directory,
                resume: resume ? (newWorkers ? .withNewWorkers : .afterRestart) : nil, allowPlainText: insecure, role: role,
                logger: Logger(label: shard.map { "coordinator-shard-\($0)" } ?? "coordinator"))
        } catch {
            // The job ends here (e.g. no checkpoint to resume verifies): its summary says why, unless the
            // directory's job already ended or another coordinator of it is alive (this one was started by mistake).
            if let directory, directory.summary() == nil,
               !(directory.endpoints().map { $0.pid != getpid() && JobLookup.isAlive($0.pid) } ?? false) {
                directory.writeFailedSummary(spec: spec, message: "the coordinator could not start: \(Readable.message(error))")
            }
            throw error
        }
        SafeOutput.print("workers=\(coordinator.workerEndpoint)\ncontrol=\(coordinator.controlEndpoint)\n")
        let summary = try coordinator.run()
        if role == .leader { SafeOutput.print(summary.jsonLine + "\n") }
        switch summary.state {
        case "completed": return
        case "stopped": throw ExitCode(2)
        default: throw ExitCode.failure
        }
    }
}

struct WorkerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker",
        abstract: "Run a worker: join the coordinator and compute gradients of its shard until told to stop.")

    @Option(help: "The coordinator's worker endpoint.") var connect: String
    @Option(help: "The job file; with it the coordinator checks that this worker builds the same model.") var config: String?
    @Option(name: .customLong("set"), help: "Override a job key: --set workers=4 (repeatable).") var assignments: [String] = []
    @Option(help: "The rank to ask for (a restarted worker asks for its old one); -1 for any.") var rank: Int32 = -1
    @Option(help: "Seconds to wait for the coordinator's welcome.") var joinTimeout: Double = 60
    @Option(help: "The key folder of a secure job (server.pub and client.key), if not in the job file.") var keys: String?
    @Option(help: "Another client key file in the key folder (e.g. client-2.key).") var clientKey: String?
    @OptionGroup var logging: LoggingOptions

    func run() throws {
        try logging.bootstrap()
        let spec = try config.map { try JobSpec.load(path: $0, overrides: try JobSpec.overrides(assignments)) }
        let folder = keys ?? spec.flatMap { $0.keysDir.isEmpty ? nil : $0.keysDir }
        if let spec, !spec.program.isEmpty { try becomeProgram(spec, keys: folder) }
        let jobKeys = try folder.map { try JobKeys.load(from: $0, clientKey: clientKey.map { "\($0.hasPrefix("/") ? "" : folder! + "/")\($0)" }) }
        Worker.leaveOnTerminationSignals()  // SIGTERM or SIGINT: leave cleanly, the share re-divided at once
        let worker = try Worker(endpoint: connect, spec: spec, keys: jobKeys, requestedRank: rank, joinTimeoutSeconds: joinTimeout,
                                ownsProcess: true, logger: Logger(label: "worker"))
        _ = try worker.run()
    }

    /// A job whose workers are a user's program (`program:` in the job file): this process becomes that
    /// program, with the coordinator, job file, rank and keys in its environment (see the SwiftDDP library),
    /// so that every deploy/ script that runs `ddpd worker` runs program jobs too.
    private func becomeProgram(_ spec: JobSpec, keys: String?) throws -> Never {
        let environment = ["DDP_CONNECT": connect, "DDP_CONFIG": config!, "DDP_RANK": "\(rank)",
                           "DDP_LOG_LEVEL": logging.logLevel, "DDP_KEYS": keys ?? ""]
        for (name, value) in environment { setenv(name, value, 1) }
        let arguments = [spec.program] + spec.programArgs
        var argv = arguments.map { strdup($0) } + [nil]
        execv(spec.program, &argv)
        throw ValidationError("the program \(spec.program) could not be started: \(String(cString: strerror(errno)))")
    }
}
