import Autodiff
import DDPData
import DDPWire
import Foundation
import Logging

/// The coordinator of a job (with coordinator shards, shard 0, the leader): admits workers, assigns
/// each step's samples, collects every live worker's gradient (with backup workers, the first all but k),
/// averages them by sample count in rank order, steps the optimizer, sends the update, evaluates after
/// each epoch, answers control requests, drives the follower shards, and ends the job with a model and a
/// summary.
///
/// One thread: `run` polls the transport and hands each event to one handler; every wait has a deadline
/// whose expiry names who was waited for.
final class Leader: ShardServer {
    let spec: JobSpec
    /// The model served: built from the spec, or for a program learned from its first Join (nil until then).
    private(set) var model: ServedModel?
    let log: Logger
    let transport: any CoordinatorTransport
    private var shardState: ShardState?
    /// The tensors, there once the model is known (every use follows the first Join).
    var shard: ShardState { shardState! }
    var membership: Membership
    var round = StepRound()
    var recorder: Recorder
    var phase = Phase.waiting
    var message = ""
    let now: () -> Double
    var schedule = LearningRateSchedule.constant
    let directory: JobDirectory?
    var stopRequested = false
    let started: Double
    var trainingStarted = 0.0
    var firstJoin = 0.0
    var belowMinimumSince = 0.0
    /// Positions of the epoch that steps were completed without (`backup_workers`), for the next step.
    var carried: [Range<Int>] = []
    /// Events that arrived while the leader waited for its followers, for the main loop.
    var deferred: [TransportEvent] = []

    /// A follower shard as the leader knows it.
    struct Follower {
        var peer: PeerID
        var endpoint: String
        var lastSeen: Double
    }
    /// The followers by shard index, their peers, and their RECEIVED reports for the current step and
    /// attempt (rank -> why refused, "" when accepted).
    var followers: [Int: Follower] = [:]
    var followerOfPeer: [PeerID: Int] = [:]
    var followerReports: [Int: [Int32: String]] = [:]
    /// A follower was lost (the job has failed; nothing more is asked of them).
    var followersLost = false
    /// The step whose follower values (and with `withState` optimizer state) this process holds: their
    /// values change only when a step is applied, so one snapshot serves every need of that step.
    var followersCopied: (step: Int, withState: Bool)?
    /// The step at which training diverged, if it did (the final model is then not written).
    var divergedAt: Int?
    /// The epoch being scored by the workers, until every held-out batch is in.
    var heldOut: HeldOutRound?

    /// The coordinator's steps per epoch: the data's, or with `sync_every` > 1 its rounds.
    var stepsPerEpoch: Int { model?.rounds.roundsPerEpoch ?? 1 }
    var totalSteps: Int { model?.totalSteps ?? 0 }

    /// A leader for `spec` on `transport`; with `resume`, the newest checkpoint in `directory` supplies
    /// parameters, optimizer state, step, history and rank tokens.
    init(spec: JobSpec, model: ServedModel?, transport: any CoordinatorTransport, directory: JobDirectory?, resume: Coordinator.Resume?,
         logger: Logger, clock: @escaping () -> Double = Coordinator.now) throws {
        self.spec = spec
        self.transport = transport
        self.directory = directory
        log = logger
        now = clock
        started = clock()
        membership = Membership(workers: spec.workers)
        round.staleness = spec.staleness
        recorder = Recorder(directory: directory, log: logger)
        if let model { try serve(model) }
        recorder.metrics.regression = spec.task == "regression"
        if let address = try spec.metricsHostAndPort() {
            recorder.metricsServer = try MetricsHTTPServer(host: address.host, port: address.port)
        }
        if let directory {
            do { recorder.tensorBoard = try TensorBoardWriter(directory: directory.tensorBoardPath, wallTime: Date().timeIntervalSince1970) } catch {
                log.warning("no TensorBoard events: \(error)")
            }
        }
        try directory?.write(Endpoints(workers: transport.workerEndpoint, control: transport.controlEndpoint, pid: getpid(),
                                       metrics: recorder.metricsServer?.url),
                             to: directory!.endpointsPath)
        directory?.removeStaleTemporaries()
        if let resume, let directory {
            let (latest, skipped) = Checkpoint.latest(in: directory)
            for (path, reason) in skipped { log.warning("skipped checkpoint \(path): \(reason)") }
            if let checkpoint = latest { try continueFrom(checkpoint, keepingRanks: resume == .afterRestart) } else if !skipped.isEmpty {
                throw SafeTensorsError.invalid(directory.checkpointsPath, "no checkpoint verifies (\(skipped.count) tried); cannot resume")
            }
        }
    }

