import Autodiff
import DDPData
import DDPWire
import Foundation
import Logging

/// A worker: joins a coordinator, then for every parameter update computes the gradient of its
/// shard of that step's global batch with the autodiff core and pushes it, until told to stop.
public final class Worker {
    /// Why a worker ended.
    public enum Outcome: Equatable, Sendable {
        /// The coordinator ended the job (normally or not) and said why.
        case stopped(reason: String)
    }

    private let endpoint: String
    private var setup: TrainingSetup?
    private let log: Logger
    private let context = ZMQContext()
    private let socket: ZMQSocket
    private let monitor: ZMQMonitor
    private var jobID: String
    private var rank: Int32 = -1
    private var parameters: [NamedParameter] = []
    private var gradientPayloads: [Payload] = []
    private var indexOfParameter: [ObjectIdentifier: Int] = [:]
    private var indexOfName: [String: Int] = [:]
    private let scratch = Tensor.zeros([WeightedMean.chunk])
    /// The parameter update being received in parts: its step, the next part due, the parameters set.
    private var updateInProgress: (step: UInt64, nextPart: UInt32, received: Set<Int>)?
    private var permutation: (epoch: Int, order: [Int])?
    private var wireType = DType.f32
    private var heartbeatInterval = 1.0
    private var heartbeatTimeout = 5.0
    private var coordinatorTimeout = 30.0
    private let joinTimeout: Double
    private let requestedRank: Int32
    private let workerID: String

    /// A worker for the coordinator at `endpoint`. With a `spec`, the worker builds its model first and
    /// the coordinator checks its fingerprint; without, it takes the job's spec from the welcome.
    /// `keys` (server public key and a client pair) are needed for a secure job.
    public init(
        endpoint: String, spec: JobSpec?, keys: JobKeys? = nil, requestedRank: Int32 = -1, joinTimeoutSeconds: Double = 60,
        logger: Logger
    ) throws {
        self.endpoint = endpoint
        setup = try spec.map(TrainingSetup.init)
        jobID = spec?.jobID ?? ""
        log = logger
        joinTimeout = joinTimeoutSeconds
        self.requestedRank = requestedRank
        workerID = "\(ProcessInfo.processInfo.hostName):\(getpid()):\(String(UInt32.random(in: 0...UInt32.max), radix: 16))"
        socket = try ZMQSocket(context: context, kind: .dealer)
        monitor = try ZMQMonitor(context: context, monitoring: socket)
        try (keys ?? spec?.keys())?.secureClient(socket)
        try socket.setSendTimeout(milliseconds: 5000)
        try socket.setHighWaterMarks(send: 0, receive: 0)
        try socket.setKernelBuffers(bytes: 4 << 20)
        try socket.connect(endpoint)
    }

    /// Joins and trains until the coordinator says stop; throws when refused or when the coordinator
    /// goes silent past its deadline.
    public func run() throws -> Outcome {
        try join()
        var lastHeard = Coordinator.now(), lastJoin = 0.0
        while true {
            guard let frames = try socket.receive(timeoutMilliseconds: Int(heartbeatInterval * 1000)) else {
                let silent = Coordinator.now() - lastHeard
                if silent > coordinatorTimeout {
                    throw WorkerError.coordinatorSilent(endpoint: endpoint, seconds: silent)
                }
                try send(.heartbeat(Heartbeat(sentUnixMilliseconds: Coordinator.unixMilliseconds(), state: "waiting")))
                // A coordinator silent past the heartbeat timeout may have restarted, or dropped this
                // worker: ask to join again, for the same rank.
                if silent > heartbeatTimeout && Coordinator.now() - lastJoin > heartbeatTimeout {
                    log.warning("the coordinator has been silent for \(Int(silent)) s; joining again", metadata: ["rank": "\(rank)"])
                    try send(.join(joinRequest(rank: rank)))
                    lastJoin = Coordinator.now()
                }
                continue
            }
            lastHeard = Coordinator.now()
            let message: WireMessage
            do {
                message = try WireCodec.decode(frames, expectedJobID: jobID)
            } catch {
                log.warning("dropped a malformed message from the coordinator: \(error)")
                continue
            }
            switch message.body {
            case .parameterUpdate(let update):
                let resent = update.attempt > 0 && message.tensors.isEmpty && !update.moreParts  // keeps the parameters
                if !resent {
                    try receiveUpdatePart(update, step: message.step, tensors: message.tensors)
                    if update.moreParts { continue }
                }
                try computeAndPush(step: Int(message.step), shard: Int(update.shardIndex), worldSize: Int(update.worldSize),
                                   attempt: update.attempt)
            case .stop(let reason, _):
                log.info("stopped by the coordinator: \(reason)")
                return .stopped(reason: reason)
            case .error(let error):
                throw WorkerError.refused(error.reason)
            case .welcome(let welcome):
                try accept(welcome, message: message)
            case .heartbeat:
                break
            default:
                log.warning("unexpected \(message.body.kind) from the coordinator")
            }
        }
    }

