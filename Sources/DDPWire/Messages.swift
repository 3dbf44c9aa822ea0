/// The protocol version this build speaks (`Envelope.protocol_version` in proto/ddp.proto).
public let wireProtocolVersion: UInt32 = 1

/// The element type of a tensor frame.
public enum DType: String, Sendable, CaseIterable, Codable {
    case f32, f16, bf16

    /// Bytes per element.
    public var size: Int { self == .f32 ? 4 : 2 }
}

/// A tensor carried as a raw frame after the envelope.
public struct WireTensor {
    public var name: String
    public var shape: [Int]
    public var dtype: DType
    public var payload: Payload
    /// The elements of the tensor (row-major) the payload holds when it is a slice of one (a tensor
    /// split between coordinator shards); nil when it holds the whole tensor.
    public var slice: Range<Int>?

    public init(name: String, shape: [Int], dtype: DType = .f32, payload: Payload, slice: Range<Int>? = nil) {
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.payload = payload
        self.slice = slice
    }

    /// Elements in the tensor.
    public var elementCount: Int { shape.reduce(1, *) }
    /// The elements the payload holds: the slice, or all of them.
    public var elements: Range<Int> { slice ?? 0..<elementCount }
}

/// One protocol message: envelope fields, the kind-specific body, and the tensors that follow.
public struct WireMessage {
    public var jobID: String
    public var step: UInt64
    /// The sender's or addressee's rank; -1 where none.
    public var rank: Int32
    public var body: Body
    public var tensors: [WireTensor]

    public init(jobID: String, step: UInt64 = 0, rank: Int32 = -1, body: Body, tensors: [WireTensor] = []) {
        self.jobID = jobID
        self.step = step
        self.rank = rank
        self.body = body
        self.tensors = tensors
    }

    /// The message kinds; see proto/ddp.proto for each one's meaning.
    public enum Body: Equatable, Sendable {
        case join(Join)
        case welcome(Welcome)
        case gradientPush(GradientPush)
        case parameterUpdate(ParameterUpdate)
        case heartbeat(Heartbeat)
        case leave(reason: String)
        case statusRequest(detail: Bool)
        case statusReply(StatusReply)
        case stop(reason: String, graceful: Bool)
        case error(ErrorReply)
        case shard(ShardMessage)
        case heldOutScores(HeldOutScores)

        /// The kind's name, for logs.
        public var kind: String {
            switch self {
            case .join: "join"
            case .welcome: "welcome"
            case .gradientPush: "gradient_push"
            case .parameterUpdate: "parameter_update"
            case .heartbeat: "heartbeat"
            case .leave: "leave"
            case .statusRequest: "status_request"
            case .statusReply: "status_reply"
            case .stop: "stop"
            case .error: "error"
            case .shard(let m): "shard \(m.kind)"
            case .heldOutScores: "held_out_scores"
            }
        }
    }
}

public struct Join: Equatable, Sendable {
    public var workerID: String
    public var host: String
    public var pid: UInt32
    public var modelFingerprint: String
    public var requestedRank: Int32
    /// The protocol version the joining worker speaks (the envelope's).
    public var protocolVersion: UInt32 = wireProtocolVersion
    /// A shared-memory segment the worker offers for tensors, or nil.
    public var sharedMemory: SharedMemoryOffer?
    /// The rank token of the Welcome that gave it `requestedRank` (empty on a first join).
    public var rankToken: [UInt8] = []
    /// A worker that brings its model (a program): its data set's training samples and the model's
    /// description (JSON); its parameters and buffers travel as the Join's tensors. 0 and "" otherwise.
    public var sampleCount: UInt64 = 0
    public var modelJSON = ""

    public init(workerID: String, host: String, pid: UInt32, modelFingerprint: String, requestedRank: Int32 = -1) {
        self.workerID = workerID
        self.host = host
        self.pid = pid
        self.modelFingerprint = modelFingerprint
        self.requestedRank = requestedRank
    }
}

