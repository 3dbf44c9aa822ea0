import DDPWire
import Foundation

/// A peer of a coordinator's worker socket (a worker or a follower shard), known by its ZeroMQ routing
/// id: liveness and membership are keyed by it, never by a connection's descriptor.
typealias PeerID = [UInt8]

/// What a coordinator's transport hands its logic.
enum TransportEvent {
    /// A message from a worker or a follower shard.
    case fromPeer(PeerID, [Payload])
    /// A control client's request.
    case control(PeerID, [Payload])
    /// A follower shard's message from its leader.
    case fromLeader([Payload])
    /// Peers whose connection dropped (a killed process closes its sockets).
    case disconnected([PeerID])
    /// A connection refused at its handshake: the address and why.
    case refused(address: String, reason: String)
}

/// The seam between a coordinator's logic and its sockets: ZeroMQ in a process, in memory in tests.
protocol CoordinatorTransport: AnyObject {
    /// The bound endpoints (ports filled in).
    var workerEndpoint: String { get }
    var controlEndpoint: String { get }
    /// What arrived, waiting at most `timeoutMilliseconds` for the first event. A peer's disconnection
    /// comes after every message it sent before it dropped.
    func poll(timeoutMilliseconds: Int) throws -> [TransportEvent]
    /// Sends to a worker or follower; throws when the peer is gone or does not take it in time.
    func send(_ frames: [OutgoingFrame], to peer: PeerID) throws
    /// Answers a control client (best effort).
    func answerControl(_ frames: [OutgoingFrame], to peer: PeerID)
    /// A follower shard's message to its leader.
    func sendToLeader(_ frames: [OutgoingFrame]) throws
    /// `peer` joined (or said hello): it no longer counts among the connections waiting to join.
    func joined(_ peer: PeerID)
    /// Closes the sockets (after the last messages had a moment to leave).
    func close()
}

/// The transport of a coordinator process: a ROUTER for workers (and follower shards), a ROUTER for
/// control clients, a DEALER to the leader for a follower shard, a monitor of the worker socket and the
/// authenticator; the only place that knows connections by descriptor, which it maps to peers.
final class ZeroMQTransport: CoordinatorTransport {
    let workerEndpoint: String
    let controlEndpoint: String
    private let context: ZMQContext
    private let workerSocket: ZMQSocket
    private let controlSocket: ZMQSocket
    private let leaderSocket: ZMQSocket?
    private let monitor: ZMQMonitor
    private let authenticator: Authenticator
    private let pending: PendingConnections
    /// The connection each peer's messages arrive on (a peer's routing id lives on one connection), and
    /// the peers on each connection.
    private var connectionOfPeer: [PeerID: Int32] = [:]
    private var peersOnConnection: [Int32: [PeerID]] = [:]
    /// Peers whose drop was seen, and when: reported a little later, after the last messages they sent
    /// (the monitor can tell of a drop before the socket shows the message that came just before it).
    private var droppedPeers: [(peer: PeerID, seen: Double)] = []
    private static let dropDelay = 0.01

