import Autodiff
import DDPWire
import Foundation

/// `ddpctl bench exchange`: the time of one full gradient round through a coordinator, without compute:
/// every worker process pushes `elements` floats, the coordinator averages them in rank order (as the
/// coordinator does, chunk by chunk) and sends the result to every worker, which copies it into its
/// parameters. Messages are the protocol's (Join, Welcome, ParameterUpdate, GradientPush); tensors travel
/// as `dtype` (f32, or bf16/f16 halving the bytes), through shared memory as between a coordinator and
/// the workers on its host (`sharedMemory`), or in frames over ipc.
public struct ExchangeBenchmark {
    public var elements: Int
    public var workers: Int
    public var dtype: DType
    public var rounds: Int
    public var sharedMemory: Bool

    public init(elements: Int, workers: Int, dtype: DType, rounds: Int = 20, sharedMemory: Bool = true) {
        self.elements = elements
        self.workers = workers
        self.dtype = dtype
        self.rounds = rounds
        self.sharedMemory = sharedMemory
    }

    public func run(executable: String, workerArguments: [String]) throws -> [String: Any] {
        guard elements > 0, workers > 0, rounds > 0 else { throw WireBenchmarkError.invalid("--elements, --workers and --rounds must be positive") }
        BLAS.threads = 1  // no matrix products here: idle OpenBLAS threads would only spin on the cores the workers need
        let context = ZMQContext(ioThreads: min(workers, 2))
        let router = try ZMQSocket(context: context, kind: .router)
        try router.setHighWaterMarks(send: 0, receive: 0)
        let endpoint = try router.bind("ipc:///tmp/ddp-exchange-\(getpid()).sock")
        defer { try? FileManager.default.removeItem(atPath: "/tmp/ddp-exchange-\(getpid()).sock") }
        let processes = try (0..<workers).map { _ -> Process in
            let p = Process()
            p.executableURL = URL(fileURLWithPath: executable)
            p.arguments = workerArguments + [endpoint, "--elements", "\(elements)", "--dtype", dtype.rawValue]
                + (sharedMemory ? ["--shared-memory"] : [])
            try p.run()
            return p
        }
        defer { for p in processes where p.isRunning { p.terminate() } }
        let byteCount = elements * dtype.size
        var identities: [[UInt8]] = []
        var segments: [[UInt8]: SharedSegment] = [:]
        var updateRegions: [[UInt8]: Payload] = [:]
        while identities.count < workers {
            guard let frames = try router.receive(timeoutMilliseconds: 30_000) else { throw WireBenchmarkError.invalid("workers did not connect") }
            guard case .join(let join) = try WireCodec.decode(Array(frames.dropFirst())).body else { continue }
            let identity = frames[0].bytes
            identities.append(identity)
            if let offer = join.sharedMemory {
                let segment = try SharedSegment(opening: offer.path, byteCount: offer.byteCount, nonce: offer.nonce)
                segments[identity] = segment
                updateRegions[identity] = segment.region(offset: offer.updateOffset, count: elements * 4)
            }
            try router.send([.bytes(identity)] + WireCodec.encode(WireMessage(
                jobID: "", step: 0, body: .welcome(Welcome(rank: Int32(identities.count - 1), worldSize: UInt32(workers), jobSpecJSON: "{}",
                                                           startStep: 0, epoch: 0, sharedMemory: segments[identity] != nil)))))
        }
        let framed = identities.contains { updateRegions[$0] == nil }
        var sum = [Float](repeating: 0, count: elements), scratch = [Float](repeating: 0, count: WeightedMean.chunk * ParallelChunks.threads)
        var replica = dtype == .f32 ? [] : [Float](repeating: 0, count: elements)  // what the workers hold, with a half-precision wire
        var update = Payload(byteCount: byteCount)
        var times: [Double] = []
        for round in -3..<rounds {
            let t = try Measure.seconds {
                if update.isInFlight { update = Payload(byteCount: byteCount) }
                Self.encode(sum, as: dtype, replica: &replica, frame: framed ? update : nil, shared: identities.compactMap { updateRegions[$0] })
                for identity in identities {
                    let shared = updateRegions[identity]
                    let tensor = WireTensor(name: "x", shape: [elements], dtype: shared == nil ? dtype : .f32, payload: shared ?? update)
                    try router.send([.bytes(identity)] + WireCodec.encode(WireMessage(
                        jobID: "", step: UInt64(round + 3), body: .parameterUpdate(ParameterUpdate(
                            learningRate: 0, fullCopy: dtype == .f32 || shared != nil, epoch: 0, worldSize: UInt32(workers), trainLoss: 0)),
                        tensors: [tensor])))
                }
                var received: [[UInt8]: WireTensor] = [:]
                while received.count < workers {
                    guard let frames = try router.receive(timeoutMilliseconds: 30_000) else {
                        throw WireBenchmarkError.invalid("a worker did not answer within 30 s")
                    }
                    let identity = frames[0].bytes
                    let message = try WireCodec.decode(Array(frames.dropFirst()), sharedMemory: segments[identity])
                    guard case .gradientPush = message.body, message.tensors.count == 1 else { throw WireBenchmarkError.invalid("a worker answered with something else") }
                    received[identity] = message.tensors[0]
                }
                let terms = identities.map { (weight: 1 / Float(workers), payload: received[$0]!.payload, dtype: received[$0]!.dtype) }
                sum.withUnsafeMutableBufferPointer { mean in
                    scratch.withUnsafeMutableBufferPointer { _ = WeightedMean.writeInParallel(terms, wire: dtype, into: mean, scratch: $0) }
                }
            }
            if round >= 0 { times.append(t) }
        }
        for identity in identities { try router.send([.bytes(identity)] + WireCodec.encode(WireMessage(jobID: "", step: 0, body: .stop(reason: "done", graceful: true)))) }
        let median = Measure.median(times)
        let bytesPerRound = Double(2 * workers * byteCount)
        let memcpy = Self.memcpyBandwidth(bytes: elements * 4)
        return [
            "benchmark": "exchange", "elements": elements, "workers": workers, "dtype": dtype.rawValue, "rounds": rounds,
            "transport": framed ? "ipc frames" : "shared memory",
            "seconds": median, "ms_per_round": median * 1e3, "round_ms_min": times.min()! * 1e3, "round_ms_max": times.max()! * 1e3,
            "bytes_per_round": Int(bytesPerRound), "gbytes_per_second": bytesPerRound / median / 1e9,
            "memcpy_gbytes_per_second": memcpy, "fraction_of_memcpy": bytesPerRound / median / 1e9 / memcpy,
        ]
    }

