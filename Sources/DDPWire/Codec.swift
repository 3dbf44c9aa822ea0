import Foundation
private import CDDPProto
private import CProtobufC

/// Why a received message was refused. Decoding never traps: every defect of the input is one of these.
public enum WireError: Error, Equatable, CustomStringConvertible {
    case emptyMessage
    case malformedEnvelope(bytes: Int)
    case versionMismatch(got: UInt32)
    case wrongJob(expected: String, got: String)
    case missingBody
    case frameCountMismatch(descriptors: Int, frames: Int)
    case badDescriptor(index: Int, reason: String)
    case byteLengthMismatch(tensor: String, expected: Int, got: Int)
    case tooLarge(what: String, bytes: Int, limit: Int)
    case nonFinite(tensor: String, element: Int)

    public var description: String {
        switch self {
        case .emptyMessage: "message has no frames"
        case .malformedEnvelope(let bytes): "frame 0 (\(bytes) bytes) is not a valid protobuf Envelope"
        case .versionMismatch(let got): "protocol version \(got) is not supported (this build speaks \(wireProtocolVersion))"
        case .wrongJob(let expected, let got): "message for job '\(got)', this is job '\(expected)'"
        case .missingBody: "envelope names no message kind (no body field set)"
        case .frameCountMismatch(let d, let f): "\(d) tensor descriptors but \(f) tensor frames"
        case .badDescriptor(let i, let why): "tensor descriptor \(i): \(why)"
        case .byteLengthMismatch(let t, let e, let g): "tensor '\(t)': expected \(e) bytes, frame has \(g)"
        case .tooLarge(let what, let b, let l): "\(what) of \(b) bytes exceeds the limit of \(l)"
        case .nonFinite(let t, let e): "tensor '\(t)' element \(e) is NaN or infinite"
        }
    }

    /// The error code sent back to the peer for this defect.
    public var replyCode: ErrorReply.Code {
        switch self {
        case .versionMismatch: .versionMismatch
        case .wrongJob: .wrongJob
        case .emptyMessage, .malformedEnvelope, .missingBody, .frameCountMismatch, .badDescriptor, .byteLengthMismatch, .tooLarge,
             .nonFinite: .malformed
        }
    }
}

/// Limits a receiver applies while decoding.
public struct DecodeLimits: Sendable {
    public var maximumEnvelopeBytes = 1 << 20
    public var maximumTensors = 4096
    public var maximumTensorBytes = 1 << 31
    /// Reject f32/f16/bf16 tensors holding NaN or infinity.
    public var requireFinite = false
    public init() {}
    public static let standard = DecodeLimits()
}

/// Converts between `WireMessage` and frames: a protobuf-c envelope plus raw tensor frames. The only
/// code that sees protobuf-c.
public enum WireCodec {
    /// The frames of `message`; owned tensor payloads are sent without copying.
    public static func encode(_ message: WireMessage) -> [OutgoingFrame] {
        encode(message, protocolVersion: wireProtocolVersion)
    }