    private func send(_ body: WireMessage.Body, step: UInt64 = 0, tensors: [WireTensor] = []) throws {
        try socket.send(WireCodec.encode(WireMessage(jobID: jobID, step: step, rank: rank, body: body, tensors: tensors)))
    }

    private func joinRequest(rank: Int32) -> Join {
        Join(workerID: workerID, host: ProcessInfo.processInfo.hostName, pid: UInt32(getpid()),
             modelFingerprint: setup?.modelFingerprint ?? "", requestedRank: rank)
    }

    private func join() throws {
        try send(.join(joinRequest(rank: requestedRank)))
        log.info("joining", metadata: ["coordinator": "\(endpoint)"])
        let deadline = Coordinator.now() + joinTimeout
        while Coordinator.now() < deadline {
            while let event = try monitor.next() {
                if case .authenticationFailed = event { throw WorkerError.refused("the coordinator did not accept this worker's CURVE key") }
            }
            guard let frames = try socket.receive(timeoutMilliseconds: 200) else { continue }
            let message = try WireCodec.decode(frames)
            switch message.body {
            case .welcome(let welcome):
                try accept(welcome, message: message)
                return
            case .error(let error) where error.code == .notReady:
                log.info("the coordinator asks to retry: \(error.reason)")
                usleep(250_000)
                try send(.join(joinRequest(rank: requestedRank)))
            case .error(let error):
                throw WorkerError.refused(error.reason)
            default:
                continue
            }
        }
        throw WorkerError.joinTimedOut(endpoint: endpoint, seconds: joinTimeout)
    }

    private func accept(_ welcome: Welcome, message: WireMessage) throws {
        let spec = try JobSpec.fromJSON(welcome.jobSpecJSON)
        if setup == nil { setup = try TrainingSetup(spec: spec) }
        jobID = message.jobID
        rank = welcome.rank
        heartbeatInterval = Double(welcome.heartbeatIntervalMilliseconds) / 1000
        heartbeatTimeout = Double(welcome.heartbeatTimeoutMilliseconds) / 1000
        coordinatorTimeout = max(30, 6 * Double(welcome.heartbeatTimeoutMilliseconds) / 1000)
        parameters = setup!.model.parameters
        indexOfParameter = Dictionary(uniqueKeysWithValues: parameters.enumerated().map { (ObjectIdentifier($1.tensor), $0) })
        indexOfName = Dictionary(uniqueKeysWithValues: parameters.enumerated().map { ($1.name, $0) })
        wireType = DType(rawValue: spec.wireDtype) ?? .f32
        gradientPayloads = parameters.map { Payload(byteCount: $0.tensor.count * wireType.size) }
        var received = Set<Int>()
        try load(message.tensors, into: &received)
        guard received.count == parameters.count else {
            throw WorkerError.modelMismatch("the welcome holds \(received.count) of the model's \(parameters.count) parameters")
        }
        updateInProgress = nil
        log.info("welcomed", metadata: ["rank": "\(rank)", "job": "\(jobID)", "step": "\(welcome.startStep)"])
    }

    /// Applies one part of a parameter update (parts arrive in order, each parameter once); after the
    /// last part, checks that the update set every parameter.
    private func receiveUpdatePart(_ update: ParameterUpdate, step: UInt64, tensors: [WireTensor]) throws {
        var progress = update.part == 0 ? (step: step, nextPart: UInt32(0), received: Set<Int>()) : updateInProgress
        guard let current = progress, current.step == step, current.nextPart == update.part else {
            let due = updateInProgress.map { "part \($0.nextPart) of step \($0.step)" } ?? "a first part"
            throw WorkerError.modelMismatch("part \(update.part) of the update for step \(step) arrived where \(due) was due")
        }
        try load(tensors, adding: !update.fullCopy, into: &progress!.received)
        progress!.nextPart += 1
        updateInProgress = update.moreParts ? progress : nil
        if !update.moreParts && progress!.received.count != parameters.count {
            throw WorkerError.modelMismatch("the update for step \(step) set \(progress!.received.count) of \(parameters.count) parameters")
        }
    }