    /// Binds both endpoints for `spec` (CURVE with its keys, else plain with `allowPlainText` or on ipc),
    /// and with `leader` connects to the leader's worker endpoint as a follower shard.
    init(spec: JobSpec, workerEndpoint: String, controlEndpoint: String, allowPlainText: Bool, largestTensorBytes: Int,
         leader: String? = nil) throws {
        let keys = try spec.keys()
        if keys == nil && !allowPlainText {
            for endpoint in [workerEndpoint, controlEndpoint] where !isPrivateEndpoint(endpoint) {
                throw SecurityError.insecureEndpoint(endpoint)
            }
        }
        // With several workers, several I/O threads (each connection is served by one), so that their
        // gradients arrive and their updates leave in parallel.
        let context = ZMQContext(ioThreads: min(max(spec.workers, 1), max(2, ProcessInfo.processInfo.activeProcessorCount / 2)))
        self.context = context
        let pending = PendingConnections(limit: 2 * (spec.workers + spec.coordinatorShards) + 32)
        self.pending = pending
        authenticator = try Authenticator(context: context, authorized: keys?.authorized) { pending.admits }
        workerSocket = try ZMQSocket(context: context, kind: .router)
        if let keys { try keys.secureServer(workerSocket) } else { try workerSocket.setZAPDomain("swiftddp") }
        // What peers may legitimately send: a tensor frame of the largest parameter, or an envelope.
        try workerSocket.setMaximumMessageSize(bytes: Int64(largestTensorBytes + (1 << 20)))
        try workerSocket.setHandshakeInterval(milliseconds: 10_000)
        try workerSocket.setRouterMandatory(true)
        try workerSocket.setSendTimeout(milliseconds: 2000)
        try workerSocket.setHighWaterMarks(send: 0, receive: 0)
        try workerSocket.setKernelBuffers(bytes: 4 << 20)
        try workerSocket.setHeartbeat(intervalMilliseconds: spec.heartbeatIntervalMs, timeoutMilliseconds: spec.heartbeatTimeoutMs)
        controlSocket = try ZMQSocket(context: context, kind: .router)
        try keys?.secureServer(controlSocket)
        try controlSocket.setSendTimeout(milliseconds: 1000)
        try controlSocket.setMaximumMessageSize(bytes: Int64(Self.largestEcho + (1 << 20)))  // ddpctl doctor's echo
        try controlSocket.setHandshakeInterval(milliseconds: 10_000)
        monitor = try ZMQMonitor(context: context, monitoring: workerSocket)
        self.workerEndpoint = try workerSocket.bind(workerEndpoint)
        self.controlEndpoint = try controlSocket.bind(controlEndpoint)
        if let leader {
            let socket = try ZMQSocket(context: context, kind: .dealer)
            try keys?.secureClient(socket)
            try socket.setHighWaterMarks(send: 0, receive: 0)
            try socket.setSendTimeout(milliseconds: 2000)
            try socket.connect(leader)
            leaderSocket = socket
        } else {
            leaderSocket = nil
        }
    }

    /// The largest tensor a control client may have echoed (ddpctl doctor's bandwidth check).
    static let largestEcho = 64 << 20

    func poll(timeoutMilliseconds: Int) throws -> [TransportEvent] {
        let sockets = [workerSocket, controlSocket, monitor.socket, authenticator.socket] + (leaderSocket.map { [$0] } ?? [])
        let ready = try ZMQSocket.poll(sockets, timeoutMilliseconds: droppedPeers.isEmpty ? timeoutMilliseconds : min(timeoutMilliseconds, 10))
        var events: [TransportEvent] = []
        let now = Coordinator.now()
        let due = droppedPeers.filter { now - $0.seen >= Self.dropDelay }.map(\.peer)
        droppedPeers.removeAll { now - $0.seen >= Self.dropDelay }
        if ready.contains(2) {  // resolved first: a drop seen now happened before any message read below on a reused descriptor
            while let event = try monitor.next() {
                switch event {
                case .accepted(let connection): pending.accepted(connection)
                case .disconnected(let connection):
                    pending.dropped(connection)
                    for peer in peersOnConnection.removeValue(forKey: connection) ?? [] {
                        connectionOfPeer[peer] = nil
                        droppedPeers.append((peer, now))
                    }
                case .authenticationFailed, .other: break
                }
            }
        }
        if ready.contains(3) {
            for (address, reason) in try authenticator.handle() { events.append(.refused(address: address, reason: reason)) }
        }
        if ready.contains(0) {
            try drain(workerSocket) { frames in
                guard let peer = frames.first?.bytes else { return }
                if connectionOfPeer[peer] == nil, workerSocket.lastConnection >= 0 {
                    connectionOfPeer[peer] = workerSocket.lastConnection
                    peersOnConnection[workerSocket.lastConnection, default: []].append(peer)
                }
                events.append(.fromPeer(peer, Array(frames.dropFirst())))
            }
        }
        if ready.contains(1) {
            try drain(controlSocket) { frames in
                if let peer = frames.first?.bytes { events.append(.control(peer, Array(frames.dropFirst()))) }
            }
        }
        if let leaderSocket, ready.contains(4) {
            try drain(leaderSocket) { events.append(.fromLeader($0)) }
        }
        if !due.isEmpty { events.append(.disconnected(due)) }  // after what those peers sent before they dropped
        return events
    }

