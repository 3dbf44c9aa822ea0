import Foundation
import Synchronization
private import CZeroMQ

#if canImport(Glibc)
import Glibc
#endif

/// Errors from ZeroMQ calls, with the call and the endpoint or option involved.
public struct ZMQError: Error, CustomStringConvertible, Equatable {
    /// The failing operation, e.g. `bind tcp://127.0.0.1:0`.
    public let operation: String
    /// The errno value ZeroMQ reported.
    public let code: Int32
    public var description: String { "\(operation): \(String(cString: zmq_strerror(code)))" }
    /// The peer is not connected (a ROUTER send to an unknown or departed routing id).
    public var isPeerUnreachable: Bool { code == EHOSTUNREACH }
    /// The operation would have blocked past its timeout.
    public var isTimeout: Bool { code == EAGAIN }

    static func last(_ operation: String) -> ZMQError { ZMQError(operation: operation, code: zmq_errno()) }
}

/// A ZeroMQ context: owns the I/O threads. Thread-safe; terminated when the last socket and the
/// context itself are gone.
public final class ZMQContext: @unchecked Sendable {
    let handle: UnsafeMutableRawPointer

    /// A new context with `ioThreads` background threads (each connection is served by one of them,
    /// so a hub talking to several peers moves their bytes in parallel with more than one). Also tunes
    /// glibc's allocator so that large message buffers are reused instead of being mapped and
    /// page-faulted afresh for every message: one arena (ZeroMQ allocates received messages on its I/O
    /// threads, whose own arenas would map every large buffer), a high mmap threshold, no trimming.
    public init(ioThreads: Int = 1) {
        _ = Self.tuneAllocator
        handle = zmq_ctx_new()!
        if ioThreads != 1 { zmq_ctx_set(handle, ZMQ_IO_THREADS, Int32(ioThreads)) }
    }

    private static let tuneAllocator: Void = {
        #if canImport(Glibc)
        _ = mallopt(M_ARENA_MAX, 1)
        _ = mallopt(M_MMAP_THRESHOLD, 512 << 20)
        _ = mallopt(M_TRIM_THRESHOLD, 1 << 30)
        #endif
    }()

    private var terminated = false

    /// Ends the context now: waits (up to each socket's linger) until what its sockets queued has left.
    /// Every socket of it must be closed first.
    public func terminate() {
        guard !terminated else { return }
        terminated = true
        zmq_ctx_term(handle)
    }

    deinit { terminate() }

    /// The libzmq version as "major.minor.patch".
    public static var libraryVersion: String {
        var major: Int32 = 0, minor: Int32 = 0, patch: Int32 = 0
        zmq_version(&major, &minor, &patch)
        return "\(major).\(minor).\(patch)"
    }

    /// Whether libzmq was built with CURVE security.
    public static var hasCurve: Bool { zmq_has("curve") != 0 }
}

/// The bytes of one message frame: memory this process allocated or borrowed (both sent without
/// copying), or a frame received from ZeroMQ (read without copying). Reuse payloads across steps:
/// `isInFlight` tells whether ZeroMQ still holds one that was sent.
public final class Payload: @unchecked Sendable {
    private enum Backing {
        case owned(UnsafeMutableRawPointer)
        case received(UnsafeMutablePointer<zmq_msg_t>)
        case borrowed(UnsafeRawPointer, owner: AnyObject)
        case shared(UnsafeMutableRawPointer, offset: Int, segment: SharedSegment)
    }

    private let backing: Backing
    /// The frame's size in bytes.
    public let byteCount: Int
    private let sendsInFlight = Atomic<Int>(0)

