import Autodiff
import DDPData
import DDPWire
import Foundation
import Logging

/// The coordinator of a job: admits workers, runs synchronous steps (collect every live worker's
/// gradient, average them by sample count in rank order, apply the optimizer to the master
/// parameters, send the new parameters to every worker), evaluates after each epoch, answers control
/// requests, and ends the job with a model and a summary.
///
/// One thread, one `zmq_poll` loop; every wait has a deadline whose expiry names who was waited for.
///
/// With `coordinator_shards` K > 1 this is one of K processes: the leader (shard 0) does all of the
/// above for the parameters `ShardPlan` gives it and drives K-1 followers, which average and step the
/// rest (see COORDINATOR SHARDS in proto/ddp.proto).
public final class Coordinator {
    /// This process's part in the job.
    public enum Role: Equatable, Sendable {
        /// The coordinator, or with shards the leader.
        case leader
        /// Follower shard `index` (1..K-1) of the leader at `leader` (its worker endpoint), reached by
        /// workers at `advertise` (default: the bound endpoint, a wildcard address replaced by the host name).
        case follower(index: Int, leader: String, advertise: String? = nil)
    }

    /// A follower shard as the leader knows it.
    struct Follower {
        var identity: [UInt8]
        var endpoint: String
        var connection: Int32
        var lastSeen: Double
    }

    /// The phases of a job.
    enum Phase: String { case waiting, training, stopping, completed, stopped, failed }

    /// A worker as the coordinator knows it.
    struct Member {
        let rank: Int32
        var identity: [UInt8]
        var workerID: String
        var host: String
        var pid: UInt32
        var state: String  // joining, training, lost, left
        var lastSeen: Double
        var lastPushedStep: UInt64 = 0
        var lastStepSeconds: Double = 0
        var restarts: UInt32 = 0
        /// Why it was declared lost or left (empty while it takes part).
        var goneReason = ""
        /// The estimated norm of its last accepted gradient, and the steps at which it stood far above the
        /// others' (a broken or hostile worker shows here).
        var gradientNorm = 0.0
        var outlierSteps: UInt32 = 0
        /// The connection its messages arrive on (for disconnect events); -1 before the first.
        var connection: Int32 = -1
        /// The shared-memory segment it offered and this coordinator mapped (a worker on this host).
        var shared: SharedArea?
        var isLive: Bool { state == "training" }
    }

    /// A worker's shared-memory segment: its pushes are read from it, its updates written into it.
    struct SharedArea {
        let segment: SharedSegment
        /// Where each parameter's update goes (room for f32 values).
        let updates: SharedLayout

        /// The region for parameter `index`'s update of `byteCount` bytes.
        func update(_ index: Int, byteCount: Int) -> Payload { segment.region(offset: updates.offsets[index], count: byteCount)! }
    }

    /// A worker's contribution to the current step.
    struct Contribution {
        let rank: Int32
        let sampleCount: UInt64
        let loss: Float
        let correct: UInt32
        let gradients: [Payload?]  // in parameter order, the owned ones set; empty when the contribution was rejected
        var dtype: DType = .f32

        /// A push that was refused: it counts as answered, with no samples.
        static func rejected(rank: Int32) -> Contribution { Contribution(rank: rank, sampleCount: 0, loss: 0, correct: 0, gradients: []) }
    }

    /// A push of which some parts (buckets of tensors) have arrived.
    struct PartialPush {
        let sampleCount: UInt64
        var gradients: [Payload?]  // in parameter order
        var nextPart: UInt32 = 0
    }

    /// Which tensors were averaged early, for which live ranks and sample counts, and whether every
    /// averaged element was finite. The step reuses them when it completes with the same contributions.
    struct EarlyAverage {
        var ranks: [Int32] = []
        var sampleCounts: [UInt64] = []
        var averaged: [Bool] = []
        var finite = true
    }

    public internal(set) var spec: JobSpec
    public let role: Role
    let setup: TrainingSetup
    /// Which shard owns each parameter, and the ones this process averages and steps.
    let plan: ShardPlan
    let owned: [Int]
    let isOwned: [Bool]
    let parameters: [NamedParameter]
    let optimizer: any Optimizer
    let schedule: LearningRateSchedule
    let log: Logger
    let directory: JobDirectory?

    /// With several workers, several I/O threads (each connection is served by one), so that their
    /// gradients arrive and their updates leave in parallel.
    let context: ZMQContext
    let workerSocket: ZMQSocket
    let controlSocket: ZMQSocket
    let monitor: ZMQMonitor
    /// Admits peers (CURVE keys with `keys_dir`; anyone otherwise) while few enough wait to join.
    let authenticator: Authenticator
    let pendingConnections: PendingConnections
    /// The endpoints actually bound (ports filled in).
    public let workerEndpoint: String
    public let controlEndpoint: String

    var phase = Phase.waiting
    var message = ""
    var members: [Int32: Member] = [:]
    var rankOfIdentity: [[UInt8]: Int32] = [:]
    var step = 0
    var contributions: [Int32: Contribution] = [:]
    /// Pushes arriving in parts this step, by rank.
    var partialPushes: [Int32: PartialPush] = [:]
    /// Tensors averaged while the step's pushes still arrived, and over which contributions.
    var earlyAverage = EarlyAverage()
    /// The attempt of the current step, and whether it must be sent again (a worker was lost mid-step).
    var attempt: UInt32 = 0
    var redoStep = false
    /// The samples each worker was assigned in the current step's update (its shard of the global
    /// batch); a push must declare exactly these, and is weighted by them.
    var assignedSamples: [Int32: UInt64] = [:]
    /// Each rank's secret (Welcome.rank_token), kept in checkpoints; after a resume, until
    /// `ranksReservedUntil`, a rank whose holder has not rejoined goes only to a Join that proves it.
    var rankTokens: [Int32: [UInt8]] = [:]
    var ranksReservedUntil = 0.0
    var stepStarted = 0.0
    var recentStepSeconds: [Double] = []
    var recentLosses: [Float] = []
    var epochLoss = (sum: 0.0, correct: 0, samples: 0)
    var history: [EpochRecord] = []
    var rejected: UInt64 = 0
    /// Rejections are logged rate-limited: a flood of junk must not fill the disk.
    var rejectionLog = RejectionLog()
    var stopRequested = false
    var lostRanks: [Int32] = []
    let started = Coordinator.now()
    var trainingStarted = 0.0
    var firstJoin = 0.0
    var belowMinimumSince = 0.0
    var samplesTrained = 0
    var metrics = Metrics()
    var stepLog: [String] = []
    var lastMetricsWrite = 0.0
    var parameterPayloads: [Payload]
    /// How tensors travel, and with a half-precision type the parameters every worker holds (the sum of
    /// the rounded changes sent so far), from which the next change is measured.
    let wireType: DType
    let replica: [Tensor]?
    var deltaPayloads: [Payload] = []
    let gradients: [Tensor]
    /// Elements per chunk when averaging, stepping and encoding, so that what one chunk touches stays in
    /// cache between the passes over it.
    static let chunk = WeightedMean.chunk
    /// Room for a chunk of converted values per thread of `ParallelChunks`.
    let scratch = Tensor.zeros([Coordinator.chunk * ParallelChunks.threads])
    let indexOfParameter: [String: Int]
    /// Where the update being encoded goes: the frame payloads (for workers without shared memory), and
    /// the segments of the live workers with it.
    var updateTargets: (frames: Bool, shared: [SharedArea]) = (true, [])

