import Autodiff
import DDPWire
import Foundation
import Logging

/// Follower coordinator shard `index` (1..K-1) of a job with `coordinator_shards` K: owns its span of
/// the model's elements (`ShardPlan`: whole tensors and slices), takes the workers' pushes for them,
/// and averages, steps and sends their updates when the leader says so (see COORDINATOR SHARDS in
/// proto/ddp.proto). Runs until the leader stops it, or fails when the leader stays silent.
final class FollowerShard: ShardServer {
    private(set) var spec: JobSpec
    let index: Int
    let leaderEndpoint: String
    /// The endpoint workers reach this shard at.
    let advertised: String
    /// The model, built from the spec; for a program's job nil until the leader's ASSIGN describes it.
    private(set) var model: ServedModel?
    let log: Logger
    let transport: any CoordinatorTransport
    private var shardState: ShardState?
    /// This shard's tensors (there once assigned: every worker's join and push comes after the ASSIGN).
    var shard: ShardState { shardState! }
    var membership: Membership
    var round = StepRound()
    var recorder: Recorder
    var phase = Phase.waiting
    var message = ""
    let now: () -> Double
    let started: Double
    /// The workers the leader says take part (rank -> worker id), and when the leader was last heard.
    var roster: [Int32: String] = [:]
    var leaderLastHeard = 0.0
    var lastHello = 0.0
    /// An APPLY waiting for recipients that have not joined this shard yet.
    var pendingApply: (message: ShardMessage, step: Int, deadline: Double)?
    /// A SNAPSHOT that arrived while an APPLY was pending, answered after it.
    var pendingSnapshot: (command: ShardMessage, message: WireMessage)?

    var stepsPerEpoch: Int { model?.rounds.roundsPerEpoch ?? 1 }

    init(spec: JobSpec, model: ServedModel?, index: Int, leader: String, advertise: String?, transport: any CoordinatorTransport,
         logger: Logger, clock: @escaping () -> Double = Coordinator.now) throws {
        self.spec = spec
        self.index = index
        leaderEndpoint = leader
        advertised = advertise ?? Self.reachable(transport.workerEndpoint)
        self.transport = transport
        log = logger
        now = clock
        started = clock()
        membership = Membership(workers: spec.workers)
        recorder = Recorder(directory: nil, log: logger)
        if let model { try serve(model) }
        log.info("follower shard listening", metadata: ["workers": "\(transport.workerEndpoint)", "leader": "\(leader)",
                                                         "tensors": model == nil ? "from the leader" : "\(shard.owned.count) of \(shard.parameters.count)"])
    }

    /// Serves `model`: this shard's tensors and their optimizer.
    private func serve(_ model: ServedModel) throws {
        self.model = model
        shardState = ShardState(parameters: model.tensors, buffers: model.buffers, optimizer: try TrainingSetup.makeCoordinatorOptimizer(spec),
                                shards: spec.coordinatorShards, shard: index, wireType: DType(rawValue: spec.wireDtype) ?? .f32)
    }

    /// `endpoint` with a wildcard host (bound to every address) replaced by this host's name.
    static func reachable(_ endpoint: String) -> String {
        for wildcard in ["tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"] where endpoint.hasPrefix(wildcard) {
            return "tcp://\(ProcessInfo.processInfo.hostName):" + endpoint.dropFirst(wildcard.count)
        }
        return endpoint
    }

    /// Serves the workers' pushes for this shard's tensors and the leader's commands until the leader
    /// stops it; returns a summary of this shard's part.
    func run() throws -> JobSummary {
        let interval = Double(spec.heartbeatIntervalMs) / 1000, timeout = Double(spec.heartbeatTimeoutMs) / 1000
        try sayHello()
        var lastBeat = now()
        leaderLastHeard = now()
        while !phase.isFinished {
            try process(try transport.poll(timeoutMilliseconds: 50))
            if let pending = pendingApply { try apply(pending.message, step: pending.step, deadline: pending.deadline) }
            let now = now()
            recorder.tick(now: now)
            if now - lastBeat > interval {
                try? toLeader(.heartbeat(Heartbeat(sentUnixMilliseconds: Coordinator.unixMilliseconds(), state: phase.rawValue)))
                lastBeat = now
            }
            let silent = now - leaderLastHeard
            if silent > max(30, 6 * timeout) {
                fail("the leader coordinator at \(leaderEndpoint) has been silent for \(Int(silent)) s")
            } else if silent > timeout && now - lastHello > timeout {
                try sayHello()  // a restarted leader assigns this shard again
            }
        }
        recorder.flushRejections()
        transport.close()
        log.info("follower shard \(phase.rawValue)", metadata: ["shard": "\(index)", "message": "\(message)"])
        return JobSummary(
            state: phase.rawValue, jobID: spec.jobID, workers: spec.workers, epochs: round.step / stepsPerEpoch, steps: round.step, trainLoss: 0,
            testLoss: 0, testAccuracy: 0, wallSeconds: now() - started, samplesPerSecond: 0, modelPath: "", message: message,
            rejectedMessages: recorder.rejected, lostWorkers: [], task: spec.task)
    }

