import DDPWire
import Foundation

/// `ddpctl bench exchange`: the time of one full gradient round through a coordinator, without compute:
/// every worker process pushes `elements` floats, the coordinator averages them in rank order (as the
/// coordinator does, chunk by chunk) and sends the result to every worker. Tensors travel as `dtype` (f32, or bf16/f16 halving the bytes).
public struct ExchangeBenchmark {
    public var elements: Int
    public var workers: Int
    public var dtype: DType
    public var rounds: Int

    public init(elements: Int, workers: Int, dtype: DType, rounds: Int = 20) {
        self.elements = elements
        self.workers = workers
        self.dtype = dtype
        self.rounds = rounds
    }

    public func run(executable: String, workerArguments: [String]) throws -> [String: Any] {
        guard elements > 0, workers > 0, rounds > 0 else { throw WireBenchmarkError.invalid("--elements, --workers and --rounds must be positive") }
        let context = ZMQContext(ioThreads: min(workers, 2))
        let router = try ZMQSocket(context: context, kind: .router)
        try router.setHighWaterMarks(send: 0, receive: 0)
        let endpoint = try router.bind("ipc:///tmp/ddp-exchange-\(getpid()).sock")
        defer { try? FileManager.default.removeItem(atPath: "/tmp/ddp-exchange-\(getpid()).sock") }
        let processes = try (0..<workers).map { _ -> Process in
            let p = Process()
            p.executableURL = URL(fileURLWithPath: executable)
            p.arguments = workerArguments + [endpoint, "--elements", "\(elements)", "--dtype", dtype.rawValue]
            try p.run()
            return p
        }
        defer { for p in processes where p.isRunning { p.terminate() } }
        var identities: [[UInt8]] = []
        while identities.count < workers {  // each worker says hello with an empty frame
            guard let frames = try router.receive(timeoutMilliseconds: 30_000) else { throw WireBenchmarkError.invalid("workers did not connect") }
            identities.append(frames[0].bytes)
        }
        var sum = [Float](repeating: 0, count: elements), scratch = [Float](repeating: 0, count: WeightedMean.chunk)
        var update = Payload(byteCount: elements * dtype.size)
        var times: [Double] = []
        for round in -3..<rounds {
            let t = try Measure.seconds {
                if update.isInFlight { update = Payload(byteCount: elements * dtype.size) }
                sum.withUnsafeBufferPointer { TensorEncoding.write($0, as: dtype, into: update) }
                for identity in identities { try router.send([.bytes(identity), .payload(update)]) }
                var received: [[UInt8]: Payload] = [:]
                while received.count < workers {
                    guard let frames = try router.receive(timeoutMilliseconds: 30_000), frames.count == 2 else {
                        throw WireBenchmarkError.invalid("a worker did not answer within 30 s")
                    }
                    received[frames[0].bytes] = frames[1]
                }
                let terms = identities.map { (weight: 1 / Float(workers), payload: received[$0]!) }
                sum.withUnsafeMutableBufferPointer { mean in
                    scratch.withUnsafeMutableBufferPointer { _ = WeightedMean.write(terms, dtype: dtype, into: mean, scratch: $0) }
                }
            }
            if round >= 0 { times.append(t) }
        }
        for identity in identities { try router.send([.bytes(identity), .bytes([])]) }
        let median = Measure.median(times)
        let bytesPerRound = Double(2 * workers * elements * dtype.size)
        let memcpy = Self.memcpyBandwidth(bytes: elements * 4)
        return [
            "benchmark": "exchange", "elements": elements, "workers": workers, "dtype": dtype.rawValue, "rounds": rounds,
            "seconds": median, "ms_per_round": median * 1e3, "round_ms_min": times.min()! * 1e3, "round_ms_max": times.max()! * 1e3,
            "bytes_per_round": Int(bytesPerRound), "gbytes_per_second": bytesPerRound / median / 1e9,
            "memcpy_gbytes_per_second": memcpy, "fraction_of_memcpy": bytesPerRound / median / 1e9 / memcpy,
        ]
    }

    /// One worker of the benchmark: answers every update with a gradient of the same size, sent as the
    /// real worker sends it: from its own storage in f32, converted into a reused buffer in f16/bf16.
    public static func worker(endpoint: String, elements: Int, dtype: DType) throws {
        let context = ZMQContext()
        let socket = try ZMQSocket(context: context, kind: .dealer)
        try socket.setHighWaterMarks(send: 0, receive: 0)
        try socket.connect(endpoint)
        try socket.send([.bytes([])])
        final class Storage { let values: [Float]; init(_ values: [Float]) { self.values = values } }
        let storage = Storage((0..<elements).map { Float($0 % 1000) * 1e-3 })
        var gradient = Payload(byteCount: elements * dtype.size)
        while let frames = try socket.receive(timeoutMilliseconds: 60_000), let update = frames.first, update.byteCount > 0 {
            if dtype == .f32 {
                try socket.send([.payload(storage.values.withUnsafeBytes { Payload(borrowing: $0, owner: storage) })])
                continue
            }
            if gradient.isInFlight { gradient = Payload(byteCount: elements * dtype.size) }
            storage.values.withUnsafeBufferPointer { TensorEncoding.write($0, as: dtype, into: gradient) }
            try socket.send([.payload(gradient)])
        }
    }

    /// memcpy bandwidth of this machine, GB/s (median of 9 copies of `bytes`).
    static func memcpyBandwidth(bytes: Int) -> Double {
        let a = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64), b = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        defer { a.deallocate(); b.deallocate() }
        a.initializeMemory(as: UInt8.self, repeating: 1, count: bytes)
        b.initializeMemory(as: UInt8.self, repeating: 2, count: bytes)
        let times = (0..<9).map { _ in Measure.seconds { b.copyMemory(from: a, byteCount: bytes) } }
        return Double(bytes) / Measure.median(times) / 1e9
    }
}