    private func drain(_ socket: ZMQSocket, _ handle: ([Payload]) throws -> Void) throws {
        var budget = 256
        while budget > 0, let frames = try socket.receive(timeoutMilliseconds: 0) {
            try handle(frames)
            budget -= 1
        }
    }

    func send(_ frames: [OutgoingFrame], to peer: PeerID) throws { try workerSocket.send([.bytes(peer)] + frames) }

    func answerControl(_ frames: [OutgoingFrame], to peer: PeerID) { try? controlSocket.send([.bytes(peer)] + frames) }

    func sendToLeader(_ frames: [OutgoingFrame]) throws { try leaderSocket?.send(frames) }

    func joined(_ peer: PeerID) {
        if let connection = connectionOfPeer[peer] { pending.joined(connection) }
    }

    func close() {
        workerSocket.close()
        controlSocket.close()
        leaderSocket?.close()
    }
}

/// A transport in memory, for tests of the coordinator's logic without sockets or processes: the test
/// hands it messages as peers would send them and reads what the coordinator sent, decoded.
final class InMemoryTransport: CoordinatorTransport {
    let workerEndpoint = "inmemory://workers"
    let controlEndpoint = "inmemory://control"
    /// Events the coordinator gets at its next poll.
    var inbox: [TransportEvent] = []
    /// What the coordinator sent, in order: to whom, and the message.
    private(set) var sent: [(peer: PeerID, message: WireMessage)] = []
    /// Messages to the leader (for a follower shard under test).
    private(set) var toLeader: [WireMessage] = []
    /// The shared-memory segment of a peer (a test's worker on this host), to decode what is sent to it.
    var segments: [PeerID: SharedSegment] = [:]
    /// Called with each message the coordinator sends a peer (a test's follower shard answering the leader's
    /// commands while the leader waits for them).
    var onSend: ((PeerID, WireMessage) -> Void)?

    /// Queues `message` as sent by `peer` to the worker socket.
    func deliver(_ message: WireMessage, from peer: PeerID) { inbox.append(.fromPeer(peer, Self.frames(WireCodec.encode(message)))) }

    /// Queues a control request.
    func control(_ message: WireMessage, from peer: PeerID) { inbox.append(.control(peer, Self.frames(WireCodec.encode(message)))) }

    /// The messages sent to `peer` since the last call, taken out.
    func take(for peer: PeerID) -> [WireMessage] {
        let mine = sent.filter { $0.peer == peer }.map(\.message)
        sent.removeAll { $0.peer == peer }
        return mine
    }

    func poll(timeoutMilliseconds: Int) throws -> [TransportEvent] {
        defer { inbox = [] }
        return inbox
    }

    func send(_ frames: [OutgoingFrame], to peer: PeerID) throws {
        let message = try WireCodec.decode(Self.frames(frames), sharedMemory: segments[peer])
        sent.append((peer, message))
        onSend?(peer, message)
    }

    func answerControl(_ frames: [OutgoingFrame], to peer: PeerID) {
        if let message = try? WireCodec.decode(Self.frames(frames)) { sent.append((peer, message)) }
    }

    func sendToLeader(_ frames: [OutgoingFrame]) throws { toLeader.append(try WireCodec.decode(Self.frames(frames))) }

    func joined(_ peer: PeerID) {}  // no connections to bound in memory

    func close() {}

    /// Frames as a receiver gets them (copied: the sender may reuse its payloads).
    static func frames(_ outgoing: [OutgoingFrame]) -> [Payload] {
        outgoing.map { frame in
            switch frame {
            case .bytes(let bytes): Payload(bytes: bytes)
            case .payload(let payload): Payload(bytes: payload.bytes)
            }
        }
    }
}