    func process(_ events: [TransportEvent]) throws {
        for event in events {
            switch event {
            case .fromPeer(let peer, let frames): try handleWorker(peer, frames)
            case .fromLeader(let frames): try handleLeader(frames)
            case .control: break  // the leader answers control clients
            case .disconnected: break  // the leader declares workers lost and sends the roster
            case .refused(let address, let reason):
                reject("refused a connection from \(address.isEmpty ? "an unknown address" : address): \(reason)", from: nil)
            }
        }
    }

    /// HELLO to the leader: this shard's index and the endpoint workers reach it at.
    func sayHello() throws {
        var hello = ShardMessage(.hello)
        hello.shard = UInt32(index)
        hello.endpoint = advertised
        try toLeader(.shard(hello))
        lastHello = now()
    }

    func toLeader(_ body: WireMessage.Body, step: UInt64 = 0, tensors: [WireTensor] = []) throws {
        try transport.sendToLeader(WireCodec.encode(WireMessage(jobID: spec.jobID, step: step, body: body, tensors: tensors)))
    }

    // MARK: Workers

    func handleWorker(_ peer: PeerID, _ frames: [Payload]) throws {
        let rank = membership.rank(of: peer)
        guard let message = decode(frames, from: peer, isKnownPeer: membership.isMember(rank)) else { return }
        switch message.body {
        case .join(let join):
            guard phase == .training, roster[join.requestedRank] == join.workerID else {
                try? send(.error(ErrorReply(code: .notReady, reason: "rank \(join.requestedRank) is not (yet) in the leader's roster; retry")), to: peer)
                return
            }
            let shared = spec.sharedMemory ? join.sharedMemory.flatMap { shard.mapSharedMemory($0, log: log) } : nil
            membership.place(Member(rank: join.requestedRank, peer: peer, workerID: join.workerID, host: join.host, pid: join.pid,
                                    state: .training, lastSeen: now(), shared: shared))
            transport.joined(peer)
            try send(.welcome(Welcome(rank: join.requestedRank, worldSize: 0, jobSpecJSON: "", startStep: UInt64(round.step), epoch: 0,
                                      sharedMemory: shared != nil)), to: peer, rank: join.requestedRank)
        case .gradientPush(let push):
            if message.step == UInt64(round.step) && push.attempt > round.attempt { abortAttempt(push.attempt) }  // the leader's ABORT is on its way
            intake(push, message: message, rank: rank)
        case .heartbeat, .leave:
            break  // liveness is the leader's
        case .welcome, .parameterUpdate, .statusRequest, .statusReply, .stop, .error, .shard, .heldOutScores:
            reject("unexpected \(message.body.kind) on a coordinator shard's worker socket", from: rank)
        }
    }

    /// Tells the leader that `rank`'s push of this step and attempt is complete or was refused (and why).
    func pushAnswered(_ rank: Int32, refused: String) {
        var report = ShardMessage(.received)
        report.ranks = [rank]
        report.attempt = round.attempt
        report.refused = refused
        try? toLeader(.shard(report), step: UInt64(round.step))
    }

    func memberGone(_ member: Member, as state: WorkerState, reason: String) {}

    /// Drops the pushes of this step: attempt `next` of it begins.
    func abortAttempt(_ next: UInt32) { round.begin(step: round.step, attempt: next) }

    // MARK: The leader

    func handleLeader(_ frames: [Payload]) throws {
        leaderLastHeard = now()
        let message: WireMessage
        do {
            message = try WireCodec.decode(frames)
        } catch {
            log.warning("dropped a malformed message from the leader: \(error)")
            return
        }
        switch message.body {
        case .shard(let command):
            try follow(command, message: message)
        case .stop(let reason, _):
            phase = .completed
            self.message = reason
        case .error(let error) where error.code == .notJoined:  // a restarted leader that has not assigned this shard yet
            if now() - lastHello > 0.25 { try sayHello() }
        case .error(let error):
            fail("the leader refused this coordinator shard: \(error.reason)")
        case .heartbeat:
            break
        case .join, .welcome, .gradientPush, .parameterUpdate, .leave, .statusRequest, .statusReply, .heldOutScores:
            log.warning("unexpected \(message.body.kind) from the leader")
        }
    }