    /// Starts serving `model`: its tensors, their optimizer, the schedule over its steps.
    private func serve(_ model: ServedModel) throws {
        self.model = model
        shardState = ShardState(parameters: model.tensors, buffers: model.buffers, optimizer: try TrainingSetup.makeCoordinatorOptimizer(spec),
                                shards: spec.coordinatorShards, shard: 0, wireType: DType(rawValue: spec.wireDtype) ?? .f32)
        schedule = TrainingSetup.schedule(spec, totalSteps: model.totalSteps)
    }

    /// Continues from `checkpoint`: its parameters, optimizer state, step, counters and (`keepingRanks`,
    /// for workers that live on) its rank tokens.
    private func continueFrom(_ checkpoint: Checkpoint, keepingRanks: Bool) throws {
        try shard.restore(checkpoint)
        round.step = checkpoint.step
        if let outside = checkpoint.carriedSamples.first(where: { $0.upperBound > model?.sampler.sampleCount ?? Int.max }) {
            throw SafeTensorsError.invalid(checkpoint.path, "carried samples \(outside) lie outside the \(model!.sampler.sampleCount) training samples")
        }
        carried = checkpoint.carriedSamples
        recorder.resume(from: checkpoint, stepsPerEpoch: stepsPerEpoch)
        if keepingRanks {
            membership.rankTokens = checkpoint.rankTokens
            membership.reservedUntil = now() + 3 * Double(spec.heartbeatTimeoutMs) / 1000
        }
        log.info("resumed from checkpoint", metadata: ["path": "\(checkpoint.path)", "step": "\(checkpoint.step)"])
        if checkpoint.step >= totalSteps {  // killed after its final checkpoint: only the end is left to do
            phase = .completed
            message = "trained \(spec.epochs) epochs (finished after a coordinator restart)"
        }
    }

    /// Runs the job to its end and returns the summary (also written to the job directory).
    func run() throws -> JobSummary {
        while !phase.isFinished {
            let events = deferred + (try transport.poll(timeoutMilliseconds: 50))
            deferred = []
            try process(events)
            try tick()
        }
        return try finish()
    }

    /// Hands each event to its handler.
    func process(_ events: [TransportEvent]) throws {
        for event in events {
            switch event {
            case .fromPeer(let peer, let frames): try handlePeer(peer, frames)
            case .control(let peer, let frames): handleControl(peer, frames)
            case .disconnected(let peers): peersGone(peers)
            case .refused(let address, let reason):
                reject("refused a connection from \(address.isEmpty ? "an unknown address" : address): \(reason)", from: nil)
            case .fromLeader: reject("a message from a leader reached the leader", from: nil)
            }
        }
    }

    /// What time alone decides: starting, deadlines, resending and completing the step.
    func tick() throws {
        let now = now()
        recorder.tick(now: now)
        switch phase {
        case .waiting where followers.count < spec.coordinatorShards - 1:
            if now > started + spec.joinTimeoutSeconds {
                fail("only \(followers.count) of \(spec.coordinatorShards - 1) coordinator shards said hello within \(spec.joinTimeoutSeconds) s")
            }
        case .waiting:
            // Training starts once the workers are ready (they hold their Welcome's values and joined every
            // shard), or after the grace period once min_workers are.
            let present = membership.liveCount + membership.joiningCount, ready = membership.readyCount
            if ready >= spec.workers || (ready >= spec.minWorkers && firstJoin > 0 && now - firstJoin > joinGrace) {
                startTraining()
            } else if now > started + spec.joinTimeoutSeconds {
                let readiness = present > ready ? " (\(ready) of them ready)" : ""
                fail("only \(present) of \(spec.workers) workers joined\(readiness) within \(spec.joinTimeoutSeconds) s")
            } else if stopRequested {
                phase = .stopped
                message = "stopped before training started"
            }
        case .training, .stopping:
            checkLiveness(now: now)
            if round.mustRedo && !phase.isFinished { resendStep() }
            if !phase.isFinished { try completeStepIfReady() }
        case .completed, .stopped, .failed:
            break
        }
    }

