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
        if let port = endpoint.split(separator: ":").last.flatMap({ Int($0) }), endpoint.hasPrefix("tcp://"), port > 0 {
            check("port \(port)", fix: "another process may hold it; pick another port") { "the coordinator's port is in use (as expected while it runs)" }
        }
        var reachable = false
        check("coordinator", fix: "start it (ddpd coordinator ...) or check the endpoint, the network and firewall") {
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