    /// `encode` with another protocol version in the envelope (tests of version checks use it).
    static func encode(_ message: WireMessage, protocolVersion: UInt32) -> [OutgoingFrame] {
        let arena = CArena()
        defer { arena.free() }
        var envelope = Ddp__V1__Envelope()
        ddp__v1__envelope__init(&envelope)
        envelope.protocol_version = protocolVersion
        envelope.job_id = arena.string(message.jobID)
        envelope.step = message.step
        envelope.rank = message.rank
        let descriptors: [UnsafeMutablePointer<Ddp__V1__TensorDescriptor>?] = message.tensors.map { tensor in
            let d = arena.make(Ddp__V1__TensorDescriptor.self, ddp__v1__tensor_descriptor__init)
            d.pointee.name = arena.string(tensor.name)
            d.pointee.n_shape = tensor.shape.count
            d.pointee.shape = arena.array(tensor.shape.map { UInt64($0) })
            d.pointee.dtype = tensor.dtype.c
            d.pointee.byte_length = UInt64(tensor.payload.byteCount)
            if let slice = tensor.slice {
                d.pointee.slice_offset = UInt64(slice.lowerBound)
                d.pointee.slice_count = UInt64(slice.count)
            }
            if let offset = tensor.payload.sharedOffset {
                d.pointee.shared = 1
                d.pointee.shared_offset = UInt64(offset)
            }
            return d
        }
        envelope.n_tensors = descriptors.count
        envelope.tensors = arena.array(descriptors)
        fill(&envelope, with: message.body, arena: arena)

        var bytes = [UInt8](repeating: 0, count: ddp__v1__envelope__get_packed_size(&envelope))
        _ = bytes.withUnsafeMutableBufferPointer { ddp__v1__envelope__pack(&envelope, $0.baseAddress) }
        return [.bytes(bytes)] + message.tensors.filter { $0.payload.sharedOffset == nil }.map { .payload($0.payload) }
    }

