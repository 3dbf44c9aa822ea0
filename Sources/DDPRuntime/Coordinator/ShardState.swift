import Autodiff
import DDPWire
import Foundation
import Logging

/// A coordinator shard's tensors: the master parameters it owns, their averaged gradients, the
/// optimizer and its state, the replica every worker holds with a half-precision wire, and the payloads
/// the updates leave in. Leader and follower shards share it; it knows nothing of workers or sockets.
final class ShardState {
    let parameters: [NamedParameter]
    let gradients: [Tensor]
    let optimizer: any Optimizer
    /// Which shard owns each parameter, and the ones this shard averages and steps.
    let plan: ShardPlan
    let owned: [Int]
    let isOwned: [Bool]
    let indexOfParameter: [String: Int]
    /// Which tensors are buffers (batch norm's running statistics): their "gradient" is each worker's
    /// value, and the step sets them to the sample-weighted mean instead of optimizing them.
    let isBuffer: [Bool]
    /// The trained parameters (not the buffers), for the optimizer and gradient clipping.
    var trainedParameters: [NamedParameter] { zip(parameters, isBuffer).filter { !$1 }.map(\.0) }
    /// How tensors travel, and with a half-precision type the parameters every worker holds (the sum of
    /// the rounded changes sent so far), from which the next change is measured.
    let wireType: DType
    let replica: [Tensor]?
    private var parameterPayloads: [Payload]
    private var deltaPayloads: [Payload]
    /// Elements per chunk when averaging, stepping and encoding, so that what one chunk touches stays in
    /// cache between the passes over it.
    static let chunk = WeightedMean.chunk
    /// Room for a chunk of converted values per thread of `ParallelChunks`.
    private let scratch = Tensor.zeros([ShardState.chunk * ParallelChunks.threads])
    /// Where the update being encoded goes: the frame payloads (for workers without shared memory), and
    /// the segments of the live workers with it.
    var updateTargets: (frames: Bool, shared: [SharedArea]) = (true, [])

    init(parameters: [NamedParameter], buffers: Set<String> = [], optimizer: any Optimizer, shards: Int, shard: Int, wireType: DType) {
        self.parameters = parameters
        isBuffer = parameters.map { buffers.contains($0.name) }
        self.optimizer = optimizer
        plan = ShardPlan(elementCounts: parameters.map(\.tensor.count), shards: shards)
        owned = plan.indices(of: shard)
        isOwned = plan.owner.map { $0 == shard }
        gradients = parameters.map { Tensor.zeros($0.tensor.shape) }
        for (p, g) in zip(parameters, gradients) { p.tensor.grad = g }
        parameterPayloads = parameters.map { Payload(byteCount: $0.tensor.count * 4) }
        self.wireType = wireType
        replica = wireType == .f32 ? nil : parameters.map { $0.tensor.detached() }
        deltaPayloads = wireType == .f32 ? [] : parameters.map { Payload(byteCount: $0.tensor.count * wireType.size) }
        indexOfParameter = Dictionary(uniqueKeysWithValues: parameters.enumerated().map { ($1.name, $0) })
    }

    /// Loads a checkpoint's parameters and optimizer state (the replica follows the parameters).
    func restore(_ checkpoint: Checkpoint) throws {
        for p in parameters {
            guard let saved = checkpoint.parameters[p.name], saved.shape == p.tensor.shape else {
                throw SafeTensorsError.invalid(checkpoint.path, "parameter '\(p.name)' is missing or has another shape")
            }
            p.tensor.assign(saved)
        }
        try optimizer.restoreState(checkpoint.optimizerState)
        optimizer.stepCount = checkpoint.optimizerSteps
        for (r, p) in zip(replica ?? [], parameters) { r.assign(p.tensor) }
    }

    /// Why (a part of) a gradient cannot be used, or nil: known parameters of this shard not sent before,
    /// the right shape, element type `dtype`. (Completeness is checked on the last part; finite values on
    /// the average, and only a non-finite average is traced to its senders.)
    func validate(_ tensors: [WireTensor], alreadyReceived: [Payload?], dtype: DType) -> String? {
        for tensor in tensors {
            guard let index = indexOfParameter[tensor.name] else { return "unknown tensor '\(tensor.name)'" }
            guard isOwned[index] else { return "tensor '\(tensor.name)' belongs to coordinator shard \(plan.owner[index])" }
            guard alreadyReceived[index] == nil else { return "tensor '\(tensor.name)' sent twice" }
            let expected = parameters[index].tensor.shape
            guard tensor.shape == expected else { return "tensor '\(tensor.name)' has shape \(tensor.shape), expected \(expected)" }
            guard tensor.dtype == dtype else { return "tensor '\(tensor.name)' is \(tensor.dtype.rawValue), this worker's pushes are \(dtype.rawValue)" }
        }
        return nil
    }