    /// A zero-filled buffer of `byteCount` bytes.
    public init(byteCount: Int) {
        let memory = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: 64)
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: max(byteCount, 1))
        backing = .owned(memory)
        self.byteCount = byteCount
    }

    /// A buffer holding a copy of `bytes`.
    public convenience init(bytes: [UInt8]) {
        self.init(byteCount: bytes.count)
        withUnsafeMutableBytes { $0.copyBytes(from: bytes) }
    }

    /// A buffer holding `floats` as little-endian float32.
    public convenience init(floats: [Float]) {
        self.init(byteCount: floats.count * 4)
        withUnsafeMutableBytes { dst in floats.withUnsafeBytes { dst.copyMemory(from: $0) } }
    }

    /// Bytes that `owner` keeps alive and that nobody writes while this payload exists (for example the
    /// storage of a gradient tensor that is dropped, not reused, after it is sent). Read-only; sent
    /// without a copy, `owner` retained until ZeroMQ is done with it.
    public init(borrowing bytes: UnsafeRawBufferPointer, owner: AnyObject) {
        backing = .borrowed(bytes.baseAddress ?? UnsafeRawPointer(bitPattern: 64)!, owner: owner)
        byteCount = bytes.count
    }

    /// A region of a shared-memory segment (see `SharedSegment.region`): written and read in place, and
    /// described in a message by its offset instead of sent as a frame.
    init(shared memory: UnsafeMutableRawPointer, byteCount: Int, offset: Int, segment: SharedSegment) {
        backing = .shared(memory, offset: offset, segment: segment)
        self.byteCount = byteCount
    }

    /// Where in its shared-memory segment this payload lies; nil for any other payload.
    var sharedOffset: Int? {
        if case .shared(_, let offset, _) = backing { return offset }
        return nil
    }

    /// Takes ownership of a received message.
    fileprivate init(receiving message: UnsafeMutablePointer<zmq_msg_t>) {
        backing = .received(message)
        byteCount = zmq_msg_size(message)
    }

    deinit {
        switch backing {
        case .owned(let memory): memory.deallocate()
        case .received(let message):
            zmq_msg_close(message)
            message.deallocate()
        case .borrowed, .shared: break
        }
    }

    /// Whether a zero-copy send of this buffer is still queued in ZeroMQ (do not write it then).
    public var isInFlight: Bool { sendsInFlight.load(ordering: .acquiring) > 0 }

    /// Reads the bytes through a pointer that must not escape `body`.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        switch backing {
        case .owned(let memory): try body(UnsafeRawBufferPointer(start: memory, count: byteCount))
        case .received(let message): try body(UnsafeRawBufferPointer(start: zmq_msg_data(message), count: byteCount))
        case .borrowed(let memory, _): try body(UnsafeRawBufferPointer(start: memory, count: byteCount))
        case .shared(let memory, _, _): try body(UnsafeRawBufferPointer(start: memory, count: byteCount))
        }
    }

    /// Writes the bytes of an owned, idle buffer (or a shared-memory region) through a pointer that must
    /// not escape `body`.
    public func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        switch backing {
        case .owned(let memory):
            precondition(!isInFlight, "Payload: written while ZeroMQ still sends it")
            return try body(UnsafeMutableRawBufferPointer(start: memory, count: byteCount))
        case .shared(let memory, _, _):
            return try body(UnsafeMutableRawBufferPointer(start: memory, count: byteCount))
        case .received, .borrowed:
            preconditionFailure("Payload: only an owned buffer or a shared region can be written")
        }
    }

    /// A copy of the bytes.
    public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }

    /// Fills `message` with this payload: zero-copy for an owned or borrowed buffer (retained until
    /// ZeroMQ frees it), a copy for a received one.
    fileprivate func attach(to message: UnsafeMutablePointer<zmq_msg_t>) -> Int32 {
        switch backing {
        case .received:
            guard zmq_msg_init_size(message, byteCount) == 0 else { return -1 }
            withUnsafeBytes { src in if byteCount > 0 { zmq_msg_data(message).copyMemory(from: src.baseAddress!, byteCount: byteCount) } }
            return 0
        case .owned(let memory): return attachWithoutCopy(memory, to: message)
        case .borrowed(let memory, _): return attachWithoutCopy(UnsafeMutableRawPointer(mutating: memory), to: message)
        case .shared(let memory, _, _): return attachWithoutCopy(memory, to: message)
        }
    }

    private func attachWithoutCopy(_ memory: UnsafeMutableRawPointer, to message: UnsafeMutablePointer<zmq_msg_t>) -> Int32 {
        sendsInFlight.add(1, ordering: .releasing)
        let hint = Unmanaged.passRetained(self).toOpaque()
        let rc = zmq_msg_init_data(message, memory, byteCount, { _, hint in
            let payload = Unmanaged<Payload>.fromOpaque(hint!).takeRetainedValue()
            payload.sendsInFlight.subtract(1, ordering: .releasing)
        }, hint)
        if rc != 0 {
            Unmanaged<Payload>.fromOpaque(hint).release()
            sendsInFlight.subtract(1, ordering: .releasing)
        }
        return rc
    }
}

/// One frame to send: small bytes (copied) or a payload (zero-copy unless it was received).
public enum OutgoingFrame {
    case bytes([UInt8])
    case payload(Payload)
}