    private static func fill(_ e: inout Ddp__V1__Envelope, with body: WireMessage.Body, arena: CArena) {
        switch body {
        case .join(let j):
            let m = arena.make(Ddp__V1__Join.self, ddp__v1__join__init)
            m.pointee.worker_id = arena.string(j.workerID)
            m.pointee.host = arena.string(j.host)
            m.pointee.pid = j.pid
            m.pointee.model_fingerprint = arena.string(j.modelFingerprint)
            m.pointee.requested_rank = j.requestedRank
            m.pointee.rank_token = ProtobufCBinaryData(len: j.rankToken.count, data: arena.array(j.rankToken))
            m.pointee.sample_count = j.sampleCount
            m.pointee.model_json = arena.string(j.modelJSON)
            if let offer = j.sharedMemory {
                m.pointee.shared_memory_path = arena.string(offer.path)
                m.pointee.shared_memory_nonce = ProtobufCBinaryData(len: offer.nonce.count, data: arena.array(offer.nonce))
                m.pointee.shared_memory_bytes = UInt64(offer.byteCount)
                m.pointee.shared_update_offset = UInt64(offer.updateOffset)
            }
            e.body_case = DDP__V1__ENVELOPE__BODY_JOIN
            e.join = m
        case .welcome(let w):
            let m = arena.make(Ddp__V1__Welcome.self, ddp__v1__welcome__init)
            m.pointee.rank = w.rank
            m.pointee.world_size = w.worldSize
            m.pointee.job_spec_json = arena.string(w.jobSpecJSON)
            m.pointee.start_step = w.startStep
            m.pointee.epoch = w.epoch
            m.pointee.heartbeat_interval_ms = w.heartbeatIntervalMilliseconds
            m.pointee.heartbeat_timeout_ms = w.heartbeatTimeoutMilliseconds
            m.pointee.shared_memory = w.sharedMemory ? 1 : 0
            m.pointee.n_shard_endpoints = w.shardEndpoints.count
            m.pointee.shard_endpoints = arena.array(w.shardEndpoints.map { Optional(arena.string($0)) })
            m.pointee.rank_token = ProtobufCBinaryData(len: w.rankToken.count, data: arena.array(w.rankToken))
            e.body_case = DDP__V1__ENVELOPE__BODY_WELCOME
            e.welcome = m
        case .gradientPush(let g):
            let m = arena.make(Ddp__V1__GradientPush.self, ddp__v1__gradient_push__init)
            m.pointee.sample_count = g.sampleCount
            m.pointee.local_loss = g.localLoss
            m.pointee.local_correct = g.localCorrect
            m.pointee.compute_seconds = g.computeSeconds
            m.pointee.attempt = g.attempt
            m.pointee.part = g.part
            m.pointee.more_parts = g.moreParts ? 1 : 0
            e.body_case = DDP__V1__ENVELOPE__BODY_GRADIENT_PUSH
            e.gradient_push = m
        case .parameterUpdate(let u):
            let m = arena.make(Ddp__V1__ParameterUpdate.self, ddp__v1__parameter_update__init)
            m.pointee.learning_rate = u.learningRate
            m.pointee.full_copy = u.fullCopy ? 1 : 0
            m.pointee.epoch = u.epoch
            m.pointee.world_size = u.worldSize
            m.pointee.train_loss = u.trainLoss
            m.pointee.attempt = u.attempt
            m.pointee.part = u.part
            m.pointee.more_parts = u.moreParts ? 1 : 0
            m.pointee.inner_steps = u.innerSteps
            m.pointee.first_inner_step = u.firstInnerStep
            m.pointee.keeps_parameters = u.keepsParameters ? 1 : 0
            m.pointee.n_samples = u.samples.count
            m.pointee.samples = arena.sampleRanges(u.samples)
            m.pointee.n_evaluate = u.evaluate.count
            m.pointee.evaluate = arena.sampleRanges(u.evaluate)
            e.body_case = DDP__V1__ENVELOPE__BODY_PARAMETER_UPDATE
            e.parameter_update = m
        case .heldOutScores(let x):
            let m = arena.make(Ddp__V1__HeldOutScores.self, ddp__v1__held_out_scores__init)
            m.pointee.n_batches = x.batches.count
            m.pointee.batches = arena.sampleRanges(x.batches)
            m.pointee.n_loss_sums = x.lossSums.count
            m.pointee.loss_sums = arena.array(x.lossSums)
            m.pointee.n_correct = x.correct.count
            m.pointee.correct = arena.array(x.correct)
            e.body_case = DDP__V1__ENVELOPE__BODY_HELD_OUT_SCORES
            e.held_out_scores = m
        case .heartbeat(let h):
            let m = arena.make(Ddp__V1__Heartbeat.self, ddp__v1__heartbeat__init)
            m.pointee.sent_unix_ms = h.sentUnixMilliseconds
            m.pointee.state = arena.string(h.state)
            e.body_case = DDP__V1__ENVELOPE__BODY_HEARTBEAT
            e.heartbeat = m
        case .leave(let reason):
            let m = arena.make(Ddp__V1__Leave.self, ddp__v1__leave__init)
            m.pointee.reason = arena.string(reason)
            e.body_case = DDP__V1__ENVELOPE__BODY_LEAVE
            e.leave = m
        case .statusRequest(let detail):
            let m = arena.make(Ddp__V1__StatusRequest.self, ddp__v1__status_request__init)
            m.pointee.detail = detail ? 1 : 0
            e.body_case = DDP__V1__ENVELOPE__BODY_STATUS_REQUEST
            e.status_request = m
        case .statusReply(let s):
            let m = arena.make(Ddp__V1__StatusReply.self, ddp__v1__status_reply__init)
            m.pointee.job_state = arena.string(s.jobState)
            m.pointee.step = s.step
            m.pointee.total_steps = s.totalSteps
            m.pointee.epoch = s.epoch
            m.pointee.total_epochs = s.totalEpochs
            m.pointee.elapsed_seconds = s.elapsedSeconds
            m.pointee.train_loss = s.trainLoss
            m.pointee.test_loss = s.testLoss
            m.pointee.test_accuracy = s.testAccuracy
            m.pointee.samples_per_second = s.samplesPerSecond
            let workers: [UnsafeMutablePointer<Ddp__V1__WorkerStatus>?] = s.workers.map { w in
                let p = arena.make(Ddp__V1__WorkerStatus.self, ddp__v1__worker_status__init)
                p.pointee.rank = w.rank
                p.pointee.host = arena.string(w.host)
                p.pointee.pid = w.pid
                p.pointee.state = arena.string(w.state)
                p.pointee.step = w.step
                p.pointee.last_seen_ms_ago = w.lastSeenMillisecondsAgo
                p.pointee.last_step_seconds = w.lastStepSeconds
                p.pointee.lagging = w.lagging ? 1 : 0
                p.pointee.restarts = w.restarts
                p.pointee.gradient_norm = w.gradientNorm
                p.pointee.outlier_steps = w.outlierSteps
                p.pointee.samples_per_second = w.samplesPerSecond
                p.pointee.left_out_steps = w.leftOutSteps
                p.pointee.last_left_out_step = w.lastLeftOutStep
                return p
            }
            m.pointee.n_workers = workers.count
            m.pointee.workers = arena.array(workers)
            m.pointee.rejected_messages = s.rejectedMessages
            m.pointee.n_recent_losses = s.recentLosses.count
            m.pointee.recent_losses = arena.array(s.recentLosses)
            m.pointee.message = arena.string(s.message)
            m.pointee.n_coordinator_shards = s.coordinatorShards.count
            m.pointee.coordinator_shards = arena.array(s.coordinatorShards.map { Optional(arena.string($0)) })
            e.body_case = DDP__V1__ENVELOPE__BODY_STATUS_REPLY
            e.status_reply = m
        case .stop(let reason, let graceful):
            let m = arena.make(Ddp__V1__Stop.self, ddp__v1__stop__init)
            m.pointee.reason = arena.string(reason)
            m.pointee.graceful = graceful ? 1 : 0
            e.body_case = DDP__V1__ENVELOPE__BODY_STOP
            e.stop = m
        case .shard(let x):
            let m = arena.make(Ddp__V1__ShardMessage.self, ddp__v1__shard_message__init)
            m.pointee.kind = Ddp__V1__ShardMessage__Kind(rawValue: UInt32(bitPattern: x.kind.rawValue))
            m.pointee.shard = x.shard
            m.pointee.endpoint = arena.string(x.endpoint)
            m.pointee.job_spec_json = arena.string(x.jobSpecJSON)
            m.pointee.attempt = x.attempt
            m.pointee.n_ranks = x.ranks.count
            m.pointee.ranks = arena.array(x.ranks)
            m.pointee.n_worker_ids = x.workerIDs.count
            m.pointee.worker_ids = arena.array(x.workerIDs.map { Optional(arena.string($0)) })
            m.pointee.n_sample_counts = x.sampleCounts.count
            m.pointee.sample_counts = arena.array(x.sampleCounts)
            m.pointee.refused = arena.string(x.refused)
            m.pointee.learning_rate = x.learningRate
            m.pointee.apply_optimizer = x.applyOptimizer ? 1 : 0
            m.pointee.optimizer_steps = x.optimizerSteps
            m.pointee.with_state = x.withState ? 1 : 0
            m.pointee.finite = x.finite ? 1 : 0
            m.pointee.model_json = arena.string(x.modelJSON)
            m.pointee.sum_of_squares = x.sumOfSquares
            m.pointee.clip_scale = x.clipScale
            m.pointee.clip = x.clip ? 1 : 0
            m.pointee.keeps_parameters = x.keepsParameters ? 1 : 0
            e.body_case = DDP__V1__ENVELOPE__BODY_SHARD
            e.shard = m
        case .error(let r):
            let m = arena.make(Ddp__V1__ErrorReply.self, ddp__v1__error_reply__init)
            m.pointee.code = Ddp__V1__ErrorReply__Code(rawValue: UInt32(bitPattern: r.code.rawValue))
            m.pointee.reason = arena.string(r.reason)
            e.body_case = DDP__V1__ENVELOPE__BODY_ERROR
            e.error = m
        }
    }