/// A segment a worker offers in its Join (see SHARED MEMORY in proto/ddp.proto).
public struct SharedMemoryOffer: Equatable, Sendable {
    public var path: String
    public var nonce: [UInt8]
    public var byteCount: Int
    /// Where the coordinator's (update) area begins; the worker's pushes lie below it.
    public var updateOffset: Int

    public init(path: String, nonce: [UInt8], byteCount: Int, updateOffset: Int) {
        self.path = path
        self.nonce = nonce
        self.byteCount = byteCount
        self.updateOffset = updateOffset
    }
}

public struct Welcome: Equatable, Sendable {
    public var rank: Int32
    public var worldSize: UInt32
    public var jobSpecJSON: String
    public var startStep: UInt64
    public var epoch: UInt64
    public var heartbeatIntervalMilliseconds: UInt64
    public var heartbeatTimeoutMilliseconds: UInt64
    /// The coordinator mapped the segment the Join offered: tensors may travel through it.
    public var sharedMemory: Bool
    /// The worker endpoints of coordinator shards 1..K-1 (empty with one coordinator).
    public var shardEndpoints: [String] = []
    /// The rank's secret, sent back in later Joins to get the rank back after a coordinator restart.
    public var rankToken: [UInt8] = []

    public init(
        rank: Int32, worldSize: UInt32, jobSpecJSON: String, startStep: UInt64, epoch: UInt64,
        heartbeatIntervalMilliseconds: UInt64 = 1000, heartbeatTimeoutMilliseconds: UInt64 = 5000, sharedMemory: Bool = false
    ) {
        self.sharedMemory = sharedMemory
        self.rank = rank
        self.worldSize = worldSize
        self.jobSpecJSON = jobSpecJSON
        self.startStep = startStep
        self.epoch = epoch
        self.heartbeatIntervalMilliseconds = heartbeatIntervalMilliseconds
        self.heartbeatTimeoutMilliseconds = heartbeatTimeoutMilliseconds
    }
}

public struct GradientPush: Equatable, Sendable {
    public var sampleCount: UInt64
    public var localLoss: Float
    public var localCorrect: UInt32
    public var computeSeconds: Double
    /// The attempt of the step this answers.
    public var attempt: UInt32
    /// For a push sent in parts (buckets of tensors, while the backward pass goes on): this part's index,
    /// and whether more parts follow. A whole push is part 0 with no more parts.
    public var part: UInt32
    public var moreParts: Bool

    public init(
        sampleCount: UInt64, localLoss: Float, localCorrect: UInt32 = 0, computeSeconds: Double = 0, attempt: UInt32 = 0,
        part: UInt32 = 0, moreParts: Bool = false
    ) {
        self.sampleCount = sampleCount
        self.localLoss = localLoss
        self.localCorrect = localCorrect
        self.computeSeconds = computeSeconds
        self.attempt = attempt
        self.part = part
        self.moreParts = moreParts
    }
}

public struct ParameterUpdate: Equatable, Sendable {
    public var learningRate: Float
    public var fullCopy: Bool
    public var epoch: UInt64
    public var worldSize: UInt32
    public var trainLoss: Float
    /// 0 normally; higher when the step is sent again after a worker was lost (then without tensors).
    public var attempt: UInt32
    /// For an update sent in parts: this part's index, and whether more parts follow.
    public var part: UInt32
    public var moreParts: Bool
    /// The samples the receiver computes: runs of positions in epoch `epoch`'s permutation.
    public var samples: [SampleRange]
    /// A round of local SGD: `samples` holds one run per inner step; the first inner step's index in the
    /// job (for the learning-rate schedule). 0: a synchronous step.
    public var innerSteps: UInt32
    public var firstInnerStep: UInt64
    /// This part carries no tensors: the parameters stay as the worker holds them (the first step after
    /// the Welcomes, from every coordinator shard).
    public var keepsParameters: Bool
    /// Held-out batches to score on this update's parameters before computing (answered with HeldOutScores).
    public var evaluate: [SampleRange] = []

