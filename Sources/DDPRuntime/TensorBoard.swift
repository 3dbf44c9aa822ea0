import Glibc

/// A failed file operation of `TensorBoardWriter`, naming the path and the system's reason.
struct TensorBoardError: Error, CustomStringConvertible {
    let description: String

    init(_ action: String, path: String, errorNumber: Int32) {
        description = "TensorBoard: cannot \(action) \(path): \(String(cString: strerror(errorNumber)))"
    }
}

/// Appends scalar summaries to a TensorBoard event file (`events.out.tfevents.<unix seconds>.<host>.<pid>`,
/// so that a resumed job's coordinator starts a file of its own beside the first) in a folder.
///
/// Each scalar becomes one `Event` protobuf in TFRecord framing. Records are buffered by `add`
/// and written by `flush`. Not thread-safe: use it from one thread (or guard it yourself).
final class TensorBoardWriter {
    let path: String
    private var pending: [UInt8] = []

    /// Creates `directory` if needed and a new event file in it, holding the `brain.Event:2` version event.
    init(directory: String, wallTime: Double) throws {
        try TensorBoardWriter.makeDirectories(directory)
        let seconds = Int(exactly: wallTime.rounded(.down)) ?? 0  // NaN or out of range: 0, not a trap
        path = directory + "/events.out.tfevents.\(seconds).\(TensorBoardWriter.hostName()).\(getpid())"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TensorBoardError("create", path: path, errorNumber: errno) }
        Glibc.close(fd)
        var event = ProtobufEncoder()
        event.double(field: 1, wallTime)
        event.bytes(field: 3, Array("brain.Event:2".utf8))
        TFRecord.append(event.bytes, to: &pending)
        try flush()
    }

    /// The most bytes kept for a file that cannot be written (a full disk); older records are dropped.
    static let largestPending = 8 << 20

    /// Buffers one scalar; NaN and infinities are written as they are (TensorBoard shows them).
    func add(_ tag: String, _ value: Float, step: Int, wallTime: Double) {
        if pending.count > Self.largestPending { pending.removeAll(keepingCapacity: true) }
        var summaryValue = ProtobufEncoder()
        summaryValue.bytes(field: 1, Array(tag.utf8))
        summaryValue.float(field: 2, value)
        var summary = ProtobufEncoder()
        summary.bytes(field: 1, summaryValue.bytes)
        var event = ProtobufEncoder()
        event.double(field: 1, wallTime)
        event.varint(field: 2, UInt64(bitPattern: Int64(step)))
        event.bytes(field: 5, summary.bytes)
        TFRecord.append(event.bytes, to: &pending)
    }

    /// Appends the buffered records to the file. On failure the records stay buffered for a later retry.
    func flush() throws {
        guard !pending.isEmpty else { return }
        let fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC)
        guard fd >= 0 else { throw TensorBoardError("open", path: path, errorNumber: errno) }
        defer { Glibc.close(fd) }
        var written = 0
        while written < pending.count {
            let count = pending.withUnsafeBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
            if count < 0 {
                if errno == EINTR { continue }
                let reason = errno
                pending.removeFirst(written)
                throw TensorBoardError("write", path: path, errorNumber: reason)
            }
            written += count
        }
        pending.removeAll(keepingCapacity: true)
    }

    /// `mkdir -p`: creates `directory` and its missing parents.
    private static func makeDirectories(_ directory: String) throws {
        var prefix = directory.hasPrefix("/") ? "/" : ""
        for component in directory.split(separator: "/") {
            prefix += component + "/"
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
                throw TensorBoardError("create folder", path: prefix, errorNumber: errno)
            }
        }
    }

    private static func hostName() -> String {
        var name = [CChar](repeating: 0, count: 256)
        guard gethostname(&name, name.count - 1) == 0 else { return "localhost" }
        let host = name.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        return host.isEmpty ? "localhost" : host
    }
}

/// Hand-rolled protocol-buffer wire encoding of the few field kinds an `Event` needs.
private struct ProtobufEncoder {
    private(set) var bytes: [UInt8] = []

    private mutating func rawVarint(_ value: UInt64) {
        var rest = value
        while rest >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: rest) | 0x80)
            rest >>= 7
        }
        bytes.append(UInt8(rest))
    }

    private mutating func key(_ field: Int, wireType: UInt64) {
        rawVarint(UInt64(field) << 3 | wireType)
    }

    private mutating func littleEndian<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    mutating func varint(field: Int, _ value: UInt64) {
        key(field, wireType: 0)
        rawVarint(value)
    }

    mutating func double(field: Int, _ value: Double) {
        key(field, wireType: 1)
        littleEndian(value.bitPattern)
    }

    mutating func bytes(field: Int, _ value: [UInt8]) {
        key(field, wireType: 2)
        rawVarint(UInt64(value.count))
        bytes.append(contentsOf: value)
    }

    mutating func float(field: Int, _ value: Float) {
        key(field, wireType: 5)
        littleEndian(value.bitPattern)
    }
}

/// TFRecord framing: length (uint64 LE), masked CRC32C of the length, data, masked CRC32C of the data.
enum TFRecord {
    static func append(_ data: [UInt8], to output: inout [UInt8]) {
        var length: [UInt8] = []
        withUnsafeBytes(of: UInt64(data.count).littleEndian) { length.append(contentsOf: $0) }
        output.append(contentsOf: length)
        withUnsafeBytes(of: maskedCRC32C(length).littleEndian) { output.append(contentsOf: $0) }
        output.append(contentsOf: data)
        withUnsafeBytes(of: maskedCRC32C(data).littleEndian) { output.append(contentsOf: $0) }
    }

    /// The CRC32C that TFRecord stores: rotated right by 15 bits plus a constant.
    static func maskedCRC32C(_ data: [UInt8]) -> UInt32 {
        let crc = crc32c(data)
        return ((crc >> 15) | (crc << 17)) &+ 0xa282_ead8
    }

    /// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), table driven.
    static func crc32c(_ data: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in data {
            crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8)
        }
        return crc ^ 0xFFFF_FFFF
    }

    private static let table: [UInt32] = (0..<256).map { index in
        var crc = UInt32(index)
        for _ in 0..<8 {
            crc = crc & 1 == 1 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1
        }
        return crc
    }
}