    /// Decodes and validates `frames` (without a ROUTER's routing-id frame). `expectedJobID` nil
    /// accepts any job; an empty job id in a Join, StatusRequest, Stop or Heartbeat is always accepted.
    /// Tensors described as shared are read from `sharedMemory` (the segment the sender and this
    /// receiver agreed on); without one, such a descriptor is an error.
    public static func decode(
        _ frames: [Payload], expectedJobID: String? = nil, limits: DecodeLimits = .standard, sharedMemory: SharedSegment? = nil
    ) throws(WireError) -> WireMessage {
        guard let head = frames.first else { throw .emptyMessage }
        guard head.byteCount <= limits.maximumEnvelopeBytes else {
            throw .tooLarge(what: "envelope", bytes: head.byteCount, limit: limits.maximumEnvelopeBytes)
        }
        let unpacked = head.withUnsafeBytes { bytes in
            ddp__v1__envelope__unpack(nil, bytes.count, bytes.baseAddress?.assumingMemoryBound(to: UInt8.self))
        }
        guard let envelope = unpacked else { throw .malformedEnvelope(bytes: head.byteCount) }
        defer { ddp__v1__envelope__free_unpacked(envelope, nil) }
        let e = envelope.pointee

        guard e.protocol_version == wireProtocolVersion else { throw .versionMismatch(got: e.protocol_version) }
        let jobID = text(e.job_id)
        guard let body = try decodeBody(e) else { throw .missingBody }
        if let expectedJobID, jobID != expectedJobID {
            let anonymousAllowed: Bool
            switch body {
            case .join, .statusRequest, .stop, .heartbeat: anonymousAllowed = jobID.isEmpty
            case .welcome, .gradientPush, .parameterUpdate, .leave, .statusReply, .error, .shard, .heldOutScores: anonymousAllowed = false
            }
            if !anonymousAllowed { throw .wrongJob(expected: expectedJobID, got: jobID) }
        }
        guard e.n_tensors <= limits.maximumTensors else {
            throw .tooLarge(what: "\(e.n_tensors) tensor descriptors", bytes: 0, limit: limits.maximumTensors)
        }
        let framed = (0..<e.n_tensors).filter { e.tensors[$0]?.pointee.shared == 0 }.count
        guard framed == frames.count - 1 else {
            throw .frameCountMismatch(descriptors: framed, frames: frames.count - 1)
        }
        var tensors: [WireTensor] = []
        var nextFrame = 1
        var names = Set<String>()
        for index in 0..<e.n_tensors {
            guard let d = e.tensors[index]?.pointee else { throw .badDescriptor(index: index, reason: "missing") }
            let name = text(d.name)
            guard !name.isEmpty else { throw .badDescriptor(index: index, reason: "empty name") }
            guard names.insert(name).inserted else { throw .badDescriptor(index: index, reason: "duplicate name '\(name)'") }
            guard let dtype = DType(c: d.dtype) else {
                throw .badDescriptor(index: index, reason: "unknown dtype \(d.dtype.rawValue) for '\(name)'")
            }
            var shape: [Int] = []
            var elements = 1
            for i in 0..<d.n_shape {
                let dim = d.shape[i]
                guard dim <= UInt64(limits.maximumTensorBytes) else {
                    throw .badDescriptor(index: index, reason: "dimension \(dim) of '\(name)' is too large")
                }
                let (product, overflow) = elements.multipliedReportingOverflow(by: Int(dim))
                guard !overflow, product <= limits.maximumTensorBytes else {
                    throw .tooLarge(what: "tensor '\(name)'", bytes: Int.max, limit: limits.maximumTensorBytes)
                }
                elements = product
                shape.append(Int(dim))
            }
            var slice: Range<Int>?
            if d.slice_offset != 0 || d.slice_count != 0 {
                guard d.slice_count > 0, d.slice_offset < UInt64(elements), d.slice_count <= UInt64(elements) - d.slice_offset else {
                    throw .badDescriptor(index: index, reason: "'\(name)' slice of \(d.slice_count) elements from \(d.slice_offset) is not inside shape \(shape)")
                }
                slice = Int(d.slice_offset)..<Int(d.slice_offset + d.slice_count)
            }
            let expected = (slice?.count ?? elements) * dtype.size
            guard expected <= limits.maximumTensorBytes else {
                throw .tooLarge(what: "tensor '\(name)'", bytes: expected, limit: limits.maximumTensorBytes)
            }
            guard d.byte_length == UInt64(expected) else {
                let what = slice.map { "\($0.count) elements of shape \(shape)" } ?? "shape \(shape)"
                throw .badDescriptor(index: index, reason: "'\(name)' declares \(d.byte_length) bytes, \(what) of \(dtype) needs \(expected)")
            }
            let frame: Payload
            if d.shared != 0 {
                guard let sharedMemory else {
                    throw .badDescriptor(index: index, reason: "'\(name)' is in shared memory, but none is mapped for this peer")
                }
                guard d.shared_offset <= UInt64(Int.max), let region = sharedMemory.region(offset: Int(d.shared_offset), count: expected) else {
                    throw .badDescriptor(index: index, reason: "'\(name)' at shared offset \(d.shared_offset) (\(expected) bytes) lies outside the "
                                         + "\(sharedMemory.byteCount)-byte segment or is not 4-byte aligned")
                }
                frame = region
            } else {
                frame = frames[nextFrame]
                nextFrame += 1
            }
            guard frame.byteCount == expected else {
                throw .byteLengthMismatch(tensor: name, expected: expected, got: frame.byteCount)
            }
            if limits.requireFinite, let bad = TensorEncoding.firstNonFinite(frame, dtype: dtype) {
                throw .nonFinite(tensor: name, element: bad + (slice?.lowerBound ?? 0))
            }
            tensors.append(WireTensor(name: name, shape: shape, dtype: dtype, payload: frame, slice: slice))
        }
        return WireMessage(jobID: jobID, step: e.step, rank: e.rank, body: body, tensors: tensors)
    }

