import DDPWire

/// The sample-weighted mean of several workers' gradients for one tensor, summed in the order given
/// (rank order, so that the result does not depend on arrival order) and chunk by chunk, so that a
/// chunk of the mean stays in cache while every contribution is added to it.
enum WeightedMean {
    /// Elements per chunk: 16 K floats, 64 KB a stream.
    static let chunk = 16_384

    /// One worker's values: its weight, and its payload of `dtype`.
    typealias Term = (weight: Float, payload: Payload, dtype: DType)

    /// Writes the sum of `weight * values` over `terms` into `mean` (zeros when there are none), decoding
    /// through `scratch` (at least `chunk` floats); f32 terms of a job whose wire type is `wire` (f16, bf16)
    /// are rounded to it first, as if they had been sent as it. Returns whether every element is finite.
    /// With `elements`, only that range of the tensor is written.
    static func write(
        _ terms: [Term], wire: DType, into mean: UnsafeMutableBufferPointer<Float>,
        elements: Range<Int>? = nil, scratch: UnsafeMutableBufferPointer<Float>
    ) -> Bool {
        var exponentOverflow: UInt32 = 0  // bit 31 is set by an element whose exponent bits are all ones
        let elements = elements ?? 0..<mean.count
        for start in stride(from: elements.lowerBound, to: elements.upperBound, by: chunk) {
            let range = start..<min(start + chunk, elements.upperBound)
            let out = UnsafeMutableBufferPointer(rebasing: mean[range])
            if terms.isEmpty { out.update(repeating: 0) }
            for (position, term) in terms.enumerated() {
                let weight = term.weight
                if term.dtype == .f32 && wire == .bf16, term.payload.withUnsafeBytes({ Int(bitPattern: $0.baseAddress) % 4 == 0 }) {
                    term.payload.withUnsafeBytes { raw in  // rounded as it is read: one pass
                        let values = raw.baseAddress!.assumingMemoryBound(to: Float.self) + range.lowerBound
                        if position == 0 {
                            for i in 0..<out.count { out[i] = weight * TensorEncoding.roundedBFloat16(values[i]) }
                        } else {
                            for i in 0..<out.count { out[i] += weight * TensorEncoding.roundedBFloat16(values[i]) }
                        }
                    }
                    continue
                }
                TensorEncoding.withFloats(term.payload, dtype: term.dtype, range: range, scratch: scratch, roundedTo: wire) { values in
                    if position == 0 {
                        for i in 0..<values.count { out[i] = weight * values[i] }
                    } else {
                        for i in 0..<values.count { out[i] += weight * values[i] }
                    }
                }
            }
            for i in 0..<out.count { exponentOverflow |= (out[i].bitPattern & 0x7F80_0000) &+ 0x0080_0000 }
        }
        return exponentOverflow & 0x8000_0000 == 0
    }

    /// `write` over the whole of `mean`, its chunks spread over `ParallelChunks.threads` threads;
    /// `scratch` holds `chunk` floats per thread.
    static func writeInParallel(
        _ terms: [Term], wire: DType, into mean: UnsafeMutableBufferPointer<Float>, scratch: UnsafeMutableBufferPointer<Float>
    ) -> Bool {
        var finite = [Bool](repeating: true, count: ParallelChunks.threads)
        finite.withUnsafeMutableBufferPointer { finite in
            ParallelChunks.forEach(count: mean.count, chunk: chunk) { range, slot in
                let mine = UnsafeMutableBufferPointer(rebasing: scratch[slot * chunk..<(slot + 1) * chunk])
                if !write(terms, wire: wire, into: mean, elements: range, scratch: mine) { finite[slot] = false }
            }
        }
        return !finite.contains(false)
    }
}