    /// How long after the first join the job waits for the rest before starting with `min_workers`.
    var joinGrace: Double { min(spec.joinTimeoutSeconds, 2 * Double(spec.heartbeatTimeoutMs) / 1000) }

    // MARK: Workers and followers

    func handlePeer(_ peer: PeerID, _ frames: [Payload]) throws {
        let follower = followerOfPeer[peer]
        if let follower { followers[follower]?.lastSeen = now() }
        let rank = membership.rank(of: peer)
        guard let message = decode(frames, from: peer, isKnownPeer: membership.isMember(rank) || follower != nil) else { return }
        switch message.body {
        case .join(let join):
            try handleJoin(join, tensors: message.tensors, from: peer)
        case .gradientPush(let push):
            intake(push, message: message, rank: rank)
            if !membership.isMember(rank) {
                try? send(.error(ErrorReply(code: .notJoined, reason: "push refused" + notJoinedReason(rank))), to: peer)
            }
        case .heldOutScores(let scores):
            heldOutScoresArrived(scores, step: message.step, rank: rank)
        case .heartbeat(let heartbeat):
            guard follower == nil else { break }
            if let rank, heartbeat.state == Heartbeat.ready { membership.update(rank) { $0.ready = true } }
            let answer: WireMessage.Body = membership.isMember(rank)
                ? .heartbeat(Heartbeat(sentUnixMilliseconds: Coordinator.unixMilliseconds(), state: phase.rawValue))
                : .error(ErrorReply(code: .notJoined, reason: "heartbeat" + notJoinedReason(rank)))
            try? send(answer, to: peer)
        case .leave(let reason):
            if let rank, membership.isMember(rank) {
                markGone(rank, as: .left, reason: "left the job: \(reason)")
            } else if let rank, membership.lostThenLeft(rank, peer: peer, reason: "left the job: \(reason)") {
                recorder.metrics.workersLost -= 1
                log.warning("worker left", metadata: ["rank": "\(rank)", "reason": "left the job: \(reason) (its Leave came after its connection dropped)"])
            }
        case .shard(let command):
            try handleFollowerMessage(command, message: message, peer: peer)
        case .welcome, .parameterUpdate, .statusRequest, .statusReply, .stop, .error:
            reject("unexpected \(message.body.kind) on the worker socket", from: rank)
        }
    }

    /// Dropped connections: a worker is declared lost at once (a killed process closes its sockets); a
    /// follower's fails the job.
    func peersGone(_ peers: [PeerID]) {
        for peer in peers {
            if let index = followerOfPeer[peer], let follower = followers[index] {
                followersLost = true
                fail("coordinator shard \(index) (\(follower.endpoint)) lost its connection")
            }
            if let rank = membership.rank(of: peer), membership.isMember(rank) { markGone(rank, as: .lost, reason: "its connection dropped") }
        }
    }