/// A ZeroMQ socket. Not thread-safe: one thread owns it. Closed in `deinit` or by `close()`.
public final class ZMQSocket {
    /// Socket patterns used by SwiftDDP.
    public enum Kind: Sendable {
        case router, dealer, pair, request, reply

        var rawValue: Int32 {
            switch self {
            case .router: ZMQ_ROUTER
            case .dealer: ZMQ_DEALER
            case .pair: ZMQ_PAIR
            case .request: ZMQ_REQ
            case .reply: ZMQ_REP
            }
        }
    }

    private var handle: UnsafeMutableRawPointer?
    private let context: ZMQContext  // kept alive while the socket is open
    public let kind: Kind
    /// The connection (its file descriptor) the last received message came in on; a `ZMQMonitor`
    /// reports disconnections by the same number.
    public private(set) var lastConnection: Int32 = -1

    /// A new socket with `linger` (how long unsent messages are kept on close) set to one second.
    public init(context: ZMQContext, kind: Kind) throws {
        guard let handle = zmq_socket(context.handle, kind.rawValue) else { throw ZMQError.last("zmq_socket") }
        self.handle = handle
        self.context = context
        self.kind = kind
        try setOption(ZMQ_LINGER, 1000, "linger")
    }

    deinit { close() }

    /// Closes the socket now; later calls fail with ENOTSOCK.
    public func close() {
        if let handle { zmq_close(handle) }
        handle = nil
    }

    fileprivate var openHandle: UnsafeMutableRawPointer { get throws { try open } }

    private var open: UnsafeMutableRawPointer {
        get throws {
            guard let handle else { throw ZMQError(operation: "socket", code: ENOTSOCK) }
            return handle
        }
    }

    /// Binds to `endpoint` (`tcp://HOST:PORT`, port 0 for any free one; `ipc://PATH`; `inproc://NAME`)
    /// and returns the endpoint actually bound, with the port filled in.
    @discardableResult
    public func bind(_ endpoint: String) throws -> String {
        guard zmq_bind(try open, endpoint) == 0 else { throw ZMQError.last("bind \(endpoint)") }
        return try lastEndpoint()
    }

    /// Connects to `endpoint`; the connection is made (and remade) in the background.
    public func connect(_ endpoint: String) throws {
        guard zmq_connect(try open, endpoint) == 0 else { throw ZMQError.last("connect \(endpoint)") }
    }

    /// The last endpoint bound (`ZMQ_LAST_ENDPOINT`).
    public func lastEndpoint() throws -> String {
        var buffer = [CChar](repeating: 0, count: 1024)
        var size = buffer.count
        guard zmq_getsockopt(try open, ZMQ_LAST_ENDPOINT, &buffer, &size) == 0 else {
            throw ZMQError.last("getsockopt last endpoint")
        }
        return String(cString: buffer.map { UInt8(bitPattern: $0) })
    }

    func setOption(_ option: Int32, _ value: Int32, _ name: String) throws {
        var v = value
        guard zmq_setsockopt(try open, option, &v, MemoryLayout<Int32>.size) == 0 else {
            throw ZMQError.last("setsockopt \(name)=\(value)")
        }
    }

    func setOption(_ option: Int32, bytes: [UInt8], _ name: String) throws {
        guard zmq_setsockopt(try open, option, bytes, bytes.count) == 0 else { throw ZMQError.last("setsockopt \(name)") }
    }