    private static func decodeBody(_ e: Ddp__V1__Envelope) throws(WireError) -> WireMessage.Body? {
        switch e.body_case {
        case DDP__V1__ENVELOPE__BODY_JOIN:
            guard let m = e.join?.pointee else { return nil }
            var join = Join(
                workerID: text(m.worker_id), host: text(m.host), pid: m.pid,
                modelFingerprint: text(m.model_fingerprint), requestedRank: m.requested_rank)
            join.protocolVersion = e.protocol_version
            join.rankToken = Array(UnsafeBufferPointer(start: m.rank_token.data, count: m.rank_token.len))
            join.sampleCount = m.sample_count
            join.modelJSON = text(m.model_json)
            if let path = m.shared_memory_path, path.pointee != 0 {
                join.sharedMemory = SharedMemoryOffer(
                    path: text(path), nonce: Array(UnsafeBufferPointer(start: m.shared_memory_nonce.data, count: m.shared_memory_nonce.len)),
                    byteCount: Int(clamping: m.shared_memory_bytes), updateOffset: Int(clamping: m.shared_update_offset))
            }
            return .join(join)
        case DDP__V1__ENVELOPE__BODY_WELCOME:
            guard let m = e.welcome?.pointee else { return nil }
            var welcome = Welcome(
                rank: m.rank, worldSize: m.world_size, jobSpecJSON: text(m.job_spec_json), startStep: m.start_step,
                epoch: m.epoch, heartbeatIntervalMilliseconds: m.heartbeat_interval_ms,
                heartbeatTimeoutMilliseconds: m.heartbeat_timeout_ms, sharedMemory: m.shared_memory != 0)
            welcome.shardEndpoints = (0..<m.n_shard_endpoints).map { text(m.shard_endpoints[$0]) }
            welcome.rankToken = Array(UnsafeBufferPointer(start: m.rank_token.data, count: m.rank_token.len))
            return .welcome(welcome)
        case DDP__V1__ENVELOPE__BODY_SHARD:
            guard let m = e.shard?.pointee else { return nil }
            guard let kind = ShardMessage.Kind(rawValue: Int32(bitPattern: m.kind.rawValue)) else { return nil }
            var x = ShardMessage(kind)
            x.shard = m.shard
            x.endpoint = text(m.endpoint)
            x.jobSpecJSON = text(m.job_spec_json)
            x.attempt = m.attempt
            x.ranks = Array(UnsafeBufferPointer(start: m.ranks, count: m.n_ranks))
            x.workerIDs = (0..<m.n_worker_ids).map { text(m.worker_ids[$0]) }
            x.sampleCounts = Array(UnsafeBufferPointer(start: m.sample_counts, count: m.n_sample_counts))
            x.refused = text(m.refused)
            x.learningRate = m.learning_rate
            x.applyOptimizer = m.apply_optimizer != 0
            x.optimizerSteps = m.optimizer_steps
            x.withState = m.with_state != 0
            x.finite = m.finite != 0
            x.modelJSON = text(m.model_json)
            x.sumOfSquares = m.sum_of_squares
            x.clipScale = m.clip_scale
            x.clip = m.clip != 0
            x.keepsParameters = m.keeps_parameters != 0
            return .shard(x)
        case DDP__V1__ENVELOPE__BODY_GRADIENT_PUSH:
            guard let m = e.gradient_push?.pointee else { return nil }
            return .gradientPush(GradientPush(
                sampleCount: m.sample_count, localLoss: m.local_loss, localCorrect: m.local_correct,
                computeSeconds: m.compute_seconds, attempt: m.attempt, part: m.part, moreParts: m.more_parts != 0))
        case DDP__V1__ENVELOPE__BODY_PARAMETER_UPDATE:
            guard let m = e.parameter_update?.pointee else { return nil }
            let samples = sampleRanges(m.samples, m.n_samples)
            var update = ParameterUpdate(
                learningRate: m.learning_rate, fullCopy: m.full_copy != 0, epoch: m.epoch, worldSize: m.world_size,
                trainLoss: m.train_loss, attempt: m.attempt, part: m.part, moreParts: m.more_parts != 0, samples: samples,
                innerSteps: m.inner_steps, firstInnerStep: m.first_inner_step, keepsParameters: m.keeps_parameters != 0)
            update.evaluate = sampleRanges(m.evaluate, m.n_evaluate)
            return .parameterUpdate(update)
        case DDP__V1__ENVELOPE__BODY_HELD_OUT_SCORES:
            guard let m = e.held_out_scores?.pointee else { return nil }
            return .heldOutScores(HeldOutScores(batches: sampleRanges(m.batches, m.n_batches),
                                          lossSums: Array(UnsafeBufferPointer(start: m.loss_sums, count: m.n_loss_sums)),
                                          correct: Array(UnsafeBufferPointer(start: m.correct, count: m.n_correct))))
        case DDP__V1__ENVELOPE__BODY_HEARTBEAT:
            guard let m = e.heartbeat?.pointee else { return nil }
            return .heartbeat(Heartbeat(sentUnixMilliseconds: m.sent_unix_ms, state: text(m.state)))
        case DDP__V1__ENVELOPE__BODY_LEAVE:
            guard let m = e.leave?.pointee else { return nil }
            return .leave(reason: text(m.reason))
        case DDP__V1__ENVELOPE__BODY_STATUS_REQUEST:
            guard let m = e.status_request?.pointee else { return nil }
            return .statusRequest(detail: m.detail != 0)
        case DDP__V1__ENVELOPE__BODY_STATUS_REPLY:
            guard let m = e.status_reply?.pointee else { return nil }
            let workers = (0..<m.n_workers).compactMap { i -> WorkerStatus? in
                guard let w = m.workers[i]?.pointee else { return nil }
                return WorkerStatus(
                    rank: w.rank, host: text(w.host), pid: w.pid, state: text(w.state), step: w.step,
                    lastSeenMillisecondsAgo: w.last_seen_ms_ago, lastStepSeconds: w.last_step_seconds,
                    lagging: w.lagging != 0, restarts: w.restarts, gradientNorm: w.gradient_norm, outlierSteps: w.outlier_steps,
                    samplesPerSecond: w.samples_per_second, leftOutSteps: w.left_out_steps, lastLeftOutStep: w.last_left_out_step)
            }
            var reply = StatusReply(
                jobState: text(m.job_state), step: m.step, totalSteps: m.total_steps, epoch: m.epoch,
                totalEpochs: m.total_epochs, elapsedSeconds: m.elapsed_seconds, trainLoss: m.train_loss,
                testLoss: m.test_loss, testAccuracy: m.test_accuracy, samplesPerSecond: m.samples_per_second,
                workers: workers, rejectedMessages: m.rejected_messages,
                recentLosses: Array(UnsafeBufferPointer(start: m.recent_losses, count: m.n_recent_losses)),
                message: text(m.message))
            reply.coordinatorShards = (0..<m.n_coordinator_shards).map { text(m.coordinator_shards[$0]) }
            return .statusReply(reply)
        case DDP__V1__ENVELOPE__BODY_STOP:
            guard let m = e.stop?.pointee else { return nil }
            return .stop(reason: text(m.reason), graceful: m.graceful != 0)
        case DDP__V1__ENVELOPE__BODY_ERROR:
            guard let m = e.error?.pointee else { return nil }
            return .error(ErrorReply(code: ErrorReply.Code(rawValue: Int32(bitPattern: m.code.rawValue)) ?? .unspecified,
                                     reason: text(m.reason)))
        default:
            return nil
        }
    }

