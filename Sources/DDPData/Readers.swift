import Foundation

/// Loaders for the data formats SwiftDDP reads.
public enum DataReader {
    static func read(_ path: String) throws -> Data {
        guard FileManager.default.fileExists(atPath: path) else { throw DataError.fileNotFound(path) }
        do { return try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw DataError.malformed(path, "cannot read: \(error.localizedDescription)")
        }
    }

    /// A CSV file whose first column is the integer class label (or, with `regression`, a real-valued
    /// target) and the rest are features. A first line that is not numeric is taken as a header.
    public static func csv(path: String, regression: Bool = false) throws -> Dataset {
        let data = try read(path)
        guard let text = String(data: data, encoding: .utf8) else { throw DataError.malformed(path, "not UTF-8 text") }
        return try csv(text: text, name: path, regression: regression)
    }

    /// Parses CSV text as `csv(path:)` does; `name` appears in errors.
    public static func csv(text: String, name: String, regression: Bool = false) throws -> Dataset {
        var features: [Float] = []
        var labels: [Int32] = []
        var targets: [Float] = []
        var width: Int?
        for (number, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = rawLine.trimmingCharacters(in: .whitespacesAndNewlines)
            if line.isEmpty { continue }
            let fields = line.split(separator: ",", omittingEmptySubsequences: false)
            if number == 0, Float(fields[0].trimmingCharacters(in: .whitespaces)) == nil { continue }  // header
            guard fields.count >= 2 else {
                throw DataError.malformed(name, "line \(number + 1): needs a label and at least one feature")
            }
            if let width, fields.count - 1 != width {
                throw DataError.malformed(name, "line \(number + 1): \(fields.count - 1) features, expected \(width)")
            }
            width = fields.count - 1
            let labelText = fields[0].trimmingCharacters(in: .whitespaces)
            if regression {
                guard let target = Float(labelText), target.isFinite else {
                    throw DataError.malformed(name, "line \(number + 1): target '\(labelText)' is not a finite number")
                }
                targets.append(target)
            } else {
            guard let label = Int32(labelText) ?? Float(labelText).flatMap({ $0 == $0.rounded() ? Int32(exactly: $0) : nil })
            else { throw DataError.malformed(name, "line \(number + 1): label '\(labelText)' is not an integer") }
            labels.append(label)
            }
            for (column, field) in fields.dropFirst().enumerated() {
                guard let value = Float(field.trimmingCharacters(in: .whitespaces)) else {
                    throw DataError.malformed(name, "line \(number + 1), column \(column + 2): '\(field)' is not a number")
                }
                features.append(value)
            }
        }
        guard let width else { throw DataError.malformed(name, "no data rows") }
        if regression { return try Dataset(name: name, featureShape: [width], features: features, targets: targets) }
        return try Dataset(name: name, featureShape: [width], features: features, labels: labels)
    }

    /// MNIST's IDX format: an image file (`idx3-ubyte`, unsigned bytes, `[n, rows, cols]`) and a label
    /// file (`idx1-ubyte`). Features become `[1, rows, cols]` in [0, 255].
    public static func idx(images: String, labels labelPath: String) throws -> Dataset {
        let imageData = try read(images), labelData = try read(labelPath)
        func header(_ data: Data, _ path: String, dimensions: Int) throws -> [Int] {
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
        let imageSizes = try header(imageData, images, dimensions: 3)
        let labelSizes = try header(labelData, labelPath, dimensions: 1)
        guard imageSizes[0] == labelSizes[0] else {
            throw DataError.malformed(labelPath, "\(labelSizes[0]) labels for \(imageSizes[0]) images in \(images)")
        }
        let features = imageData.dropFirst(16).map { Float($0) }
        let labels = labelData.dropFirst(8).map { Int32($0) }
        return try Dataset(name: images, featureShape: [1, imageSizes[1], imageSizes[2]], features: features, labels: labels)
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
            return try Dataset(
                name: featurePath, featureShape: Array(features.shape.dropFirst()), features: features.values.map { Float($0) },
                targets: labels.values.map { Float($0) })
        }
        var classes: [Int32] = []
        for (i, value) in labels.values.enumerated() {
            guard value == value.rounded(), let label = Int32(exactly: value) else {
                throw DataError.malformed(labelPath, "label \(i) is \(value), not an integer")
            }
            classes.append(label)
        }
        return try Dataset(
            name: featurePath, featureShape: Array(features.shape.dropFirst()), features: features.values.map { Float($0) },
            labels: classes)
    }
}

/// A NumPy array file (format version 1 to 3, C order, little-endian).
struct NumpyArray {
    let shape: [Int]
    let values: [Double]

    init(path: String) throws {
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