    /// Replaces parameters of the replica with the coordinator's, or adds the changes it sent, adding
    /// their indices to `received` (a parameter already received is an error).
    private func load(_ tensors: [WireTensor], adding: Bool = false, into received: inout Set<Int>) throws {
        for t in tensors {
            guard let index = indexOfName[t.name], parameters[index].tensor.shape == t.shape else {
                throw WorkerError.modelMismatch("got '\(t.name)' \(t.shape), which is not a parameter of this model")
            }
            guard received.insert(index).inserted else { throw WorkerError.modelMismatch("'\(t.name)' came twice in one update") }
            parameters[index].tensor.withUnsafeMutableBufferPointer { dst in
                scratch.withUnsafeMutableBufferPointer { scratch in  // half-precision values convert a chunk at a time
                    for start in stride(from: 0, to: dst.count, by: scratch.count) {
                        let range = start..<min(start + scratch.count, dst.count)
                        TensorEncoding.withFloats(t.payload, dtype: t.dtype, range: range, scratch: scratch) { src in
                            let out = dst.baseAddress! + start
                            if adding { for i in 0..<src.count { out[i] += src[i] } } else { out.update(from: src.baseAddress!, count: src.count) }
                        }
                    }
                }
            }
        }
    }

    /// Computes the gradient of this worker's shard of `step`'s batch and pushes it: in buckets of about
    /// `bucket_kb` sent from inside the backward pass as the tape completes them (last layers first), the
    /// rest in a final part; or whole.
    private func computeAndPush(step: Int, shard: Int, worldSize: Int, attempt: UInt32) throws {
        let setup = setup!
        let start = Coordinator.now()
        let stepsPerEpoch = setup.sampler.stepsPerEpoch
        let epoch = step / stepsPerEpoch
        if permutation?.epoch != epoch { permutation = (epoch, setup.sampler.permutation(epoch: epoch)) }
        let batch = setup.sampler.globalBatch(step: step % stepsPerEpoch, of: permutation!.order)
        let mine = EpochSampler.shard(batch, rank: shard, worldSize: worldSize)
        setup.model.zeroGrad()
        var header = GradientPush(sampleCount: UInt64(mine.count), localLoss: 0, attempt: attempt)
        var unsent = Set(parameters.indices)
        func pushPart(_ indices: [Int], more: Bool) throws {
            header.moreParts = more
            try send(.gradientPush(header), step: UInt64(step), tensors: indices.map(gradientTensor))
            header.part += 1
            unsent.subtract(indices)
        }
        if !mine.isEmpty {
            let (lossTensor, rightOnes) = setup.loss(mine, in: setup.train)
            header.localLoss = lossTensor.item
            header.localCorrect = UInt32(rightOnes)
            let bucketBytes = setup.spec.bucketKB * 1024
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

    /// The wire tensor of parameter `index`'s gradient: an f32 gradient goes out from its own storage (the
    /// next step's backward writes a new one); a half-precision one is converted into a reused payload.
    private func gradientTensor(_ index: Int) -> WireTensor {
        let p = parameters[index]
        if wireType == .f32, let grad = p.tensor.grad {
            let payload = grad.withUnsafeBufferPointer { Payload(borrowing: UnsafeRawBufferPointer($0), owner: grad) }
            return WireTensor(name: p.name, shape: p.tensor.shape, dtype: wireType, payload: payload)
        }
        if gradientPayloads[index].isInFlight { gradientPayloads[index] = Payload(byteCount: p.tensor.count * wireType.size) }
        let payload = gradientPayloads[index]
        if let grad = p.tensor.grad {
            grad.withUnsafeBufferPointer { TensorEncoding.write($0, as: wireType, into: payload) }
        } else {
            payload.withUnsafeMutableBytes { _ = $0.initializeMemory(as: UInt8.self, repeating: 0) }
        }
        return WireTensor(name: p.name, shape: p.tensor.shape, dtype: wireType, payload: payload)
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
