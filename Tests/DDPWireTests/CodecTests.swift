import Testing
@testable import DDPWire

/// What a receiver would get for these frames (as if they had crossed a socket).
func received(_ frames: [OutgoingFrame]) -> [Payload] {
    frames.map { frame in
        switch frame {
        case .bytes(let bytes): Payload(bytes: bytes)
        case .payload(let payload): Payload(bytes: payload.bytes)
        }
    }
}

func roundTrip(_ message: WireMessage, expectedJobID: String? = nil) throws -> WireMessage {
    try WireCodec.decode(received(WireCodec.encode(message)), expectedJobID: expectedJobID)
}

struct CodecTests {
    static let bodies: [WireMessage.Body] = [
        .join(Join(workerID: "h:1:x", host: "h", pid: 42, modelFingerprint: "abc", requestedRank: 3)),
        .welcome(Welcome(rank: 1, worldSize: 2, jobSpecJSON: "{\"a\":1}", startStep: 7, epoch: 2,
                         heartbeatIntervalMilliseconds: 900, heartbeatTimeoutMilliseconds: 4000)),
        .join({
            var join = Join(workerID: "h:2:y", host: "h", pid: 43, modelFingerprint: "abc")
            join.sharedMemory = SharedMemoryOffer(path: "/proc/43/fd/7", nonce: (0..<32).map { UInt8($0 * 7 % 256) }, byteCount: 1 << 20, updateOffset: 4096)
            join.sampleCount = 1200
            join.modelJSON = "{\"program\":\"p\"}"
            return join
        }()),
        .welcome(Welcome(rank: 0, worldSize: 1, jobSpecJSON: "{}", startStep: 0, epoch: 0, sharedMemory: true)),
        .welcome({
            var welcome = Welcome(rank: 2, worldSize: 3, jobSpecJSON: "{}", startStep: 5, epoch: 1)
            welcome.shardEndpoints = ["ipc:///tmp/j/shard-1.sock", "tcp://10.0.0.2:5557"]
            return welcome
        }()),
        .shard({
            var m = ShardMessage(.average)
            m.shard = 2; m.endpoint = "tcp://h:1"; m.jobSpecJSON = "{}"; m.attempt = 3; m.ranks = [0, 2, -1]; m.workerIDs = ["a", "b"]
            m.sampleCounts = [64, 0, 7]; m.refused = "why"; m.learningRate = 0.5; m.applyOptimizer = true; m.optimizerSteps = 9
            m.withState = true; m.finite = false; m.modelJSON = "{\"program\":\"p\"}"; m.sumOfSquares = 12.5; m.clipScale = 0.25; m.clip = true
            m.keepsParameters = true
            return m
        }()),
        .shard(ShardMessage(.snapshotReply)),
        .gradientPush(GradientPush(sampleCount: 64, localLoss: 0.25, localCorrect: 60, computeSeconds: 0.001)),
        .gradientPush(GradientPush(sampleCount: 64, localLoss: 0.25, attempt: 1, part: 2, moreParts: true)),
        .parameterUpdate(ParameterUpdate(learningRate: 0.1, fullCopy: true, epoch: 1, worldSize: 3, trainLoss: 0.5, samples: [SampleRange(start: 64, count: 32), SampleRange(start: 0, count: 3)])),
        .parameterUpdate(ParameterUpdate(learningRate: 0.1, fullCopy: false, epoch: 1, worldSize: 3, trainLoss: 0.5, part: 3, moreParts: true)),
        .parameterUpdate(ParameterUpdate(learningRate: 0.1, fullCopy: true, epoch: 0, worldSize: 2, trainLoss: 0, keepsParameters: true)),
        .heartbeat(Heartbeat(sentUnixMilliseconds: 123_456, state: "computing")),
        .leave(reason: "done"),
        .statusRequest(detail: true),
        .statusReply(StatusReply(
            jobState: "training", step: 5, totalSteps: 10, epoch: 1, totalEpochs: 2, elapsedSeconds: 1.5, trainLoss: 0.3,
            testLoss: 0.4, testAccuracy: 0.9, samplesPerSecond: 1000,
            workers: [WorkerStatus(rank: 0, host: "h", pid: 1, state: "training", step: 5, lastSeenMillisecondsAgo: 3,
                                   lastStepSeconds: 0.01, lagging: true, restarts: 1)],
            rejectedMessages: 2, recentLosses: [0.5, 0.4, 0.3], message: "ok")),
        .stop(reason: "user", graceful: true),
        .error(ErrorReply(code: .modelMismatch, reason: "fingerprint differs")),
    ]