    /// Leader: the followers by shard index, their identities, and their RECEIVED reports for the current
    /// step and attempt (rank -> why refused, "" when accepted).
    var followers: [Int: Follower] = [:]
    var followerOfIdentity: [[UInt8]: Int] = [:]
    var followerReports: [Int: [Int32: String]] = [:]
    /// Leader: worker messages (with their connection) that arrived while it waited for followers.
    var deferred: [(frames: [Payload], connection: Int32)] = []
    /// Follower: its socket to the leader, the workers the leader says take part (rank -> worker id), and
    /// when the leader was last heard.
    var leaderSocket: ZMQSocket?
    var roster: [Int32: String] = [:]
    var leaderLastHeard = 0.0
    /// Follower: when it last said HELLO to the leader.
    var lastHello = 0.0
    /// Follower: an APPLY waiting for recipients that have not joined this shard yet.
    var pendingApply: (message: ShardMessage, step: Int, deadline: Double)?
    /// Follower: a SNAPSHOT that arrived while an APPLY was pending, answered after it.
    var pendingSnapshot: (command: ShardMessage, message: WireMessage)?
    /// Leader: a follower was lost (the job has failed; nothing more is asked of them).
    var followersLost = false
    /// Leader: connections that dropped while it waited for followers, for the main loop to handle.
    var disconnectedWhileWaiting: [Int32] = []

    /// Builds the job's model and binds both endpoints (`tcp://HOST:0` takes any free port).
    /// With `resume`, the newest checkpoint in the job directory supplies parameters, optimizer state,
    /// step and history.
    public init(
        spec: JobSpec, workerEndpoint: String, controlEndpoint: String, directory: JobDirectory?, resume: Bool = false,
        allowPlainText: Bool = false, role: Role = .leader,
        logger: Logger
    ) throws {
        var spec = spec
        if spec.jobID.isEmpty { spec.jobID = JobSpec.newJobID() }
        self.spec = spec
        self.role = role
        context = ZMQContext(ioThreads: min(max(spec.workers, 1), max(2, ProcessInfo.processInfo.activeProcessorCount / 2)))
        setup = try TrainingSetup(spec: spec)
        parameters = setup.model.parameters
        let plan = ShardPlan(elementCounts: parameters.map(\.tensor.count), shards: spec.coordinatorShards)
        let shard = role.shardIndex
        guard shard < spec.coordinatorShards else {
            throw JobSpecError.invalid("shard \(shard) does not exist with coordinator_shards = \(spec.coordinatorShards) (followers are 1...\(spec.coordinatorShards - 1))")
        }
        self.plan = plan
        owned = plan.indices(of: shard)
        isOwned = plan.owner.map { $0 == shard }
        optimizer = try setup.makeOptimizer()
        schedule = setup.schedule
        log = logger
        self.directory = directory
        gradients = parameters.map { Tensor.zeros($0.tensor.shape) }
        for (p, g) in zip(parameters, gradients) { p.tensor.grad = g }
        parameterPayloads = parameters.map { Payload(byteCount: $0.tensor.count * 4) }
        let wireType = DType(rawValue: spec.wireDtype) ?? .f32
        self.wireType = wireType
        replica = wireType == .f32 ? nil : parameters.map { $0.tensor.detached() }
        deltaPayloads = wireType == .f32 ? [] : parameters.map { Payload(byteCount: $0.tensor.count * wireType.size) }
        indexOfParameter = Dictionary(uniqueKeysWithValues: parameters.enumerated().map { ($1.name, $0) })

        let keys = try spec.keys()
        if keys == nil && !allowPlainText {
            for endpoint in [workerEndpoint, controlEndpoint] where !isPrivateEndpoint(endpoint) {
                throw SecurityError.insecureEndpoint(endpoint)
            }
        }
        let context = self.context
        let pending = PendingConnections(limit: 2 * (spec.workers + spec.coordinatorShards) + 32)
        pendingConnections = pending
        authenticator = try Authenticator(context: context, authorized: keys?.authorized) { pending.admits }
        workerSocket = try ZMQSocket(context: context, kind: .router)
        if let keys { try keys.secureServer(workerSocket) } else { try workerSocket.setZAPDomain("swiftddp") }
        // What peers may legitimately send: a tensor frame of the largest parameter, or an envelope.
        try workerSocket.setMaximumMessageSize(bytes: Int64((parameters.map(\.tensor.count).max() ?? 0) * 4 + (1 << 20)))
        try workerSocket.setHandshakeInterval(milliseconds: 10_000)
        try workerSocket.setRouterMandatory(true)
        try workerSocket.setSendTimeout(milliseconds: 2000)
        try workerSocket.setHighWaterMarks(send: 0, receive: 0)
        try workerSocket.setKernelBuffers(bytes: 4 << 20)
        try workerSocket.setHeartbeat(intervalMilliseconds: spec.heartbeatIntervalMs, timeoutMilliseconds: spec.heartbeatTimeoutMs)
        controlSocket = try ZMQSocket(context: context, kind: .router)
        try keys?.secureServer(controlSocket)
        try controlSocket.setSendTimeout(milliseconds: 1000)
        try controlSocket.setMaximumMessageSize(bytes: Int64(Self.largestEcho + (1 << 20)))  // ddpctl doctor's echo
        try controlSocket.setHandshakeInterval(milliseconds: 10_000)
        monitor = try ZMQMonitor(context: context, monitoring: workerSocket)
        self.workerEndpoint = try workerSocket.bind(workerEndpoint)
        self.controlEndpoint = try controlSocket.bind(controlEndpoint)
        if case .follower(_, let leader, _) = role {
            let socket = try ZMQSocket(context: context, kind: .dealer)
            try keys?.secureClient(socket)
            try socket.setHighWaterMarks(send: 0, receive: 0)
            try socket.setSendTimeout(milliseconds: 2000)
            try socket.connect(leader)
            leaderSocket = socket
            log.info("follower shard listening", metadata: ["workers": "\(self.workerEndpoint)", "leader": "\(leader)",
                                                             "tensors": "\(owned.count) of \(parameters.count)"])
            return
        }
        try directory?.write(Endpoints(workers: self.workerEndpoint, control: self.controlEndpoint, pid: getpid()),
                             to: directory!.endpointsPath)
        if resume, let directory, let checkpoint = try Checkpoint.latest(in: directory) {
            try restore(checkpoint)
            for (r, p) in zip(replica ?? [], parameters) { r.assign(p.tensor) }
            log.info("resumed from checkpoint", metadata: ["path": "\(checkpoint.path)", "step": "\(checkpoint.step)"])
        }
        log.info("listening", metadata: ["workers": "\(self.workerEndpoint)", "control": "\(self.controlEndpoint)",
                                          "job": "\(spec.jobID)", "parameters": "\(setup.model.parameterCount)",
                                          "security": "\(keys == nil ? "none (plain text)" : "CURVE")"])
    }

    func restore(_ checkpoint: Checkpoint) throws {
        for p in parameters {
            guard let saved = checkpoint.parameters[p.name], saved.shape == p.tensor.shape else {
                throw SafeTensorsError.invalid(checkpoint.path, "parameter '\(p.name)' is missing or has another shape")
            }
            p.tensor.assign(saved)
        }
        try optimizer.restoreState(checkpoint.optimizerState)
        optimizer.stepCount = checkpoint.optimizerSteps
        step = checkpoint.step
        history = checkpoint.history()
        metrics.steps = step
        rankTokens = checkpoint.rankTokens
        ranksReservedUntil = Self.now() + 3 * Double(spec.heartbeatTimeoutMs) / 1000
    }

    /// The largest tensor a control client may have echoed (ddpctl doctor's bandwidth check).
    static let largestEcho = 64 << 20

