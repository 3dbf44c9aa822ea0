import Foundation

/// Why a shared-memory segment could not be created or mapped. Never fatal: the peers then send
/// tensors in frames.
public enum SharedMemoryError: Error, CustomStringConvertible, Equatable {
    case unavailable(String)
    case cannotOpen(path: String, reason: String)
    case wrongSize(path: String, expected: Int, got: Int)
    case nonceMismatch(path: String)
    case notASegment(path: String, reason: String)

    public var description: String {
        switch self {
        case .unavailable(let why): "shared memory is unavailable: \(why)"
        case .cannotOpen(let path, let why): "cannot map the shared-memory segment \(path): \(why)"
        case .wrongSize(let path, let e, let g): "the shared-memory segment \(path) has \(g) bytes, \(e) were announced"
        case .nonceMismatch(let path): "the shared-memory segment \(path) does not start with the announced nonce (another host or process)"
        case .notASegment(let path, let why): "\(path) is not a SwiftDDP shared-memory segment: \(why)"
        }
    }
}

/// A memory segment that two processes on one host map, so that tensors pass between them without
/// going through a socket (see SHARED MEMORY in proto/ddp.proto). The creator makes an anonymous file
/// (memfd; nothing to clean up, it vanishes with the last mapping) whose first 32 bytes are a random
/// nonce; the peer opens it by `path` and proves it sees the same memory by comparing the nonce.
///
/// The peer maps only what provably is such a memfd: `/proc/PID/fd/N` naming an anonymous file on the
/// kernel's memfd device, named by SwiftDDP, with no link in any folder. A path to a regular file, a
/// device or another program's memory is refused before anything is mapped, whoever can read its first
/// bytes (a coordinator, often root, writes updates into what it maps).
///
/// Regions of it are handed out as `Payload`s: written by one side, described in a message by offset,
/// and read by the other after the message arrived.
public final class SharedSegment: @unchecked Sendable {
    /// Bytes at the start reserved for the nonce; tensor regions begin at or after it.
    public static let headerBytes = 64
    /// Alignment of every region laid out by `SharedLayout`.
    public static let alignment = 64

    public let byteCount: Int
    public let nonce: [UInt8]
    /// What a process on the same host opens to map this segment.
    public let path: String
    private let base: UnsafeMutableRawPointer
    private let descriptor: Int32