    /// Maps the segment a joining worker offers when it has room for f32 updates of every parameter;
    /// nil (tensors then travel in frames) otherwise, with the reason logged.
    func mapSharedMemory(_ offer: SharedMemoryOffer, log: Logger) -> SharedArea? {
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

    /// Averages the tensors `indices` whose pushes are all in, over `basis` (see
    /// `StepRound.earlyAverageBasis`), so that the sum overlaps the rest of the pushes.
    func averageEarly(_ indices: [Int], round: inout StepRound, basis: (ranks: [Int32], counts: [UInt64]), dtype: (Int32) -> DType) {
        let samples = basis.counts.reduce(0, +)
        guard samples > 0 else { return }
        scratch.withUnsafeMutableBufferPointer { scratch in
            nextTensor: for index in indices where !round.early.averaged[index] {
                var terms: [WeightedMean.Term] = []
                for (rank, count) in zip(basis.ranks, basis.counts) where count > 0 {
                    guard let payload = round.sent(by: rank, index) else { continue nextTensor }  // not every worker sent it yet
                    terms.append((Float(count) / Float(samples), payload, dtype(rank)))
                }
                let finite = gradients[index].withUnsafeMutableBufferPointer { WeightedMean.write(terms, wire: wireType, into: $0, scratch: scratch) }
                round.early.averaged[index] = true
                round.early.finite = round.early.finite && finite
            }
        }
    }

    /// Writes the sample-weighted mean of the contributions into the gradients of this shard's tensors,
    /// summing in rank order (so that the result does not depend on arrival order), chunk by chunk;
    /// returns whether every element of the mean is finite.
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

    /// The first NaN or infinite element of each contribution that holds one, by rank: (tensor, element).
    func nonFinite(_ used: [Contribution]) -> [Int32: (tensor: String, element: Int)] {
        var bad: [Int32: (String, Int)] = [:]
        for c in used where !c.wasRefused {
            for index in owned {
                if let element = TensorEncoding.firstNonFinite(c.gradients[index]!, dtype: c.dtype, roundedTo: wireType) {
                    bad[c.rank] = (parameters[index].name, element)
                    break
                }
            }
        }
        return bad
    }

    /// The estimated L2 norm of each contribution over this shard's tensors (0 for a refused one).
    func gradientNorms(_ used: [Contribution]) -> [Double] {
        used.map { c in
            c.wasRefused ? 0 : owned.filter { !isBuffer[$0] }.reduce(0.0) { $0 + TensorEncoding.sampledSumOfSquares(c.gradients[$1]!, dtype: c.dtype) }.squareRoot()
        }
    }

    /// Applies the optimizer (when asked) and encodes the update for the workers, chunk by chunk so that
    /// each chunk is stepped and encoded while it is in cache: the f32 parameters, or with a half-precision
    /// wire the change from the replica rounded to the wire type (the replica moving by exactly that
    /// rounded change, as every worker moves its copy). The update goes to `updateTargets`: encoded into
    /// the frame payloads (those still being sent are replaced), and as f32 values (the parameters, or the
    /// replica) into each sharing worker's segment, where they are that worker's parameters. Hands the
    /// parameter indices to `emit` in buckets of about `bucketKB` as they are done (`last` true for the
    /// final one).
    func stepAndEncode(applyOptimizer: Bool, bucketKB: Int, emit: (_ indices: [Int], _ last: Bool) -> Void) {
        if applyOptimizer { optimizer.beginStep() }
        if owned.isEmpty { emit([], true) }
        var bucket: [Int] = [], bucketBytes = 0
        for index in owned {
            let p = parameters[index]
            let count = p.tensor.count
            let shared = updateTargets.shared.map { $0.update(index, byteCount: count * 4) }
            let frame = updateTargets.frames || shared.isEmpty ? reusablePayload(index, byteCount: count * wireType.size) : nil
            let isBuffer = isBuffer[index]
            if applyOptimizer && !isBuffer { optimizer.update(p, range: 0..<0) }  // creates its state before threads share it
            p.tensor.withUnsafeBufferPointer { master in withReplica(index) { held in
                ParallelChunks.forEach(count: count, chunk: Self.chunk) { range, _ in
                    let start = range.lowerBound
                    if applyOptimizer && isBuffer {  // a buffer takes the workers' mean value
                        p.tensor.grad!.withUnsafeBufferPointer { mean in
                            UnsafeMutablePointer(mutating: master.baseAddress! + start).update(from: mean.baseAddress! + start, count: range.count)
                        }
                    } else if applyOptimizer { optimizer.update(p, range: range) }
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
            if last || (bucketKB > 0 && bucketBytes >= bucketKB * 1024) {
                emit(bucket, last)
                bucket = []
                bucketBytes = 0
            }
        }
    }

    /// Calls `body` with the storage of parameter `index`'s replica, or nil with an f32 wire.
    private func withReplica<R>(_ index: Int, _ body: (UnsafeMutableBufferPointer<Float>?) -> R) -> R {
        guard let replica else { return body(nil) }
        return replica[index].withUnsafeMutableBufferPointer { body($0) }
    }

    /// The tensor of parameter `index` for an update in frames: the f32 values, or the half-precision
    /// change (as `stepAndEncode` last wrote them).
    func updateFrame(_ index: Int) -> WireTensor {
        let p = parameters[index]
        return WireTensor(name: p.name, shape: p.tensor.shape, dtype: wireType, payload: (replica == nil ? parameterPayloads : deltaPayloads)[index])
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
    private func reusablePayload(_ index: Int, byteCount: Int) -> Payload {
        if replica == nil {
            if parameterPayloads[index].isInFlight { parameterPayloads[index] = Payload(byteCount: byteCount) }
            return parameterPayloads[index]
        }
        if deltaPayloads[index].isInFlight { deltaPayloads[index] = Payload(byteCount: byteCount) }
        return deltaPayloads[index]
    }

    // MARK: Tensors between shards

    /// The values of parameters `indices`, their replica with a half-precision wire and, with
    /// `withState`, their optimizer state, as ASSIGN and SNAPSHOT_REPLY carry them: "NAME",
    /// "replica/NAME" and "optimizer/PARAMETER.SLOT".
    func shardTensors(_ indices: [Int], withState: Bool) -> [WireTensor] {
        func tensor(_ name: String, _ t: Tensor) -> WireTensor { WireTensor(name: name, shape: t.shape, payload: Payload(floats: t.scalars)) }
        var tensors: [WireTensor] = []
        for i in indices {
            tensors.append(tensor(parameters[i].name, parameters[i].tensor))
            if let held = replica?[i] { tensors.append(tensor("replica/" + parameters[i].name, held)) }
        }
        guard withState else { return tensors }
        let names = Set(indices.map { parameters[$0].name })
        for slot in optimizer.state where names.contains(where: { slot.name.hasPrefix($0 + ".") }) {
            tensors.append(tensor("optimizer/" + slot.name, slot.tensor))
        }
        return tensors
    }

    /// Loads tensors named as `shardTensors` names them into the parameters (and replica) of `shard`;
    /// returns the optimizer state they carry, and the first tensor that is not one of that shard's (with
    /// its shape), which is left alone.
    func load(shardTensors tensors: [WireTensor], of shard: Int) -> (state: [String: Tensor], foreign: WireTensor?) {
        var state: [String: Tensor] = [:], foreign: WireTensor?
        for tensor in tensors {
            let values = Tensor(shape: tensor.shape, values: TensorEncoding.floats(tensor.payload))
            if tensor.name.hasPrefix("optimizer/") {
                state[String(tensor.name.dropFirst("optimizer/".count))] = values
                continue
            }
            let isReplica = tensor.name.hasPrefix("replica/")
            guard let i = indexOfParameter[isReplica ? String(tensor.name.dropFirst("replica/".count)) : tensor.name],
                  plan.owner[i] == shard, parameters[i].tensor.shape == tensor.shape else {
                foreign = foreign ?? tensor
                continue
            }
            (isReplica ? replica?[i] : parameters[i].tensor)?.assign(values)
        }
        return (state, foreign)
    }
}
