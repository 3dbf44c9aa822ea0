import Autodiff
import DDPData
import DDPWire
import Foundation
import Logging

/// The termination signal this process received (0: none), set by the handler `Worker.leaveOnTerminationSignals` installs.
nonisolated(unsafe) private var terminationSignal: Int32 = 0

/// A worker: joins a coordinator, then for every parameter update computes the gradient of its
/// shard of that step's global batch with the autodiff core and pushes it, until told to stop.
public final class Worker {
    /// Why a worker ended.
    public enum Outcome: Equatable, Sendable {
        /// The coordinator ended the job (normally or not) and said why.
        case stopped(reason: String)
        /// This worker left on its own (`requestLeave`), after telling the coordinator.
        case left(reason: String)
    }

    /// A leave asked for from another thread (a signal handler), taken up by the loop.
    private final class LeaveRequest: @unchecked Sendable {
        private let lock = NSLock()
        private var reason: String?
        func set(_ why: String) { lock.withLock { reason = reason ?? why } }
        var value: String? { lock.withLock { reason } }
    }
    private let leaveRequest = LeaveRequest()

    /// Asks the worker to leave the job (safe from any thread): at the next chance, between steps, it
    /// sends `Leave` with `reason`, so that its share is re-divided at once, and `run` returns.
    public func requestLeave(_ reason: String) { leaveRequest.set(reason) }

