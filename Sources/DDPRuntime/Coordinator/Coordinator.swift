import DDPWire
import Foundation
import Logging

/// A coordinator process of a job: the leader (with one coordinator, the coordinator), or with
/// `coordinator_shards` K > 1 one of the K-1 follower shards. Binds its endpoints over ZeroMQ and runs
/// the `Leader` or the `FollowerShard`; see docs/ARCHITECTURE.md for the parts they are made of.
public final class Coordinator {
    /// This process's part in the job.
    public enum Role: Equatable, Sendable {
        /// The coordinator, or with shards the leader.
        case leader
        /// Follower shard `index` (1..K-1) of the leader at `leader` (its worker endpoint), reached by
        /// workers at `advertise` (default: the bound endpoint, a wildcard address replaced by the host name).
        case follower(index: Int, leader: String, advertise: String? = nil)
    }

    private enum Engine {
        case leader(Leader)
        case follower(FollowerShard)
    }

    public let spec: JobSpec
    public let role: Role
    /// The endpoints actually bound (ports filled in).
    public let workerEndpoint: String
    public let controlEndpoint: String
    private let engine: Engine

    /// How a coordinator continues from the newest checkpoint in its job directory.
    public enum Resume: Sendable {
        /// It was restarted and its workers live on: each rank is kept a while for the worker holding its token.
        case afterRestart
        /// The job continues with new worker processes (`ddpctl start --resume`): no rank is kept for anyone.
        case withNewWorkers
    }

    /// Builds the job's model and binds both endpoints (`tcp://HOST:0` takes any free port; TCP needs the
    /// job's keys or `allowPlainText`). With `resume`, the newest checkpoint in the job directory supplies
    /// parameters, optimizer state, step, history and rank tokens.
    public init(
        spec: JobSpec, workerEndpoint: String, controlEndpoint: String, directory: JobDirectory?, resume: Resume? = nil,
        allowPlainText: Bool = false, role: Role = .leader, logger: Logger
    ) throws {
        var spec = spec
        if spec.jobID.isEmpty { spec.jobID = JobSpec.newJobID() }
        self.spec = spec
        self.role = role
        if case .follower(let index, _, _) = role, !(1..<spec.coordinatorShards).contains(index) {
            throw JobSpecError.invalid("shard \(index) does not exist with coordinator_shards = \(spec.coordinatorShards) (followers are 1...\(max(1, spec.coordinatorShards - 1)))")
        }
        // A program's workers bring the model: it is learned from the first Join, or from the newest checkpoint.
        let setup = spec.program.isEmpty ? try BuiltInTasks.make(spec) : nil
        try setup?.loadInitialParameters()
        var model = setup.map(ServedModel.init)
        if setup == nil, resume != nil, let directory { model = try ServedModel.fromCheckpoint(in: directory, spec: spec) }
        var leaderEndpoint: String?
        if case .follower(_, let leader, _) = role { leaderEndpoint = leader }
        let transport = try ZeroMQTransport(
            spec: spec, workerEndpoint: workerEndpoint, controlEndpoint: controlEndpoint, allowPlainText: allowPlainText,
            largestTensorBytes: setup.map { (setup: any BuiltInTask) in (setup.wireTensors.map { $0.tensor.count }.max() ?? 0) * 4 } ?? Self.largestProgramTensorBytes,
            leader: leaderEndpoint)
        self.workerEndpoint = transport.workerEndpoint
        self.controlEndpoint = transport.controlEndpoint
        switch role {
        case .leader:
            let security = try spec.keys() == nil ? "none (plain text)" : "CURVE"
            engine = .leader(try Leader(spec: spec, model: model, transport: transport, directory: directory, resume: resume, logger: logger))
            logger.info("listening", metadata: ["workers": "\(transport.workerEndpoint)", "control": "\(transport.controlEndpoint)",
                                                 "job": "\(spec.jobID)", "parameters": "\(setup.map { "\($0.parameterCount)" } ?? "from the first worker")",
                                                 "security": "\(security)"])
        case .follower(let index, let leader, let advertise):
            engine = .follower(try FollowerShard(spec: spec, model: model, index: index, leader: leader, advertise: advertise,
                                                 transport: transport, logger: logger))
        }
    }

    /// Runs the job to its end and returns the summary (also written to the job directory). A follower
    /// runs until the leader stops it, and returns a summary of its own part.
    public func run() throws -> JobSummary {
        switch engine {
        case .leader(let leader): try leader.run()
        case .follower(let follower): try follower.run()
        }
    }

    /// The largest tensor a program's worker may send (its model is not known when the sockets open).
    static let largestProgramTensorBytes = 1 << 30

    /// The monotonic clock, in seconds.
    public static func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    static func unixMilliseconds() -> UInt64 { UInt64(Date().timeIntervalSince1970 * 1000) }
}

extension JobSpec {
    /// A fresh job id: time and a random suffix, e.g. `job-20261127-063000-4f2a`.
    public static func newJobID() -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.timeZone = TimeZone(identifier: "UTC")
        return "job-\(formatter.string(from: Date()))-\(String(UInt16.random(in: 0...UInt16.max), radix: 16))"
    }
}
