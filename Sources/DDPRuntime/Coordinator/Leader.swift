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
    /// The step at which training diverged, if it did (the final model is then not written).
    var divergedAt: Int?

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
        recorder.resume(from: checkpoint)
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
            let present = membership.liveCount + membership.joiningCount
            if present >= spec.workers || (present >= spec.minWorkers && firstJoin > 0 && now - firstJoin > joinGrace) {
                startTraining()
            } else if now > started + spec.joinTimeoutSeconds {
                fail("only \(present) of \(spec.workers) workers joined within \(spec.joinTimeoutSeconds) s")
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
        case .heartbeat:
            guard follower == nil else { break }
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
            let region = shared.update(index, byteCount: t.payload.byteCount)
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

    // MARK: Control

    func handleControl(_ peer: PeerID, _ frames: [Payload]) {
        func answer(_ body: WireMessage.Body, tensors: [WireTensor] = []) {
            transport.answerControl(WireCodec.encode(WireMessage(jobID: spec.jobID, step: UInt64(round.step), body: body, tensors: tensors)), to: peer)
        }
        let request: WireMessage
        do {
            request = try WireCodec.decode(frames, expectedJobID: spec.jobID)
        } catch {
            reject("control message: \(error)", from: nil)
            answer(.error(ErrorReply(code: error.replyCode, reason: "\(error)")))
            return
        }
        switch request.body {
        case .statusRequest(let detail):
            answer(.statusReply(status(detail: detail)))
        case .heartbeat(let beat):  // an echo, for round-trip and bandwidth checks (ddpctl doctor)
            answer(.heartbeat(Heartbeat(sentUnixMilliseconds: beat.sentUnixMilliseconds, state: phase.rawValue)),
                   tensors: request.tensors.filter { $0.payload.byteCount <= ZeroMQTransport.largestEcho })
        case .stop(let reason, let graceful):
            log.info("stop requested: \(reason)", metadata: ["graceful": "\(graceful)"])
            stopRequested = true
            if graceful {
                if phase == .training { phase = .stopping }
            } else if !phase.isFinished {  // at once: the step in progress is dropped (a resume computes it again)
                phase = .stopped
                message = "stopped at once by request at step \(round.step) (the step in progress was dropped)"
            }
            answer(.statusReply(status(detail: true)))
        case .join, .welcome, .gradientPush, .parameterUpdate, .leave, .statusReply, .error, .shard:
            answer(.error(ErrorReply(code: .malformed, reason: "unexpected \(request.body.kind) on the control socket")))
        }
    }

    /// The job's state as a status reply; without `detail`, without the workers and recent losses.
    func status(detail: Bool = true) -> StatusReply {
        let now = now()
        let live = membership.live
        let workers: [WorkerStatus] = !detail ? [] : membership.byRank.map { m in
            let others = live.filter { $0.rank != m.rank }
            return WorkerStatus(rank: m.rank, host: m.host, pid: m.pid, state: m.state.rawValue, step: m.lastPushedStep,
                         lastSeenMillisecondsAgo: UInt64(max(0, now - m.lastSeen) * 1000), lastStepSeconds: m.lastStepSeconds,
                         lagging: m.isLive && Self.lags(m, behind: others), restarts: m.restarts, gradientNorm: m.gradientNorm,
                         outlierSteps: m.outlierSteps, samplesPerSecond: m.secondsPerSample > 0 ? 1 / m.secondsPerSample : 0,
                         leftOutSteps: m.leftOutSteps, lastLeftOutStep: m.lastLeftOutStep)
        }
        let last = recorder.history.last
        let elapsed = trainingStarted > 0 ? now - trainingStarted : 0
        var reply = StatusReply(
            jobState: phase.rawValue, step: UInt64(round.step), totalSteps: UInt64(totalSteps),
            epoch: UInt64(round.step / stepsPerEpoch), totalEpochs: UInt64(spec.epochs), elapsedSeconds: now - started,
            trainLoss: recorder.recentLosses.last ?? 0, testLoss: last?.testLoss ?? 0, testAccuracy: last?.testAccuracy ?? 0,
            samplesPerSecond: elapsed > 0 ? Double(recorder.samplesTrained) / elapsed : 0, workers: workers,
            rejectedMessages: recorder.rejected, recentLosses: detail ? Array(recorder.recentLosses.suffix(64)) : [], message: messageWithProblems)
        reply.coordinatorShards = followers.keys.sorted().map { followers[$0]!.endpoint }
        return reply
    }

    /// Whether a worker lags behind the other live ones: its measured time per sample is over 1.5x their
    /// median (which names a slow worker also when `balance: speed` has evened out the step times), or,
    /// until all are measured, its last step took over twice theirs (and 5 ms more).
    static func lags(_ member: Member, behind others: [Member]) -> Bool {
        guard !others.isEmpty else { return false }
        if member.secondsPerSample > 0 && others.allSatisfy({ $0.secondsPerSample > 0 }) {
            return member.secondsPerSample > 1.5 * Measure.median(others.map(\.secondsPerSample))
        }
        let typical = Measure.median(others.map(\.lastStepSeconds))
        return member.lastStepSeconds > 2 * typical && member.lastStepSeconds - typical > 0.005
    }

    // MARK: Steps

    func startTraining() {
        phase = .training
        membership.reservedUntil = 0  // from now on a free rank is free (the holders that came back have it)
        trainingStarted = now()
        log.info("training started", metadata: ["workers": "\(membership.liveCount + membership.joiningCount)", "steps": "\(totalSteps)",
                                                 "steps_per_epoch": "\(stepsPerEpoch)"])
        var apply = ShardMessage(.apply)  // the followers send their tensors' current values
        apply.ranks = membership.takingPart
        sendToFollowers(apply)
        broadcastUpdate(trainLoss: 0) { send in shard.stepAndEncode(applyOptimizer: false, bucketKB: spec.bucketKB, emit: send) }
    }

    var stepTimeout: Double { recorder.stepTimeout(configured: spec.stepTimeoutSeconds) }

    func checkLiveness(now: Double) {
        let heartbeatTimeout = Double(spec.heartbeatTimeoutMs) / 1000
        for (index, follower) in followers where now - follower.lastSeen > 2 * heartbeatTimeout {
            followersLost = true
            fail("coordinator shard \(index) (\(follower.endpoint)) has been silent for \(Int(now - follower.lastSeen)) s")
            return
        }
        let overdue = membership.overdue(now: now, step: round.step, stepStarted: round.started, stepTimeout: stepTimeout, heartbeatTimeout: heartbeatTimeout) {
            !self.round.hasAnswered($0) || !self.everyFollowerAnswered($0)
        }
        for (rank, reason) in overdue { markGone(rank, as: .lost, reason: reason) }
        // Below min_workers the job pauses (no step completes) and waits a grace period for workers to
        // rejoin, then fails.
        let present = membership.liveCount + membership.joiningCount
        if membership.liveCount < spec.minWorkers && present >= spec.minWorkers { round.mustRedo = true }  // enough again: resend with them
        if present < spec.minWorkers && phase != .failed {
            if belowMinimumSince == 0 {
                belowMinimumSince = now
                log.warning("\(membership.liveCount) live workers, below min_workers \(spec.minWorkers); waiting \(Int(joinGrace)) s for workers to rejoin")
            } else if now - belowMinimumSince > joinGrace {
                let lost = membership.byRank.filter { $0.state == .lost }.map { "rank \($0.rank) (\($0.host), pid \($0.pid))" }
                fail("\(membership.liveCount) live workers, below min_workers \(spec.minWorkers) for \(Int(joinGrace)) s; lost: \(lost.joined(separator: ", "))")
            }
        } else {
            belowMinimumSince = 0
        }
    }

    /// Completes the step once every live worker's push is in, or with `backup_workers` all but k (and
    /// every follower reported them): averages (again without non-finite contributions where needed),
    /// records, carries the left-out samples over, and advances.
    func completeStepIfReady() throws {
        let live = membership.live.map(\.rank)
        let answered = live.filter { round.hasAnswered($0) && everyFollowerAnswered($0) }
        guard live.count >= max(spec.minWorkers, 1), answered.count >= pushesNeeded(live: live.count) else { return }
        let leftOut = live.filter { !answered.contains($0) }
        refuseWhatFollowersRefused(answered)
        let contributions = round.contributions(of: answered) + round.latePushes
        if let loss = Self.divergedLoss(contributions) {
            recorder.recordDivergedLoss(loss)  // the summary, status and metrics show the loss that ended it
            return diverged("the training loss of step \(round.step) is \(loss)")
        }
        guard let used = averageContributions(contributions) else { return }  // a follower failed
        let samples = used.reduce(0) { $0 + Int($1.sampleCount) }
        var loss: Float = 0, correct = 0
        if samples > 0 {
            recordGradientNorms(used)
            // With local SGD the job's clipping and schedule are the workers' inner steps'; the outer step size is constant.
            if !spec.isLocalSGD {
                if spec.clipNorm > 0 { clipGradientNorm(shard.trainedParameters, maxNorm: spec.clipNorm) }
                shard.optimizer.learningRate = schedule.rate(base: spec.learningRate, at: round.step)
            }
            for c in used { loss += c.loss * Float(c.sampleCount) / Float(samples); correct += Int(c.correct) }
        } else {
            log.warning("step \(round.step) had no usable gradient; parameters unchanged")
        }
        let seconds = now() - round.started
        recorder.recordStep(round.step, seconds: seconds, loss: loss, learningRate: shard.optimizer.learningRate, samples: samples, correct: correct,
                            workerSeconds: used.isEmpty ? [] : membership.live.map { ($0.rank, $0.lastStepSeconds) },
                            workerSamples: round.assignment.keys.sorted().map { ($0, Int(round.assignedCount(of: $0) ?? 0)) },
                            leftOut: leftOut, late: used.compactMap { c in c.lateStep.map { (c.rank, $0, Int(c.sampleCount)) } },
                            liveWorkers: membership.liveCount, jobID: spec.jobID, now: now())
        carryOver(leftOut)
        advance(trainLoss: loss, applyOptimizer: samples > 0)
    }

    /// Moves on to the next step once the current one is averaged: the followers and this shard step
    /// (when `applyOptimizer`) and send the update, then the epoch's end, a checkpoint, or the job's end.
    func advance(trainLoss loss: Float, applyOptimizer: Bool) {
        followerReports.removeAll(keepingCapacity: true)
        round.begin(step: round.step + 1, attempt: 0)
        let step = round.step
        let more = step < totalSteps && !stopRequested
        var apply = ShardMessage(.apply)
        apply.learningRate = shard.optimizer.learningRate
        apply.applyOptimizer = applyOptimizer
        apply.ranks = more ? membership.takingPart : []
        sendToFollowers(apply)
        // The update leaves bucket by bucket as it is computed; evaluation and checkpoints come after it.
        if more {
            broadcastUpdate(trainLoss: loss) { send in shard.stepAndEncode(applyOptimizer: applyOptimizer, bucketKB: spec.bucketKB, emit: send) }
        } else {
            shard.stepAndEncode(applyOptimizer: applyOptimizer, bucketKB: spec.bucketKB) { _, _ in }
        }
        if step % stepsPerEpoch == 0 { endEpoch() }
        let checkpointDue = spec.checkpointEvery > 0 ? step % spec.checkpointEvery == 0 : step % stepsPerEpoch == 0
        if checkpointDue && more { writeCheckpoint() }
        if step >= totalSteps {
            phase = .completed
            message = "trained \(spec.epochs) epochs"
        } else if stopRequested {
            phase = .stopped
            message = "stopped by request after step \(step)"
        }
    }

    /// How many of the live workers' pushes complete a step: all of them, or with `backup_workers: k` the
    /// first all-but-k; the last step of an epoch waits for every one, so that the epoch trains all its
    /// samples.
    func pushesNeeded(live: Int) -> Int {
        let lastOfEpoch = (round.step + 1) % stepsPerEpoch == 0 || round.step + 1 >= totalSteps
        return spec.backupWorkers == 0 || lastOfEpoch ? live : max(1, live - spec.backupWorkers)
    }

    /// Records that the step completes without `ranks` (late, with backup workers) and carries their
    /// samples into the next step's batch (with none left out, nothing is carried); their pushes for it are
    /// late from now on. With `staleness` their samples wait for those pushes instead, and only the samples
    /// of pushes that can no longer come in time (or, before an epoch's last step, all) are carried.
    func carryOver(_ ranks: [Int32]) {
        let next = round.step + 1
        var again: [SampleRange]
        if spec.staleness > 0 {  // their pushes may still come: their samples wait, up to the staleness or the epoch's end
            for rank in ranks { round.awaiting[rank, default: [:]][round.step] = round.assignment[rank] ?? [] }
            let nextIsLastOfEpoch = (next + 1) % stepsPerEpoch == 0 || next + 1 >= totalSteps
            again = round.expireAwaiting(before: nextIsLastOfEpoch ? next : next - spec.staleness)
        } else {
            again = ranks.flatMap { round.assignment[$0] ?? [] }
        }
        carried = again.map { Int($0.start)..<Int($0.start + $0.count) }
        round.leftOut = Set(ranks)
        for rank in ranks {
            membership.update(rank) {
                $0.leftOutSteps += 1
                $0.lastLeftOutStep = UInt64(round.step)
            }
            let count = membership[rank]?.leftOutSteps ?? 0
            guard count <= 3 || count.isMultiple(of: 100) else { continue }
            log.warning("step \(round.step) completed without rank \(rank): its push was not in when the others' were (backup_workers \(spec.backupWorkers))",
                        metadata: ["samples_carried": "\(round.assignedCount(of: rank) ?? 0)", "left_out_steps": "\(count)"])
        }
    }

    /// The step's loss over every contribution that reported samples, when it is NaN or infinite: the
    /// model has diverged (as Keras' TerminateOnNaN decides), since all workers hold the same parameters.
    static func divergedLoss(_ contributions: [Contribution]) -> Float? {
        let counted = contributions.filter { $0.sampleCount > 0 }
        let samples = counted.reduce(0) { $0 + Float($1.sampleCount) }
        guard samples > 0 else { return nil }
        let loss = counted.reduce(Float(0)) { $0 + $1.loss * Float($1.sampleCount) / samples }
        return loss.isFinite ? nil : loss
    }

    /// Ends the job as failed because training diverged; the newest checkpoint (all finite) stays, and
    /// the final model is not written over with non-finite values.
    func diverged(_ what: String) {
        let checkpoint = directory.flatMap { Checkpoint.list(in: $0).last }
        divergedAt = round.step
        fail("training diverged: \(what) (learning rate \(shard.optimizer.learningRate)); lower learning_rate or set clip_norm"
             + (checkpoint.map { "; the last finite checkpoint is \($0)" } ?? "; no checkpoint was written before it"))
    }

    /// A push a follower refused is refused as a whole, as one coordinator would.
    func refuseWhatFollowersRefused(_ ranks: [Int32]) {
        for rank in ranks {
            guard let (index, why) = followerReports.sorted(by: { $0.key < $1.key }).lazy
                .compactMap({ index, reports in reports[rank].flatMap { $0.isEmpty ? nil : (index, $0) } }).first else { continue }
            reject("gradient of rank \(rank) at step \(round.step) skipped by coordinator shard \(index): \(why)", from: rank)
            round.refuse(rank)
        }
    }

    /// Every shard averages its tensors (reusing the early average where it covers the contributions);
    /// contributions with a value that is not finite anywhere are dropped everywhere and the rest averaged
    /// again. Returns the contributions used, or nil when a follower did not answer (the job failed).
    func averageContributions(_ contributions: [Contribution]) -> [Contribution]? {
        var used = contributions
        let samples = used.reduce(0) { $0 + Int($1.sampleCount) }
        guard samples > 0 else { return used }
        let early = round.early
        round.early = EarlyAverage()
        sendToFollowers(averageCommand(used))
        let finite = early.covers(used, owned: shard.owned) ? early.finite : shard.average(used, samples: samples)
        guard let answers = awaitFollowers(.averaged) else { return nil }
        guard !finite || answers.values.contains(where: { !$0.message.finite }) else { return used }
        var skipped = Set<Int32>()
        for (rank, bad) in shard.nonFinite(used).sorted(by: { $0.key < $1.key }) {
            reject("gradient of rank \(rank) at step \(round.step) skipped: tensor '\(bad.tensor)' element \(bad.element) is NaN or infinite", from: rank)
            skipped.insert(rank)
        }
        for (index, answer) in answers.sorted(by: { $0.key < $1.key }) {
            for rank in answer.message.ranks where skipped.insert(rank).inserted {
                reject("gradient of rank \(rank) at step \(round.step) skipped: a tensor of coordinator shard \(index) is NaN or infinite", from: rank)
            }
        }
        used = used.filter { !skipped.contains($0.rank) }
        let remaining = used.reduce(0) { $0 + Int($1.sampleCount) }
        if remaining > 0 {
            sendToFollowers(averageCommand(used))
            _ = shard.average(used, samples: remaining)
            guard awaitFollowers(.averaged) != nil else { return nil }
        }
        return used
    }

    /// Estimates each used contribution's gradient norm over this shard's tensors and counts a step at
    /// which one stands over 10x the median of the others' as an outlier of that worker (logged, in status).
    /// It takes at least two others to say which one is off.
    func recordGradientNorms(_ used: [Contribution]) {
        let norms = shard.gradientNorms(used)
        for (c, norm) in zip(used, norms) where !c.wasRefused {
            membership.update(c.rank) { $0.gradientNorm = norm }
            let others = zip(used, norms).filter { $0.0.rank != c.rank && !$0.0.wasRefused }.map(\.1).sorted()
            guard others.count >= 2 else { continue }
            let median = others[others.count / 2]
            guard norm > 10 * median && norm - median > 1e-12 else { continue }
            membership.update(c.rank) { $0.outlierSteps += 1 }
            let count = membership[c.rank]?.outlierSteps ?? 0
            if count <= 3 || count.isMultiple(of: 100) {
                log.warning("gradient of rank \(c.rank) at step \(round.step) is an outlier", metadata: [
                    "norm": "\(norm)", "median_of_others": "\(median)", "outlier_steps": "\(count)"])
            }
        }
    }

    func endEpoch() {
        guard refreshFromFollowers(withState: false) else { return }
        recorder.endEpoch(round.step / stepsPerEpoch, step: round.step, test: model!.evaluate(), elapsed: now() - trainingStarted,
                          liveWorkers: membership.liveCount, totalEpochs: spec.epochs, jobID: spec.jobID, now: now())
    }

    /// Writes a checkpoint; after `checkpoint_failure_limit` failures in a row the job fails (the newest
    /// checkpoint written stays for a resume).
    func writeCheckpoint() {
        guard directory != nil, refreshFromFollowers(withState: true) else { return }
        if let bad = shard.parameters.first(where: { !$0.tensor.isFinite }) {
            return diverged("parameter '\(bad.name)' holds a value that is NaN or infinite after step \(round.step)")
        }
        recorder.writeCheckpoint(step: round.step, stepsPerEpoch: stepsPerEpoch, shard: shard, spec: spec,
                                 model: model!.description(step: round.step, spec: spec), rankTokens: membership.rankTokens,
                                 carried: carried + round.awaitedSamples.map { Int($0.start)..<Int($0.start + $0.count) })
        if spec.checkpointFailureLimit > 0 && recorder.failedCheckpointsInARow >= spec.checkpointFailureLimit && !phase.isFinished {
            fail("\(recorder.failedCheckpointsInARow) checkpoints in a row could not be written (last: \(recorder.lastCheckpointFailure)); "
                 + "free space and resume (checkpoint_failure_limit \(spec.checkpointFailureLimit))")
        }
    }

    /// The job's message with what went wrong with its files, if anything did.
    var messageWithProblems: String {
        let problems = recorder.problems
        return problems.isEmpty ? message : message.isEmpty ? problems : message + "; " + problems
    }

    /// Sends the current step again, with the next attempt, to the live workers: its whole global batch
    /// re-divided among them, parameters unchanged (no tensors), earlier pushes dropped.
    func resendStep() {
        round.mustRedo = false
        round.begin(step: round.step, attempt: round.attempt + 1)
        followerReports.removeAll(keepingCapacity: true)
        var abort = ShardMessage(.abort)
        abort.attempt = round.attempt
        sendToFollowers(abort)
        log.warning("step \(round.step) sent again to \(membership.liveCount) live workers", metadata: ["attempt": "\(round.attempt)"])
        broadcastUpdate(trainLoss: recorder.recentLosses.last ?? 0) { send in send([], true) }
    }

    /// Sends the update for the round's step to every live worker (joiners begin training with it) with
    /// the samples it computes: the step's global batch (after any samples carried from left-out workers)
    /// cut into contiguous shares, one per live worker in rank order: equal (the first `batch mod workers`
    /// take one more), or with `balance: speed` and every live worker measured, in proportion to their
    /// samples per second. With `sync_every` > 1 the step is a round of local SGD: each worker gets its share
    /// of each of the round's data steps, one run per inner step.
    func broadcastUpdate(trainLoss: Float, produce: (_ send: (_ indices: [Int], _ last: Bool) -> Void) -> Void) {
        membership.startJoiners()
        let live = membership.live
        let speeds = live.map { $0.secondsPerSample > 0 ? 1 / $0.secondsPerSample : 0 }
        let measured = spec.balance == "speed" && !live.isEmpty && speeds.allSatisfy { $0 > 0 }
        let weights = measured ? speeds : nil
        let sampler = model!.sampler
        var local: LocalRound?, shares: [[SampleRange]]
        if spec.isLocalSGD {
            (shares, local) = model!.rounds.shares(ofRound: round.step, sampler: sampler, workers: live.count, weights: weights)
        } else {
            shares = StepBatch(carried: carried, batch: sampler.batchRange(step: round.step % stepsPerEpoch)).shares(workers: live.count, weights: weights)
        }
        round.assignment = Dictionary(uniqueKeysWithValues: zip(live.map(\.rank), shares))
        broadcast(to: live, trainLoss: trainLoss, learningRate: shard.optimizer.learningRate, assignments: round.assignment, local: local, produce: produce)
    }

    // MARK: End

    func finish() throws -> JobSummary {
        // The final checkpoint before the workers are let go: a coordinator killed after that is resumed
        // at the end and finishes without them.
        if round.step > 0 && phase != .failed { writeCheckpoint() }
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
        // With followers, the model is whole only when they could send their tensors.
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