    static func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    /// Runs the job to its end and returns the summary (also written to the job directory). A follower
    /// runs until the leader stops it, and returns a summary of its own part.
    public func run() throws -> JobSummary {
        if case .follower = role { return try runFollower() }
        let joinDeadline = started + spec.joinTimeoutSeconds
        while !isFinished {
            let waiting = deferred
            deferred = []
            for (frames, connection) in waiting { try handleWorkerFrames(frames, connection: connection) }
            let ready = try ZMQSocket.poll([workerSocket, controlSocket, monitor.socket, authenticator.socket], timeoutMilliseconds: 50)
            if ready.contains(0) { try drain(workerSocket) { try handleWorkerFrames($0, connection: workerSocket.lastConnection) } }
            if ready.contains(1) { try drain(controlSocket, handleControlFrames) }
            if ready.contains(2) || !disconnectedWhileWaiting.isEmpty { try handleConnectionEvents() }
            if ready.contains(3) { try authenticate() }
            let now = Self.now()
            rejectionLog.tick(now: now, to: log)
            switch phase {
            case .waiting where followers.count < spec.coordinatorShards - 1:
                if now > joinDeadline {
                    fail("only \(followers.count) of \(spec.coordinatorShards - 1) coordinator shards said hello within \(spec.joinTimeoutSeconds) s")
                }
            case .waiting:
                if liveCount + joiningCount >= spec.workers
                    || (liveCount + joiningCount >= spec.minWorkers && firstJoin > 0 && now - firstJoin > joinGrace) {
                    startTraining()
                } else if now > joinDeadline {
                    fail("only \(liveCount + joiningCount) of \(spec.workers) workers joined within \(spec.joinTimeoutSeconds) s")
                } else if stopRequested {
                    phase = .stopped
                    message = "stopped before training started"
                }
            case .training, .stopping:
                checkLiveness(now: now)
                if redoStep && (phase == .training || phase == .stopping) { resendStep() }
                if phase == .training || phase == .stopping { try completeStepIfReady() }
            default:
                break
            }
        }
        return try finish()
    }

    /// How long after the first join the job waits for the rest before starting with `min_workers`.
    var joinGrace: Double { min(spec.joinTimeoutSeconds, 2 * Double(spec.heartbeatTimeoutMs) / 1000) }

    var isFinished: Bool { [.completed, .stopped, .failed].contains(phase) }
    var liveCount: Int { members.values.filter(\.isLive).count }
    var joiningCount: Int { members.values.filter { $0.state == "joining" }.count }
    var stepsPerEpoch: Int { setup.sampler.stepsPerEpoch }

    func drain(_ socket: ZMQSocket, _ handle: ([Payload]) throws -> Void) throws {
        var budget = 256
        while budget > 0, let frames = try socket.receive(timeoutMilliseconds: 0) {
            try handle(frames)
            budget -= 1
        }
    }

    func fail(_ reason: String) {
        phase = .failed
        message = reason
        log.error("job failed: \(reason)")
    }

    // MARK: Worker messages

    func handleWorkerFrames(_ frames: [Payload], connection: Int32) throws {
        guard frames.count >= 2 else { reject("a message without an envelope", from: nil); return }
        let identity = frames[0].bytes
        if let index = followerOfIdentity[identity] {
            followers[index]?.lastSeen = Self.now()
            followers[index]?.connection = connection
        }
        let rank = rankOfIdentity[identity]
        if let rank {
            members[rank]?.lastSeen = Self.now()
            members[rank]?.connection = connection
        }
        metrics.bytesReceived += frames.reduce(0) { $0 + $1.byteCount }
        let message: WireMessage
        do {
            message = try WireCodec.decode(Array(frames.dropFirst()), expectedJobID: spec.jobID,
                                           sharedMemory: rank.flatMap { members[$0]?.shared?.segment })
        } catch {
            reject("\(error)", from: rank)
            // A peer that is no longer a member (a worker woken after it was declared lost, or whose pushes
            // outlived a coordinator restart) is told to join again; a stranger's junk gets the same answer.
            let member = isMember(rank) || followerOfIdentity[identity] != nil
            let code = member || [.versionMismatch, .wrongJob].contains(error.replyCode) ? error.replyCode : .notJoined
            try? reply(identity, .error(ErrorReply(code: code, reason: "\(error)" + (code == .notJoined ? notJoinedReason(rank) : ""))))
            return
        }
        switch message.body {
        case .join(let join): try handleJoin(join, identity: identity, connection: connection)
        case .gradientPush(let push):
            handlePush(push, message: message, rank: rank)
            if !isMember(rank) { try? reply(identity, .error(ErrorReply(code: .notJoined, reason: "push refused" + notJoinedReason(rank)))) }
        case .heartbeat:
            let answer: WireMessage.Body = isMember(rank) ? .heartbeat(Heartbeat(sentUnixMilliseconds: Self.unixMilliseconds(), state: phase.rawValue))
                : .error(ErrorReply(code: .notJoined, reason: "heartbeat" + notJoinedReason(rank)))
            try? reply(identity, answer)
        case .leave(let reason):
            if let rank { markGone(rank, state: "left", reason: "left the job: \(reason)") }
        case .shard(let shard):
            try handleFollowerMessage(shard, message: message, identity: identity, connection: connection)
        default:
            reject("unexpected \(message.body.kind) on the worker socket", from: rank)
        }
    }

    /// Whether `rank` is a worker that takes part (joining or training).
    func isMember(_ rank: Int32?) -> Bool {
        guard let rank, let member = members[rank] else { return false }
        return member.isLive || member.state == "joining"
    }

    /// Why a peer is not a member, for a NOT_JOINED reply.
    func notJoinedReason(_ rank: Int32?) -> String {
        guard let rank, let member = members[rank] else { return ": this peer has not joined; join first" }
        return ": rank \(rank) \(member.state == "left" ? "left" : "was declared lost") (\(member.goneReason)); join again"
    }

    /// Answers the pending authentication requests, each refusal counted and logged.
    func authenticate() throws {
        for (address, reason) in try authenticator.handle() {
            reject("refused a connection from \(address.isEmpty ? "an unknown address" : address): \(reason)", from: nil)
        }
    }

    func reject(_ reason: String, from rank: Int32?) {
        rejected += 1
        metrics.rejectedMessages = rejected
        rejectionLog.record(reason, metadata: rank.map { ["rank": "\($0)"] } ?? [:], now: Self.now(), to: log)
    }

    func reply(_ identity: [UInt8], _ body: WireMessage.Body, step: UInt64 = 0, rank: Int32 = -1, tensors: [WireTensor] = []) throws {
        metrics.bytesSent += tensors.reduce(0) { $0 + $1.payload.byteCount }
        try workerSocket.send([.bytes(identity)] + WireCodec.encode(
            WireMessage(jobID: spec.jobID, step: step, rank: rank, body: body, tensors: tensors)))
    }

