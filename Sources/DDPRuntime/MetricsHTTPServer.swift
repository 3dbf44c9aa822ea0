import Foundation
import Glibc

/// A socket call of `MetricsHTTPServer` that failed, naming the address and the system's reason.
struct MetricsHTTPServerError: Error, CustomStringConvertible {
    let description: String

    init(_ action: String, address: String, errorNumber: Int32) {
        description = "metrics server: cannot \(action) \(address): \(String(cString: strerror(errorNumber)))"
    }
}

/// Serves the latest metrics text at http://ADDRESS/metrics (Prometheus' text format 0.0.4) from a thread of its own.
///
/// One thread polls the listening socket and every client (all non-blocking), so a slow client
/// never holds up the others. A client gets 2 s to send its request; at most 16 are served at once.
final class MetricsHTTPServer: @unchecked Sendable {
    let url: String
    private let listener: Int32
    private let lock = NSLock()
    private var body: [UInt8] = []  // guarded by lock
    private var stopping = false  // guarded by lock
    private var thread: pthread_t?  // guarded by lock

    private static let maxConnections = 16
    private static let maxHeaderBytes = 8192
    private static let requestTimeout = 2.0
    private static let pollMilliseconds: Int32 = 50

    /// Binds `host` (an IPv4 address or "0.0.0.0") and `port` (0 picks a free one) and starts serving.
    init(host: String, port: UInt16) throws {
        let address = "\(host):\(port)"
        var socketAddress = sockaddr_in()
        socketAddress.sin_family = sa_family_t(AF_INET)
        socketAddress.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &socketAddress.sin_addr) == 1 else {
            throw MetricsHTTPServerError("parse IPv4 address", address: address, errorNumber: EINVAL)
        }
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard listener >= 0 else { throw MetricsHTTPServerError("open a socket for", address: address, errorNumber: errno) }
        var yes: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &socketAddress) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { generic in
                bind(listener, generic, length) == 0 && listen(listener, 64) == 0
                    && getsockname(listener, generic, &length) == 0
            }
        }
        guard bound else {
            let reason = errno
            Glibc.close(listener)
            throw MetricsHTTPServerError("listen on", address: address, errorNumber: reason)
        }
        self.listener = listener
        url = "http://\(host):\(UInt16(bigEndian: socketAddress.sin_port))/metrics"
        var handle = pthread_t()
        let started = pthread_create(&handle, nil, { context in
            Unmanaged<MetricsHTTPServer>.fromOpaque(context!).takeUnretainedValue().serve()
            return nil
        }, Unmanaged.passUnretained(self).toOpaque())
        guard started == 0 else {
            Glibc.close(listener)
            throw MetricsHTTPServerError("start a thread for", address: address, errorNumber: started)
        }
        thread = handle
    }

    deinit { close() }

    /// Sets the text served from now on (thread-safe).
    func update(_ text: String) {
        lock.withLock { body = Array(text.utf8) }
    }

    /// Stops the thread (within one poll interval) and closes every socket. Idempotent.
    func close() {
        let running: pthread_t? = lock.withLock {
            stopping = true
            defer { thread = nil }
            return thread
        }
        guard let running else { return }
        pthread_join(running, nil)
        Glibc.close(listener)
    }

    /// One client socket: the request read so far, then the response still to send.
    private struct Connection {
        enum Phase { case reading, writing, draining }
        var socket: Int32
        var deadline: Double
        var phase = Phase.reading
        var request: [UInt8] = []
        var response: [UInt8] = []
        var sent = 0
    }

    /// The server thread: polls the listener and all clients until `close()`.
    private func serve() {
        var connections: [Connection] = []
        while !lock.withLock({ stopping }) {
            var descriptors = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]
            for connection in connections {
                let events = connection.phase == .writing ? POLLOUT : POLLIN
                descriptors.append(pollfd(fd: connection.socket, events: Int16(events), revents: 0))
            }
            guard poll(&descriptors, nfds_t(descriptors.count), Self.pollMilliseconds) >= 0 || errno == EINTR else { break }
            let now = Self.monotonicSeconds()
            var open: [Connection] = []
            for (index, var connection) in connections.enumerated() {
                if descriptors[index + 1].revents != 0 { advance(&connection, now: now) }
                if connection.socket >= 0 && now < connection.deadline {
                    open.append(connection)
                } else if connection.socket >= 0 {
                    Glibc.close(connection.socket)
                }
            }
            connections = open
            if descriptors[0].revents != 0 { acceptClients(into: &connections, now: now) }
        }
        for connection in connections { Glibc.close(connection.socket) }
    }

    /// Accepts every pending client; beyond the limit a client is closed at once.
    private func acceptClients(into connections: inout [Connection], now: Double) {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 { return }
            let flags = fcntl(client, F_GETFL)
            if connections.count >= Self.maxConnections || flags < 0
                || fcntl(client, F_SETFL, flags | O_NONBLOCK) < 0 || fcntl(client, F_SETFD, FD_CLOEXEC) < 0 {
                Glibc.close(client)
            } else {
                connections.append(Connection(socket: client, deadline: now + Self.requestTimeout))
            }
        }
    }

    /// Does what the socket allows in the connection's phase; sets `socket` to -1 once it is closed.
    ///
    /// After the response the write side is shut down and input is drained until the client
    /// closes, so unread request bytes do not make the kernel reset the connection early.
    private func advance(_ connection: inout Connection, now: Double) {
        if connection.phase == .writing {
            let count = connection.response.withUnsafeBytes { bytes in
                send(connection.socket, bytes.baseAddress! + connection.sent, bytes.count - connection.sent, Int32(MSG_NOSIGNAL))
            }
            if count > 0 { connection.sent += count }
            if connection.sent == connection.response.count {
                shutdown(connection.socket, Int32(SHUT_WR))
                connection.phase = .draining
            } else if count < 0 && errno != EAGAIN && errno != EINTR {
                finish(&connection)
            }
            return
        }
        var chunk = [UInt8](repeating: 0, count: 4096)
        let count = recv(connection.socket, &chunk, chunk.count, 0)
        if count == 0 || (count < 0 && errno != EAGAIN && errno != EINTR) {
            finish(&connection)
            return
        }
        guard count > 0, connection.phase == .reading else { return }
        connection.request.append(contentsOf: chunk[0..<count])
        if let head = Self.headerSection(connection.request) {
            connection.response = respond(to: head)
        } else if connection.request.count > Self.maxHeaderBytes {
            connection.response = Self.response(400, "Bad Request", body: Array("request header too large\n".utf8))
        } else {
            return
        }
        connection.request = []
        connection.phase = .writing
        connection.deadline = now + Self.requestTimeout
        advance(&connection, now: now)
    }

    private func finish(_ connection: inout Connection) {
        Glibc.close(connection.socket)
        connection.socket = -1
    }

    /// The request line and headers (up to the blank line), or nil while incomplete.
    private static func headerSection(_ request: [UInt8]) -> ArraySlice<UInt8>? {
        for index in request.indices where request[index] == UInt8(ascii: "\n") {
            if index >= 1 && request[index - 1] == UInt8(ascii: "\n") { return request[..<index] }
            if index >= 2 && request[index - 1] == UInt8(ascii: "\r") && request[index - 2] == UInt8(ascii: "\n") {
                return request[..<index]
            }
        }
        return nil
    }

    /// The full response to a complete request head.
    private func respond(to head: ArraySlice<UInt8>) -> [UInt8] {
        let firstLine = head.prefix { $0 != UInt8(ascii: "\r") && $0 != UInt8(ascii: "\n") }
        let parts = firstLine.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false)
        guard parts.count == 3, parts[2].starts(with: "HTTP/1.".utf8), head.count <= Self.maxHeaderBytes else {
            return Self.response(400, "Bad Request", body: Array("bad request\n".utf8))
        }
        let method = String(decoding: parts[0], as: UTF8.self)
        let path = parts[1].prefix { $0 != UInt8(ascii: "?") }
        guard method == "GET" || method == "HEAD" else {
            return Self.response(405, "Method Not Allowed", body: Array("only GET and HEAD\n".utf8), extraHeaders: "Allow: GET, HEAD\r\n")
        }
        guard path.elementsEqual("/metrics".utf8) else {
            return Self.response(404, "Not Found", body: Array("see /metrics\n".utf8), headOnly: method == "HEAD")
        }
        let metrics = lock.withLock { body }
        return Self.response(200, "OK", body: metrics, contentType: "text/plain; version=0.0.4; charset=utf-8", headOnly: method == "HEAD")
    }

    private static func response(
        _ status: Int, _ reason: String, body: [UInt8], contentType: String = "text/plain; charset=utf-8",
        extraHeaders: String = "", headOnly: Bool = false
    ) -> [UInt8] {
        let head = "HTTP/1.1 \(status) \(reason)\r\nContent-Type: \(contentType)\r\nContent-Length: \(body.count)\r\n"
            + extraHeaders + "Connection: close\r\n\r\n"
        return Array(head.utf8) + (headOnly ? [] : body)
    }

    private static func monotonicSeconds() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) * 1e-9
    }
}