    /// The coordinator's update, as it makes it, a chunk at a time on `ParallelChunks.threads` threads: in
    /// f32 the values; with a half-precision wire the change from `replica` encoded into the frame, and the
    /// replica moved by the rounded change. Sharing workers get the f32 values they hold (`values` or the
    /// replica) written into their segments.
    static func encode(
        _ values: [Float], as dtype: DType, replica: inout [Float], frame: Payload?, shared: [Payload]
    ) {
        values.withUnsafeBufferPointer { values in replica.withUnsafeMutableBufferPointer { replica in
            ParallelChunks.forEach(count: values.count, chunk: WeightedMean.chunk) { range, _ in
                let start = range.lowerBound
                var held = UnsafeBufferPointer(rebasing: values[range])
                if dtype != .f32 {
                    TensorEncoding.advance(replica.baseAddress! + start, toward: values.baseAddress! + start, count: range.count, dtype: dtype,
                                           encodingInto: frame, at: start)
                    held = UnsafeBufferPointer(rebasing: replica[range])
                } else if let frame {
                    TensorEncoding.write(held, as: .f32, into: frame, at: start)
                }
                for target in shared { TensorEncoding.write(held, as: .f32, into: target, at: start) }
            }
        } }
    }

    /// One worker of the benchmark: takes every update into its parameters and answers with a gradient
    /// of the same size, as the real worker does. Through shared memory its parameters and its gradient
    /// live in the segment as f32 whatever the wire type (the coordinator writes the parameters in place
    /// and rounds the gradient; backward would write the gradient in place), so nothing is copied on this
    /// side. In frames the update is decoded into its parameters (added, for half-precision changes); the
    /// f32 gradient goes out from its own storage, a half-precision one converted into a reused buffer.
    public static func worker(endpoint: String, elements: Int, dtype: DType, sharedMemory: Bool) throws {
        BLAS.threads = 1
        let context = ZMQContext()
        let socket = try ZMQSocket(context: context, kind: .dealer)
        try socket.setHighWaterMarks(send: 0, receive: 0)
        try socket.connect(endpoint)
        let byteCount = elements * dtype.size
        let pushes = SharedLayout(start: SharedSegment.headerBytes, byteCounts: [elements * 4])
        let updates = SharedLayout(start: pushes.end, byteCounts: [elements * 4])
        let segment = sharedMemory ? try SharedSegment(creating: updates.end) : nil
        var join = Join(workerID: "exchange-\(getpid())", host: ProcessInfo.processInfo.hostName, pid: UInt32(getpid()), modelFingerprint: "")
        join.sharedMemory = segment.map { SharedMemoryOffer(path: $0.path, nonce: $0.nonce, byteCount: $0.byteCount, updateOffset: pushes.end) }
        try socket.send(WireCodec.encode(WireMessage(jobID: "", step: 0, body: .join(join))))
        final class Storage { var values: [Float]; init(_ values: [Float]) { self.values = values } }
        let gradient = Storage((0..<elements).map { Float($0 % 1000) * 1e-3 })
        var parameters = [Float](repeating: 0, count: elements), scratch = [Float](repeating: 0, count: WeightedMean.chunk)
        var encoded = Payload(byteCount: byteCount)
        var sharing = false
        let gradientRegion = segment?.region(offset: pushes.offsets[0], count: elements * 4)
        let parameterRegion = segment?.region(offset: updates.offsets[0], count: elements * 4)
        while let frames = try socket.receive(timeoutMilliseconds: 60_000) {
            let message = try WireCodec.decode(frames, sharedMemory: sharing ? segment : nil)
            switch message.body {
            case .welcome(let welcome):
                try socket.send(WireCodec.encode(WireMessage(jobID: "", rank: welcome.rank, body: .heartbeat(
                    Heartbeat(sentUnixMilliseconds: Coordinator.unixMilliseconds(), state: Heartbeat.ready)))))
                sharing = welcome.sharedMemory
                if sharing, let gradientRegion {  // as if backward had written it there
                    gradient.values.withUnsafeBufferPointer { TensorEncoding.write($0, as: .f32, into: gradientRegion) }
                }
            case .parameterUpdate(let header):
                if !header.keepsParameters {  // the first step keeps the Welcome's values
                    guard let update = message.tensors.first, update.elementCount == elements else { throw WireBenchmarkError.invalid("bad update") }
                    let inPlace = sharing && update.payload.withUnsafeBytes { $0.baseAddress } == parameterRegion?.withUnsafeBytes { $0.baseAddress }
                    if !inPlace {
                        parameters.withUnsafeMutableBufferPointer { dst in
                            scratch.withUnsafeMutableBufferPointer { scratch in
                                for start in stride(from: 0, to: elements, by: scratch.count) {
                                    TensorEncoding.withFloats(update.payload, dtype: update.dtype, range: start..<min(start + scratch.count, elements), scratch: scratch) {
                                        let out = dst.baseAddress! + start
                                        if header.fullCopy { out.update(from: $0.baseAddress!, count: $0.count) } else { for i in 0..<$0.count { out[i] += $0[i] } }
                                    }
                                }
                            }
                        }
                    }
                }
                let tensor: WireTensor
                if sharing, let gradientRegion {
                    tensor = WireTensor(name: "x", shape: [elements], dtype: .f32, payload: gradientRegion)
                } else if dtype == .f32 {
                    tensor = WireTensor(name: "x", shape: [elements], payload: gradient.values.withUnsafeBytes { Payload(borrowing: $0, owner: gradient) })
                } else {
                    if encoded.isInFlight { encoded = Payload(byteCount: byteCount) }
                    gradient.values.withUnsafeBufferPointer { TensorEncoding.write($0, as: dtype, into: encoded) }
                    tensor = WireTensor(name: "x", shape: [elements], dtype: dtype, payload: encoded)
                }
                try socket.send(WireCodec.encode(WireMessage(
                    jobID: "", step: message.step, body: .gradientPush(GradientPush(sampleCount: 1, localLoss: 0)), tensors: [tensor])))
            case .heartbeat:
                continue  // the answer to its "ready"
            default:
                return
            }
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