    func handleJoin(_ join: Join, identity: [UInt8], connection: Int32) throws {
        guard followers.count == spec.coordinatorShards - 1 else {
            try? reply(identity, .error(ErrorReply(code: .notReady, reason: "the coordinator shards are still starting; retry")))
            return
        }
        let fingerprint = setup.modelFingerprint
        if !join.modelFingerprint.isEmpty && join.modelFingerprint != fingerprint {
            let reason = "model fingerprint \(join.modelFingerprint) of worker \(join.workerID) on \(join.host) differs from the job's \(fingerprint)"
            reject(reason, from: nil)
            try? reply(identity, .error(ErrorReply(code: .modelMismatch, reason: reason)))
            return
        }
        if let existing = rankOfIdentity[identity], members[existing]?.state != "lost" {
            log.info("duplicate join ignored", metadata: ["rank": "\(existing)"])
            return
        }
        guard !isFinished, phase != .stopping, let rank = freeRank(requested: join.requestedRank, token: join.rankToken) else {
            let ending = isFinished || phase == .stopping
            let reserved = Self.now() < ranksReservedUntil
            // A restarted worker asking for its old rank may arrive before its predecessor is declared
            // lost, and after a coordinator restart ranks are kept a while for their holders: it is told to
            // retry, not refused.
            let retry = !ending && (reserved || (join.requestedRank >= 0 && join.requestedRank < spec.workers))
            let reason = ending ? "the job is ending"
                : reserved ? "the free ranks are kept for their holders for \(Int(ranksReservedUntil - Self.now()) + 1) s after a coordinator restart; retry"
                : retry ? "rank \(join.requestedRank) is still held by a live worker; retry" : "all \(spec.workers) ranks are taken"
            reject("join of \(join.workerID) refused: \(reason)", from: nil)
            try? reply(identity, .error(ErrorReply(code: retry ? .notReady : .jobFull, reason: reason)))
            return
        }
        let restarts = members[rank].map { $0.restarts + 1 } ?? 0
        if join.rankToken.isEmpty || rankTokens[rank] != join.rankToken {
            rankTokens[rank] = (0..<16).map { _ in UInt8.random(in: 0...255) }
        }
        if let old = members[rank] { rankOfIdentity[old.identity] = nil }
        members[rank] = Member(rank: rank, identity: identity, workerID: join.workerID, host: join.host, pid: join.pid,
                               state: "joining", lastSeen: Self.now(), restarts: restarts, shared: join.sharedMemory.flatMap(mapSharedMemory))
        rankOfIdentity[identity] = rank
        members[rank]?.connection = connection
        pendingConnections.joined(connection)
        if firstJoin == 0 { firstJoin = Self.now() }
        sendRoster()
        // A worker joining a running sharded job gets the followers' current values too.
        if phase != .waiting && !followers.isEmpty && !refreshFromFollowers(withState: false) { return }
        log.info("worker joined", metadata: ["rank": "\(rank)", "host": "\(join.host)", "pid": "\(join.pid)",
                                              "restarts": "\(restarts)"])
        var welcome = Welcome(
            rank: rank, worldSize: UInt32(spec.workers), jobSpecJSON: spec.json(), startStep: UInt64(step),
            epoch: UInt64(step / stepsPerEpoch), heartbeatIntervalMilliseconds: UInt64(spec.heartbeatIntervalMs),
            heartbeatTimeoutMilliseconds: UInt64(spec.heartbeatTimeoutMs), sharedMemory: members[rank]?.shared != nil)
        welcome.shardEndpoints = followers.keys.sorted().map { followers[$0]!.endpoint }
        welcome.rankToken = rankTokens[rank] ?? []
        do {
            try reply(identity, .welcome(welcome), step: UInt64(step), rank: rank, tensors: parameterTensors())
        } catch {
            markGone(rank, state: "lost", reason: "could not be welcomed: \(error)")
        }
    }

    /// Maps the segment a joining worker offers, when the job allows it and the worker is on this host
    /// (it can be opened and holds the announced nonce) and it has room for f32 updates; else nil, and
    /// tensors travel in frames.
    func mapSharedMemory(_ offer: SharedMemoryOffer) -> SharedArea? {
        guard spec.sharedMemory else { return nil }
        let updates = SharedLayout(start: offer.updateOffset, byteCounts: parameters.map { $0.tensor.count * 4 })
        guard offer.updateOffset >= SharedSegment.headerBytes, updates.end <= offer.byteCount else {
            log.warning("shared memory offered by a worker not used: its update area (from \(offer.updateOffset), \(offer.byteCount) bytes) cannot hold the parameters")
            return nil
        }
        do {
            return SharedArea(segment: try SharedSegment(opening: offer.path, byteCount: offer.byteCount, nonce: offer.nonce), updates: updates)
        } catch {
            log.info("tensors travel in frames: \(error)")
            return nil
        }
    }

    /// The requested rank if it is free (or held by a lost or departed worker), else the lowest free one.
    /// Shortly after a resume, a rank nobody has rejoined yet is free only for the `token` it was given.
    func freeRank(requested: Int32, token: [UInt8]) -> Int32? {
        let reserving = Self.now() < ranksReservedUntil
        func free(_ r: Int32) -> Bool {
            guard let member = members[r] else { return !reserving || rankTokens[r] == nil || rankTokens[r] == token }
            return member.state == "lost" || member.state == "left"
        }
        if requested >= 0 && requested < spec.workers { return free(requested) ? requested : nil }
        return (0..<Int32(spec.workers)).first(where: free)
    }

    func handlePush(_ push: GradientPush, message: WireMessage, rank: Int32?) {
        guard let rank, let member = members[rank], member.isLive else {
            reject("gradient push from a worker that is not training", from: rank)
            return
        }
        guard message.rank == rank else { reject("push names rank \(message.rank) but comes from rank \(rank)", from: rank); return }
        guard message.step == UInt64(step) else {
            reject("push for step \(message.step) while at step \(step)", from: rank)
            return
        }
        if case .follower = role, push.attempt > attempt {  // the leader's ABORT is still on its way
            abortAttempt(push.attempt)
        }
        guard push.attempt == attempt else {
            reject("push for attempt \(push.attempt) of step \(step), now at attempt \(attempt)", from: rank)
            return
        }
        guard contributions[rank] == nil else { reject("duplicate push for step \(step)", from: rank); return }
        members[rank]?.lastPushedStep = message.step
        var partial = partialPushes[rank] ?? PartialPush(sampleCount: push.sampleCount, gradients: Array(repeating: nil, count: parameters.count))
        let assigned = role == .leader ? assignedSamples[rank] : nil
        let problem = assigned.map { $0 != push.sampleCount } == true
            ? "it declares \(push.sampleCount) samples, but \(assigned!) were assigned to rank \(rank) for step \(step)"
            : push.part != partial.nextPart ? "part \(push.part) of the push arrived where part \(partial.nextPart) was due"
            : push.sampleCount != partial.sampleCount ? "its parts disagree on the sample count (\(partial.sampleCount), then \(push.sampleCount))"
            : validate(message.tensors, alreadyReceived: partial.gradients, rank: rank)
        if let problem {
            refuse(rank, problem)
            return
        }
        let arrived = message.tensors.map { indexOfParameter[$0.name]! }
        for (index, tensor) in zip(arrived, message.tensors) { partial.gradients[index] = tensor.payload }
        if push.moreParts {
            partial.nextPart += 1
            partialPushes[rank] = partial
        } else {
            partialPushes[rank] = nil
            members[rank]?.lastStepSeconds = push.computeSeconds
            let missing = owned.filter { partial.gradients[$0] == nil }
            guard missing.isEmpty else {
                refuse(rank, "\(missing.count) of \(owned.count) tensors missing, '\(parameters[missing[0]].name)' first")
                return
            }
            contributions[rank] = Contribution(rank: rank, sampleCount: push.sampleCount, loss: push.localLoss, correct: push.localCorrect,
                                               gradients: partial.gradients, dtype: pushType(of: rank))
            reportToLeader(rank, refused: "")
        }
        averageEarly(arrived)
    }

    /// Refuses the rest of `rank`'s push for this step: it counts as answered, with no samples.
    /// The worker is told why (a `PUSH_REFUSED` error), and keeps its rank.
    func refuse(_ rank: Int32, _ problem: String) {
        reject("gradient of rank \(rank) at step \(step) skipped: \(problem)", from: rank)
        if let identity = members[rank]?.identity {
            try? reply(identity, .error(ErrorReply(code: .pushRefused, reason: "push for step \(step) refused: \(problem)")), step: UInt64(step), rank: rank)
        }
        partialPushes[rank] = nil
        contributions[rank] = .rejected(rank: rank)
        reportToLeader(rank, refused: problem)
    }

