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
    /// Which shard owns which elements of each parameter; the parameters this shard averages and steps a
    /// part of, and that part of each (empty where it owns none).
    let plan: ShardPlan
    let shard: Int
    let owned: [Int]
    let ownedRange: [Range<Int>]
    let indexOfParameter: [String: Int]
    /// Which tensors are buffers (batch norm's running statistics): their "gradient" is each worker's
    /// value, and the step sets them to the sample-weighted mean instead of optimizing them.
    let isBuffer: [Bool]
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
        let plan = ShardPlan(elementCounts: parameters.map(\.tensor.count), shards: shards)
        self.plan = plan
        self.shard = shard
        owned = plan.indices(of: shard)
        let ownedRange = parameters.indices.map { plan.range(of: $0, in: shard) }
        self.ownedRange = ownedRange
        gradients = parameters.map { Tensor.zeros($0.tensor.shape) }
        for (p, g) in zip(parameters, gradients) { p.tensor.grad = g }
        parameterPayloads = ownedRange.map { Payload(byteCount: $0.count * 4) }
        self.wireType = wireType
        replica = wireType == .f32 ? nil : parameters.map { $0.tensor.detached() }
        deltaPayloads = wireType == .f32 ? [] : ownedRange.map { Payload(byteCount: $0.count * wireType.size) }
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
    /// the right shape and slice (this shard's elements of it), element type `dtype`. (Completeness is
    /// checked on the last part; finite values on the average, and only a non-finite average is traced to
    /// its senders.)
    func validate(_ tensors: [WireTensor], alreadyReceived: [Payload?], dtype: DType) -> String? {
        for tensor in tensors {
            guard let index = indexOfParameter[tensor.name] else { return "unknown tensor '\(tensor.name)'" }
            let mine = ownedRange[index]
            guard !mine.isEmpty else { return "tensor '\(tensor.name)' belongs to coordinator shard \(plan.owners(of: index).map(String.init).joined(separator: ", "))" }
            guard alreadyReceived[index] == nil else { return "tensor '\(tensor.name)' sent twice" }
            let expected = parameters[index].tensor.shape
            guard tensor.shape == expected else { return "tensor '\(tensor.name)' has shape \(tensor.shape), expected \(expected)" }
            guard tensor.elements == mine else { return "tensor '\(tensor.name)' holds elements \(tensor.elements), this coordinator shard owns \(mine)" }
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
                let range = ownedRange[index]
                let finite = gradients[index].withUnsafeMutableBufferPointer {
                    WeightedMean.write(terms, wire: wireType, into: UnsafeMutableBufferPointer(rebasing: $0[range]), scratch: scratch)
                }
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
                let range = ownedRange[index]
                return gradients[index].withUnsafeMutableBufferPointer { mean in
                    WeightedMean.writeInParallel(terms, wire: wireType, into: UnsafeMutableBufferPointer(rebasing: mean[range]), scratch: scratch)
                } && finite
            }
        }
    }

    /// The sum of squares (in Double, element by element in parameter order, as `clipGradientNorm` sums)
    /// of this shard's averaged gradients of trained parameters: its part of the global norm for clipping.
    func sumOfSquares() -> Double {
        owned.filter { !isBuffer[$0] }.reduce(0.0) { total, index in
            gradients[index].withUnsafeBufferPointer { UnsafeBufferPointer(rebasing: $0[ownedRange[index]]).reduce(total) { $0 + Double($1) * Double($1) } }
        }
    }

    /// Scales this shard's averaged gradients of trained parameters by `scale` (clipping by the global norm).
    func scaleGradients(by scale: Float) {
        for index in owned where !isBuffer[index] {
            gradients[index].withUnsafeMutableBufferPointer { g in for i in ownedRange[index] { g[i] *= scale } }
        }
    }

    /// The first NaN or infinite element of each contribution that holds one, by rank: (tensor, element).
    func nonFinite(_ used: [Contribution]) -> [Int32: (tensor: String, element: Int)] {
        var bad: [Int32: (String, Int)] = [:]
        for c in used where !c.wasRefused {
            for index in owned {
                if let element = TensorEncoding.firstNonFinite(c.gradients[index]!, dtype: c.dtype, roundedTo: wireType) {
                    bad[c.rank] = (parameters[index].name, ownedRange[index].lowerBound + element)
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
            let mine = ownedRange[index], first = mine.lowerBound
            let shared = updateTargets.shared.map { $0.update(index, elements: 0..<p.tensor.count) }
            let frame = updateTargets.frames || shared.isEmpty ? reusablePayload(index, byteCount: mine.count * wireType.size) : nil
            let isBuffer = isBuffer[index]
            if applyOptimizer && !isBuffer { optimizer.update(p, range: 0..<0) }  // creates its state before threads share it
            p.tensor.withUnsafeBufferPointer { master in withReplica(index) { held in
                ParallelChunks.forEach(count: mine.count, chunk: Self.chunk) { chunk, _ in
                    let range = (first + chunk.lowerBound)..<(first + chunk.upperBound), start = range.lowerBound
                    if applyOptimizer && isBuffer {  // a buffer takes the workers' mean value
                        p.tensor.grad!.withUnsafeBufferPointer { mean in
                            UnsafeMutablePointer(mutating: master.baseAddress! + start).update(from: mean.baseAddress! + start, count: range.count)
                        }
                    } else if applyOptimizer { optimizer.update(p, range: range) }
                    let values: UnsafeBufferPointer<Float>  // what the workers hold from now on
                    if let held {  // the replica moves by the rounded change, as a worker decoding it does
                        TensorEncoding.advance(held.baseAddress! + start, toward: master.baseAddress! + start, count: range.count,
                                               dtype: wireType, encodingInto: frame, at: start - first)
                        values = UnsafeBufferPointer(rebasing: held[range])
                    } else {
                        values = UnsafeBufferPointer(rebasing: master[range])
                        if let frame { TensorEncoding.write(values, as: .f32, into: frame, at: start - first) }
                    }
                    for target in shared { TensorEncoding.write(values, as: .f32, into: target, at: start) }  // in cache
                }
            } }
            bucket.append(index)
            bucketBytes += mine.count * wireType.size
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

    /// The tensor (or this shard's slice of it) of parameter `index` for an update in frames: the f32
    /// values, or the half-precision change (as `stepAndEncode` last wrote them).
    func updateFrame(_ index: Int) -> WireTensor {
        let p = parameters[index]
        return WireTensor(name: p.name, shape: p.tensor.shape, dtype: wireType, payload: (replica == nil ? parameterPayloads : deltaPayloads)[index],
                          slice: slice(index))
    }

    /// This shard's elements of parameter `index` as a wire slice: nil when it owns the whole tensor.
    func slice(_ index: Int) -> Range<Int>? { plan.slice(of: index, in: shard) }

    /// The parameters the workers should hold (the replica with a half-precision wire), whole, as f32
    /// wire tensors (for a Welcome).
    func parameterTensors() -> [WireTensor] {
        parameters.enumerated().map { index, p in
            WireTensor(name: p.name, shape: p.tensor.shape, payload: Payload(floats: (replica?[index] ?? p.tensor).scalars))
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
    /// "replica/NAME" and "optimizer/PARAMETER.SLOT". With `sliced` (a follower's SNAPSHOT_REPLY) each is
    /// this shard's slice of the tensor; otherwise whole (the leader's ASSIGN).
    func shardTensors(_ indices: [Int], withState: Bool, sliced: Bool) -> [WireTensor] {
        func tensor(_ name: String, _ t: Tensor, of index: Int) -> WireTensor {
            let part = sliced && t.count == parameters[index].tensor.count ? slice(index) : nil
            let values = t.withUnsafeBufferPointer { Array($0[part ?? 0..<t.count]) }
            return WireTensor(name: name, shape: t.shape, payload: Payload(floats: values), slice: part)
        }
        var tensors: [WireTensor] = []
        for i in indices {
            tensors.append(tensor(parameters[i].name, parameters[i].tensor, of: i))
            if let held = replica?[i] { tensors.append(tensor("replica/" + parameters[i].name, held, of: i)) }
        }
        guard withState else { return tensors }
        for slot in optimizer.state {
            guard let i = indices.first(where: { slot.name.hasPrefix(parameters[$0].name + ".") }) else { continue }
            tensors.append(tensor("optimizer/" + slot.name, slot.tensor, of: i))
        }
        return tensors
    }

    /// Loads tensors named as `shardTensors` names them into the parameters (and replica) of `shard`, and
    /// the optimizer state they carry into `state` (a slice over what `state` or the optimizer holds of it
    /// so far): with `sliced` (a follower's SNAPSHOT_REPLY) each must be exactly `shard`'s elements of
    /// its tensor, otherwise (an ASSIGN) whole. Returns the first tensor that is not (with its shape),
    /// which is left alone.
    func load(shardTensors tensors: [WireTensor], of shard: Int, sliced: Bool, state: inout [String: Tensor]) -> WireTensor? {
        var foreign: WireTensor?
        func write(_ tensor: WireTensor, into target: Tensor) {
            let values = TensorEncoding.floats(tensor.payload)
            target.withUnsafeMutableBufferPointer { dst in (dst.baseAddress! + tensor.elements.lowerBound).update(from: values, count: values.count) }
        }
        /// Whether `tensor` holds the elements of parameter `index` that this load takes.
        func expected(_ tensor: WireTensor, of index: Int) -> Bool {
            let mine = plan.range(of: index, in: shard)
            return !mine.isEmpty && (sliced ? tensor.elements == mine : tensor.slice == nil)
        }
        for tensor in tensors {
            if tensor.name.hasPrefix("optimizer/") {
                let name = String(tensor.name.dropFirst("optimizer/".count))
                let whole = state[name] ?? optimizer.state.first { $0.name == name }?.tensor.detached() ?? Tensor.zeros(tensor.shape)
                let owner = parameters.indices.first { name.hasPrefix(parameters[$0].name + ".") }
                guard whole.shape == tensor.shape, let owner, tensor.elementCount != parameters[owner].tensor.count || expected(tensor, of: owner) else {
                    foreign = foreign ?? tensor
                    continue
                }
                write(tensor, into: whole)
                state[name] = whole
                continue
            }
            let isReplica = tensor.name.hasPrefix("replica/")
            guard let i = indexOfParameter[isReplica ? String(tensor.name.dropFirst("replica/".count)) : tensor.name],
                  parameters[i].tensor.shape == tensor.shape, expected(tensor, of: i) else {
                foreign = foreign ?? tensor
                continue
            }
            if let target = isReplica ? replica?[i] : parameters[i].tensor { write(tensor, into: target) }
        }
        return foreign
    }
}