    /// How long, in milliseconds, unsent messages survive `close()` (-1: forever).
    public func setLinger(milliseconds: Int) throws { try setOption(ZMQ_LINGER, Int32(milliseconds), "linger") }
    /// Queue limits in messages for each direction (0: none).
    public func setHighWaterMarks(send: Int, receive: Int) throws {
        try setOption(ZMQ_SNDHWM, Int32(send), "sndhwm")
        try setOption(ZMQ_RCVHWM, Int32(receive), "rcvhwm")
    }
    /// Kernel socket buffer sizes in bytes (larger buffers mean fewer wake-ups for megabyte messages).
    public func setKernelBuffers(bytes: Int) throws {
        try setOption(ZMQ_SNDBUF, Int32(bytes), "sndbuf")
        try setOption(ZMQ_RCVBUF, Int32(bytes), "rcvbuf")
    }
    /// The largest inbound message accepted; a peer sending more is disconnected.
    public func setMaximumMessageSize(bytes: Int64) throws {
        var v = bytes
        guard zmq_setsockopt(try open, ZMQ_MAXMSGSIZE, &v, 8) == 0 else { throw ZMQError.last("setsockopt maxmsgsize") }
    }
    /// How long a new connection may take to complete its handshake before it is closed (a peer that
    /// connects and says nothing holds a descriptor no longer than this).
    public func setHandshakeInterval(milliseconds: Int) throws { try setOption(ZMQ_HANDSHAKE_IVL, Int32(milliseconds), "handshake_ivl") }
    /// A send blocks at most this long before failing with a timeout (-1: forever).
    public func setSendTimeout(milliseconds: Int) throws { try setOption(ZMQ_SNDTIMEO, Int32(milliseconds), "sndtimeo") }
    /// ZMTP heartbeats: a PING every `interval`; the connection is dropped after `timeout` without traffic.
    public func setHeartbeat(intervalMilliseconds: Int, timeoutMilliseconds: Int) throws {
        try setOption(ZMQ_HEARTBEAT_IVL, Int32(intervalMilliseconds), "heartbeat_ivl")
        try setOption(ZMQ_HEARTBEAT_TIMEOUT, Int32(timeoutMilliseconds), "heartbeat_timeout")
        try setOption(ZMQ_HEARTBEAT_TTL, Int32(timeoutMilliseconds), "heartbeat_ttl")
    }
    /// The routing id this socket presents to a ROUTER peer.
    public func setRoutingID(_ id: [UInt8]) throws { try setOption(ZMQ_ROUTING_ID, bytes: id, "routing_id") }
    /// On a ROUTER: fail a send to an unknown routing id instead of dropping it silently.
    public func setRouterMandatory(_ on: Bool) throws { try setOption(ZMQ_ROUTER_MANDATORY, on ? 1 : 0, "router_mandatory") }
    /// Makes this socket a CURVE server holding `secretKey` (Z85 text).
    public func setCurveServer(secretKey: String) throws {
        try setOption(ZMQ_CURVE_SERVER, 1, "curve_server")
        try setOption(ZMQ_CURVE_SECRETKEY, bytes: Array(secretKey.utf8), "curve_secretkey")
    }
    /// Makes this socket a CURVE client of the server with `serverKey`, with its own key pair (Z85 text).
    public func setCurveClient(serverKey: String, publicKey: String, secretKey: String) throws {
        try setOption(ZMQ_CURVE_SERVERKEY, bytes: Array(serverKey.utf8), "curve_serverkey")
        try setOption(ZMQ_CURVE_PUBLICKEY, bytes: Array(publicKey.utf8), "curve_publickey")
        try setOption(ZMQ_CURVE_SECRETKEY, bytes: Array(secretKey.utf8), "curve_secretkey")
    }
    /// The ZAP domain; with a ZAP handler running, connections are authenticated against it.
    public func setZAPDomain(_ domain: String) throws { try setOption(ZMQ_ZAP_DOMAIN, bytes: Array(domain.utf8), "zap_domain") }

