/// Float32 values to and from the wire's element types (f32, f16, bf16), little-endian.
public enum TensorEncoding {
    /// Writes `values` into `payload` as `dtype`, starting at element `offset`; the payload must hold them.
    public static func write(_ values: UnsafeBufferPointer<Float>, as dtype: DType, into payload: Payload, at offset: Int = 0) {
        precondition(offset >= 0 && (offset + values.count) * dtype.size <= payload.byteCount, "TensorEncoding.write: out of bounds")
        payload.withUnsafeMutableBytes { whole in
            let raw = UnsafeMutableRawBufferPointer(rebasing: whole[(offset * dtype.size)...])
            switch dtype {
            case .f32:
                raw.copyMemory(from: UnsafeRawBufferPointer(values))
            case .f16:
                let out = raw.bindMemory(to: UInt16.self)
                for i in values.indices { out[i] = Float16(values[i]).bitPattern.littleEndian }
            case .bf16:
                let out = raw.bindMemory(to: UInt16.self)
                for i in values.indices { out[i] = bfloat16(values[i]).littleEndian }  // branch-free: vectorises
            }
        }
    }

    /// Calls `body` with the elements `range` of the payload as float32: in place when they are aligned
    /// f32, otherwise converted into `scratch` (which must hold `range.count` floats). For walking a large
    /// tensor chunk by chunk without a whole-size temporary. f32 values with `roundedTo` f16 or bf16 come
    /// rounded to that type (exactly what encoding them as it and decoding would give).
    public static func withFloats<R>(
        _ payload: Payload, dtype: DType, range: Range<Int>, scratch: UnsafeMutableBufferPointer<Float>, roundedTo: DType = .f32,
        _ body: (UnsafeBufferPointer<Float>) throws -> R
    ) rethrows -> R {
        try payload.withUnsafeBytes { raw in
            precondition(range.lowerBound >= 0 && range.upperBound * dtype.size <= raw.count && scratch.count >= range.count,
                         "TensorEncoding.withFloats: range out of bounds")
            let start = raw.baseAddress! + range.lowerBound * dtype.size
            switch dtype {
            case .f32 where roundedTo != .f32:
                let out = scratch.baseAddress!
                if Int(bitPattern: start) % 4 == 0 {
                    let values = start.assumingMemoryBound(to: Float.self)
                    switch roundedTo {
                    case .bf16: for i in 0..<range.count { out[i] = roundedBFloat16(values[i]) }  // vectorises
                    default: for i in 0..<range.count { out[i] = Float(Float16(values[i])) }
                    }
                } else {
                    for i in 0..<range.count { out[i] = start.loadUnaligned(fromByteOffset: 4 * i, as: Float.self) }
                    round(UnsafeMutableBufferPointer(rebasing: scratch[0..<range.count]), to: roundedTo)
                }
            case .f32 where Int(bitPattern: start) % MemoryLayout<Float>.alignment == 0:
                return try body(UnsafeBufferPointer(start: start.assumingMemoryBound(to: Float.self), count: range.count))
            case .f32:
                UnsafeMutableRawPointer(scratch.baseAddress!).copyMemory(from: start, byteCount: range.count * 4)
            case .f16, .bf16:
                decode(start, count: range.count, dtype: dtype, into: scratch.baseAddress!)
            }
            return try body(UnsafeBufferPointer(rebasing: scratch[0..<range.count]))
        }
    }

