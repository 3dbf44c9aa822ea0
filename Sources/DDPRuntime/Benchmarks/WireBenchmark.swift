import DDPWire
import Foundation

/// `ddpctl bench wire`: a tensor of `elements` floats sent to a second process and back over ZeroMQ on
/// loopback, with reused, zero-copy buffers on both sides; one way is half the round trip.
public struct WireBenchmark {
    public var elements: Int
    public var repeats: Int
    public var endpoint: String

    public init(elements: Int, repeats: Int = 20, endpoint: String = "tcp://127.0.0.1:0") {
        self.elements = elements
        self.repeats = repeats
        self.endpoint = endpoint
    }

    /// Runs the benchmark against an echo process started from `executable` with `echoArguments`
    /// followed by the endpoint.
    public func run(executable: String, echoArguments: [String]) throws -> [String: Any] {
        guard elements > 0, repeats > 0 else { throw WireBenchmarkError.invalid("--elements and --repeats must be positive") }
        let context = ZMQContext()
        let socket = try ZMQSocket(context: context, kind: .pair)
        let bound = try socket.bind(endpoint)
        let echo = Process()
        echo.executableURL = URL(fileURLWithPath: executable)
        echo.arguments = echoArguments + [bound]
        try echo.run()
        defer { if echo.isRunning { echo.terminate() }; echo.waitUntilExit() }

        let big = try roundTrips(socket, elements: elements, repeats: repeats)
        let small = try roundTrips(socket, elements: 9610, repeats: 200)
        try socket.send([.bytes([])])  // tells the echo process to exit
        let oneWay = Measure.median(big) / 2, bytes = Double(elements * 4)
        return [
            "benchmark": "wire", "elements": elements, "bytes": elements * 4, "transport": bound.components(separatedBy: ":").first!,
            "seconds": oneWay, "gbytes_per_second": bytes / oneWay / 1e9,
            "round_trip_seconds_min": big.min()!, "round_trip_seconds_max": big.max()!,
            "small_message_elements": 9610, "small_round_trip_ms": Measure.median(small) * 1e3,
        ]
    }

    private func roundTrips(_ socket: ZMQSocket, elements: Int, repeats: Int) throws -> [Double] {
        let payload = Payload(floats: Array(repeating: 1, count: elements))
        var times: [Double] = []
        for round in -3..<repeats {
            let t = try Measure.seconds {
                try socket.send([.payload(payload)])
                guard let reply = try socket.receive(timeoutMilliseconds: 30_000), reply.first?.byteCount == elements * 4 else {
                    throw WireBenchmarkError.invalid("the echo process did not answer within 30 s")
                }
            }
            if round >= 0 { times.append(t) }
        }
        return times
    }

    /// The echo side: returns every frame it receives from `endpoint` from a reused buffer, until an
    /// empty frame arrives.
    public static func echo(endpoint: String) throws {
        let context = ZMQContext()
        let socket = try ZMQSocket(context: context, kind: .pair)
        try socket.connect(endpoint)
        var buffers: [Int: Payload] = [:]
        while let frames = try socket.receive(timeoutMilliseconds: 60_000), let frame = frames.first, frame.byteCount > 0 {
            var buffer = buffers[frame.byteCount] ?? Payload(byteCount: frame.byteCount)
            if buffer.isInFlight { buffer = Payload(byteCount: frame.byteCount) }
            buffers[frame.byteCount] = buffer
            buffer.withUnsafeMutableBytes { dst in frame.withUnsafeBytes { dst.copyMemory(from: $0) } }
            try socket.send([.payload(buffer)])
        }
    }
}

enum WireBenchmarkError: Error, CustomStringConvertible {
    case invalid(String)
    var description: String { switch self { case .invalid(let why): "bench wire: \(why)" } }
}
