import DDPWire
import Foundation

/// Talks to a coordinator's control socket: status and stop requests, each with a deadline.
public final class ControlClient {
    private let context = ZMQContext()
    private let socket: ZMQSocket
    public let endpoint: String
    private let jobID: String

    /// `keys` are needed for a secure job's coordinator.
    public init(endpoint: String, jobID: String = "", keys: JobKeys? = nil) throws {
        self.endpoint = endpoint
        self.jobID = jobID
        socket = try ZMQSocket(context: context, kind: .dealer)
        try keys?.secureClient(socket)
        try socket.setLinger(milliseconds: 0)
        try socket.setSendTimeout(milliseconds: 1000)
        try socket.connect(endpoint)
    }

    /// The coordinator's status; throws `ControlError.noAnswer` when it does not answer in time.
    public func status(timeoutSeconds: Double = 2) throws -> StatusReply {
        try request(.statusRequest(detail: true), timeoutSeconds: timeoutSeconds)
    }

    /// Asks the coordinator to end the job: `graceful`, after finishing the current step; otherwise at
    /// once, the step in progress dropped.
    public func stop(reason: String, graceful: Bool = true, timeoutSeconds: Double = 2) throws -> StatusReply {
        try request(.stop(reason: reason, graceful: graceful), timeoutSeconds: timeoutSeconds)
    }

    private func request(_ body: WireMessage.Body, timeoutSeconds: Double) throws -> StatusReply {
        do {
            try socket.send(WireCodec.encode(WireMessage(jobID: jobID, body: body)))
        } catch {
            throw ControlError.noAnswer(endpoint: endpoint, seconds: timeoutSeconds)
        }
        let deadline = Coordinator.now() + timeoutSeconds
        while true {
            let left = deadline - Coordinator.now()
            guard left > 0, let frames = try socket.receive(timeoutMilliseconds: Int(left * 1000)) else {
                throw ControlError.noAnswer(endpoint: endpoint, seconds: timeoutSeconds)
            }
            let reply = try WireCodec.decode(frames)
            switch reply.body {
            case .statusReply(let status): return status
            case .error(let error): throw ControlError.refused(error.reason)
            case .heartbeat, .join, .welcome, .gradientPush, .parameterUpdate, .leave, .statusRequest, .stop, .shard, .heldOutScores: continue
            }
        }
    }
}

public enum ControlError: Error, CustomStringConvertible, Equatable {
    case noAnswer(endpoint: String, seconds: Double)
    case refused(String)
    case failed(String)

    public var description: String {
        switch self {
        case .noAnswer(let endpoint, let s):
            "coordinator at \(endpoint) did not answer within \(s.formatted(.number.precision(.fractionLength(0...1)))) s"
        case .refused(let reason): "the coordinator refused the request: \(reason)"
        case .failed(let what): what
        }
    }
}