    /// A C string from protobuf-c as Swift text; invalid UTF-8 is repaired, never trusted.
    private static func text(_ p: UnsafeMutablePointer<CChar>?) -> String {
        guard let p else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: strlen(p)), as: UTF8.self)
    }

    private static func sampleRanges(_ ranges: UnsafeMutablePointer<UnsafeMutablePointer<Ddp__V1__SampleRange>?>?, _ count: Int) -> [SampleRange] {
        (0..<count).compactMap { i in ranges?[i].map { SampleRange(start: $0.pointee.start, count: $0.pointee.count) } }
    }
}

extension DType {
    fileprivate var c: Ddp__V1__DType {
        switch self {
        case .f32: DDP__V1__DTYPE__F32
        case .f16: DDP__V1__DTYPE__F16
        case .bf16: DDP__V1__DTYPE__BF16
        }
    }

    fileprivate init?(c: Ddp__V1__DType) {
        switch c {
        case DDP__V1__DTYPE__F32: self = .f32
        case DDP__V1__DTYPE__F16: self = .f16
        case DDP__V1__DTYPE__BF16: self = .bf16
        default: return nil
        }
    }
}

/// C memory for one protobuf-c pack: strings, arrays and messages, all freed together.
private final class CArena {
    private var allocations: [UnsafeMutableRawPointer] = []

