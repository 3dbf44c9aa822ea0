import DDPWire
import Foundation

/// `ddpctl doctor`: preflight checks before a job, each passed or failed with a fix.
public enum Doctor {
    public struct Check: Sendable {
        public let name: String
        public let passed: Bool
        public let detail: String
        public let fix: String
    }

    /// Runs the local checks, and with `endpoint` (a coordinator's control endpoint) the remote ones.
    public static func run(jobsRoot: String, endpoint: String?, keys: JobKeys? = nil) -> [Check] {
        var checks: [Check] = []
        func check(_ name: String, fix: String, _ body: () throws -> String) {
            do { checks.append(Check(name: name, passed: true, detail: try body(), fix: "")) } catch {
                checks.append(Check(name: name, passed: false, detail: "\(error)", fix: fix))
            }
        }
        check("libzmq", fix: "apt-get install libzmq3-dev") {
            "ZeroMQ \(ZMQContext.libraryVersion), CURVE \(ZMQContext.hasCurve ? "available" : "missing")"
        }
        check("jobs directory", fix: "set SWIFTDDP_HOME or --jobs-dir to a writable folder") {
            try FileManager.default.createDirectory(atPath: jobsRoot, withIntermediateDirectories: true)
            let probe = jobsRoot + "/.doctor-\(getpid())"
            guard FileManager.default.createFile(atPath: probe, contents: Data()) else { throw ControlError.failed("\(jobsRoot) is not writable") }
            try FileManager.default.removeItem(atPath: probe)
            return "\(jobsRoot) is writable"
        }
        let context = ZMQContext()
        check("ipc sockets", fix: "use --transport tcp, or free space and permissions in /tmp") {
            let socket = try ZMQSocket(context: context, kind: .router)
            let path = "/tmp/ddp-doctor-\(getpid()).sock"
            defer { socket.close(); try? FileManager.default.removeItem(atPath: path) }
            return "bound \(try socket.bind("ipc://" + path))"
        }
        check("tcp loopback", fix: "check the loopback interface and local firewall rules") {
            let socket = try ZMQSocket(context: context, kind: .router)
            defer { socket.close() }
            return "bound \(try socket.bind("tcp://127.0.0.1:0"))"
        }
        guard let endpoint else { return checks }
        if endpoint.hasPrefix("tcp://"), let colon = endpoint.lastIndex(of: ":"), let port = UInt16(endpoint[endpoint.index(after: colon)...]), port > 0 {
            let host = String(endpoint.dropFirst("tcp://".count)[..<colon])
            check("port \(port)", fix: "start the coordinator, or check the address, its --control port and the firewall") {
                try probeTCP(host: host, port: port, timeoutSeconds: 2)
                return "something listens on \(host):\(port)"
            }
        }
        var reachable = false
        let keyHint = keys == nil ? "; a secure coordinator (keys_dir, or TCP jobs of ddpctl start) answers only with its keys: pass --keys DIR" : ""
        check("coordinator", fix: "start it (ddpd coordinator ...) or check the endpoint, the network and firewall" + keyHint) {
            let reply = try ControlClient(endpoint: endpoint, keys: keys).status(timeoutSeconds: 2)
            reachable = true
            return "answered at \(endpoint): job state \(reply.jobState), step \(reply.step)"
        }
        guard reachable else { return checks }
        check("protocol version", fix: "run the same SwiftDDP version on both sides") { "both speak protocol version \(wireProtocolVersion)" }
        check("round trip", fix: "check the network between this host and the coordinator") {
            let times = try echo(endpoint, keys: keys, bytes: 0, times: 20)
            return String(format: "median %.3f ms over 20 echoes", Measure.median(times) * 1000)
        }
        check("bandwidth", fix: "check the link speed and load between this host and the coordinator") {
            let bytes = 8 << 20
            let times = try echo(endpoint, keys: keys, bytes: bytes, times: 5)
            return String(format: "%.2f GB/s each way (8 MiB echoes)", Double(bytes) / (Measure.median(times) / 2) / 1e9)
        }
        return checks
    }

    /// Opens (and closes) a TCP connection to `host:port` within `timeoutSeconds`; throws what happened:
    /// refused (nothing listens), no answer (a firewall dropping packets), or the name does not resolve.
    static func probeTCP(host: String, port: UInt16, timeoutSeconds: Double) throws {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let resolved = getaddrinfo(host == "*" ? "127.0.0.1" : host, "\(port)", &hints, &list)
        guard resolved == 0, let first = list else {
            throw ControlError.failed("\(host) does not resolve: \(String(cString: gai_strerror(resolved)))")
        }
        defer { freeaddrinfo(list) }
        let fd = socket(first.pointee.ai_family, first.pointee.ai_socktype | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ControlError.failed("cannot make a socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        if connect(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) != 0 && errno != EINPROGRESS {
            throw ControlError.failed("nothing listens on \(host):\(port) (\(String(cString: strerror(errno))))")
        }
        var poller = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        guard poll(&poller, 1, Int32(timeoutSeconds * 1000)) == 1 else {
            throw ControlError.failed("no answer from \(host):\(port) within \(timeoutSeconds) s (a firewall dropping packets?)")
        }
        var error: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length)
        guard error == 0 else { throw ControlError.failed("nothing listens on \(host):\(port) (\(String(cString: strerror(error))))") }
    }

    /// Times `times` heartbeat echoes carrying `bytes` through the coordinator's control socket.
    static func echo(_ endpoint: String, keys: JobKeys?, bytes: Int, times: Int) throws -> [Double] {
        let context = ZMQContext()
        let socket = try ZMQSocket(context: context, kind: .dealer)
        try keys?.secureClient(socket)
        try socket.setLinger(milliseconds: 0)
        try socket.connect(endpoint)
        let payload = Payload(byteCount: bytes)
        var result: [Double] = []
        for _ in 0..<times {
            let tensors = bytes > 0 ? [WireTensor(name: "echo", shape: [bytes / 4], payload: payload)] : []
            let t = try Measure.seconds {
                try socket.send(WireCodec.encode(WireMessage(jobID: "", body: .heartbeat(Heartbeat(sentUnixMilliseconds: 0, state: "doctor")), tensors: tensors)))
                guard try socket.receive(timeoutMilliseconds: 5000) != nil else {
                    throw ControlError.noAnswer(endpoint: endpoint, seconds: 5)
                }
            }
            result.append(t)
        }
        return result
    }
}
