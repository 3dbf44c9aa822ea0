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
    /// tensor chunk by chunk without a whole-size temporary.
    public static func withFloats<R>(
        _ payload: Payload, dtype: DType, range: Range<Int>, scratch: UnsafeMutableBufferPointer<Float>,
        _ body: (UnsafeBufferPointer<Float>) throws -> R
    ) rethrows -> R {
        try payload.withUnsafeBytes { raw in
            precondition(range.lowerBound >= 0 && range.upperBound * dtype.size <= raw.count && scratch.count >= range.count,
                         "TensorEncoding.withFloats: range out of bounds")
            let start = raw.baseAddress! + range.lowerBound * dtype.size
            switch dtype {
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

    /// The index of the first NaN or infinite element, if any.
    public static func firstNonFinite(_ payload: Payload, dtype: DType) -> Int? {
        payload.withUnsafeBytes { raw in
            switch dtype {
            case .f32:
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

    /// The bfloat16 bits of `x`, rounded to nearest even (NaN stays a quiet NaN), without branches.
    @inline(__always)
    static func bfloat16(_ x: Float) -> UInt16 {
        let bits = x.bitPattern
        let rounded = (bits &+ 0x7FFF &+ ((bits >> 16) & 1)) >> 16
        let quietNaN = (bits >> 16) | 0x40
        return UInt16(truncatingIfNeeded: bits & 0x7FFF_FFFF > 0x7F80_0000 ? quietNaN : rounded)
    }
}