    func handleJoin(_ join: Join, tensors: [WireTensor], from peer: PeerID) throws {
        guard followers.count == spec.coordinatorShards - 1 else {
            try? send(.error(ErrorReply(code: .notReady, reason: "the coordinator shards are still starting; retry")), to: peer)
            return
        }
        if model == nil {  // a program's first Join brings the job's model
            do { try serve(ServedModel(join: join, tensors: tensors, spec: spec)) } catch {
                let reason = "\(error)"
                reject("join of \(join.workerID) refused: \(reason)", from: nil)
                try? send(.error(ErrorReply(code: .modelMismatch, reason: reason)), to: peer)
                return
            }
            log.info("model received from the first worker", metadata: ["worker": "\(join.workerID)", "tensors": "\(shard.parameters.count)",
                                                                         "samples": "\(model!.sampler.sampleCount)"])
            for index in followers.keys.sorted() { assign(index) }
        }
        let fingerprint = model!.fingerprint
        if !join.modelFingerprint.isEmpty && join.modelFingerprint != fingerprint {
            var difference = ""
            if let theirs = try? JSONDecoder().decode(ProgramModel.self, from: Data(join.modelJSON.utf8)),
               let first = model!.program?.firstDifference(from: theirs) { difference = ": \(first)" }
            let reason = "model fingerprint \(join.modelFingerprint) of worker \(join.workerID) on \(join.host) differs from the job's \(fingerprint)\(difference)"
            reject(reason, from: nil)
            try? send(.error(ErrorReply(code: .modelMismatch, reason: reason)), to: peer)
            return
        }
        if let existing = membership.rank(of: peer), membership[existing]?.state != .lost {
            log.info("duplicate join ignored", metadata: ["rank": "\(existing)"])
            return
        }
        let ending = phase.isFinished || phase == .stopping
        guard !ending, let rank = membership.freeRank(requested: join.requestedRank, token: join.rankToken, now: now()) else {
            let reserved = now() < membership.reservedUntil
            // A restarted worker asking for its old rank may arrive before its predecessor is declared
            // lost, and after a coordinator restart ranks are kept a while for their holders: it is told to
            // retry, not refused.
            let retry = !ending && (reserved || (join.requestedRank >= 0 && join.requestedRank < spec.workers))
            let reason = ending ? "the job is ending"
                : reserved ? "the free ranks are kept for their holders for \(Int(membership.reservedUntil - now()) + 1) s after a coordinator restart; retry"
                : retry ? "rank \(join.requestedRank) is still held by a live worker; retry" : "all \(spec.workers) ranks are taken"
            reject("join of \(join.workerID) refused: \(reason)", from: nil)
            try? send(.error(ErrorReply(code: retry ? .notReady : .jobFull, reason: reason)), to: peer)
            return
        }
        let shared = spec.sharedMemory ? join.sharedMemory.flatMap { shard.mapSharedMemory($0, log: log) } : nil
        let member = membership.admit(join, from: peer, rank: rank, shared: shared, now: now())
        transport.joined(peer)
        if firstJoin == 0 { firstJoin = now() }
        sendRoster()
        // A worker joining a running sharded job gets the followers' current values too.
        if phase != .waiting && !followers.isEmpty && !refreshFromFollowers(withState: false) { return }
        log.info("worker joined", metadata: ["rank": "\(rank)", "host": "\(join.host)", "pid": "\(join.pid)", "restarts": "\(member.restarts)"])
        var welcome = Welcome(
            rank: rank, worldSize: UInt32(spec.workers), jobSpecJSON: spec.json(), startStep: UInt64(round.step),
            epoch: UInt64(round.step / stepsPerEpoch), heartbeatIntervalMilliseconds: UInt64(spec.heartbeatIntervalMs),
            heartbeatTimeoutMilliseconds: UInt64(spec.heartbeatTimeoutMs), sharedMemory: shared != nil)
        welcome.shardEndpoints = followers.keys.sorted().map { followers[$0]!.endpoint }
        welcome.rankToken = membership.rankTokens[rank] ?? []
        do {
            try send(.welcome(welcome), to: peer, step: UInt64(round.step), rank: rank, tensors: welcomeTensors(for: shared))
        } catch {
            markGone(rank, as: .lost, reason: "could not be welcomed: \(error)")
        }
    }

