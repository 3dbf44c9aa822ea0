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
    /// `client-N.key`) and an `authorized_keys` listing every client. The folder is made 0700 (an
    /// existing one is made so) and every secret is 0600 from its first byte: no other user can read
    /// a key while it is written.
    public static func generate(into folder: String, clients: Int = 1) throws {
        try PrivateFolder.create(folder)
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

    /// Writes `text` to a new temporary file created with its final mode (0600 for a secret), then
    /// renames it into place.
    private static func write(_ text: String, to path: String, secret: Bool) throws {
        let temporary = path + ".tmp-\(getpid())"
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, secret ? 0o600 : 0o644)
        guard fd >= 0 else { throw SecurityError.keys(path, "cannot be written: \(String(cString: strerror(errno)))") }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Foundation.write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        close(fd)
        guard written == bytes.count, synced, rename(temporary, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw SecurityError.keys(path, "cannot be written: \(reason)")
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

/// Answers ZeroMQ's authentication requests (ZAP, RFC 27) for one context. With keys, CURVE clients
/// whose public key is authorised pass and everyone else is refused; without (`authorized` nil), any
/// plain (NULL mechanism) peer passes. Either way a peer is refused while `admit` says no (too many
/// connections are waiting to join): a refused connection is closed, so a flood cannot exhaust the
/// process's descriptors. Poll `socket` and call `handle()` when readable.
public final class Authenticator {
    public let socket: ZMQSocket
    private let authorized: Set<String>?
    private let admit: () -> Bool

    public init(context: ZMQContext, authorized: Set<String>?, admit: @escaping () -> Bool = { true }) throws {
        self.authorized = authorized
        self.admit = admit
        socket = try ZMQSocket(context: context, kind: .reply)
        try socket.bind("inproc://zeromq.zap.01")
    }

    /// Answers the pending requests; returns the peers refused by this call, with the reason.
    @discardableResult
    public func handle() throws -> [(address: String, reason: String)] {
        var refused: [(address: String, reason: String)] = []
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
            let reason: String? = if let authorized {
                mechanism == "CURVE" && authorized.contains(clientKey) ? nil : "key not authorised"
            } else {
                mechanism == "NULL" ? nil : "mechanism \(mechanism) not expected"
            }
            let refusal = reason ?? (admit() ? nil : "too many connections waiting to join")
            if let refusal { refused.append((address, refusal)) }
            try socket.send([.bytes(version), .bytes(requestID), .bytes(Array((refusal == nil ? "200" : "400").utf8)),
                             .bytes(Array((refusal ?? "OK").utf8)), .bytes(Array(clientKey.utf8)), .bytes([])])
        }
        return refused
    }
}

/// Folders only their owner may enter: key folders and job directories.
public enum PrivateFolder {
    /// Creates `folder` (and missing parents, with the usual mode) with mode 0700, or makes an existing
    /// one 0700. Whatever is written inside it afterwards is out of other users' reach.
    public static func create(_ folder: String) throws {
        let parent = (folder as NSString).deletingLastPathComponent
        if !parent.isEmpty && !FileManager.default.fileExists(atPath: parent) {
            do { try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true) } catch {
                let underlying = ((error as NSError).userInfo[NSUnderlyingErrorKey] as? any Error).map { $0 as NSError }
                let reason = underlying.map { $0.domain == NSPOSIXErrorDomain ? String(cString: strerror(Int32($0.code))) : $0.localizedDescription }
                throw SecurityError.folder(parent, "cannot be created: \(reason ?? (error as NSError).localizedFailureReason ?? "\(error)")")
            }
        }
        if mkdir(folder, 0o700) != 0 && errno != EEXIST {
            throw SecurityError.folder(folder, "cannot be created: \(String(cString: strerror(errno)))")
        }
        var status = stat()
        guard stat(folder, &status) == 0, status.st_mode & S_IFMT == S_IFDIR else { throw SecurityError.folder(folder, "is not a folder") }
        guard chmod(folder, 0o700) == 0 else { throw SecurityError.folder(folder, "cannot be made private: \(String(cString: strerror(errno)))") }
    }
}

public enum SecurityError: Error, CustomStringConvertible, Equatable {
    case keys(String, String)
    case folder(String, String)
    case insecureEndpoint(String)
    public var description: String {
        switch self {
        case .keys(let path, let why): "key file \(path): \(why)"
        case .folder(let path, let why): "folder \(path) \(why)"
        case .insecureEndpoint(let endpoint):
            "\(endpoint) is reachable by every user of this host\(endpoint.hasPrefix("tcp://127.") || endpoint.hasPrefix("tcp://localhost") || endpoint.hasPrefix("tcp://[::1]") ? "" : " and by other hosts"): "
                + "give the job keys (ddpctl keygen, keys_dir), bind ipc://PATH, or pass --insecure to accept anyone in plain text"
        }
    }
}

/// Whether only this host's processes that may open its socket file can reach an endpoint (ipc, whose
/// file lives in a private job directory; inproc). Every TCP port, loopback included, can be reached by
/// any user of the host, and so needs keys (or an explicit --insecure).
public func isPrivateEndpoint(_ endpoint: String) -> Bool {
    endpoint.hasPrefix("ipc://") || endpoint.hasPrefix("inproc://")
}