    public init(
        learningRate: Float, fullCopy: Bool, epoch: UInt64, worldSize: UInt32, trainLoss: Float, attempt: UInt32 = 0,
        part: UInt32 = 0, moreParts: Bool = false, samples: [SampleRange] = [], innerSteps: UInt32 = 0, firstInnerStep: UInt64 = 0,
        keepsParameters: Bool = false
    ) {
        self.keepsParameters = keepsParameters
        self.samples = samples
        self.innerSteps = innerSteps
        self.firstInnerStep = firstInnerStep
        self.learningRate = learningRate
        self.fullCopy = fullCopy
        self.epoch = epoch
        self.worldSize = worldSize
        self.trainLoss = trainLoss
        self.attempt = attempt
        self.part = part
        self.moreParts = moreParts
    }
}

/// `count` consecutive positions from `start` in an epoch's permutation of the training samples.
public struct SampleRange: Equatable, Sendable {
    public var start: UInt64
    public var count: UInt64
    public init(start: UInt64, count: UInt64) {
        self.start = start
        self.count = count
    }
}

/// A worker's scores of the held-out batches an update named (`ParameterUpdate.evaluate`): per batch, in
/// order, its summed loss and its hits.
public struct HeldOutScores: Equatable, Sendable {
    public var batches: [SampleRange]
    public var lossSums: [Double]
    public var correct: [UInt64]
    public init(batches: [SampleRange], lossSums: [Double], correct: [UInt64]) {
        self.batches = batches
        self.lossSums = lossSums
        self.correct = correct
    }
}

public struct Heartbeat: Equatable, Sendable {
    public var sentUnixMilliseconds: UInt64
    public var state: String
    /// The state of a worker's Heartbeat once it holds its Welcome's values and every coordinator shard
    /// welcomed it: training starts once the workers are ready.
    public static let ready = "ready"
    public init(sentUnixMilliseconds: UInt64, state: String) {
        self.sentUnixMilliseconds = sentUnixMilliseconds
        self.state = state
    }
}

public struct WorkerStatus: Equatable, Sendable, Codable {
    public var rank: Int32
    public var host: String
    public var pid: UInt32
    public var state: String
    public var step: UInt64
    public var lastSeenMillisecondsAgo: UInt64
    public var lastStepSeconds: Double
    public var lagging: Bool
    public var restarts: UInt32
    /// The L2 norm of its last accepted gradient (estimated from a fixed sample of elements).
    public var gradientNorm: Double
    /// Steps at which its gradient norm was over 10x the median of the others'.
    public var outlierSteps: UInt32
    /// Its measured training samples per second (0 until measured).
    public var samplesPerSecond: Double
    /// With backup workers: the steps completed without it, and the last of them.
    public var leftOutSteps: UInt32
    public var lastLeftOutStep: UInt64

    public init(
        rank: Int32, host: String, pid: UInt32, state: String, step: UInt64, lastSeenMillisecondsAgo: UInt64,
        lastStepSeconds: Double, lagging: Bool, restarts: UInt32 = 0, gradientNorm: Double = 0, outlierSteps: UInt32 = 0,
        samplesPerSecond: Double = 0, leftOutSteps: UInt32 = 0, lastLeftOutStep: UInt64 = 0
    ) {
        self.rank = rank
        self.host = host
        self.pid = pid
        self.state = state
        self.step = step
        self.lastSeenMillisecondsAgo = lastSeenMillisecondsAgo
        self.lastStepSeconds = lastStepSeconds
        self.lagging = lagging
        self.restarts = restarts
        self.gradientNorm = gradientNorm
        self.outlierSteps = outlierSteps
        self.samplesPerSecond = samplesPerSecond
        self.leftOutSteps = leftOutSteps
        self.lastLeftOutStep = lastLeftOutStep
    }
}