    /// Makes SIGTERM and SIGINT ask every worker of this process to leave (a plain handler that sets a
    /// flag the loop reads: async-signal-safe, and whichever thread the signal lands on).
    /// Call it before the first worker starts its threads: they inherit the unblocked signals.
    public static func leaveOnTerminationSignals() {
        signal(SIGTERM) { _ in terminationSignal = SIGTERM }
        signal(SIGINT) { _ in terminationSignal = SIGINT }
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &signals, nil)  // a parent may have left them blocked
    }

    /// The reason to leave: asked for, or a termination signal received.
    private var leaveReason: String? {
        if let reason = leaveRequest.value { return reason }
        switch terminationSignal {
        case SIGTERM: return "SIGTERM received"
        case SIGINT: return "SIGINT received"
        default: return nil
        }
    }

    private let endpoint: String
    /// What this worker trains (built from the job's spec when not given), the spec and its sampler.
    private var task: (any WorkerTask)?
    private var spec: JobSpec?
    private var sampler: EpochSampler?
    private let log: Logger
    private let context = ZMQContext()
    private let socket: ZMQSocket
    private let monitor: ZMQMonitor
    private var jobID: String
    private var rank: Int32 = -1
    /// The secret of `rank` from its Welcome, sent in every later Join (see Welcome.rank_token).
    private var rankToken: [UInt8] = []
    /// The model's parameters, then its buffers (which are pushed as their values: see `Buffer`).
    private var parameters: [NamedParameter] = []
    private var isBuffer: [Bool] = []
    /// Half-precision pushes' payloads: of each parameter, one per owning coordinator shard.
    private var gradientPayloads: [[Payload]] = []
    private var indexOfParameter: [ObjectIdentifier: Int] = [:]
    private var indexOfName: [String: Int] = [:]
    private let scratch = Tensor.zeros([WeightedMean.chunk])
    /// The parameter update being received in parts, from the leader (source 0) and each follower
    /// coordinator shard (source j): its step, each source's next part due and whether its last part is
    /// in, the parameters set so far, and the leader's last part (the next step's division).
    private struct UpdateProgress {
        var step: UInt64
        var nextPart: [UInt32]
        var done: [Bool]
        var received: [Set<Int>] = []  // the shards that set their part of each parameter
        var kept: [Bool] = []  // the sources whose part kept the parameters (keeps_parameters)
        var header: ParameterUpdate?
    }
    private var updateInProgress: UpdateProgress?
    /// The step whose update is complete and whose gradient is due: computed once no newer message
    /// waits (a worker left behind by backup workers skips to the newest update).
    private var dueStep: (step: Int, assignment: ParameterUpdate)?
    /// With `sync_every` > 1: the rounds of local steps (created with the first one).
    private var localRounds: LocalRounds?
    /// With coordinator shards: which elements of each parameter each shard owns, a socket to each
    /// follower (shard j at j - 1), whether it welcomed this worker, whether it shares memory, and when to
    /// ask it again.
    private var plan = ShardPlan(elementCounts: [], shards: 1)
    private var shardSockets: [ZMQSocket] = []
    private var shardEndpoints: [String] = []
    private var shardWelcomed: [Bool] = []
    /// Whether this worker told the leader, since its last Welcome, that it is ready to compute.
    private var announcedReady = false
    private var shardSharing: [Bool] = []
    private var shardJoinRetry: [Double] = []
    private let keys: JobKeys?
    private var permutation: (epoch: Int, order: [Int])?
    private var wireType = DType.f32
    private var heartbeatInterval = 1.0
    private var heartbeatTimeout = 5.0
    private var coordinatorTimeout = 30.0
    private let joinTimeout: Double
    private let requestedRank: Int32
    private let workerID: String
    private let ownsProcess: Bool
    /// The segment offered to the coordinator (when this worker knows its model before joining), where
    /// its pushes go, and whether the coordinator took it (its Welcome said so).
    private var sharedSegment: SharedSegment?
    private var pushLayout: SharedLayout?
    private var updateLayout: SharedLayout?
    private var sharing = false

    /// A worker for the coordinator at `endpoint`. With a `spec`, the worker builds its model first and
    /// the coordinator checks its fingerprint; without, it takes the job's spec from the welcome. A
    /// `task` (a user's program) trains its own model instead of the spec's.
    /// `keys` (server public key and a client pair) are needed for a secure job. A worker that `ownsProcess`
    /// (ddpd's) sets the process's BLAS threads to the job's once it knows the spec.
    public init(
        endpoint: String, spec: JobSpec?, task: (any WorkerTask)? = nil, keys: JobKeys? = nil, requestedRank: Int32 = -1,
        joinTimeoutSeconds: Double = 60, ownsProcess: Bool = false, logger: Logger
    ) throws {
        self.endpoint = endpoint
        self.spec = spec
        self.ownsProcess = ownsProcess
        if ownsProcess, let spec { TrainingSetup.useBLASThreads(of: spec) }
        self.task = try task ?? spec.map(BuiltInTasks.make)
        jobID = spec?.jobID ?? ""
        log = logger
        joinTimeout = joinTimeoutSeconds
        self.requestedRank = requestedRank
        workerID = "\(ProcessInfo.processInfo.hostName):\(getpid()):\(String(UInt32.random(in: 0...UInt32.max), radix: 16))"
        socket = try ZMQSocket(context: context, kind: .dealer)
        monitor = try ZMQMonitor(context: context, monitoring: socket)
        self.keys = try keys ?? spec?.keys()
        try self.keys?.secureClient(socket)
        try socket.setSendTimeout(milliseconds: 5000)
        try socket.setHighWaterMarks(send: 0, receive: 0)
        try socket.setKernelBuffers(bytes: 4 << 20)
        try socket.connect(endpoint)
    }

    /// Joins and trains until the coordinator says stop; throws when refused or when the coordinator
    /// goes silent past its deadline.
    public func run() throws -> Outcome {
        guard try join() else { return .left(reason: leaveReason ?? "") }
        var lastHeard = Coordinator.now(), lastJoin = 0.0
        var rejoinDue = false  // the coordinator said this worker is not a member (or to retry): join again
        while true {
            if let reason = leaveReason {
                log.info("leaving the job: \(reason)", metadata: ["rank": "\(rank)"])
                try? send(.leave(reason: reason))
                for j in shardSockets.indices { try? send(.leave(reason: reason), to: j + 1) }
                // The Leave must leave before the process does: close everything and wait for it to be sent.
                for s in [socket, monitor.socket] + shardSockets { s.close() }
                context.terminate()
                return .left(reason: reason)
            }
            if let due = dueStep, try ZMQSocket.poll([socket] + shardSockets, timeoutMilliseconds: 0).isEmpty {
                dueStep = nil
                try computeAndPush(step: due.step, assignment: due.assignment)
            }
            if rejoinDue && Coordinator.now() - lastJoin > 0.25 {
                try sendJoin(rank: rank)
                lastJoin = Coordinator.now()
                rejoinDue = false
            }
            let retrying = rejoinDue || shardJoinRetry.contains { $0 > 0 }
            let ready = try ZMQSocket.poll([socket] + shardSockets, timeoutMilliseconds: retrying ? 50 : Int(heartbeatInterval * 1000))
            for j in shardSockets.indices where ready.contains(j + 1) {
                while let frames = try shardSockets[j].receive(timeoutMilliseconds: 0) { try handleShardFrames(frames, shard: j + 1) }
            }
            try retryShardJoins()
            guard ready.contains(0), let frames = try socket.receive(timeoutMilliseconds: 0) else {
                let silent = Coordinator.now() - lastHeard
                guard ready.isEmpty, silent >= heartbeatInterval else { continue }
                if silent > coordinatorTimeout {
                    throw WorkerError.coordinatorSilent(endpoint: endpoint, seconds: silent)
                }
                try send(.heartbeat(Heartbeat(sentUnixMilliseconds: Coordinator.unixMilliseconds(), state: "waiting")))
                // A coordinator silent past the heartbeat timeout may have restarted, or dropped this
                // worker: ask to join again, for the same rank.
                if silent > heartbeatTimeout && Coordinator.now() - lastJoin > heartbeatTimeout {
                    log.warning("the coordinator has been silent for \(Int(silent)) s; joining again", metadata: ["rank": "\(rank)"])
                    try sendJoin(rank: rank)
                    lastJoin = Coordinator.now()
                }
                continue
            }
            lastHeard = Coordinator.now()
            let message: WireMessage
            do {
                message = try WireCodec.decode(frames, expectedJobID: jobID, sharedMemory: sharedSegment)
            } catch {
                log.warning("dropped a malformed message from the coordinator: \(error)")
                continue
            }
            switch message.body {
            case .parameterUpdate(let update):
                let resent = update.attempt > 0 && message.tensors.isEmpty && !update.moreParts  // keeps the parameters
                if resent {
                    try evaluateIfAsked(update, step: message.step)
                    makeDue(step: Int(message.step), assignment: update)
                } else {
                    try receiveUpdatePart(update, step: message.step, tensors: message.tensors, from: 0)
                }
            case .stop(let reason, _):
                log.info("stopped by the coordinator: \(reason)")
                return .stopped(reason: reason)
            case .error(let error) where error.code == .pushRefused:
                log.warning("the coordinator refused this worker's push: \(error.reason)", metadata: ["step": "\(message.step)"])
            case .error(let error) where error.code == .notJoined || error.code == .notReady:
                // Dropped (e.g. paused past the step deadline) or the coordinator restarted: join again.
                updateInProgress = nil
                dueStep = nil
                if !rejoinDue { log.warning("joining again: \(error.reason)", metadata: ["rank": "\(rank)"]) }
                rejoinDue = true
            case .error(let error):
                throw WorkerError.refused(error.reason)
            case .welcome(let welcome):
                try accept(welcome, message: message)
            case .heartbeat:
                break
            case .join, .gradientPush, .leave, .statusRequest, .statusReply, .shard, .heldOutScores:
                log.warning("unexpected \(message.body.kind) from the coordinator")
            }
        }
    }

    private func send(_ body: WireMessage.Body, step: UInt64 = 0, tensors: [WireTensor] = [], to shard: Int = 0) throws {
        try (shard == 0 ? socket : shardSockets[shard - 1]).send(
            WireCodec.encode(WireMessage(jobID: jobID, step: step, rank: rank, body: body, tensors: tensors)))
    }

    /// A message from follower coordinator shard `shard` (its Stop is ignored: the leader's ends the job).
    private func handleShardFrames(_ frames: [Payload], shard: Int) throws {
        let message: WireMessage
        do {
            message = try WireCodec.decode(frames, expectedJobID: jobID, sharedMemory: shardSharing[shard - 1] ? sharedSegment : nil)
        } catch {
            log.warning("dropped a malformed message from coordinator shard \(shard): \(error)")
            return
        }
        switch message.body {
        case .welcome(let welcome):
            shardWelcomed[shard - 1] = true
            shardSharing[shard - 1] = welcome.sharedMemory && sharedSegment != nil
            log.info("joined coordinator shard", metadata: ["shard": "\(shard)", "tensors_via": "\(shardSharing[shard - 1] ? "shared memory" : "frames")"])
            try announceReadyOnceJoined()
        case .error(let error) where error.code == .notReady || error.code == .notJoined:
            shardWelcomed[shard - 1] = false
            shardJoinRetry[shard - 1] = Coordinator.now() + 0.1
        case .error(let error) where error.code == .pushRefused:
            log.warning("coordinator shard \(shard) refused this worker's push: \(error.reason)", metadata: ["step": "\(message.step)"])
        case .error(let error):
            throw WorkerError.refused("coordinator shard \(shard): \(error.reason)")
        case .parameterUpdate(let update):
            try receiveUpdatePart(update, step: message.step, tensors: message.tensors, from: shard)
        case .stop, .heartbeat:
            break  // the leader's Stop ends the job
        case .join, .gradientPush, .leave, .statusRequest, .statusReply, .shard, .heldOutScores:
            log.warning("unexpected \(message.body.kind) from coordinator shard \(shard)")
        }
    }

    /// Joins the follower shards that have not welcomed this worker yet and asked it to retry.
    private func retryShardJoins() throws {
        let now = Coordinator.now()
        for j in shardSockets.indices where !shardWelcomed[j] && shardJoinRetry[j] > 0 && now >= shardJoinRetry[j] {
            shardJoinRetry[j] = 0
            try sendJoin(rank: rank, to: j + 1)
        }
    }

    /// Connects to the follower shards a welcome names (once per endpoint list) and joins each.
    private func joinShards(_ endpoints: [String]) throws {
        if endpoints != shardEndpoints {
            for s in shardSockets { s.close() }
            shardSockets = try endpoints.map { endpoint in
                let s = try ZMQSocket(context: context, kind: .dealer)
                try keys?.secureClient(s)
                try s.setSendTimeout(milliseconds: 5000)
                try s.setHighWaterMarks(send: 0, receive: 0)
                try s.setKernelBuffers(bytes: 4 << 20)
                try s.connect(endpoint)
                return s
            }
            shardEndpoints = endpoints
            shardSharing = Array(repeating: false, count: endpoints.count)
        }
        shardWelcomed = Array(repeating: false, count: endpoints.count)
        shardJoinRetry = Array(repeating: 0, count: endpoints.count)
        for j in endpoints.indices { try sendJoin(rank: rank, to: j + 1) }
    }

    /// Sends a Join for `rank` to the leader (0) or a follower shard; a program's Join to the leader
    /// carries its model's tensors (the first admitted worker's values start the job).
    private func sendJoin(rank: Int32, to shard: Int = 0) throws {
        let tensors = shard == 0 && task?.programModel != nil
            ? task!.wireTensors.map { WireTensor(name: $0.name, shape: $0.tensor.shape, payload: Payload(floats: $0.tensor.scalars)) } : []
        try send(.join(joinRequest(rank: rank)), tensors: tensors, to: shard)
    }

    private func joinRequest(rank: Int32) -> Join {
        var join = Join(workerID: workerID, host: ProcessInfo.processInfo.hostName, pid: UInt32(getpid()),
                        modelFingerprint: task?.modelFingerprint ?? "", requestedRank: rank)
        join.sharedMemory = sharedMemoryOffer()
        if let program = task?.programModel {
            join.sampleCount = UInt64(program.sampleCount)
            join.modelJSON = program.json()
        }
        if rank == self.rank { join.rankToken = rankToken }
        return join
    }

    /// A segment with room for this worker's pushes and, above them, the coordinator's f32 updates,
    /// offered when the job allows it; the coordinator uses it if it runs on this host. Without a
    /// model yet, or when no segment can be made, nothing is offered.
    private func sharedMemoryOffer() -> SharedMemoryOffer? {
        guard let spec, spec.sharedMemory, let task else { return nil }
        let counts = task.wireTensors.map(\.tensor.count)
        let pushes = SharedLayout(start: SharedSegment.headerBytes, byteCounts: counts.map { $0 * 4 })
        let updates = SharedLayout(start: pushes.end, byteCounts: counts.map { $0 * 4 })
        if sharedSegment?.byteCount != updates.end {
            do {
                sharedSegment = try SharedSegment(creating: updates.end)
            } catch {
                log.info("tensors travel in frames: \(error)")
                sharedSegment = nil
                return nil
            }
        }
        pushLayout = pushes
        updateLayout = updates
        return sharedSegment.map { SharedMemoryOffer(path: $0.path, nonce: $0.nonce, byteCount: $0.byteCount, updateOffset: pushes.end) }
    }

    /// Joins; false when a leave was asked for before a Welcome came (nothing to tell the coordinator).
    private func join() throws -> Bool {
        try sendJoin(rank: requestedRank)
        log.info("joining", metadata: ["coordinator": "\(endpoint)"])
        let deadline = Coordinator.now() + joinTimeout
        while Coordinator.now() < deadline {
            if let reason = leaveReason {
                log.info("gave up joining: \(reason)")
                return false
            }
            while let event = try monitor.next() {
                if case .authenticationFailed = event { throw WorkerError.refused("the coordinator did not accept this worker's CURVE key") }
            }
            guard let frames = try socket.receive(timeoutMilliseconds: 200) else { continue }
            let message = try WireCodec.decode(frames, sharedMemory: sharedSegment)  // a Welcome may name its tensors in it
            switch message.body {
            case .welcome(let welcome):
                try accept(welcome, message: message)
                return true
            case .error(let error) where error.code == .notReady || error.code == .notJoined:
                log.info("the coordinator asks to retry: \(error.reason)")
                usleep(250_000)
                try sendJoin(rank: requestedRank)
            case .error(let error):
                throw WorkerError.refused(error.reason)
            case .heartbeat, .parameterUpdate, .stop:
                continue  // before its Welcome a worker takes no part
            case .join, .gradientPush, .leave, .statusRequest, .statusReply, .shard, .heldOutScores:
                log.warning("unexpected \(message.body.kind) from the coordinator while joining")
            }
        }
        throw WorkerError.joinTimedOut(endpoint: endpoint, seconds: joinTimeout)
    }

    private func accept(_ welcome: Welcome, message: WireMessage) throws {
        let spec = try JobSpec.fromJSON(welcome.jobSpecJSON)
        if ownsProcess && self.spec == nil { TrainingSetup.useBLASThreads(of: spec) }
        if task == nil { task = try BuiltInTasks.make(spec) }
        self.spec = spec
        sampler = try EpochSampler(sampleCount: task!.trainingSampleCount, globalBatchSize: spec.batchSize, seed: spec.seed)
        permutation = nil
        jobID = message.jobID
        rank = welcome.rank
        rankToken = welcome.rankToken
        heartbeatInterval = Double(welcome.heartbeatIntervalMilliseconds) / 1000
        heartbeatTimeout = Double(welcome.heartbeatTimeoutMilliseconds) / 1000
        coordinatorTimeout = max(30, 6 * Double(welcome.heartbeatTimeoutMilliseconds) / 1000)
        parameters = task!.wireTensors
        let buffers = task!.bufferNames
        isBuffer = parameters.map { buffers.contains($0.name) }
        indexOfParameter = Dictionary(uniqueKeysWithValues: parameters.enumerated().map { (ObjectIdentifier($1.tensor), $0) })
        indexOfName = Dictionary(uniqueKeysWithValues: parameters.enumerated().map { ($1.name, $0) })
        wireType = DType(rawValue: spec.wireDtype) ?? .f32
        sharing = welcome.sharedMemory && sharedSegment != nil && pushLayout?.offsets.count == parameters.count
        if welcome.sharedMemory && !sharing { throw WorkerError.modelMismatch("the coordinator took a shared-memory segment this worker did not offer") }
        // A coordinator on another host (without shards that might share it) does not need the segment: its
        // memory is released (tensors already placed in it keep their regions alive).
        if !welcome.sharedMemory && welcome.shardEndpoints.isEmpty { sharedSegment = nil }
        // Through shared memory the coordinator wrote the parameters into this worker's segment before its
        // Welcome, and may since have written the next update there: the tensors take what is there and
        // nothing is copied over it. In frames the Welcome's values are copied in.
        placeTensorsInSharedMemory()
        plan = ShardPlan(elementCounts: parameters.map(\.tensor.count), shards: welcome.shardEndpoints.count + 1)
        var received = [Set<Int>](repeating: [], count: parameters.count)
        try load(message.tensors, from: nil, into: &received)
        guard wholly(received) == parameters.count else {
            throw WorkerError.modelMismatch("the welcome holds \(wholly(received)) of the model's \(parameters.count) parameters")
        }
        updateInProgress = nil
        dueStep = nil
        localRounds?.settle()  // the Welcome's values are the coordinator's
        gradientPayloads = parameters.indices.map { index in
            plan.owners(of: index).map { Payload(byteCount: plan.range(of: index, in: $0).count * wireType.size) }
        }
        try joinShards(welcome.shardEndpoints)
        log.info("welcomed", metadata: ["rank": "\(rank)", "job": "\(jobID)", "step": "\(welcome.startStep)",
                                        "tensors_via": "\(sharing ? "shared memory" : "frames")"])
        announcedReady = false
        try announceReadyOnceJoined()
    }

    /// Tells the leader (a Heartbeat with state "ready") that this worker holds its Welcome's values and
    /// every coordinator shard has welcomed it: a job starts training once its workers are ready.
    private func announceReadyOnceJoined() throws {
        guard !announcedReady, spec != nil, !shardWelcomed.contains(false) else { return }
        announcedReady = true
        try send(.heartbeat(Heartbeat(sentUnixMilliseconds: Coordinator.unixMilliseconds(), state: Heartbeat.ready)))
    }

    /// Through shared memory the parameters live where the coordinator writes them (as f32, whatever the
    /// wire type) and gradients are computed, as f32, where it reads them (it rounds them to the wire type):
    /// nothing is copied or converted on this side.
    private func placeTensorsInSharedMemory() {
        for (index, p) in parameters.enumerated() {
            guard sharing, let segment = sharedSegment, let pushLayout, let updateLayout,
                  let values = segment.region(offset: updateLayout.offsets[index], count: p.tensor.count * 4),
                  let gradient = segment.region(offset: pushLayout.offsets[index], count: p.tensor.count * 4)
            else {
                p.tensor.gradientDestination = nil
                continue
            }
            values.withUnsafeMutableBytes { p.tensor.relocate(to: $0, owner: values, keepingValues: false) }
            p.tensor.gradientDestination = gradient.withUnsafeMutableBytes { Tensor(shape: p.tensor.shape, external: $0, owner: gradient) }
        }
    }

    /// Applies one part of a parameter update from `source` (0: the leader, j: follower shard j); parts
    /// of each source arrive in order, each parameter once. When every source has sent its last part
    /// (which together must set every parameter), computes the step.
    private func receiveUpdatePart(_ update: ParameterUpdate, step: UInt64, tensors: [WireTensor], from source: Int) throws {
        let sources = shardSockets.count + 1
        if update.part == 0 && updateInProgress?.step != step {
            updateInProgress = UpdateProgress(step: step, nextPart: Array(repeating: 0, count: sources), done: Array(repeating: false, count: sources),
                                              received: Array(repeating: [], count: parameters.count), kept: Array(repeating: false, count: sources))
        }
        guard var progress = updateInProgress, progress.step == step, progress.nextPart[source] == update.part, !progress.done[source] else {
            let due = updateInProgress.map { "part \($0.nextPart[source]) of step \($0.step)" } ?? "a first part"
            let from = source == 0 ? "" : " from coordinator shard \(source)"
            throw WorkerError.modelMismatch("part \(update.part) of the update for step \(step)\(from) arrived where \(due) was due")
        }
        if update.keepsParameters {
            guard tensors.isEmpty && update.part == 0 && !update.moreParts else {
                throw WorkerError.modelMismatch("an update for step \(step) that keeps the parameters came with \(tensors.count) tensors, as part \(update.part)")
            }
            progress.kept[source] = true
        }
        try load(tensors, adding: !update.fullCopy, from: source, into: &progress.received)
        progress.nextPart[source] += 1
        progress.done[source] = !update.moreParts
        if source == 0 && !update.moreParts { progress.header = update }
        updateInProgress = progress
        guard !progress.done.contains(false), let header = progress.header else { return }
        updateInProgress = nil
        // Every source kept the parameters (the first step: the Welcome's values), or together they set all.
        guard !progress.kept.contains(false) || wholly(progress.received) == parameters.count else {
            throw WorkerError.modelMismatch("the update for step \(step) set \(wholly(progress.received)) of \(parameters.count) parameters")
        }
        localRounds?.settle()
        try evaluateIfAsked(header, step: step)
        makeDue(step: Int(step), assignment: header)
    }

    /// Scores the held-out batches `update` names on its parameters (before they change) and sends the
    /// scores to the leader, ahead of this step's push (see EVALUATION in the proto).
    private func evaluateIfAsked(_ update: ParameterUpdate, step: UInt64) throws {
        guard !update.evaluate.isEmpty else { return }
        guard let task = task as? any BuiltInTask else {
            throw WorkerError.modelMismatch("asked to score held-out batches, but this worker's model is a program's")
        }
        var batches: [Int] = []
        for range in update.evaluate {
            guard range.start + range.count <= UInt64(task.heldOutBatches) else {
                throw WorkerError.modelMismatch("asked to score held-out batches \(range.start)..<\(range.start + range.count) of \(task.heldOutBatches)")
            }
            batches += Int(range.start)..<Int(range.start + range.count)
        }
        let scores = batches.flatMap { task.scoreHeldOut($0..<$0 + 1) }
        log.info("scored held-out batches", metadata: ["step": "\(step)", "batches": "\(batches.count) of \(task.heldOutBatches)"])
        try send(.heldOutScores(HeldOutScores(batches: update.evaluate, lossSums: scores.map(\.lossSum), correct: scores.map { UInt64($0.correct) })), step: step)
    }

    /// Makes `step` the one to compute next, in place of any older one not begun.
    private func makeDue(step: Int, assignment: ParameterUpdate) {
        if let older = dueStep { log.debug("step \(older.step) skipped: the update for step \(step) came before it was begun") }
        dueStep = (step, assignment)
    }

    /// Replaces parameters of the replica with the coordinator's, or adds the changes it sent: whole
    /// tensors from a Welcome (`source` nil), or from coordinator shard `source` the slice of each it owns.
    /// Adds to `received` the shards whose part was set (a part already received is an error).
    private func load(_ tensors: [WireTensor], adding: Bool = false, from source: Int?, into received: inout [Set<Int>]) throws {
        for t in tensors {
            guard let index = indexOfName[t.name], parameters[index].tensor.shape == t.shape else {
                throw WorkerError.modelMismatch("got '\(t.name)' \(t.shape), which is not a parameter of this model")
            }
            let elements = t.elements, tensor = parameters[index].tensor
            let expected = source.map { plan.range(of: index, in: $0) } ?? 0..<tensor.count
            guard elements == expected else {
                let from = source.map { "from coordinator shard \($0)" } ?? "in the Welcome"
                throw WorkerError.modelMismatch("got elements \(elements) of '\(t.name)', where \(expected) were due \(from)")
            }
            let parts = source.map { [$0] } ?? plan.owners(of: index)
            guard received[index].isDisjoint(with: parts) else { throw WorkerError.modelMismatch("'\(t.name)' came twice in one update") }
            received[index].formUnion(parts)
            if !adding && t.dtype == .f32 && tensor.isStored(in: t.payload, at: elements) { continue }  // written in place
            // After a round of local steps the changes apply to where the round began, not where it ended.
            if adding { localRounds?.restoreStart(index, elements: elements, into: tensor) }
            tensor.withUnsafeMutableBufferPointer { dst in
                scratch.withUnsafeMutableBufferPointer { scratch in  // half-precision values convert a chunk at a time
                    for start in stride(from: 0, to: elements.count, by: scratch.count) {
                        let range = start..<min(start + scratch.count, elements.count)
                        TensorEncoding.withFloats(t.payload, dtype: t.dtype, range: range, scratch: scratch) { src in
                            let out = dst.baseAddress! + elements.lowerBound + start
                            if adding { for i in 0..<src.count { out[i] += src[i] } } else { out.update(from: src.baseAddress!, count: src.count) }
                        }
                    }
                }
            }
        }
    }

    /// How many parameters `received` (the shards that set their part of each) sets wholly.
    private func wholly(_ received: [Set<Int>]) -> Int { received.indices.filter { received[$0].count == plan.owners(of: $0).count }.count }

    /// Computes the gradient of this worker's shard of `step`'s batch and pushes it: in buckets of about
    /// `bucket_kb` sent from inside the backward pass as the tape completes them (last layers first), the
    /// rest in a final part; or whole.
    private func computeAndPush(step: Int, assignment: ParameterUpdate) throws {
        if assignment.innerSteps > 0 { return try computeRound(step: step, assignment: assignment) }
        let task = task!
        let start = Coordinator.now()
        let mine = try assignedSamples(assignment)
        task.zeroGrad()
        var header = GradientPush(sampleCount: UInt64(mine.count), localLoss: 0, attempt: assignment.attempt)
        var unsent = Set(parameters.indices)
        var nextPart = [UInt32](repeating: 0, count: plan.shards)
        func pushPart(_ indices: [Int], more: Bool) throws {
            try sendPushPart(header, indices, more: more, step: step, nextPart: &nextPart)
            unsent.subtract(indices)
        }
        if !mine.isEmpty {
            let (lossTensor, rightOnes) = try task.loss(mine)
            header.localLoss = lossTensor.item
            header.localCorrect = UInt32(rightOnes)
            let bucketBytes = spec!.bucketKB * 1024
            var bucket: [Int] = [], bucketSize = 0, sendError: (any Error)?
            try lossTensor.backward(onLeafReady: bucketBytes == 0 ? nil : { [self] leaf in
                guard sendError == nil, let index = indexOfParameter[ObjectIdentifier(leaf)] else { return }
                bucket.append(index)
                bucketSize += leaf.count * wireType.size
                guard bucketSize >= bucketBytes, unsent.count > bucket.count else { return }
                do { try pushPart(bucket, more: true) } catch { sendError = error }
                bucket = []
                bucketSize = 0
            })
            if let sendError { throw sendError }
        }
        header.computeSeconds = Coordinator.now() - start
        try pushPart(unsent.sorted(), more: false)
    }

    /// Takes a round of local SGD's inner steps from this update's parameters (again from the same start
    /// when the round is resent) and pushes the parameter change, whole.
    private func computeRound(step: Int, assignment: ParameterUpdate) throws {
        let start = Coordinator.now()
        guard assignment.samples.count == Int(assignment.innerSteps) else {
            throw WorkerError.modelMismatch("a round of \(assignment.innerSteps) inner steps came with \(assignment.samples.count) runs of samples")
        }
        let rounds = try localRounds ?? LocalRounds(spec: spec!, stepsPerEpoch: sampler!.stepsPerEpoch)
        localRounds = rounds
        try rounds.begin(step: step, tensors: parameters)
        let runs = try assignment.samples.map { try assignedSamples(assignment, ranges: [$0]) }
        let trained = zip(parameters, isBuffer).filter { !$1 }.map(\.0)
        let (loss, correct) = try rounds.run(runs, firstInnerStep: Int(assignment.firstInnerStep), task: task!, trained: trained)
        rounds.writeChange(parameters, isBuffer: isBuffer)
        var header = GradientPush(sampleCount: UInt64(runs.reduce(0) { $0 + $1.count }), localLoss: loss, attempt: assignment.attempt)
        header.localCorrect = UInt32(correct)
        header.computeSeconds = Coordinator.now() - start
        var parts = [UInt32](repeating: 0, count: plan.shards)
        try sendPushPart(header, Array(parameters.indices), more: false, step: step, nextPart: &parts)
    }

    /// Sends (a part of) a push: each coordinator shard the tensors of `indices` it owns, in its own
    /// numbered parts (`nextPart`); a last part (`more` false) goes to every shard, with tensors or without.
    private func sendPushPart(_ header: GradientPush, _ indices: [Int], more: Bool, step: Int, nextPart: inout [UInt32]) throws {
        var header = header
        header.moreParts = more
        for shard in 0..<plan.shards {
            let theirs = indices.filter { !plan.range(of: $0, in: shard).isEmpty }
            guard !theirs.isEmpty || !more else { continue }
            header.part = nextPart[shard]
            try send(.gradientPush(header), step: UInt64(step), tensors: theirs.map { gradientTensor($0, for: shard) }, to: shard)
            nextPart[shard] += 1
        }
    }

    /// The training samples an update assigns: its ranges of positions in its epoch's permutation. A range
    /// outside the training set is refused (a coordinator of another data set).
    private func assignedSamples(_ update: ParameterUpdate, ranges: [SampleRange]? = nil) throws -> [Int] {
        let sampler = sampler!
        let epoch = Int(clamping: update.epoch)
        if permutation?.epoch != epoch { permutation = (epoch, sampler.permutation(epoch: epoch)) }
        var samples: [Int] = []
        for range in ranges ?? update.samples {
            guard range.start <= UInt64(sampler.sampleCount), range.count <= UInt64(sampler.sampleCount) - range.start else {
                throw WorkerError.modelMismatch("samples \(range.start)..<\(range.start &+ range.count) lie outside the \(sampler.sampleCount) training samples")
            }
            samples += permutation!.order[Int(range.start)..<Int(range.start + range.count)]
        }
        return samples
    }

    /// The wire tensor of parameter `index`'s gradient, or of the slice coordinator shard `shard` owns:
    /// written into its region of the shared segment; or an f32 gradient goes out from its own storage
    /// (the next step's backward writes a new one), a half-precision one converted into a reused payload.
    private func gradientTensor(_ index: Int, for shard: Int) -> WireTensor {
        let p = parameters[index]
        let elements = plan.range(of: index, in: shard)
        let slice = plan.slice(of: index, in: shard)
        let shared = shard == 0 ? sharing : shardSharing[shard - 1]
        let pushed = isBuffer[index] ? p.tensor : p.tensor.grad  // a buffer's contribution is its value
        if shared, let region = sharedSegment?.region(offset: pushLayout!.offsets[index] + elements.lowerBound * 4, count: elements.count * 4) {
            if isBuffer[index] || p.tensor.grad == nil || p.tensor.grad !== p.tensor.gradientDestination { write(pushed, elements, as: .f32, into: region) }
            return WireTensor(name: p.name, shape: p.tensor.shape, dtype: .f32, payload: region, slice: slice)
        }
        if wireType == .f32, let grad = pushed {
            let payload = grad.withUnsafeBufferPointer {
                Payload(borrowing: UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer($0)[elements.lowerBound * 4..<elements.upperBound * 4]), owner: grad)
            }
            return WireTensor(name: p.name, shape: p.tensor.shape, dtype: wireType, payload: payload, slice: slice)
        }
        let part = plan.owners(of: index).firstIndex(of: shard)!
        if gradientPayloads[index][part].isInFlight { gradientPayloads[index][part] = Payload(byteCount: elements.count * wireType.size) }
        write(pushed, elements, as: wireType, into: gradientPayloads[index][part])
        return WireTensor(name: p.name, shape: p.tensor.shape, dtype: wireType, payload: gradientPayloads[index][part], slice: slice)
    }

    /// Encodes elements `elements` of a gradient (zeros for a parameter the loss does not reach) as `dtype`.
    private func write(_ gradient: Tensor?, _ elements: Range<Int>, as dtype: DType, into payload: Payload) {
        if let gradient {
            gradient.withUnsafeBufferPointer { TensorEncoding.write(UnsafeBufferPointer(rebasing: $0[elements]), as: dtype, into: payload) }
        } else {
            payload.withUnsafeMutableBytes { _ = $0.initializeMemory(as: UInt8.self, repeating: 0) }
        }
    }
}

/// Why a worker could not take part.
public enum WorkerError: Error, CustomStringConvertible, Equatable {
    case refused(String)
    case joinTimedOut(endpoint: String, seconds: Double)
    case coordinatorSilent(endpoint: String, seconds: Double)
    case modelMismatch(String)

    public var description: String {
        switch self {
        case .refused(let reason): "the coordinator refused this worker: \(reason)"
        case .joinTimedOut(let endpoint, let s): "no welcome from the coordinator at \(endpoint) within \(Int(s)) s"
        case .coordinatorSilent(let endpoint, let s): "the coordinator at \(endpoint) has been silent for \(Int(s)) s"
        case .modelMismatch(let why): "the coordinator's parameters do not fit this worker's model: \(why)"
        }
    }
}

extension Tensor {
    /// Whether this tensor's values `elements` are the bytes of `payload` (a parameter updated in place).
    func isStored(in payload: Payload, at elements: Range<Int>) -> Bool {
        payload.byteCount == elements.count * 4
            && withUnsafeBufferPointer { mine in payload.withUnsafeBytes { $0.baseAddress == UnsafeRawPointer(mine.baseAddress! + elements.lowerBound) } }
    }
}
