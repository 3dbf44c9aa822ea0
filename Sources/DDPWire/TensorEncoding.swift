/// Float32 values to and from the wire's element types (f32, f16, bf16), little-endian.
public enum TensorEncoding {
    /// Writes `values` into `payload` as `dtype`; the payload must hold `values.count * dtype.size` bytes.
    public static func write(_ values: UnsafeBufferPointer<Float>, as dtype: DType, into payload: Payload) {
        precondition(payload.byteCount == values.count * dtype.size, "TensorEncoding.write: size mismatch")
        payload.withUnsafeMutableBytes { raw in
            switch dtype {
            case .f32:
                raw.copyMemory(from: UnsafeRawBufferPointer(values))
            case .f16:
                let out = raw.bindMemory(to: UInt16.self)
                for i in values.indices { out[i] = Float16(values[i]).bitPattern.littleEndian }
            case .bf16:
                let out = raw.bindMemory(to: UInt16.self)
                for i in values.indices { out[i] = bfloat16(values[i]).littleEndian }
            }
        }
    }

    /// Calls `body` with the payload's values as float32 (converted from f16/bf16 into a temporary buffer).
    public static func withFloats<R>(_ payload: Payload, dtype: DType, _ body: (UnsafeBufferPointer<Float>) throws -> R) rethrows -> R {
        try payload.withUnsafeBytes { raw in
            let count = raw.count / dtype.size
            switch dtype {
            case .f32:
                if Int(bitPattern: raw.baseAddress) % MemoryLayout<Float>.alignment == 0 {
                    return try body(raw.bindMemory(to: Float.self))
                }
                let copy = [Float](unsafeUninitializedCapacity: count) { b, n in
                    UnsafeMutableRawBufferPointer(b).copyMemory(from: raw)
                    n = count
                }
                return try copy.withUnsafeBufferPointer(body)
            case .f16, .bf16:
                let converted = [Float](unsafeUninitializedCapacity: count) { b, n in
                    for i in 0..<count {
                        let bits = UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))
                        b[i] = dtype == .f16 ? Float(Float16(bitPattern: bits)) : Float(bitPattern: UInt32(bits) << 16)
                    }
                    n = count
                }
                return try converted.withUnsafeBufferPointer(body)
            }
        }
    }

    /// The payload's values as a float32 array (a copy).
    public static func floats(_ payload: Payload, dtype: DType = .f32) -> [Float] { withFloats(payload, dtype: dtype) { Array($0) } }

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

    /// The bfloat16 bits of `x`, rounded to nearest even (NaN stays NaN).
    @inline(__always)
    static func bfloat16(_ x: Float) -> UInt16 {
        let bits = x.bitPattern
        if x.isNaN { return UInt16(bits >> 16) | 0x40 }
        let rounding = 0x7FFF + ((bits >> 16) & 1)
        return UInt16((bits &+ rounding) >> 16)
    }
}