    @Test(arguments: bodies)
    func everyKindRoundTrips(body: WireMessage.Body) throws {
        let tensors = [
            WireTensor(name: "0.weight", shape: [2, 3], payload: Payload(floats: [1, 2, 3, 4, 5, 6])),
            WireTensor(name: "0.bias", shape: [], payload: Payload(floats: [7])),
        ]
        let message = WireMessage(jobID: "job-1", step: 9, rank: 1, body: body, tensors: tensors)
        let decoded = try roundTrip(message, expectedJobID: "job-1")
        #expect(decoded.body == body)
        #expect(decoded.jobID == "job-1" && decoded.step == 9 && decoded.rank == 1)
        #expect(decoded.tensors.map(\.name) == ["0.weight", "0.bias"])
        #expect(decoded.tensors.map(\.shape) == [[2, 3], []])
        #expect(TensorEncoding.floats(decoded.tensors[0].payload) == [1, 2, 3, 4, 5, 6])
    }

    @Test func halfPrecisionEncodings() throws {
        let values: [Float] = [0, 1, -2.5, 3.140625, 65504, 1e-3]
        for dtype in [DType.f16, .bf16] {
            let payload = Payload(byteCount: values.count * 2)
            values.withUnsafeBufferPointer { TensorEncoding.write($0, as: dtype, into: payload) }
            let message = WireMessage(jobID: "j", body: .leave(reason: ""),
                                      tensors: [WireTensor(name: "t", shape: [6], dtype: dtype, payload: payload)])
            let back = TensorEncoding.floats(try roundTrip(message).tensors[0].payload, dtype: dtype)
            for (a, b) in zip(values, back) { #expect(abs(a - b) <= abs(a) * (dtype == .f16 ? 1e-3 : 8e-3)) }
        }
    }

    /// Rounding f32 values to a half type in place, reading them rounded, and moving a replica by rounded
    /// changes give exactly what encoding and decoding gives (a coordinator rounds what workers sharing
    /// memory push as f32, and those workers hold its replica).
    @Test(arguments: [DType.f16, .bf16]) func roundingIsEncodingThenDecoding(dtype: DType) {
        var generator = SystemRandomNumberGenerator()
        var values = (0..<4099).map { _ in Float(bitPattern: UInt32.random(in: 0...UInt32.max, using: &generator)) }
        values += [0, -0, 1e-40, 65504, 65520, 1e5, .infinity, -.infinity, .nan, Float.greatestFiniteMagnitude]
        let encoded = Payload(byteCount: values.count * 2)
        values.withUnsafeBufferPointer { TensorEncoding.write($0, as: dtype, into: encoded) }
        let decoded = TensorEncoding.floats(encoded, dtype: dtype)
        func same(_ a: [Float], _ b: [Float]) -> Bool { a.elementsEqual(b) { $0.bitPattern == $1.bitPattern || ($0.isNaN && $1.isNaN) } }

        var rounded = values
        rounded.withUnsafeMutableBufferPointer { TensorEncoding.round($0, to: dtype) }
        #expect(same(rounded, decoded))
        let f32 = Payload(floats: values)
        var scratch = [Float](repeating: 0, count: values.count)
        let read = scratch.withUnsafeMutableBufferPointer { s in
            TensorEncoding.withFloats(f32, dtype: .f32, range: 0..<values.count, scratch: s, roundedTo: dtype) { Array($0) }
        }
        #expect(same(read, decoded))
        let firstBad = TensorEncoding.firstNonFinite(encoded, dtype: dtype)
        #expect(TensorEncoding.firstNonFinite(f32, dtype: .f32, roundedTo: dtype) == firstBad)

        // advance: held moves by the rounded change, and the frame holds the encoded change.
        let target = (0..<1000).map { Float($0) * 0.37 - 90 }
        var held = (0..<1000).map { Float($0) * 0.11 }
        var expected = held
        let frame = Payload(byteCount: 2000)
        let change = zip(target, held).map { $0 - $1 }
        let changeFrame = Payload(byteCount: 2000)
        change.withUnsafeBufferPointer { TensorEncoding.write($0, as: dtype, into: changeFrame) }
        for (i, c) in TensorEncoding.floats(changeFrame, dtype: dtype).enumerated() { expected[i] += c }
        target.withUnsafeBufferPointer { t in held.withUnsafeMutableBufferPointer { h in
            TensorEncoding.advance(h.baseAddress!, toward: t.baseAddress!, count: 1000, dtype: dtype, encodingInto: frame, at: 0)
        } }
        #expect(same(held, expected) && frame.bytes == changeFrame.bytes)
    }

    @Test func chunksReadAndWriteLikeTheWhole() {
        let values = (0..<1000).map { Float($0) * 0.37 - 150 }
        var scratch = [Float](repeating: .nan, count: 300)
        for dtype in [DType.f32, .f16, .bf16] {
            let whole = Payload(byteCount: values.count * dtype.size), pieces = Payload(byteCount: values.count * dtype.size)
            values.withUnsafeBufferPointer { TensorEncoding.write($0, as: dtype, into: whole) }
            for start in stride(from: 0, to: values.count, by: 300) {
                values[start..<min(start + 300, values.count)].withUnsafeBufferPointer { TensorEncoding.write($0, as: dtype, into: pieces, at: start) }
            }
            #expect(whole.bytes == pieces.bytes, "\(dtype)")
            let expected = TensorEncoding.floats(whole, dtype: dtype)
            for start in stride(from: 0, to: values.count, by: 300) {
                let range = start..<min(start + 300, values.count)
                let chunk = scratch.withUnsafeMutableBufferPointer { TensorEncoding.withFloats(whole, dtype: dtype, range: range, scratch: $0) { Array($0) } }
                #expect(chunk == Array(expected[range]), "\(dtype) \(range)")
            }
        }
    }

    @Test func wrongVersionIsRejectedWithAClearError() {
        let frames = received(WireCodec.encode(WireMessage(jobID: "j", body: .leave(reason: "")), protocolVersion: 2))
        #expect(throws: WireError.versionMismatch(got: 2)) { try WireCodec.decode(frames) }
        #expect(WireError.versionMismatch(got: 2).description.contains("protocol version 2"))
    }

    @Test func wrongJobIsRejectedButAnonymousJoinIsAccepted() throws {
        #expect(throws: WireError.wrongJob(expected: "mine", got: "other")) {
            try roundTrip(WireMessage(jobID: "other", body: .leave(reason: "")), expectedJobID: "mine")
        }
        let join = WireMessage(jobID: "", body: .join(Join(workerID: "w", host: "h", pid: 1, modelFingerprint: "f")))
        #expect(try roundTrip(join, expectedJobID: "mine").body.kind == "join")
    }

