import Foundation

/// Loaders for the data formats SwiftDDP reads.
public enum DataReader {
    static func read(_ path: String) throws -> Data {
        guard FileManager.default.fileExists(atPath: path) else { throw DataError.fileNotFound(path) }
        do { return try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw DataError.malformed(path, "cannot read: \(error.localizedDescription)")
        }
    }

    /// MNIST's IDX format: an image file (`idx3-ubyte`, unsigned bytes, `[n, rows, cols]`) and a label
    /// file (`idx1-ubyte`). Features become `[1, rows, cols]` in [0, 255].
    public static func idx(images: String, labels labelPath: String) throws -> Dataset {
        let pictures = try idxImages(path: images)
        let labels = try idxLabels(path: labelPath)
        guard pictures.count == labels.count else {
            throw DataError.malformed(labelPath, "\(labels.count) labels for \(pictures.count) images in \(images)")
        }
        let classes = try ClassLabels(integers: labels.map { Int64($0) }, source: labelPath, where: { "label \($0 + 1)" })
        return try Dataset(name: images, featureShape: [1, pictures.rows, pictures.columns], features: pictures.values, labels: classes.ids,
                           classNames: classes.names)
    }

    /// An IDX image file: `count` images of `rows` x `columns` bytes, as floats in [0, 255].
    public static func idxImages(path: String) throws -> (count: Int, rows: Int, columns: Int, values: [Float]) {
        let data = try read(path)
        let sizes = try idxHeader(data, path, dimensions: 3)
        return (sizes[0], sizes[1], sizes[2], data.dropFirst(16).map { Float($0) })
    }

    /// An IDX label file: one byte a label.
    public static func idxLabels(path: String) throws -> [UInt8] {
        let data = try read(path)
        _ = try idxHeader(data, path, dimensions: 1)
        return Array(data.dropFirst(8))
    }

    /// The sizes an IDX header of unsigned bytes promises, checked against the file's length.
    static func idxHeader(_ data: Data, _ path: String, dimensions: Int) throws -> [Int] {
        let bytes = [UInt8](data.prefix(4 + 4 * dimensions))
        if bytes.starts(with: [0x1f, 0x8b]) { throw DataError.unsupported(path, "gzip-compressed; gunzip it first") }
        guard bytes.count == 4 + 4 * dimensions, bytes[0] == 0, bytes[1] == 0 else {
            throw DataError.malformed(path, "not an IDX file (bad magic number)")
        }
        guard bytes[2] == 0x08 else { throw DataError.unsupported(path, "IDX element type \(bytes[2]); only unsigned bytes") }
        guard Int(bytes[3]) == dimensions else {
            throw DataError.malformed(path, "has \(bytes[3]) dimensions, expected \(dimensions)")
        }
        let sizes = (0..<dimensions).map { d in
            (0..<4).reduce(0) { $0 << 8 | Int(bytes[4 + 4 * d + $1]) }
        }
        let expected = 4 + 4 * dimensions + sizes.reduce(1, *)
        guard data.count == expected else {
            throw DataError.malformed(path, "\(data.count) bytes, header promises \(expected)")
        }
        return sizes
    }

    /// NumPy `.npy` arrays: features `[n, ...]` (float32/float64/integer) and labels `[n]` (integer).
    /// With `regression`, the labels file holds real-valued targets.
    public static func npy(features featurePath: String, labels labelPath: String, regression: Bool = false) throws -> Dataset {
        let features = try NumpyArray(path: featurePath)
        let labels = try NumpyArray(path: labelPath)
        guard features.shape.count >= 2 else {
            throw DataError.malformed(featurePath, "features need shape [n, ...], got \(features.shape)")
        }
        guard labels.shape.count == 1, labels.shape[0] == features.shape[0] else {
            throw DataError.malformed(labelPath, "labels of shape \(labels.shape) do not fit features \(features.shape)")
        }
        if regression {
            if let bad = labels.values.firstIndex(where: { !$0.isFinite }) {
                throw DataError.malformed(labelPath, "target \(bad + 1) is not finite")
            }
            return try Dataset(
                name: featurePath, featureShape: Array(features.shape.dropFirst()), features: features.values.map { Float($0) },
                targets: labels.values.map { Float($0) })
        }
        var integers: [Int64] = []
        for (i, value) in labels.values.enumerated() {
            guard value == value.rounded(), let label = Int64(exactly: value) else {
                throw DataError.malformed(labelPath, "label \(i + 1) is \(value), not an integer")
            }
            integers.append(label)
        }
        let classes = try ClassLabels(integers: integers, source: labelPath, where: { "label \($0 + 1)" })
        return try Dataset(
            name: featurePath, featureShape: Array(features.shape.dropFirst()), features: features.values.map { Float($0) },
            labels: classes.ids, classNames: classes.names)
    }
}