    /// Sends `frames` as one multipart message. Fails with a timeout error when the send timeout
    /// passes, and with `isPeerUnreachable` on a mandatory ROUTER whose peer is gone.
    public func send(_ frames: [OutgoingFrame]) throws {
        let socket = try open
        precondition(!frames.isEmpty, "send: a message needs at least one frame")
        let message = UnsafeMutablePointer<zmq_msg_t>.allocate(capacity: 1)
        defer { message.deallocate() }
        for (index, frame) in frames.enumerated() {
            let flags = index == frames.count - 1 ? 0 : ZMQ_SNDMORE
            switch frame {
            case .bytes(let bytes):
                guard zmq_msg_init_size(message, bytes.count) == 0 else { throw ZMQError.last("zmq_msg_init_size") }
                if !bytes.isEmpty { bytes.withUnsafeBytes { zmq_msg_data(message).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) } }
            case .payload(let payload):
                guard payload.attach(to: message) == 0 else { throw ZMQError.last("zmq_msg_init_data") }
            }
            while zmq_msg_send(message, socket, flags) < 0 {
                let error = ZMQError.last("send frame \(index + 1) of \(frames.count)")
                if error.code == EINTR { continue }
                zmq_msg_close(message)
                throw error
            }
        }
    }

    /// Receives one multipart message, waiting at most `timeoutMilliseconds` (nil: forever) for its
    /// first frame; returns nil on timeout.
    public func receive(timeoutMilliseconds: Int? = nil) throws -> [Payload]? {
        let socket = try open
        if let timeoutMilliseconds {
            var item = zmq_pollitem_t(socket: socket, fd: 0, events: Int16(ZMQ_POLLIN), revents: 0)
            var rc: Int32
            repeat { rc = zmq_poll(&item, 1, timeoutMilliseconds) } while rc < 0 && zmq_errno() == EINTR
            guard rc >= 0 else { throw ZMQError.last("poll") }
            if rc == 0 { return nil }
        }
        var frames: [Payload] = []
        while true {
            let message = UnsafeMutablePointer<zmq_msg_t>.allocate(capacity: 1)
            zmq_msg_init(message)
            var rc: Int32
            repeat { rc = zmq_msg_recv(message, socket, 0) } while rc < 0 && zmq_errno() == EINTR
            guard rc >= 0 else {
                let error = ZMQError.last("receive")
                zmq_msg_close(message)
                message.deallocate()
                throw error
            }
            let more = zmq_msg_more(message) != 0
            // A ROUTER's routing-id frame is made locally; the frames after it carry the connection.
            let connection = zmq_msg_get(message, ZMQ_SRCFD)
            if frames.isEmpty || connection >= 0 { lastConnection = connection }
            frames.append(Payload(receiving: message))
            if !more { return frames }
        }
    }

    /// Waits until one of `sockets` has a message to read or `timeoutMilliseconds` passes; returns the
    /// indices of the readable ones.
    public static func poll(_ sockets: [ZMQSocket], timeoutMilliseconds: Int) throws -> [Int] {
        var items = try sockets.map { zmq_pollitem_t(socket: try $0.open, fd: 0, events: Int16(ZMQ_POLLIN), revents: 0) }
        var rc: Int32
        repeat { rc = zmq_poll(&items, Int32(items.count), timeoutMilliseconds) } while rc < 0 && zmq_errno() == EINTR
        guard rc >= 0 else { throw ZMQError.last("poll") }
        return items.indices.filter { items[$0].revents & Int16(ZMQ_POLLIN) != 0 }
    }
}

/// Connection events of a socket, read from ZeroMQ's socket monitor.
public final class ZMQMonitor {
    /// An event and the connection (file descriptor) it concerns.
    public enum Event: Equatable, Sendable {
        case accepted(connection: Int32)
        case disconnected(connection: Int32)
        case authenticationFailed(connection: Int32)
        case other(code: UInt16)
    }

    /// The socket to poll for events (with `ZMQSocket.poll`).
    public let socket: ZMQSocket

    /// Starts monitoring `target` for accepted and dropped connections and failed authentication.
    public init(context: ZMQContext, monitoring target: ZMQSocket) throws {
        let address = "inproc://monitor-\(UInt64.random(in: 0...UInt64.max))"
        let events = ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH
        guard zmq_socket_monitor(try target.openHandle, address, events) == 0 else { throw ZMQError.last("zmq_socket_monitor") }
        socket = try ZMQSocket(context: context, kind: .pair)
        try socket.connect(address)
    }

    /// The next event, waiting at most `timeoutMilliseconds`.
    public func next(timeoutMilliseconds: Int = 0) throws -> Event? {
        guard let frames = try socket.receive(timeoutMilliseconds: timeoutMilliseconds), frames.count >= 1, frames[0].byteCount >= 6 else {
            return nil
        }
        let (code, value) = frames[0].withUnsafeBytes { raw in
            (raw.loadUnaligned(as: UInt16.self), raw.loadUnaligned(fromByteOffset: 2, as: UInt32.self))
        }
        let connection = Int32(bitPattern: value)
        switch Int32(code) {
        case ZMQ_EVENT_ACCEPTED: return .accepted(connection: connection)
        case ZMQ_EVENT_DISCONNECTED: return .disconnected(connection: connection)
        case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH: return .authenticationFailed(connection: connection)
        default: return .other(code: code)
        }
    }
}

/// A CURVE key pair in Z85 text (40 characters each).
public struct CurveKeyPair: Sendable, Equatable, Codable {
    public let publicKey: String
    public let secretKey: String

    /// A fresh random key pair.
    public static func generate() throws -> CurveKeyPair {
        var publicKey = [CChar](repeating: 0, count: 41), secretKey = [CChar](repeating: 0, count: 41)
        guard zmq_curve_keypair(&publicKey, &secretKey) == 0 else { throw ZMQError.last("zmq_curve_keypair") }
        func text(_ c: [CChar]) -> String { String(decoding: c.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        return CurveKeyPair(publicKey: text(publicKey), secretKey: text(secretKey))
    }

    public init(publicKey: String, secretKey: String) {
        self.publicKey = publicKey
        self.secretKey = secretKey
    }
}