    @Test func framesThatDisagreeWithDescriptorsAreRejected() throws {
        let message = WireMessage(jobID: "j", body: .leave(reason: ""),
                                  tensors: [WireTensor(name: "w", shape: [2], payload: Payload(floats: [1, 2]))])
        let frames = received(WireCodec.encode(message))
        #expect(throws: WireError.frameCountMismatch(descriptors: 1, frames: 0)) { try WireCodec.decode([frames[0]]) }
        #expect(throws: WireError.byteLengthMismatch(tensor: "w", expected: 8, got: 4)) {
            try WireCodec.decode([frames[0], Payload(floats: [1])])
        }
        let lying = WireMessage(jobID: "j", body: .leave(reason: ""),
                                tensors: [WireTensor(name: "w", shape: [3], payload: Payload(floats: [1, 2]))])
        #expect(throws: WireError.self) { try roundTrip(lying) }
        let duplicate = WireMessage(jobID: "j", body: .leave(reason: ""), tensors: [
            WireTensor(name: "w", shape: [1], payload: Payload(floats: [1])),
            WireTensor(name: "w", shape: [1], payload: Payload(floats: [1])),
        ])
        #expect(throws: WireError.badDescriptor(index: 1, reason: "duplicate name 'w'")) { try roundTrip(duplicate) }
    }

    /// A slice of a tensor (a coordinator shard's part) keeps its place in the tensor; a slice that does
    /// not lie inside the shape, or whose frame does not hold its elements, is refused, naming the tensor.
    @Test func slicesTravelWithTheirPlaceInTheTensor() throws {
        let slice = WireMessage(jobID: "j", body: .leave(reason: ""),
                                tensors: [WireTensor(name: "w", shape: [4, 8], payload: Payload(floats: [1, 2, 3]), slice: 16..<19)])
        let decoded = try roundTrip(slice).tensors[0]
        #expect(decoded.slice == 16..<19 && decoded.elements == 16..<19 && decoded.shape == [4, 8])
        #expect(TensorEncoding.floats(decoded.payload) == [1, 2, 3])
        #expect(try roundTrip(WireMessage(jobID: "j", body: .leave(reason: ""),
                                          tensors: [WireTensor(name: "w", shape: [2], payload: Payload(floats: [1, 2]))])).tensors[0].slice == nil)
        let outside = WireMessage(jobID: "j", body: .leave(reason: ""),
                                  tensors: [WireTensor(name: "w", shape: [4], payload: Payload(floats: [1, 2]), slice: 3..<5)])
        #expect(throws: WireError.badDescriptor(index: 0, reason: "'w' slice of 2 elements from 3 is not inside shape [4]")) { try roundTrip(outside) }
        let short = WireMessage(jobID: "j", body: .leave(reason: ""),
                                tensors: [WireTensor(name: "w", shape: [4], payload: Payload(floats: [1]), slice: 0..<2)])
        #expect(throws: WireError.badDescriptor(index: 0, reason: "'w' declares 4 bytes, 2 elements of shape [4] of f32 needs 8")) { try roundTrip(short) }
        var limits = DecodeLimits()
        limits.requireFinite = true
        let bad = WireMessage(jobID: "j", body: .leave(reason: ""),
                              tensors: [WireTensor(name: "g", shape: [10], payload: Payload(floats: [1, .nan]), slice: 6..<8)])
        #expect(throws: WireError.nonFinite(tensor: "g", element: 7)) { try WireCodec.decode(received(WireCodec.encode(bad)), limits: limits) }
    }

    @Test func nonFiniteValuesAreRejectedWhenAsked() throws {
        let message = WireMessage(jobID: "j", body: .leave(reason: ""),
                                  tensors: [WireTensor(name: "g", shape: [3], payload: Payload(floats: [1, .nan, 2]))])
        var limits = DecodeLimits()
        limits.requireFinite = true
        #expect(throws: WireError.nonFinite(tensor: "g", element: 1)) {
            try WireCodec.decode(received(WireCodec.encode(message)), limits: limits)
        }
        #expect(try WireCodec.decode(received(WireCodec.encode(message))).tensors.count == 1)
    }

    @Test func oversizedTensorsAreRejected() {
        var limits = DecodeLimits()
        limits.maximumTensorBytes = 16
        let message = WireMessage(jobID: "j", body: .leave(reason: ""),
                                  tensors: [WireTensor(name: "big", shape: [8], payload: Payload(floats: Array(repeating: 0, count: 8)))])
        #expect(throws: WireError.tooLarge(what: "tensor 'big'", bytes: 32, limit: 16)) {
            try WireCodec.decode(received(WireCodec.encode(message)), limits: limits)
        }
    }
}