/// A NumPy array file (format version 1 to 3, C order, little-endian).
public struct NumpyArray {
    public let shape: [Int]
    public let values: [Double]

    /// The bytes of a version 1.0 `.npy` file of float32 values.
    public static func encode(float32 values: [Float], shape: [Int]) -> Data {
        encode(descr: "<f4", shape: shape, body: values.withUnsafeBytes { Data($0) })
    }

    /// The bytes of a version 1.0 `.npy` file of int64 values.
    public static func encode(int64 values: [Int64], shape: [Int]) -> Data {
        encode(descr: "<i8", shape: shape, body: values.map(\.littleEndian).withUnsafeBytes { Data($0) })
    }

    private static func encode(descr: String, shape: [Int], body: Data) -> Data {
        let dims = shape.count == 1 ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
        var header = Array("{'descr': '\(descr)', 'fortran_order': False, 'shape': \(dims), }".utf8)
        while (10 + header.count + 1) % 64 != 0 { header.append(0x20) }
        header.append(0x0a)
        var data = Data([0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(header.count & 0xff), UInt8(header.count >> 8)] + header)
        data.append(body)
        return data
    }

    /// Reads a `.npy` file.
    public init(path: String) throws {
        let data = try DataReader.read(path)
        let bytes = [UInt8](data)
        guard bytes.count >= 10, bytes.starts(with: [0x93] + Array("NUMPY".utf8)) else {
            throw DataError.malformed(path, "not a .npy file (bad magic)")
        }
        let major = bytes[6]
        let headerLength: Int, headerStart: Int
        if major == 1 {
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8
            headerStart = 10
        } else {
            guard bytes.count >= 12 else { throw DataError.malformed(path, "truncated header") }
            headerLength = (0..<4).reduce(0) { $0 | Int(bytes[8 + $1]) << (8 * $1) }
            headerStart = 12
        }
        guard bytes.count >= headerStart + headerLength,
            let header = String(bytes: bytes[headerStart..<headerStart + headerLength], encoding: .utf8)
        else { throw DataError.malformed(path, "truncated header") }
        func field(_ key: String) -> String? {
            guard let range = header.range(of: "'\(key)':") else { return nil }
            return String(header[range.upperBound...]).trimmingCharacters(in: .whitespaces)
        }
        guard let descr = field("descr")?.split(separator: "'").first.map(String.init) else {
            throw DataError.malformed(path, "header has no dtype")
        }
        if field("fortran_order")?.hasPrefix("True") == true {
            throw DataError.unsupported(path, "Fortran-ordered arrays; save with np.ascontiguousarray")
        }
        guard let shapeText = field("shape"), let open = shapeText.firstIndex(of: "("),
            let close = shapeText.firstIndex(of: ")")
        else { throw DataError.malformed(path, "header has no shape") }
        let dims = shapeText[shapeText.index(after: open)..<close].split(separator: ",")
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        let shape = try dims.map { d -> Int in
            guard let n = Int(d), n >= 0 else { throw DataError.malformed(path, "bad dimension '\(d)'") }
            return n
        }
        let count = shape.reduce(1, *)
        let body = bytes[(headerStart + headerLength)...]
        let decode: (ArraySlice<UInt8>) -> Double
        let size: Int
        switch descr {
        case "<f4": size = 4; decode = { Double(Float(bitPattern: $0.littleEndianInteger())) }
        case "<f8": size = 8; decode = { Double(bitPattern: $0.littleEndianInteger()) }
        case "<i4": size = 4; decode = { Double(Int32(bitPattern: $0.littleEndianInteger())) }
        case "<i8": size = 8; decode = { Double(Int64(bitPattern: $0.littleEndianInteger())) }
        case "|u1", "<u1": size = 1; decode = { Double($0.first!) }
        case "|i1": size = 1; decode = { Double(Int8(bitPattern: $0.first!)) }
        default: throw DataError.unsupported(path, "dtype \(descr)")
        }
        guard body.count == count * size else {
            throw DataError.malformed(path, "\(body.count) data bytes, shape \(shape) of \(descr) needs \(count * size)")
        }
        var values: [Double] = []
        values.reserveCapacity(count)
        var offset = body.startIndex
        for _ in 0..<count {
            values.append(decode(body[offset..<offset + size]))
            offset += size
        }
        self.shape = shape
        self.values = values
    }
}

extension ArraySlice<UInt8> {
    func littleEndianInteger<T: FixedWidthInteger>() -> T {
        var value: T = 0
        for (shift, byte) in enumerated() { value |= T(byte) << (8 * shift) }
        return value
    }
}
