import Foundation
private import CZeroMQ

/// CURVE keys for a job: the coordinator's server pair, the workers' client pair, and the client
/// public keys the coordinator accepts. Stored in a folder made by `ddpctl keygen`:
/// `server.key` (coordinator only), `server.pub`, `client.key`, `authorized_keys`.
public struct JobKeys: Sendable, Equatable {
    public var serverPublic: String
    public var serverSecret: String?
    public var client: CurveKeyPair?
    public var authorized: Set<String>

    /// Writes a new server pair, `clients` client pairs (the first as `client.key`, others as
    /// `client-N.key`) and an `authorized_keys` listing every client.
    public static func generate(into folder: String, clients: Int = 1) throws {
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let server = try CurveKeyPair.generate()
        try write(server.publicKey + "\n" + server.secretKey + "\n", to: folder + "/server.key", secret: true)
        try write(server.publicKey + "\n", to: folder + "/server.pub", secret: false)
        var authorized = "# client public keys the coordinator accepts, one per line\n"
        for i in 0..<max(clients, 1) {
            let pair = try CurveKeyPair.generate()
            try write(pair.publicKey + "\n" + pair.secretKey + "\n", to: folder + (i == 0 ? "/client.key" : "/client-\(i).key"), secret: true)
            authorized += pair.publicKey + "\n"
        }
        try write(authorized, to: folder + "/authorized_keys", secret: false)
    }

    private static func write(_ text: String, to path: String, secret: Bool) throws {
        guard FileManager.default.createFile(atPath: path, contents: Data(text.utf8), attributes: [.posixPermissions: secret ? 0o600 : 0o644]) else {
            throw SecurityError.keys(path, "cannot be written")
        }
    }

    /// Reads what is in `folder`: the coordinator needs `server.key` and `authorized_keys`, a worker or
    /// control client `server.pub` and `client.key` (or `clientKey`, another client key file).
    public static func load(from folder: String, clientKey: String? = nil) throws -> JobKeys {
        func lines(_ path: String) throws -> [String] {
            guard let data = FileManager.default.contents(atPath: path) else { throw SecurityError.keys(path, "not found") }
            return String(decoding: data, as: UTF8.self).split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
                .filter { !$0.isEmpty && !$0.hasPrefix("#") }
        }
        func key(_ text: String, _ path: String) throws -> String {
            guard text.count == 40, text.allSatisfy({ $0.isASCII && !$0.isWhitespace }) else {
                throw SecurityError.keys(path, "'\(text.prefix(12))...' is not a 40-character Z85 key")
            }
            return text
        }
        let fm = FileManager.default
        let serverKeyPath = folder + "/server.key", serverPubPath = folder + "/server.pub"
        var serverPublic: String, serverSecret: String?
        if fm.fileExists(atPath: serverKeyPath) {
            let pair = try lines(serverKeyPath)
            guard pair.count >= 2 else { throw SecurityError.keys(serverKeyPath, "needs a public and a secret key line") }
            serverPublic = try key(pair[0], serverKeyPath)
            serverSecret = try key(pair[1], serverKeyPath)
        } else {
            serverPublic = try key(try lines(serverPubPath).first ?? "", serverPubPath)
        }
        var client: CurveKeyPair?
        let clientPath = clientKey ?? folder + "/client.key"
        if fm.fileExists(atPath: clientPath) {
            let pair = try lines(clientPath)
            guard pair.count >= 2 else { throw SecurityError.keys(clientPath, "needs a public and a secret key line") }
            client = CurveKeyPair(publicKey: try key(pair[0], clientPath), secretKey: try key(pair[1], clientPath))
        }
        let authorizedPath = folder + "/authorized_keys"
        let authorized = fm.fileExists(atPath: authorizedPath) ? Set(try lines(authorizedPath).map { try key($0, authorizedPath) }) : []
        return JobKeys(serverPublic: serverPublic, serverSecret: serverSecret, client: client, authorized: authorized)
    }

    /// Makes `socket` the CURVE server side (before it binds).
    public func secureServer(_ socket: ZMQSocket) throws {
        guard let serverSecret else { throw SecurityError.keys("server.key", "the coordinator needs the server's secret key") }
        try socket.setZAPDomain("swiftddp")
        try socket.setCurveServer(secretKey: serverSecret)
    }

    /// Makes `socket` a CURVE client of the coordinator (before it connects).
    public func secureClient(_ socket: ZMQSocket) throws {
        guard let client else { throw SecurityError.keys("client.key", "a worker or control client needs a client key pair") }
        try socket.setCurveClient(serverKey: serverPublic, publicKey: client.publicKey, secretKey: client.secretKey)
    }
}

/// Answers ZeroMQ's authentication requests (ZAP, RFC 27) for one context: CURVE clients whose public
/// key is authorised pass, everyone else is refused. Poll `socket` and call `handle()` when readable.
public final class Authenticator {
    public let socket: ZMQSocket
    private let authorized: Set<String>
    /// Refusals so far, with the peer address.
    public private(set) var refusals: [String] = []

    public init(context: ZMQContext, authorized: Set<String>) throws {
        self.authorized = authorized
        socket = try ZMQSocket(context: context, kind: .reply)
        try socket.bind("inproc://zeromq.zap.01")
    }

    /// Answers the pending requests; returns the addresses refused by this call.
    @discardableResult
    public func handle() throws -> [String] {
        var refused: [String] = []
        while let frames = try socket.receive(timeoutMilliseconds: 0) {
            guard frames.count >= 6 else { continue }
            let text = frames.map { String(decoding: $0.bytes, as: UTF8.self) }
            let (version, requestID, address, mechanism) = (frames[0].bytes, frames[1].bytes, text[3], text[5])
            var clientKey = ""
            if mechanism == "CURVE", frames.count >= 7, frames[6].byteCount == 32 {
                var encoded = [CChar](repeating: 0, count: 41)
                let raw = frames[6].bytes
                _ = zmq_z85_encode(&encoded, raw, 32)
                clientKey = String(decoding: encoded.prefix(40).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            }
            let allowed = mechanism == "CURVE" && authorized.contains(clientKey)
            if !allowed {
                refused.append(address)
                refusals.append(address)
            }
            try socket.send([.bytes(version), .bytes(requestID), .bytes(Array((allowed ? "200" : "400").utf8)),
                             .bytes(Array((allowed ? "OK" : "key not authorised").utf8)), .bytes(Array(clientKey.utf8)), .bytes([])])
        }
        return refused
    }
}

public enum SecurityError: Error, CustomStringConvertible, Equatable {
    case keys(String, String)
    case insecureEndpoint(String)
    public var description: String {
        switch self {
        case .keys(let path, let why): "key file \(path): \(why)"
        case .insecureEndpoint(let endpoint):
            "\(endpoint) is reachable from other hosts: give the job keys (ddpctl keygen, keys_dir) or pass --insecure to send plain text"
        }
    }
}

/// Whether an endpoint can only be reached from this host (loopback, ipc, inproc).
public func isLocalEndpoint(_ endpoint: String) -> Bool {
    if endpoint.hasPrefix("ipc://") || endpoint.hasPrefix("inproc://") { return true }
    guard endpoint.hasPrefix("tcp://") else { return false }
    let host = endpoint.dropFirst(6).split(separator: ":").dropLast().joined(separator: ":")
    return host.hasPrefix("127.") || host == "localhost" || host == "[::1]"
}