    /// Averages the tensors `indices` now if every live worker has sent them, so that the sum overlaps
    /// the rest of the pushes (and the workers' backward passes).
    func averageEarly(_ indices: [Int]) {
        let ranks = members.values.filter(\.isLive).map(\.rank).sorted()
        var counts: [UInt64] = []
        for rank in ranks {  // every live worker has begun its push, so every weight is known
            guard let count = contributions[rank]?.sampleCount ?? partialPushes[rank]?.sampleCount else { return }
            counts.append(count)
        }
        if earlyAverage.ranks != ranks || earlyAverage.sampleCounts != counts {
            earlyAverage = EarlyAverage(ranks: ranks, sampleCounts: counts, averaged: Array(repeating: false, count: parameters.count))
        }
        let samples = counts.reduce(0, +)
        guard samples > 0 else { return }
        scratch.withUnsafeMutableBufferPointer { scratch in
            nextTensor: for index in indices where !earlyAverage.averaged[index] {
                var terms: [WeightedMean.Term] = []
                for (rank, count) in zip(ranks, counts) where count > 0 {
                    let sent = contributions[rank].map { $0.gradients[index] } ?? partialPushes[rank]?.gradients[index]
                    guard let payload = sent ?? nil else {
                        continue nextTensor  // not every worker has sent this one yet
                    }
                    terms.append((Float(count) / Float(samples), payload, pushType(of: rank)))
                }
                let finite = gradients[index].withUnsafeMutableBufferPointer { WeightedMean.write(terms, wire: wireType, into: $0, scratch: scratch) }
                earlyAverage.averaged[index] = true
                earlyAverage.finite = earlyAverage.finite && finite
            }
        }
    }

    /// Why (a part of) a gradient cannot be used, or nil: known parameters not sent before, right shape,
    /// the job's wire type. (Completeness is checked on the last part; finite values on the average, and
    /// only a non-finite average is traced to its senders.)
    func validate(_ tensors: [WireTensor], alreadyReceived: [Payload?], rank: Int32) -> String? {
        for tensor in tensors {
            guard let index = indexOfParameter[tensor.name] else { return "unknown tensor '\(tensor.name)'" }
            guard isOwned[index] else { return "tensor '\(tensor.name)' belongs to coordinator shard \(plan.owner[index])" }
            guard alreadyReceived[index] == nil else { return "tensor '\(tensor.name)' sent twice" }
            let expected = parameters[index].tensor.shape
            guard tensor.shape == expected else { return "tensor '\(tensor.name)' has shape \(tensor.shape), expected \(expected)" }
            guard tensor.dtype == pushType(of: rank) else {
                return "tensor '\(tensor.name)' is \(tensor.dtype.rawValue), this worker's pushes are \(pushType(of: rank).rawValue)"
            }
        }
        return nil
    }

    /// A dropped connection of a worker declares it lost at once (a killed process closes its sockets).
    func handleConnectionEvents() throws {
        var dropped = disconnectedWhileWaiting
        disconnectedWhileWaiting = []
        while let event = try monitor.next() {
            log.debug("connection event \(event)")
            switch event {
            case .accepted(let connection): pendingConnections.accepted(connection)
            case .disconnected(let connection):
                pendingConnections.dropped(connection)
                dropped.append(connection)
            case .authenticationFailed, .other: break
            }
        }
        for connection in dropped {
            for (index, follower) in followers where follower.connection == connection {
                followersLost = true
                fail("coordinator shard \(index) (\(follower.endpoint)) lost its connection")
            }
            for member in members.values where member.connection == connection && (member.isLive || member.state == "joining") {
                markGone(member.rank, state: "lost", reason: "its connection dropped")
            }
        }
    }

    func markGone(_ rank: Int32, state: String, reason: String) {
        guard var member = members[rank], member.state != state else { return }
        // A live worker gone before the step completed: the step is sent again to the others, re-divided.
        if member.isLive && (phase == .training || phase == .stopping) { redoStep = true }
        member.state = state
        member.goneReason = reason
        members[rank] = member
        contributions[rank] = nil
        partialPushes[rank] = nil
        if state == "lost" { lostRanks.append(rank); metrics.workersLost += 1 }
        log.warning("worker \(state)", metadata: ["rank": "\(rank)", "host": "\(member.host)", "pid": "\(member.pid)", "reason": "\(reason)"])
        if role == .leader { sendRoster() }
    }

    // MARK: Control messages

    func handleControlFrames(_ frames: [Payload]) throws {
        guard frames.count >= 2 else { return }
        let identity = frames[0].bytes
        func answer(_ body: WireMessage.Body) {
            try? controlSocket.send([.bytes(identity)] + WireCodec.encode(WireMessage(jobID: spec.jobID, step: UInt64(step), body: body)))
        }
        let request: WireMessage
        do {
            request = try WireCodec.decode(Array(frames.dropFirst()), expectedJobID: spec.jobID)
        } catch {
            reject("control message: \(error)", from: nil)
            answer(.error(ErrorReply(code: error.replyCode, reason: "\(error)")))
            return
        }
        switch request.body {
        case .statusRequest:
            answer(.statusReply(status()))
        case .heartbeat(let beat):  // an echo, for round-trip and bandwidth checks (ddpctl doctor)
            let echoed = request.tensors.filter { $0.payload.byteCount <= Self.largestEcho }
            try? controlSocket.send([.bytes(identity)] + WireCodec.encode(WireMessage(
                jobID: spec.jobID, body: .heartbeat(Heartbeat(sentUnixMilliseconds: beat.sentUnixMilliseconds, state: phase.rawValue)),
                tensors: echoed)))
        case .stop(let reason, _):
            log.info("stop requested: \(reason)")
            stopRequested = true
            if phase == .training { phase = .stopping }
            answer(.statusReply(status()))
        default:
            answer(.error(ErrorReply(code: .malformed, reason: "unexpected \(request.body.kind) on the control socket")))
        }
    }

    /// The job's state as a status reply.
    func status() -> StatusReply {
        let now = Self.now()
        let computeTimes = members.values.filter(\.isLive).map(\.lastStepSeconds).sorted()
        let median = computeTimes.isEmpty ? 0 : computeTimes[computeTimes.count / 2]
        let workers = members.values.sorted { $0.rank < $1.rank }.map { m in
            // Lagging: clearly slower than the typical live worker in its last step.
            WorkerStatus(rank: m.rank, host: m.host, pid: m.pid, state: m.state, step: m.lastPushedStep,
                         lastSeenMillisecondsAgo: UInt64(max(0, now - m.lastSeen) * 1000), lastStepSeconds: m.lastStepSeconds,
                         lagging: m.isLive && m.lastStepSeconds > 2 * median && m.lastStepSeconds - median > 0.005, restarts: m.restarts,
                         gradientNorm: m.gradientNorm, outlierSteps: m.outlierSteps)
        }
        let last = history.last
        let elapsed = trainingStarted > 0 ? now - trainingStarted : 0
        var reply = StatusReply(
            jobState: phase.rawValue, step: UInt64(step), totalSteps: UInt64(setup.totalSteps),
            epoch: UInt64(step / stepsPerEpoch), totalEpochs: UInt64(spec.epochs), elapsedSeconds: now - started,
            trainLoss: recentLosses.last ?? 0, testLoss: last?.testLoss ?? 0, testAccuracy: last?.testAccuracy ?? 0,
            samplesPerSecond: elapsed > 0 ? Double(samplesTrained) / elapsed : 0, workers: workers,
            rejectedMessages: rejected, recentLosses: Array(recentLosses.suffix(64)), message: message)
        reply.coordinatorShards = followers.keys.sorted().map { followers[$0]!.endpoint }
        return reply
    }

    // MARK: Steps

