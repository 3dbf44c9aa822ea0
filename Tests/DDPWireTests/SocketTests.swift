import Foundation
import Testing
@testable import DDPWire

struct SocketTests {
    /// A ROUTER and a connected DEALER exchange a message with tensors and a reply.
    func exchange(bindingTo endpoint: String) throws {
        let context = ZMQContext()
        let router = try ZMQSocket(context: context, kind: .router)
        let bound = try router.bind(endpoint)
        #expect(!bound.hasSuffix(":0"))
        let dealer = try ZMQSocket(context: context, kind: .dealer)
        try dealer.connect(bound)
        let weights = Payload(floats: (0..<1000).map(Float.init))
        let push = WireMessage(jobID: "j", step: 4, rank: 1,
                               body: .gradientPush(GradientPush(sampleCount: 10, localLoss: 1.5)),
                               tensors: [WireTensor(name: "w", shape: [10, 100], payload: weights)])
        try dealer.send(WireCodec.encode(push))
        let frames = try #require(try router.receive(timeoutMilliseconds: 5000))
        let identity = frames[0].bytes
        let decoded = try WireCodec.decode(Array(frames.dropFirst()), expectedJobID: "j")
        #expect(decoded.body == push.body)
        #expect(TensorEncoding.floats(decoded.tensors[0].payload) == (0..<1000).map(Float.init))
        try router.send([.bytes(identity)] + WireCodec.encode(WireMessage(jobID: "j", body: .stop(reason: "bye", graceful: false))))
        let reply = try #require(try dealer.receive(timeoutMilliseconds: 5000))
        #expect(try WireCodec.decode(reply).body == .stop(reason: "bye", graceful: false))
    }

    @Test func inproc() throws { try exchange(bindingTo: "inproc://wire-test-\(UUID().uuidString)") }
    @Test func ipc() throws { try exchange(bindingTo: "ipc://\(NSTemporaryDirectory())ddp-\(UUID().uuidString.prefix(8)).sock") }
    @Test func tcpOnAnEphemeralPort() throws { try exchange(bindingTo: "tcp://127.0.0.1:0") }

    @Test func receiveTimesOutInsteadOfHanging() throws {
        let context = ZMQContext()
        let router = try ZMQSocket(context: context, kind: .router)
        try router.bind("tcp://127.0.0.1:0")
        let start = Date()
        #expect(try router.receive(timeoutMilliseconds: 100) == nil)
        #expect(Date().timeIntervalSince(start) < 2)
    }

    @Test func sendToADepartedPeerFailsClearly() throws {
        let context = ZMQContext()
        let router = try ZMQSocket(context: context, kind: .router)
        try router.setRouterMandatory(true)
        try router.bind("tcp://127.0.0.1:0")
        #expect(throws: ZMQError.self) { try router.send([.bytes(Array("nobody".utf8)), .bytes([1])]) }
        do { try router.send([.bytes(Array("nobody".utf8)), .bytes([1])]) } catch let error as ZMQError {
            #expect(error.isPeerUnreachable)
        }
    }

    /// A raw TCP peer that sends half a ZMTP greeting and vanishes: the ROUTER delivers nothing from it
    /// and keeps serving other peers.
    @Test func peerThatDisappearsMidMessage() throws {
        let context = ZMQContext()
        let router = try ZMQSocket(context: context, kind: .router)
        let endpoint = try router.bind("tcp://127.0.0.1:0")
        let port = UInt16(endpoint.split(separator: ":").last!)!
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Foundation.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        #expect(connected == 0)
        let partial: [UInt8] = [0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, 3, 0, 0x4E, 0x55]  // greeting, cut short
        _ = partial.withUnsafeBytes { Foundation.send(fd, $0.baseAddress, $0.count, 0) }
        close(fd)
        #expect(try router.receive(timeoutMilliseconds: 200) == nil)

        let dealer = try ZMQSocket(context: context, kind: .dealer)
        try dealer.connect(endpoint)
        try dealer.send(WireCodec.encode(WireMessage(jobID: "j", body: .leave(reason: "after"))))
        let frames = try #require(try router.receive(timeoutMilliseconds: 5000))
        #expect(try WireCodec.decode(Array(frames.dropFirst())).body == .leave(reason: "after"))
    }

    @Test func zeroCopyPayloadIsReleasedAfterSending() throws {
        let context = ZMQContext()
        let a = try ZMQSocket(context: context, kind: .pair), b = try ZMQSocket(context: context, kind: .pair)
        let endpoint = try a.bind("inproc://zero-copy-\(UUID().uuidString)")
        try b.connect(endpoint)
        let payload = Payload(floats: Array(repeating: 1, count: 1 << 20))
        try a.send([.payload(payload)])
        _ = try #require(try b.receive(timeoutMilliseconds: 5000))
        var waited = 0
        while payload.isInFlight && waited < 200 { usleep(5000); waited += 1 }
        #expect(!payload.isInFlight)
    }

    @Test func borrowedBytesAreSentWithoutACopyAndTheirOwnerKeptAlive() throws {
        final class Owner { let values: [Float] = (0..<4096).map(Float.init) }
        let context = ZMQContext()
        let a = try ZMQSocket(context: context, kind: .pair), b = try ZMQSocket(context: context, kind: .pair)
        let endpoint = try a.bind("inproc://borrowed-\(UUID().uuidString)")
        try b.connect(endpoint)
        weak var released: Owner?
        do {
            let owner = Owner()
            released = owner
            let payload = owner.values.withUnsafeBytes { Payload(borrowing: $0, owner: owner) }
            try a.send([.payload(payload)])
        }
        do {  // over inproc the receiver reads the very same bytes, so the owner lives until this frame goes
            let frames = try #require(try b.receive(timeoutMilliseconds: 5000))
            #expect(TensorEncoding.floats(frames[0]) == (0..<4096).map(Float.init))
            #expect(released != nil)
        }
        var waited = 0
        while released != nil && waited < 200 { usleep(5000); waited += 1 }
        #expect(released == nil, "ZeroMQ should release the owner once the frame is sent")
    }

    @Test func curveKeysAndLibraryFacts() throws {
        #expect(ZMQContext.libraryVersion.hasPrefix("4."))
        if ZMQContext.hasCurve {
            let keys = try CurveKeyPair.generate()
            #expect(keys.publicKey.count == 40 && keys.secretKey.count == 40)
        }
    }
}