    /// A new segment of `byteCount` bytes, its memory reserved now (so that a full memory device is an
    /// error here, not a fault later), the nonce written at offset 0.
    public init(creating byteCount: Int) throws {
        guard byteCount >= Self.headerBytes else { throw SharedMemoryError.unavailable("a segment needs at least \(Self.headerBytes) bytes") }
        let fd = try Self.memfd()
        let reserved = posix_fallocate(fd, 0, off_t(byteCount))
        guard reserved == 0 else {
            close(fd)
            throw SharedMemoryError.unavailable("reserving \(byteCount) bytes: \(String(cString: strerror(reserved)))")
        }
        guard let memory = Self.map(fd, byteCount) else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw SharedMemoryError.unavailable("mmap of \(byteCount) bytes: \(reason)")
        }
        var nonce = [UInt8](repeating: 0, count: 32)
        for i in nonce.indices { nonce[i] = UInt8.random(in: 0...255) }
        memory.copyMemory(from: nonce, byteCount: nonce.count)
        self.byteCount = byteCount
        self.nonce = nonce
        path = "/proc/\(getpid())/fd/\(fd)"
        base = memory
        descriptor = fd
    }

    /// Maps the segment another process created, if it has `byteCount` bytes and starts with `nonce`.
    public init(opening path: String, byteCount: Int, nonce: [UInt8]) throws {
        guard nonce.count == 32, byteCount >= Self.headerBytes else {
            throw SharedMemoryError.cannotOpen(path: path, reason: "a 32-byte nonce and at least \(Self.headerBytes) bytes are needed")
        }
        let fd = try Self.openSegment(path)
        var status = stat()
        guard fstat(fd, &status) == 0, Int(status.st_size) == byteCount else {
            close(fd)
            throw SharedMemoryError.wrongSize(path: path, expected: byteCount, got: Int(status.st_size))
        }
        guard let memory = Self.map(fd, byteCount) else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw SharedMemoryError.cannotOpen(path: path, reason: "mmap: \(reason)")
        }
        guard memcmp(memory, nonce, 32) == 0 else {
            munmap(memory, byteCount)
            close(fd)
            throw SharedMemoryError.nonceMismatch(path: path)
        }
        self.byteCount = byteCount
        self.nonce = nonce
        self.path = path
        base = memory
        descriptor = fd
    }

    /// The name every SwiftDDP memfd has (it shows in `/proc/PID/fd/N` as `/memfd:NAME (deleted)`).
    static let memfdName = "swiftddp-segment"

    /// A new anonymous memory file, closed on exec.
    private static func memfd() throws -> Int32 {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "memfd_create") else {
            throw SharedMemoryError.unavailable("this C library has no memfd_create")
        }
        typealias MemfdCreate = @convention(c) (UnsafePointer<CChar>, UInt32) -> Int32
        let fd = unsafeBitCast(symbol, to: MemfdCreate.self)(memfdName, 1 /* MFD_CLOEXEC */)
        guard fd >= 0 else { throw SharedMemoryError.unavailable("memfd_create: \(String(cString: strerror(errno)))") }
        return fd
    }

    /// The device that memfd files live on (the kernel's internal shared-memory mount), learnt from one
    /// of this process's own; nil where memfds cannot be made.
    private static let memfdDevice: dev_t? = {
        guard let fd = try? memfd() else { return nil }
        defer { close(fd) }
        var status = stat()
        return fstat(fd, &status) == 0 ? status.st_dev : nil
    }()

    /// Opens `path` read-write after proving it names another process's SwiftDDP memfd: the form
    /// `/proc/PID/fd/N`, a regular file on the memfd device with no link, and (once opened, the same
    /// file) named `/memfd:swiftddp-segment`. Anything else is refused before it is opened for writing.
    private static func openSegment(_ path: String) throws -> Int32 {
        func refuse(_ why: String) -> SharedMemoryError { .notASegment(path: path, reason: why) }
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 5, parts[0].isEmpty, parts[1] == "proc", parts[3] == "fd",
              [parts[2], parts[4]].allSatisfy({ !$0.isEmpty && $0.count < 12 && $0.allSatisfy(\.isASCII) && $0.allSatisfy(\.isNumber) })
        else { throw refuse("only /proc/PID/fd/N of a worker's memfd is accepted") }
        guard let device = memfdDevice else { throw SharedMemoryError.unavailable("this kernel makes no memfd to compare with") }
        var before = stat()
        guard stat(path, &before) == 0 else { throw SharedMemoryError.cannotOpen(path: path, reason: String(cString: strerror(errno))) }
        guard before.st_mode & S_IFMT == S_IFREG, before.st_dev == device, before.st_nlink == 0 else {
            throw refuse("it is not an anonymous memory file (memfd)")
        }
        let fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        guard fd >= 0 else { throw SharedMemoryError.cannotOpen(path: path, reason: String(cString: strerror(errno))) }
        var after = stat()
        var target = [CChar](repeating: 0, count: 256)
        let length = readlink("/proc/self/fd/\(fd)", &target, target.count - 1)
        let name = length > 0 ? String(decoding: target.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
        guard fstat(fd, &after) == 0, after.st_dev == before.st_dev, after.st_ino == before.st_ino, after.st_nlink == 0,
              name.hasPrefix("/memfd:\(memfdName) ") || name == "/memfd:\(memfdName)"
        else {
            close(fd)
            throw refuse("it is not a SwiftDDP memfd (\(name.isEmpty ? "unnamed" : name))")
        }
        return fd
    }

    private static func map(_ fd: Int32, _ byteCount: Int) -> UnsafeMutableRawPointer? {
        let memory = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        return memory == MAP_FAILED ? nil : memory
    }

    deinit {
        munmap(base, byteCount)
        close(descriptor)
    }

    /// The region `offset..<offset+count` as a payload (which keeps this segment mapped), or nil when it
    /// lies outside the segment's tensor area or is not 4-byte aligned.
    public func region(offset: Int, count: Int) -> Payload? {
        guard offset >= Self.headerBytes, offset % 4 == 0, count >= 0, offset <= byteCount - count else { return nil }
        return Payload(shared: base + offset, byteCount: count, offset: offset, segment: self)
    }
}

/// Where each tensor of a list goes in a shared segment: consecutive aligned regions from `start`.
public struct SharedLayout: Sendable, Equatable {
    /// The offset of each tensor's region.
    public let offsets: [Int]
    /// The first byte after the last region (aligned).
    public let end: Int

    /// Regions of `byteCounts` bytes each, in order, from `start`.
    public init(start: Int, byteCounts: [Int]) {
        func aligned(_ n: Int) -> Int { (n + SharedSegment.alignment - 1) / SharedSegment.alignment * SharedSegment.alignment }
        var offset = aligned(start)
        var offsets: [Int] = []
        for count in byteCounts {
            offsets.append(offset)
            offset = aligned(offset + count)
        }
        self.offsets = offsets
        end = offset
    }
}