    /// The parameters a Welcome carries: in frames, or written into the joiner's shared segment (before
    /// any update can be, so that the worker never copies an older value over a newer one there).
    func welcomeTensors(for shared: SharedArea?) -> [WireTensor] {
        let tensors = shard.parameterTensors()
        guard let shared else { return tensors }
        return tensors.enumerated().map { index, t in
            let region = shared.update(index, elements: t.elements)
            region.withUnsafeMutableBytes { target in t.payload.withUnsafeBytes { target.copyMemory(from: $0) } }
            return WireTensor(name: t.name, shape: t.shape, dtype: .f32, payload: region)
        }
    }

    func pushAnswered(_ rank: Int32, refused: String) {}

    func memberGone(_ member: Member, as state: WorkerState, reason: String) {
        // A live worker gone before the step completed: the step is sent again to the others, re-divided.
        if member.isLive && (phase == .training || phase == .stopping) { round.mustRedo = true }
        sendRoster()
    }

    // MARK: End

    func finish() throws -> JobSummary {
        // The final checkpoint before the workers are let go: a coordinator killed after that is resumed
        // at the end and finishes without them.
        if round.step > 0 && phase != .failed { writeCheckpoint() }
        // An epoch the workers were scoring when the job ended (its step dropped): scored here on the
        // parameters it ended with, which are the last completed step's.
        if heldOut != nil {
            let scorable = phase != .failed && !followersLost && refreshFromFollowers(withState: false)
            publishHeldOut(test: scorable ? model?.evaluate() : nil)
        }
        // Every worker ever admitted is told, those declared lost too: one that was only paused (its
        // connection alive) gets it when it wakes, instead of trying to rejoin a coordinator that is gone.
        for member in membership.byRank where member.state != .left {
            try? send(.stop(reason: message, graceful: phase != .failed), to: member.peer)
        }
        let last = recorder.history.last
        let elapsed = trainingStarted > 0 ? now() - trainingStarted : 0
        var modelPath = ""
        recorder.flushRejections()
        recorder.writeMetrics(liveWorkers: membership.liveCount, jobID: spec.jobID, now: now())
        // With followers, the model is written only when none was lost and their tensors of this step are
        // here (copied for the last evaluation or checkpoint, or sent now).
        let whole = followers.isEmpty || refreshFromFollowers(withState: false)
        for index in followers.keys.sorted() { sendToFollower(index, body: .stop(reason: message, graceful: phase != .failed)) }
        if let directory, whole, divergedAt == nil, model != nil {  // no model: a program's job no worker joined
            do {  // a failed write is reported in the summary, which is still written
                try SafeTensors.write(shard.parameters.map { ($0.name, $0.tensor) },
                                      metadata: model!.description(step: round.step, spec: spec).metadata.merging([
                                          "job_id": spec.jobID, "step": "\(round.step)", "format": "pt", "job_spec": spec.json()]) { $1 },
                                      to: directory.modelPath)
                modelPath = directory.modelPath
            } catch {
                log.error("the model could not be written: \(error)")
                message += "; the model could not be written: \(error)"
            }
        }
        let summary = JobSummary(
            state: phase.rawValue, jobID: spec.jobID, workers: spec.workers, epochs: round.step / stepsPerEpoch, steps: round.step,
            trainLoss: (divergedAt == nil ? last?.trainLoss : nil) ?? recorder.recentLosses.last ?? 0, testLoss: last?.testLoss ?? 0,
            testAccuracy: last?.testAccuracy ?? 0, wallSeconds: now() - started,
            samplesPerSecond: elapsed > 0 ? Double(recorder.samplesTrained) / elapsed : 0, modelPath: modelPath, message: messageWithProblems,
            rejectedMessages: recorder.rejected, lostWorkers: membership.lostRanks, task: spec.program.isEmpty ? spec.task : "program")
        if let directory {  // on a full disk the summary still reaches standard output and the exit status
            do { try directory.write(summary, to: directory.summaryPath) } catch { log.error("the summary could not be written: \(error)") }
        }
        recorder.metricsServer?.close()
        log.info("job \(phase.rawValue)", metadata: ["steps": "\(round.step)", "test_accuracy": "\(summary.testAccuracy)", "message": "\(message)"])
        transport.close()
        return summary
    }
}