    func string(_ s: String) -> UnsafeMutablePointer<CChar> {
        let p = strdup(s)!
        allocations.append(UnsafeMutableRawPointer(p))
        return p
    }

    func array<T>(_ values: [T]) -> UnsafeMutablePointer<T> {
        let p = UnsafeMutablePointer<T>.allocate(capacity: max(values.count, 1))
        p.initialize(from: values, count: values.count)
        allocations.append(UnsafeMutableRawPointer(p))
        return p
    }

    func sampleRanges(_ ranges: [SampleRange]) -> UnsafeMutablePointer<UnsafeMutablePointer<Ddp__V1__SampleRange>?> {
        array(ranges.map { range -> UnsafeMutablePointer<Ddp__V1__SampleRange>? in
            let r = make(Ddp__V1__SampleRange.self, ddp__v1__sample_range__init)
            r.pointee.start = range.start
            r.pointee.count = range.count
            return r
        })
    }

    func make<T>(_ type: T.Type, _ initialize: (UnsafeMutablePointer<T>?) -> Void) -> UnsafeMutablePointer<T> {
        let p = UnsafeMutablePointer<T>.allocate(capacity: 1)
        initialize(p)
        allocations.append(UnsafeMutableRawPointer(p))
        return p
    }

    func free() {
        for p in allocations { Foundation.free(p) }
        allocations.removeAll()
    }
}