    func startTraining() {
        phase = .training
        trainingStarted = Self.now()
        log.info("training started", metadata: ["workers": "\(liveCount + joiningCount)", "steps": "\(setup.totalSteps)",
                                                 "steps_per_epoch": "\(stepsPerEpoch)"])
        var apply = ShardMessage(.apply)  // the followers send their tensors' current values
        apply.ranks = updateRecipients
        sendToFollowers(apply)
        broadcastUpdate(trainLoss: 0) { send in stepAndEncode(applyOptimizer: false, emit: send) }
    }

    /// The step deadline: at least the configured timeout, and ten times the median step.
    var stepTimeout: Double {
        max(spec.stepTimeoutSeconds, recentStepSeconds.isEmpty ? 0 : 10 * Measure.median(recentStepSeconds))
    }

    func checkLiveness(now: Double) {
        let heartbeatTimeout = Double(spec.heartbeatTimeoutMs) / 1000
        for (index, follower) in followers where now - follower.lastSeen > 2 * heartbeatTimeout {
            followersLost = true
            fail("coordinator shard \(index) (\(follower.endpoint)) has been silent for \(Int(now - follower.lastSeen)) s")
            return
        }
        for member in members.values where member.isLive && (contributions[member.rank] == nil || !everyFollowerAnswered(member.rank)) {
            let silent = now - member.lastSeen
            if now - stepStarted > stepTimeout {
                markGone(member.rank, state: "lost", reason: "no gradient for step \(step) within \(String(format: "%.1f", stepTimeout)) s")
            } else if silent > max(heartbeatTimeout, stepTimeout) {
                markGone(member.rank, state: "lost", reason: "silent for \(String(format: "%.1f", silent)) s")
            }
        }
        for member in members.values where member.state == "joining" && now - member.lastSeen > heartbeatTimeout * 2 {
            markGone(member.rank, state: "lost", reason: "silent since joining")
        }
        // Below min_workers the job waits a grace period for restarted workers to rejoin, then fails.
        if liveCount + joiningCount < spec.minWorkers && phase != .failed {
            if belowMinimumSince == 0 {
                belowMinimumSince = now
                log.warning("\(liveCount) live workers, below min_workers \(spec.minWorkers); waiting \(Int(joinGrace)) s for workers to rejoin")
            } else if now - belowMinimumSince > joinGrace {
                let lost = members.values.filter { $0.state == "lost" }.map { "rank \($0.rank) (\($0.host), pid \($0.pid))" }
                fail("\(liveCount) live workers, below min_workers \(spec.minWorkers) for \(Int(joinGrace)) s; lost: \(lost.joined(separator: ", "))")
            }
        } else {
            belowMinimumSince = 0
        }
        // With no live worker left, workers that (re)joined take up the interrupted step at once.
        if liveCount == 0 && joiningCount >= spec.minWorkers { redoStep = true }
    }

    func completeStepIfReady() throws {
        let live = members.values.filter(\.isLive)
        guard !live.isEmpty, live.allSatisfy({ contributions[$0.rank] != nil && everyFollowerAnswered($0.rank) }) else { return }
        for member in live {  // a push a follower refused is refused as a whole, as one coordinator would
            guard let (index, why) = followerReports.sorted(by: { $0.key < $1.key }).lazy
                .compactMap({ index, reports in reports[member.rank].flatMap { $0.isEmpty ? nil : (index, $0) } }).first else { continue }
            reject("gradient of rank \(member.rank) at step \(step) skipped by coordinator shard \(index): \(why)", from: member.rank)
            contributions[member.rank] = .rejected(rank: member.rank)
        }
        var used = contributions.filter { members[$0.key]?.isLive == true }.sorted { $0.key < $1.key }.map(\.value)
        var samples = used.reduce(0) { $0 + Int($1.sampleCount) }
        var loss: Float = 0, correct = 0
        let early = earlyAverage
        earlyAverage = EarlyAverage()
        let averagedEarly = early.ranks == used.map(\.rank) && early.sampleCounts == used.map(\.sampleCount)
            && early.averaged.count == parameters.count && owned.allSatisfy { early.averaged[$0] }
        if samples > 0 {
            // Every shard averages its tensors; contributions with a value that is not finite anywhere are
            // dropped everywhere and the rest averaged again, as one coordinator does.
            sendToFollowers(averageCommand(used))
            let finite = averagedEarly ? early.finite : average(used, samples: samples)
            guard let answers = awaitFollowers(.averaged) else { return }
            if !finite || answers.values.contains(where: { !$0.message.finite }) {
                let kept = withoutNonFinite(used)  // names each contribution skipped for this shard's tensors
                var skipped = Set(used.map(\.rank)).subtracting(kept.map(\.rank))
                for (index, answer) in answers.sorted(by: { $0.key < $1.key }) {
                    for rank in answer.message.ranks where skipped.insert(rank).inserted {
                        reject("gradient of rank \(rank) at step \(step) skipped: a tensor of coordinator shard \(index) is NaN or infinite", from: rank)
                    }
                }
                used = kept.filter { !skipped.contains($0.rank) }
                samples = used.reduce(0) { $0 + Int($1.sampleCount) }
                if samples > 0 {
                    sendToFollowers(averageCommand(used))
                    _ = average(used, samples: samples)
                    guard awaitFollowers(.averaged) != nil else { return }
                }
            }
        }
        if samples > 0 {
            recordGradientNorms(used)
            if spec.clipNorm > 0 { clipGradientNorm(parameters, maxNorm: spec.clipNorm) }
            optimizer.learningRate = schedule.rate(base: spec.learningRate, at: step)
            for c in used { loss += c.loss * Float(c.sampleCount) / Float(samples); correct += Int(c.correct) }
        } else {
            log.warning("step \(step) had no usable gradient; parameters unchanged")
        }
        let seconds = Self.now() - stepStarted
        recentStepSeconds.append(seconds)
        if recentStepSeconds.count > 50 { recentStepSeconds.removeFirst() }
        recentLosses.append(loss)
        if recentLosses.count > 256 { recentLosses.removeFirst() }
        epochLoss.sum += Double(loss) * Double(samples)
        epochLoss.correct += correct
        epochLoss.samples += samples
        samplesTrained += samples
        let workerSeconds = used.isEmpty ? "" : members.values.filter(\.isLive).sorted { $0.rank < $1.rank }
            .map { "\"\($0.rank)\":\($0.lastStepSeconds)" }.joined(separator: ",")
        stepLog.append("{\"step\":\(step),\"seconds\":\(seconds),\"loss\":\(loss),\"workers\":{\(workerSeconds)}}")
        metrics.steps = step + 1
        metrics.samples += samples
        metrics.trainLoss = loss
        metrics.workersAlive = liveCount
        metrics.observeStep(seconds: seconds)
        contributions.removeAll(keepingCapacity: true)
        partialPushes.removeAll(keepingCapacity: true)
        followerReports.removeAll(keepingCapacity: true)
        step += 1
        var apply = ShardMessage(.apply)
        apply.learningRate = optimizer.learningRate
        apply.applyOptimizer = samples > 0
        apply.ranks = step < setup.totalSteps && !stopRequested ? updateRecipients : []
        sendToFollowers(apply)
        // The update leaves bucket by bucket as it is computed; evaluation and checkpoints come after it.
        if step < setup.totalSteps && !stopRequested {
            broadcastUpdate(trainLoss: loss) { send in stepAndEncode(applyOptimizer: samples > 0, emit: send) }
        } else {
            stepAndEncode(applyOptimizer: samples > 0) { _, _ in }
        }
        if step % stepsPerEpoch == 0 { endEpoch() }
        let checkpointDue = spec.checkpointEvery > 0 ? step % spec.checkpointEvery == 0 : step % stepsPerEpoch == 0
        if checkpointDue && step < setup.totalSteps && !stopRequested { writeCheckpoint() }
        if Self.now() - lastMetricsWrite > 1 { writeMetrics() }
        if step >= setup.totalSteps {
            phase = .completed
            message = "trained \(spec.epochs) epochs"
        } else if stopRequested {
            phase = .stopped
            message = "stopped by request after step \(step)"
        }
    }

