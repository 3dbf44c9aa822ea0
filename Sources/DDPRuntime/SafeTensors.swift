import Autodiff
import Foundation

/// The safetensors format (as Python's `safetensors` and PyTorch read it): an 8-byte little-endian
/// header length, a JSON header naming each tensor's dtype, shape and byte range, then the raw data.
/// Files are written atomically: a temporary file, fsync, then rename.
public enum SafeTensors {
    /// Writes float32 tensors (in the given order) and string metadata to `path`.
    public static func write(_ tensors: [(name: String, tensor: Tensor)], metadata: [String: String] = [:], to path: String) throws {
        var header: [String: Any] = [:]
        var offset = 0
        var checksum = DataChecksum()
        for (_, tensor) in tensors { tensor.withUnsafeBufferPointer { checksum.add(UnsafeRawBufferPointer($0)) } }
        var metadata = metadata
        metadata[DataChecksum.key] = checksum.text
        for (name, tensor) in tensors {
            let bytes = tensor.count * 4
            header[name] = ["dtype": "F32", "shape": tensor.shape, "data_offsets": [offset, offset + bytes]]
            offset += bytes
        }
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while (json.count + 8) % 8 != 0 { json.append(0x20) }  // align the data to 8 bytes
        var file = Data()
        file.reserveCapacity(8 + json.count + offset)
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { file.append(contentsOf: $0) }
        file.append(json)
        for (_, tensor) in tensors { tensor.withUnsafeBufferPointer { file.append(UnsafeBufferPointer(start: $0.baseAddress, count: $0.count)) } }
        try AtomicFile.write(file, to: path)
    }

    /// A loaded file: tensors by name (in file order) and metadata.
    public struct Contents {
        public var tensors: [(name: String, tensor: Tensor)]
        public var metadata: [String: String]
        /// The tensor named `name`.
        public subscript(name: String) -> Tensor? { tensors.first { $0.name == name }?.tensor }
    }

    /// Reads a file written by `write` (or any safetensors file of F32 tensors).
    public static func read(path: String) throws -> Contents {
        guard let data = FileManager.default.contents(atPath: path) else { throw SafeTensorsError.invalid(path, "file not found") }
        guard data.count >= 8 else { throw SafeTensorsError.invalid(path, "shorter than its 8-byte header length") }
        let headerLength = data.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        guard headerLength <= UInt64(data.count - 8) else { throw SafeTensorsError.invalid(path, "header length \(headerLength) exceeds the file") }
        let body = data.dropFirst(8 + Int(headerLength))
        guard let header = try? JSONSerialization.jsonObject(with: data.subdata(in: 8..<8 + Int(headerLength))) as? [String: Any] else {
            throw SafeTensorsError.invalid(path, "header is not a JSON object")
        }
        var tensors: [(name: String, tensor: Tensor, begin: Int)] = []
        for (name, value) in header where name != "__metadata__" {
            guard let entry = value as? [String: Any], let dtype = entry["dtype"] as? String,
                let shape = entry["shape"] as? [Int], let offsets = entry["data_offsets"] as? [Int], offsets.count == 2
            else { throw SafeTensorsError.invalid(path, "tensor '\(name)' has an incomplete entry") }
            guard dtype == "F32" else { throw SafeTensorsError.invalid(path, "tensor '\(name)' is \(dtype); only F32 is read") }
            let count = shape.reduce(1, *)
            guard shape.allSatisfy({ $0 >= 0 }), offsets[0] >= 0, offsets[1] - offsets[0] == count * 4, offsets[1] <= body.count else {
                throw SafeTensorsError.invalid(path, "tensor '\(name)': byte range \(offsets) does not fit shape \(shape)")
            }
            let start = body.startIndex + offsets[0]
            var values = [Float](repeating: 0, count: count)
            values.withUnsafeMutableBytes { _ = data.copyBytes(to: $0, from: start..<start + count * 4) }
            tensors.append((name, Tensor(shape: shape, values: values), offsets[0]))
        }
        tensors.sort { $0.begin < $1.begin }
        let metadata = (header["__metadata__"] as? [String: String]) ?? [:]
        if let expected = metadata[DataChecksum.key] {  // files SwiftDDP wrote carry one: corrupt data is refused
            var checksum = DataChecksum()
            for t in tensors { t.tensor.withUnsafeBufferPointer { checksum.add(UnsafeRawBufferPointer($0)) } }
            guard checksum.text == expected else {
                throw SafeTensorsError.invalid(path, "its tensor data does not match its checksum (\(checksum.text), \(expected) written): the file is corrupt")
            }
        }
        return Contents(tensors: tensors.map { ($0.name, $0.tensor) }, metadata: metadata)
    }
}

public enum SafeTensorsError: Error, CustomStringConvertible {
    case invalid(String, String)
    public var description: String { switch self { case .invalid(let path, let why): "safetensors file \(path): \(why)" } }
}

/// Whole-file writes that never leave a half-written file behind.
/// A 64-bit checksum of tensor bytes (FNV-1a, tensor by tensor in file order: its little-endian 8-byte
/// words, then the 0-7 bytes left),
/// kept in the metadata of every safetensors file SwiftDDP writes (`swiftddp_checksum`, 16 hex digits)
/// and verified when one is read: flipped or truncated data is refused, not resumed from.
struct DataChecksum {
    static let key = "swiftddp_checksum"
    private var hash: UInt64 = 0xCBF2_9CE4_8422_2325

    mutating func add(_ bytes: UnsafeRawBufferPointer) {
        let words = bytes.count / 8
        for i in 0..<words { hash = (hash ^ UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))) &* 0x100_0000_01B3 }
        for i in (8 * words)..<bytes.count { hash = (hash ^ UInt64(bytes[i])) &* 0x100_0000_01B3 }
    }

    var text: String { String(format: "%016llx", hash) }
}

/// A job file that could not be written, and why.
struct FileWriteError: Error, CustomStringConvertible {
    let path: String
    let reason: String
    var description: String { "cannot write \(path): \(reason)" }
}

enum AtomicFile {
    /// Writes `data` to a temporary file beside `path`, syncs it, and renames it into place: `path` holds
    /// the old contents or the new, never a part. A failure (a full disk) leaves the old file, removes the
    /// temporary one, and says what failed in plain words.
    static func write(_ data: Data, to path: String) throws {
        let temporary = path + ".tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FileWriteError(path: path, reason: "cannot create \(temporary): \(String(cString: strerror(errno)))") }
        var failure = data.withUnsafeBytes { SafeOutput.write($0, to: fd) }
        if failure == nil && fsync(fd) != 0 { failure = String(cString: strerror(errno)) }
        close(fd)
        if failure == nil && rename(temporary, path) != 0 { failure = "cannot rename into place: \(String(cString: strerror(errno)))" }
        if let failure {
            unlink(temporary)
            throw FileWriteError(path: path, reason: failure)
        }
    }

    static func write(_ text: String, to path: String) throws { try write(Data(text.utf8), to: path) }
}