    /// Carries out one of the leader's commands.
    func follow(_ command: ShardMessage, message: WireMessage) throws {
        let atStep = message.step == UInt64(round.step) && command.attempt == round.attempt
        switch command.kind {
        case .assign:
            if model == nil {  // a program's job: the ASSIGN says what the model is; values are loaded below
                guard let program = try? JSONDecoder().decode(ProgramModel.self, from: Data(command.modelJSON.utf8)) else {
                    fail("the leader's ASSIGN does not describe the program's model")
                    return
                }
                let zeros = Dictionary(uniqueKeysWithValues: program.tensors.map { ($0.name, Tensor.zeros($0.shape)) })
                try serve(ServedModel(program: program, values: zeros, spec: spec))
            }
            var state: [String: Tensor] = [:]
            if let foreign = shard.load(shardTensors: message.tensors, of: index, sliced: false, state: &state) {
                fail("the leader assigned '\(foreign.name)' \(foreign.shape), which is not a tensor of this shard")
                return
            }
            try shard.optimizer.restoreState(state)
            shard.optimizer.stepCount = Int(command.optimizerSteps)
            spec.jobID = message.jobID
            round.begin(step: Int(message.step), attempt: 0)
            pendingApply = nil
            phase = .training
            log.info("assigned by the leader", metadata: ["step": "\(round.step)", "tensors": "\(shard.owned.count)"])
        case .roster:
            roster = Dictionary(uniqueKeysWithValues: zip(command.ranks, command.workerIDs))
            for member in membership.byRank where roster[member.rank] != member.workerID {
                membership.remove(member.rank)
                round.forget(member.rank)
            }
        case .abort:
            if message.step == UInt64(round.step) && command.attempt > round.attempt { abortAttempt(command.attempt) }
        case .average:
            guard atStep else { break }
            try average(command)
        case .apply:
            guard message.step >= UInt64(round.step) else { break }
            try apply(command, step: Int(message.step), deadline: now() + Double(spec.heartbeatTimeoutMs) / 1000)
        case .snapshot:
            if pendingApply != nil {
                pendingSnapshot = (command, message)  // answered once the update it must include is done
                break
            }
            var answer = ShardMessage(.snapshotReply)
            answer.optimizerSteps = UInt64(shard.optimizer.stepCount)
            try toLeader(.shard(answer), step: message.step, tensors: shard.shardTensors(shard.owned, withState: command.withState, sliced: true))
        case .hello, .received, .averaged, .snapshotReply:
            log.debug("a follower's message \(command.kind) from the leader ignored")
        }
    }

    /// AVERAGE: the contributions the leader names, with its weights (a push whose count differs counts
    /// as refused); answers whether the mean is finite, and if not which ranks hold a non-finite value.
    func average(_ command: ShardMessage) throws {
        let used = zip(command.ranks, command.sampleCounts).map { rank, count in
            round.contributions(of: [rank]).first.flatMap { $0.sampleCount == count ? $0 : nil } ?? .refused(rank: rank)
        }
        let samples = used.reduce(0) { $0 + Int($1.sampleCount) }
        let early = round.early
        round.early = EarlyAverage()
        var answer = ShardMessage(.averaged)
        answer.attempt = round.attempt
        answer.finite = samples == 0 || (early.covers(used, owned: shard.owned) ? early.finite : shard.average(used, samples: samples))
        if !answer.finite { answer.ranks = shard.nonFinite(used).keys.sorted() }
        if samples > 0 && spec.clipNorm > 0 && !spec.isLocalSGD { answer.sumOfSquares = shard.sumOfSquares() }
        try toLeader(.shard(answer), step: UInt64(round.step))
    }

    /// APPLY: steps this shard's tensors (when asked) and sends their update for `newStep` to the
    /// recipients. Waits (until `deadline`) for recipients that have not joined this shard yet.
    func apply(_ command: ShardMessage, step newStep: Int, deadline: Double) throws {
        let missing = command.ranks.filter { membership[$0] == nil }
        if !missing.isEmpty && now() < deadline {
            pendingApply = (command, newStep, deadline)
            return
        }
        pendingApply = nil
        if !missing.isEmpty { log.warning("ranks \(missing) did not join this coordinator shard in time; their update leaves without them") }
        shard.optimizer.learningRate = command.learningRate
        if command.applyOptimizer && command.clip { shard.scaleGradients(by: command.clipScale) }
        round.begin(step: newStep, attempt: 0)
        let recipients = command.ranks.compactMap { membership[$0] }
        broadcast(to: recipients, trainLoss: 0, learningRate: command.learningRate, assignments: [:], keepsParameters: command.keepsParameters) { send in
            if command.keepsParameters { send([], true) } else { shard.stepAndEncode(applyOptimizer: command.applyOptimizer, bucketKB: spec.bucketKB, emit: send) }
        }
        if let (snapshot, message) = pendingSnapshot {
            pendingSnapshot = nil
            try follow(snapshot, message: message)
        }
    }
}