    /// Estimates each used contribution's gradient norm over this shard's tensors and counts a step at
    /// which one stands over 10x the median of the others' as an outlier of that worker (logged, in status).
    func recordGradientNorms(_ used: [Contribution]) {
        let norms = used.map { c in
            c.gradients.isEmpty ? 0 : owned.reduce(0.0) { $0 + TensorEncoding.sampledSumOfSquares(c.gradients[$1]!, dtype: c.dtype) }.squareRoot()
        }
        for (c, norm) in zip(used, norms) where !c.gradients.isEmpty {
            members[c.rank]?.gradientNorm = norm
            let others = zip(used, norms).filter { $0.0.rank != c.rank && !$0.0.gradients.isEmpty }.map(\.1).sorted()
            guard !others.isEmpty else { continue }
            let median = others[others.count / 2]
            if norm > 10 * median && norm - median > 1e-12 {
                members[c.rank]?.outlierSteps += 1
                if members[c.rank]!.outlierSteps <= 3 || members[c.rank]!.outlierSteps.isMultiple(of: 100) {
                    log.warning("gradient of rank \(c.rank) at step \(step) is an outlier", metadata: [
                        "norm": "\(norm)", "median_of_others": "\(median)", "outlier_steps": "\(members[c.rank]!.outlierSteps)"])
                }
            }
        }
    }

    /// The contributions without those holding NaN or infinity, each one skipped named in the log.
    func withoutNonFinite(_ used: [Contribution]) -> [Contribution] {
        used.filter { c in
            for index in owned where !c.gradients.isEmpty {
                if let bad = TensorEncoding.firstNonFinite(c.gradients[index]!, dtype: c.dtype, roundedTo: wireType) {
                    reject("gradient of rank \(c.rank) at step \(step) skipped: tensor '\(parameters[index].name)' element \(bad) is NaN or infinite",
                           from: c.rank)
                    return false
                }
            }
            return true
        }
    }

    /// Writes the sample-weighted mean of the contributions into the parameters' gradients, summing in
    /// rank order (so that the result does not depend on arrival order), chunk by chunk; returns whether
    /// every element of the mean is finite.
    func average(_ used: [Contribution], samples: Int) -> Bool {
        let weighted = used.filter { $0.sampleCount > 0 }
        return scratch.withUnsafeMutableBufferPointer { scratch in
            owned.reduce(true) { finite, index in
                let terms = weighted.map { (weight: Float($0.sampleCount) / Float(samples), payload: $0.gradients[index]!, dtype: $0.dtype) }
                return gradients[index].withUnsafeMutableBufferPointer { mean in
                    WeightedMean.writeInParallel(terms, wire: wireType, into: mean, scratch: scratch)
                } && finite
            }
        }
    }

    /// Applies the optimizer (when asked) and encodes the update for the workers, chunk by chunk so that
    /// each chunk is stepped and encoded while it is in cache: the f32 parameters, or with a half-precision
    /// wire the change from the replica rounded to the wire type (the replica moving by exactly that
    /// rounded change, as every worker moves its copy). The update goes to `updateTargets`: encoded into
    /// the frame payloads (those still being sent are replaced), and as f32 values (the parameters, or the
    /// replica) into each sharing worker's segment, where they are that worker's parameters. Hands the
    /// parameter indices to `emit` in buckets of about `bucket_kb` as they are done (`last` true for the
    /// final one).
    func stepAndEncode(applyOptimizer: Bool, emit: (_ indices: [Int], _ last: Bool) -> Void) {
        if applyOptimizer { optimizer.beginStep() }
        if owned.isEmpty { emit([], true) }
        var bucket: [Int] = [], bucketBytes = 0
        for index in owned {
            let p = parameters[index]
            let count = p.tensor.count
            let shared = updateTargets.shared.map { $0.update(index, byteCount: count * 4) }
            let frame = updateTargets.frames || shared.isEmpty ? reusablePayload(index, byteCount: count * wireType.size) : nil
            if applyOptimizer { optimizer.update(p, range: 0..<0) }  // creates its state before threads share it
            p.tensor.withUnsafeBufferPointer { master in withReplica(index) { held in
                ParallelChunks.forEach(count: count, chunk: Self.chunk) { range, _ in
                        let start = range.lowerBound
                        if applyOptimizer { optimizer.update(p, range: range) }
                        let values: UnsafeBufferPointer<Float>  // what the workers hold from now on
                        if let held {  // the replica moves by the rounded change, as a worker decoding it does
                            TensorEncoding.advance(held.baseAddress! + start, toward: master.baseAddress! + start, count: range.count,
                                                   dtype: wireType, encodingInto: frame, at: start)
                            values = UnsafeBufferPointer(rebasing: held[range])
                        } else {
                            values = UnsafeBufferPointer(rebasing: master[range])
                            if let frame { TensorEncoding.write(values, as: .f32, into: frame, at: start) }
                        }
                        for target in shared { TensorEncoding.write(values, as: .f32, into: target, at: start) }  // in cache
                    }
            } }
            bucket.append(index)
            bucketBytes += count * wireType.size
            let last = index == owned.last
            if last || (spec.bucketKB > 0 && bucketBytes >= spec.bucketKB * 1024) {
                emit(bucket, last)
                bucket = []
                bucketBytes = 0
            }
        }
    }

    /// The element type of `rank`'s pushes: f32 from a worker sharing memory (the coordinator rounds them
    /// to the wire type when averaging, as if they had been sent as it), else the job's wire type.
    func pushType(of rank: Int32) -> DType { members[rank]?.shared != nil ? .f32 : wireType }

    /// Calls `body` with the storage of parameter `index`'s replica, or nil with an f32 wire.
    func withReplica<R>(_ index: Int, _ body: (UnsafeMutableBufferPointer<Float>?) -> R) -> R {
        guard let replica else { return body(nil) }
        return replica[index].withUnsafeMutableBufferPointer { body($0) }
    }

    func endEpoch() {
        let epoch = step / stepsPerEpoch
        guard refreshFromFollowers(withState: false) else { return }
        let (testLoss, testAccuracy) = setup.evaluate(on: setup.test)
        let record = EpochRecord(
            epoch: epoch, step: step, trainLoss: Float(epochLoss.sum / Double(max(epochLoss.samples, 1))),
            trainAccuracy: Float(epochLoss.correct) / Float(max(epochLoss.samples, 1)), testLoss: testLoss,
            testAccuracy: testAccuracy, elapsedSeconds: Self.now() - trainingStarted, workers: liveCount)
        history.append(record)
        epochLoss = (0, 0, 0)
        log.info("epoch \(epoch)/\(spec.epochs)", metadata: [
            "step": "\(step)", "train_loss": "\(record.trainLoss)", "test_loss": "\(testLoss)",
            "test_accuracy": "\(testAccuracy)", "workers": "\(liveCount)",
        ])
        metrics.testLoss = testLoss
        metrics.testAccuracy = testAccuracy
        if let directory { try? directory.write(history, to: directory.historyPath) }
        writeMetrics()
    }

    /// Writes a checkpoint; a failure is logged and the job goes on.
    func writeCheckpoint() {
        guard let directory, refreshFromFollowers(withState: true) else { return }
        do {
            let path = try Checkpoint.save(
                step: step, stepsPerEpoch: stepsPerEpoch, parameters: parameters, optimizer: optimizer, spec: spec,
                history: history, rankTokens: rankTokens, in: directory, keep: spec.keepCheckpoints)
            log.debug("checkpoint written", metadata: ["path": "\(path)", "step": "\(step)"])
        } catch {
            log.error("checkpoint at step \(step) failed: \(error)")
        }
    }