    /// Converts `count` little-endian f16 or bf16 values at `source` to float32.
    private static func decode(_ source: UnsafeRawPointer, count: Int, dtype: DType, into out: UnsafeMutablePointer<Float>) {
        func bits(_ i: Int) -> UInt16 { UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        switch dtype {
        case .bf16 where Int(bitPattern: source) % 2 == 0 && UInt16(1).littleEndian == 1:  // aligned on a little-endian host: vectorises
            let halves = source.assumingMemoryBound(to: UInt16.self)
            for i in 0..<count { out[i] = Float(bitPattern: UInt32(halves[i]) << 16) }
        case .bf16:
            for i in 0..<count { out[i] = Float(bitPattern: UInt32(bits(i)) << 16) }
        case .f16:
            for i in 0..<count { out[i] = Float(Float16(bitPattern: bits(i))) }
        case .f32:
            preconditionFailure("TensorEncoding.decode: f32 needs no conversion")
        }
    }

    /// The payload's values as a float32 array (a copy).
    public static func floats(_ payload: Payload, dtype: DType = .f32) -> [Float] {
        let count = payload.byteCount / dtype.size
        return [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0 {
                withFloats(payload, dtype: dtype, range: 0..<count, scratch: buffer) { values in
                    if values.baseAddress != UnsafePointer(buffer.baseAddress) { buffer.baseAddress!.initialize(from: values.baseAddress!, count: count) }
                }
            }
            initialized = count
        }
    }

    /// Rounds `values` in place to the nearest values of `dtype` (bf16: to nearest even; f16: as Float16
    /// conversion does, overflowing to infinity), as encoding and decoding them would.
    public static func round(_ values: UnsafeMutableBufferPointer<Float>, to dtype: DType) {
        switch dtype {
        case .f32: break
        case .bf16: for i in values.indices { values[i] = roundedBFloat16(values[i]) }  // vectorises
        case .f16: for i in values.indices { values[i] = Float(Float16(values[i])) }
        }
    }

    /// An estimate of the sum of the squares of the elements: every k-th of them (at most about `samples`,
    /// at fixed positions) squared, summed and scaled by k. Cheap enough for every push of every step.
    public static func sampledSumOfSquares(_ payload: Payload, dtype: DType, samples: Int = 256) -> Double {
        let count = payload.byteCount / dtype.size
        guard count > 0 else { return 0 }
        let stride = max(1, count / max(samples, 1))
        return payload.withUnsafeBytes { raw in
            var sum = 0.0
            for i in Swift.stride(from: 0, to: count, by: stride) {
                let value: Float
                switch dtype {
                case .f32: value = raw.loadUnaligned(fromByteOffset: 4 * i, as: Float.self)
                case .f16: value = Float(Float16(bitPattern: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))))
                case .bf16: value = Float(bitPattern: UInt32(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))) << 16)
                }
                sum += Double(value) * Double(value)
            }
            return sum * Double(stride)
        }
    }

    /// The index of the first NaN or infinite element, if any; with `roundedTo`, of f32 values once rounded
    /// to that type (a large f32 value can round to an f16 infinity).
    public static func firstNonFinite(_ payload: Payload, dtype: DType, roundedTo: DType = .f32) -> Int? {
        payload.withUnsafeBytes { raw in
            switch dtype {
            case .f32 where roundedTo == .f16:
                for i in 0..<raw.count / 4 where !Float(Float16(raw.loadUnaligned(fromByteOffset: 4 * i, as: Float.self))).isFinite { return i }
            case .f32:  // bf16 has f32's exponent: only values already infinite or NaN, or that round up past the largest, are not finite
                for i in 0..<raw.count / 4 {
                    let value = raw.loadUnaligned(fromByteOffset: 4 * i, as: Float.self)
                    let bits = (roundedTo == .bf16 ? Float(bitPattern: UInt32(bfloat16(value)) << 16) : value).bitPattern
                    if bits & 0x7F80_0000 == 0x7F80_0000 { return i }
                }
                for i in 0..<raw.count / 4 {
                    let bits = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))
                    if bits & 0x7F80_0000 == 0x7F80_0000 { return i }
                }
            case .f16:
                for i in 0..<raw.count / 2 where UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) & 0x7C00 == 0x7C00 {
                    return i
                }
            case .bf16:
                for i in 0..<raw.count / 2 where UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) & 0x7F80 == 0x7F80 {
                    return i
                }
            }
            return nil
        }
    }

    /// Moves each of `count` values of `held` toward `target` by their difference rounded to `dtype`
    /// (f16 or bf16), writing the encoded differences into `frame` from element `offset` when there is
    /// one: one pass for what a coordinator sends against the replica every worker holds.
    public static func advance(
        _ held: UnsafeMutablePointer<Float>, toward target: UnsafePointer<Float>, count: Int, dtype: DType, encodingInto frame: Payload?, at offset: Int
    ) {
        precondition(dtype != .f32, "TensorEncoding.advance: for half-precision wires")
        guard let frame else {
            switch dtype {
            case .bf16: for i in 0..<count { held[i] += roundedBFloat16(target[i] - held[i]) }
            default: for i in 0..<count { held[i] += Float(Float16(target[i] - held[i])) }
            }
            return
        }
        precondition(offset >= 0 && (offset + count) * 2 <= frame.byteCount, "TensorEncoding.advance: out of bounds")
        frame.withUnsafeMutableBytes { raw in
            let out = (raw.baseAddress! + 2 * offset).assumingMemoryBound(to: UInt16.self)
            switch dtype {
            case .bf16:
                for i in 0..<count {
                    let bits = bfloat16(target[i] - held[i])
                    out[i] = bits.littleEndian
                    held[i] += Float(bitPattern: UInt32(bits) << 16)
                }
            default:
                for i in 0..<count {
                    let half = Float16(target[i] - held[i])
                    out[i] = half.bitPattern.littleEndian
                    held[i] += Float(half)
                }
            }
        }
    }

    /// `x` rounded to the nearest bfloat16 value (as encoding and decoding it would give).
    @inline(__always)
    public static func roundedBFloat16(_ x: Float) -> Float { Float(bitPattern: UInt32(bfloat16(x)) << 16) }

    /// The bfloat16 bits of `x`, rounded to nearest even (NaN stays a quiet NaN), without branches.
    @inline(__always)
    static func bfloat16(_ x: Float) -> UInt16 {
        let bits = x.bitPattern
        let rounded = (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) >> 16
        let quietNaN = (bits >> 16) | 0x40
        return UInt16(truncatingIfNeeded: bits & 0x7FFF_FFFF > 0x7F80_0000 ? quietNaN : rounded)
    }
}