public struct StatusReply: Equatable, Sendable, Codable {
    public var jobState: String
    public var step: UInt64
    public var totalSteps: UInt64
    public var epoch: UInt64
    public var totalEpochs: UInt64
    public var elapsedSeconds: Double
    public var trainLoss: Float
    public var testLoss: Float
    public var testAccuracy: Float
    public var samplesPerSecond: Double
    public var workers: [WorkerStatus]
    public var rejectedMessages: UInt64
    public var recentLosses: [Float]
    public var message: String
    /// The worker endpoints of coordinator shards 1..K-1 (empty with one coordinator).
    public var coordinatorShards: [String] = []

    public init(
        jobState: String, step: UInt64 = 0, totalSteps: UInt64 = 0, epoch: UInt64 = 0, totalEpochs: UInt64 = 0,
        elapsedSeconds: Double = 0, trainLoss: Float = 0, testLoss: Float = 0, testAccuracy: Float = 0,
        samplesPerSecond: Double = 0, workers: [WorkerStatus] = [], rejectedMessages: UInt64 = 0,
        recentLosses: [Float] = [], message: String = ""
    ) {
        self.jobState = jobState
        self.step = step
        self.totalSteps = totalSteps
        self.epoch = epoch
        self.totalEpochs = totalEpochs
        self.elapsedSeconds = elapsedSeconds
        self.trainLoss = trainLoss
        self.testLoss = testLoss
        self.testAccuracy = testAccuracy
        self.samplesPerSecond = samplesPerSecond
        self.workers = workers
        self.rejectedMessages = rejectedMessages
        self.recentLosses = recentLosses
        self.message = message
    }
}

public struct ErrorReply: Equatable, Sendable, Error {
    public enum Code: Int32, Sendable {
        case unspecified = 0, malformed, versionMismatch, wrongJob, modelMismatch, jobFull, unauthorized, notReady
        /// A push was refused for this step; the worker keeps its rank and goes on with the next update.
        case pushRefused
        /// The sender is not (or no longer) a member: it joins again.
        case notJoined
    }
    public var code: Code
    public var reason: String
    public init(code: Code, reason: String) {
        self.code = code
        self.reason = reason
    }
}

/// Between the leader coordinator (shard 0) and its follower shards; see COORDINATOR SHARDS in
/// proto/ddp.proto. Which fields matter depends on `kind`.
public struct ShardMessage: Equatable, Sendable {
    public enum Kind: Int32, Sendable, CustomStringConvertible {
        case hello = 1, assign, roster, received, average, averaged, apply, abort, snapshot, snapshotReply

        public var description: String {
            switch self {
            case .hello: "hello"
            case .assign: "assign"
            case .roster: "roster"
            case .received: "received"
            case .average: "average"
            case .averaged: "averaged"
            case .apply: "apply"
            case .abort: "abort"
            case .snapshot: "snapshot"
            case .snapshotReply: "snapshot_reply"
            }
        }
    }

    public var kind: Kind
    public var shard: UInt32 = 0
    public var endpoint = ""
    public var jobSpecJSON = ""
    public var attempt: UInt32 = 0
    public var ranks: [Int32] = []
    public var workerIDs: [String] = []
    public var sampleCounts: [UInt64] = []
    public var refused = ""
    public var learningRate: Float = 0
    public var applyOptimizer = false
    public var optimizerSteps: UInt64 = 0
    public var withState = false
    public var finite = true
    /// ASSIGN of a program's job: the model's description (see `Join.modelJSON`).
    public var modelJSON = ""
    /// AVERAGED with clipping: the sum of squares of the follower's averaged gradients.
    public var sumOfSquares: Double = 0
    /// APPLY: whether to scale the gradients by `clipScale` before stepping (the global norm was over clip_norm).
    public var clip = false
    public var clipScale: Float = 1
    /// APPLY of the first step: the update keeps the values the Welcomes carried (no tensors).
    public var keepsParameters = false

    public init(_ kind: Kind) { self.kind = kind }
}