    /// Writes the Prometheus metrics file and appends the buffered per-step records.
    func writeMetrics() {
        lastMetricsWrite = Self.now()
        guard let directory else { return }
        metrics.workersAlive = liveCount
        try? AtomicFile.write(metrics.text(jobID: spec.jobID), to: directory.metricsPath)
        guard !stepLog.isEmpty else { return }
        let text = stepLog.joined(separator: "\n") + "\n"
        stepLog.removeAll(keepingCapacity: true)
        if let handle = FileHandle(forWritingAtPath: directory.stepLogPath) {
            handle.seekToEndOfFile()
            handle.write(Data(text.utf8))
            try? handle.close()
        } else {
            _ = FileManager.default.createFile(atPath: directory.stepLogPath, contents: Data(text.utf8))
        }
    }

    /// The parameters the workers should hold (the replica with a half-precision wire) as f32 wire
    /// tensors; payloads still being sent are replaced, not overwritten.
    func parameterTensors() -> [WireTensor] {
        parameters.enumerated().map { index, p in
            if parameterPayloads[index].isInFlight { parameterPayloads[index] = Payload(byteCount: p.tensor.count * 4) }
            (replica?[index] ?? p.tensor).withUnsafeBufferPointer { TensorEncoding.write($0, as: .f32, into: parameterPayloads[index]) }
            return WireTensor(name: p.name, shape: p.tensor.shape, payload: parameterPayloads[index])
        }
    }

    /// The payload for parameter `index` of the update (the f32 copies, or the half-precision changes),
    /// replaced by a new one while the last is still being sent.
    func reusablePayload(_ index: Int, byteCount: Int) -> Payload {
        if replica == nil {
            if parameterPayloads[index].isInFlight { parameterPayloads[index] = Payload(byteCount: byteCount) }
            return parameterPayloads[index]
        }
        if deltaPayloads[index].isInFlight { deltaPayloads[index] = Payload(byteCount: byteCount) }
        return deltaPayloads[index]
    }

    /// Sends the current step again, with the next attempt, to the live workers: its whole global batch
    /// re-divided among them, parameters unchanged (no tensors), earlier pushes dropped.
    func resendStep() {
        redoStep = false
        contributions.removeAll(keepingCapacity: true)
        partialPushes.removeAll(keepingCapacity: true)
        earlyAverage = EarlyAverage()
        attempt += 1
        followerReports.removeAll(keepingCapacity: true)
        var abort = ShardMessage(.abort)
        abort.attempt = attempt
        sendToFollowers(abort)
        log.warning("step \(step) sent again to \(liveCount) live workers", metadata: ["attempt": "\(attempt)"])
        broadcastUpdate(trainLoss: recentLosses.last ?? 0, resend: true) { send in send([], true) }
    }

    /// Sends the update for `step` to every live worker with its shard of the batch, in the parts that
    /// `produce` hands to its argument as they are ready (the parameter indices, `last` true for the final
    /// one; a resend is one part without tensors): through shared memory to the workers that share it, in
    /// frames to the others. The workers and their shards are fixed for all parts.
    func broadcastUpdate(
        trainLoss: Float, resend: Bool = false, recipients: [Int32]? = nil, produce: (_ send: (_ indices: [Int], _ last: Bool) -> Void) -> Void
    ) {
        if !resend { attempt = 0 }
        for rank in members.keys where members[rank]!.state == "joining" { members[rank]!.state = "training" }
        let live = recipients?.compactMap { members[$0] } ?? members.values.filter(\.isLive).sorted { $0.rank < $1.rank }
        updateTargets = (live.contains { $0.shared == nil }, live.compactMap(\.shared))
        defer { updateTargets = (true, []) }
        stepStarted = Self.now()
        // The leader assigns the samples: the step's global batch cut into contiguous shards, one per live
        // worker in rank order (the first batch % workers take one more).
        let batch = setup.sampler.batchRange(step: step % stepsPerEpoch)
        let assignments: [Int32: [SampleRange]] = role != .leader ? [:] : Dictionary(uniqueKeysWithValues: live.enumerated().map { shard, member in
            let positions = EpochSampler.shard(batch, rank: shard, worldSize: live.count)
            return (member.rank, positions.isEmpty ? [] : [SampleRange(start: UInt64(positions.lowerBound), count: UInt64(positions.count))])
        })
        assignedSamples = assignments.mapValues { $0.reduce(0) { $0 + $1.count } }
        var part: UInt32 = 0
        produce { indices, last in
            for member in live where members[member.rank]?.isLive == true {
                let update = ParameterUpdate(
                    learningRate: optimizer.learningRate, fullCopy: replica == nil || member.shared != nil, epoch: UInt64(step / stepsPerEpoch),
                    worldSize: UInt32(live.count), trainLoss: trainLoss, attempt: attempt,
                    part: part, moreParts: !last, samples: assignments[member.rank] ?? [])
                let tensors = indices.map { index in
                    let p = parameters[index]
                    guard let area = member.shared else {
                        return WireTensor(name: p.name, shape: p.tensor.shape, dtype: wireType, payload: (replica == nil ? parameterPayloads : deltaPayloads)[index])
                    }
                    return WireTensor(name: p.name, shape: p.tensor.shape, dtype: .f32, payload: area.update(index, byteCount: p.tensor.count * 4))
                }
                do {
                    try reply(member.identity, .parameterUpdate(update), step: UInt64(step), rank: member.rank, tensors: tensors)
                } catch {
                    markGone(member.rank, state: "lost", reason: "unreachable: \(error)")
                }
            }
            part += 1
        }
    }

    // MARK: End

    func finish() throws -> JobSummary {
        for member in members.values where member.isLive || member.state == "joining" {
            try? reply(member.identity, .stop(reason: message, graceful: false))
        }
        let last = history.last
        let elapsed = trainingStarted > 0 ? Self.now() - trainingStarted : 0
        var modelPath = ""
        if step > 0 && phase != .failed { writeCheckpoint() }
        rejectionLog.flush(to: log)
        writeMetrics()
        // With followers, the model is whole only when they could send their tensors.
        let whole = followers.isEmpty || refreshFromFollowers(withState: false)
        for index in followers.keys.sorted() { sendToFollower(index, body: .stop(reason: message, graceful: false)) }
        if let directory, whole {
            do {  // a failed write is reported in the summary, which is still written
                try SafeTensors.write(parameters.map { ($0.name, $0.tensor) },
                                      metadata: ["job_id": spec.jobID, "step": "\(step)", "format": "pt"], to: directory.modelPath)
                modelPath = directory.modelPath
            } catch {
                log.error("the model could not be written: \(error)")
                message += "; the model could not be written: \(error)"
            }
        }
        let summary = JobSummary(
            state: phase.rawValue, jobID: spec.jobID, workers: spec.workers, epochs: step / stepsPerEpoch, steps: step,
            trainLoss: last?.trainLoss ?? recentLosses.last ?? 0, testLoss: last?.testLoss ?? 0,
            testAccuracy: last?.testAccuracy ?? 0, wallSeconds: Self.now() - started,
            samplesPerSecond: elapsed > 0 ? Double(samplesTrained) / elapsed : 0, modelPath: modelPath, message: message,
            rejectedMessages: rejected, lostWorkers: lostRanks, task: spec.task)
        if let directory { try directory.write(summary, to: directory.summaryPath) }
        log.info("job \(phase.rawValue)", metadata: ["steps": "\(step)", "test_accuracy": "\(summary.testAccuracy)",
                                                      "message": "\(message)"])
        // Give the stop messages a moment to leave before the sockets close.
        workerSocket.close()
        controlSocket.close()
        return summary
    }

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
