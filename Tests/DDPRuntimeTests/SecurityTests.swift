@testable import DDPWire
import Foundation
import Logging
import Testing
@testable import DDPRuntime

/// The attacks of a local stranger or a compromised worker, each run against a real coordinator: the
/// attack fails, the job's result stands.
@Suite(.serialized)
struct SecurityTests {
    /// A peer speaking the protocol with a socket of its own (a stranger, or a worker that lies).
    final class RawPeer {
        let context = ZMQContext()
        let socket: ZMQSocket

        init(connectingTo endpoint: String) throws {
            socket = try ZMQSocket(context: context, kind: .dealer)
            try socket.setLinger(milliseconds: 0)
            try socket.connect(endpoint)
        }

        func send(_ message: WireMessage) throws { try socket.send(WireCodec.encode(message)) }

        /// The next message, within `seconds`.
        func next(within seconds: Double = 10) throws -> WireMessage? {
            guard let frames = try socket.receive(timeoutMilliseconds: Int(seconds * 1000)) else { return nil }
            return try WireCodec.decode(frames)
        }

        /// Messages until one matches `accept` (or the deadline passes).
        func await(within seconds: Double = 10, _ accept: (WireMessage) -> Bool) throws -> WireMessage? {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline, let message = try next(within: max(0.01, deadline.timeIntervalSinceNow)) {
                if accept(message) { return message }
            }
            return nil
        }
    }

    /// A Join that offers a root-owned file (whose first bytes anyone may read) as its "segment", by path
    /// and through /proc/PID/fd: the coordinator maps neither, sends its updates in frames, and the file is
    /// unchanged.
    @Test func aJoinCannotMakeTheCoordinatorWriteIntoAFile() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let spec = try JobSpec.load(path: nil, overrides: ["job_id": "victim-job", "workers": 2, "epochs": 1])
        let parameterBytes = try TrainingSetup(spec: spec).model.parameters.reduce(0) { $0 + $1.tensor.count * 4 }
        let victim = dir + "/victim.conf"
        let original = (0..<(parameterBytes + 8192)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try Data(original).write(to: URL(fileURLWithPath: victim))
        chmod(victim, 0o644)
        let reader = open(victim, O_RDONLY)
        defer { close(reader) }
        let (coordinator, _, endpoints) = try launchCoordinator(["job_id": "victim-job", "workers": 2, "epochs": 1,
                                                                 "step_timeout_seconds": 1.0], in: dir)
        defer { coordinator.terminate() }
        var peers: [RawPeer] = []
        for (index, path) in [victim, "/proc/\(getpid())/fd/\(reader)"].enumerated() {
            let peer = try RawPeer(connectingTo: endpoints.workers)
            var join = Join(workerID: "attacker-\(index)", host: "h", pid: UInt32(getpid()), modelFingerprint: "")
            join.sharedMemory = SharedMemoryOffer(path: path, nonce: Array(original.prefix(32)), byteCount: original.count, updateOffset: 4096)
            try peer.send(WireMessage(jobID: "victim-job", body: .join(join)))
            let welcome = try #require(try peer.await { if case .welcome = $0.body { true } else { false } })
            guard case .welcome(let w) = welcome.body else { return }
            #expect(!w.sharedMemory, "the coordinator must not map \(path)")
            #expect(!welcome.tensors.isEmpty && welcome.tensors.allSatisfy { $0.payload.byteCount > 0 }, "the Welcome's values come in frames")
            try peer.send(WireMessage(jobID: "victim-job", rank: w.rank, body: .heartbeat(Heartbeat(sentUnixMilliseconds: 0, state: Heartbeat.ready))))
            peers.append(peer)
        }
        // Both joined and ready: training starts and the first update goes out (keeping the Welcome's values).
        for peer in peers {
            let update = try #require(try peer.await { if case .parameterUpdate = $0.body { true } else { false } })
            #expect(update.tensors.isEmpty)
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: victim)) == Data(original))
        let log = try String(contentsOfFile: dir + "/coordinator.log", encoding: .utf8)
        #expect(log.contains("is not a SwiftDDP shared-memory segment"), "\(log)")
    }

    /// A worker that declares more samples than it was assigned is refused with a reason it is told, every
    /// step; the job completes on the honest worker's gradients as if the liar's share were empty.
    @Test func aPushThatOverstatesItsSamplesIsRefusedAndNamed() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let overrides: [String: Any] = ["job_id": "weights-job", "workers": 2, "epochs": 3, "batch_size": 64]
        let spec = try JobSpec.load(path: nil, overrides: overrides)
        let parameters = try TrainingSetup(spec: spec).model.parameters
        let (coordinator, job, endpoints) = try launchCoordinator(overrides, in: dir)
        defer { coordinator.terminate() }
        let liar = try RawPeer(connectingTo: endpoints.workers)
        try liar.send(WireMessage(jobID: "weights-job", body: .join(Join(workerID: "liar", host: "h", pid: 1, modelFingerprint: "", requestedRank: 1))))
        let welcome = try #require(try liar.await { if case .welcome = $0.body { true } else { false } })
        #expect(welcome.rank == 1)
        try liar.send(WireMessage(jobID: "weights-job", rank: 1, body: .heartbeat(Heartbeat(sentUnixMilliseconds: 0, state: Heartbeat.ready))))
        let honest = try ChildProcess(Binaries.ddpd, ["worker", "--connect", endpoints.workers, "--config", dir + "/spec.json"],
                                      standardError: dir + "/worker.log")
        defer { honest.terminate() }
        var refusals: [String] = []
        var stopped = false
        let deadline = Date().addingTimeInterval(90)
        while !stopped && Date() < deadline, let message = try liar.next(within: 5) {
            switch message.body {
            case .parameterUpdate(let update) where !update.moreParts:
                let poisoned = parameters.map { WireTensor(name: $0.name, shape: $0.tensor.shape, payload: Payload(floats: [Float](repeating: 1, count: $0.tensor.count))) }
                try liar.send(WireMessage(jobID: "weights-job", step: message.step, rank: 1,
                                          body: .gradientPush(GradientPush(sampleCount: 1_000_000, localLoss: 0.1, attempt: update.attempt)),
                                          tensors: poisoned))
            case .error(let error):
                #expect(error.code == .pushRefused)
                refusals.append(error.reason)
            case .stop:
                stopped = true
            default:
                break
            }
        }
        #expect(stopped)
        #expect(coordinator.wait(timeout: 30) == 0)
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.steps == 3 * 23)
        #expect(summary.testAccuracy > 0.85, "the liar's gradients must not count: \(summary.testAccuracy)")
        #expect(refusals.count >= 60, "\(refusals.count) refusals")
        #expect(refusals.first?.contains("it declares 1000000 samples, but 32 were assigned to rank 1 for step") == true, "\(refusals.first ?? "")")
        let metrics = try String(contentsOfFile: job.metricsPath, encoding: .utf8)
        let samples = metrics.split(separator: "\n").first { $0.hasPrefix("ddp_samples_total") }.flatMap { $0.split(separator: " ").last }
        #expect(samples.flatMap { Double($0) }.map { $0 < 1438 * 3 } == true, "only the honest worker's samples count: \(samples ?? "none")")
    }

    /// Every TCP port is open to every local user: a coordinator refuses plain text on loopback too, unless
    /// told --insecure; `ddpctl start --transport tcp` gives its job keys of its own, and a plain stranger
    /// then gets nothing (no status, no stop, no join) while the job trains to its end.
    @Test func loopbackTCPIsClosedToStrangers() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "workers: 1\n".write(toFile: dir + "/job.yaml", atomically: true, encoding: .utf8)
        let plain = try runCommand(Binaries.ddpd, ["coordinator", "--config", dir + "/job.yaml", "--job-dir", dir + "/plain"], timeout: 30)
        #expect(plain.status != 0 && plain.stderr.contains("tcp://127.0.0.1:0 is reachable by every user of this host"), "\(plain.stderr)")

        let job = try startDetachedJob(["--transport", "tcp", "--epochs", "300"], jobsDir: dir + "/jobs")
        defer { _ = try? runCommand(Binaries.ddpctl, ["stop", "--job", job.path, "--timeout", "10"], timeout: 30) }
        let spec = try JobSpec.fromJSON(try String(contentsOfFile: job.specPath, encoding: .utf8))
        #expect(spec.keysDir == job.keysPath)
        #expect(mode(job.path) == 0o700 && mode(job.keysPath) == 0o700 && mode(job.keysPath + "/server.key") == 0o600)
        let endpoints = try #require(job.endpoints())
        #expect(endpoints.workers.hasPrefix("tcp://127.0.0.1:"))
        #expect(waitUntil(timeout: 30) { currentStep(job) > 0 })

        #expect(throws: ControlError.self) { try ControlClient(endpoint: endpoints.control, jobID: spec.jobID).status(timeoutSeconds: 1) }
        #expect(throws: ControlError.self) { try ControlClient(endpoint: endpoints.control, jobID: spec.jobID).stop(reason: "a stranger", timeoutSeconds: 1) }
        let stranger = try RawPeer(connectingTo: endpoints.workers)
        try stranger.send(WireMessage(jobID: "", body: .join(Join(workerID: "stranger", host: "h", pid: 1, modelFingerprint: ""))))
        #expect(try stranger.next(within: 1) == nil)
        let status = try job.status(timeoutSeconds: 2)
        #expect(status.state == "training" && status.workers.count == 2)
    }

    /// Job directories are private: another user can read nothing in them.
    @Test(.enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/runuser"), "needs root and runuser"))
    func jobDirectoriesArePrivate() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        chmod(dir, 0o755)
        let (summary, result) = try startJob(["--epochs", "1"], jobsDir: dir)
        #expect(summary?.state == "completed", "\(result.stderr)")
        let jobDir = try #require(try FileManager.default.contentsOfDirectory(atPath: dir).first.map { dir + "/" + $0 })
        #expect(mode(jobDir) == 0o700)
        for file in ["spec.json", "model.safetensors", "endpoints.json", "logs/coordinator.log"] {
            let read = try runCommand("/usr/sbin/runuser", ["-u", "nobody", "--", "cat", jobDir + "/" + file], timeout: 10)
            #expect(read.status != 0 && read.stdout.isEmpty, "nobody read \(file)")
        }
    }

    /// `ddpctl keygen` never lets another user read a secret: a `nobody` process polling the folder while
    /// keys are written reads none, and the modes are 0700 and 0600 from the first byte.
    @Test(.enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/runuser"), "needs root and runuser"))
    func keygenSecretsAreNeverReadable() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        chmod(dir, 0o755)
        let stolen = dir + "/stolen"
        FileManager.default.createFile(atPath: stolen, contents: nil)
        chmod(stolen, 0o666)
        let poller = try ChildProcess("/usr/sbin/runuser", ["-u", "nobody", "--", "sh", "-c",
                                                             "end=$(($(date +%s) + 20)); while [ $(date +%s) -lt $end ]; do cat \(dir)/k*/*.key >> \(stolen) 2>/dev/null; done"])
        defer { poller.terminate(grace: 1) }
        var secrets: [String] = []
        for i in 0..<20 {
            let folder = "\(dir)/k\(i)"
            if i.isMultiple(of: 2) { mkdir(folder, 0o755) }  // an existing, open folder is made private too
            let made = try runCommand(Binaries.ddpctl, ["keygen", "--out", folder], timeout: 30)
            #expect(made.status == 0, "\(made.stderr)")
            #expect(mode(folder) == 0o700 && mode(folder + "/server.key") == 0o600 && mode(folder + "/client.key") == 0o600)
            secrets += ["server.key", "client.key"].compactMap { try? String(contentsOfFile: "\(folder)/\($0)", encoding: .utf8) }
                .compactMap { $0.split(separator: "\n").last.map(String.init) }
        }
        poller.terminate(grace: 1)
        let read = (try? String(contentsOfFile: stolen, encoding: .utf8)) ?? ""
        #expect(secrets.count == 40 && !secrets.contains { read.contains($0) }, "nobody read a secret key")
    }

    /// A flood of junk frames is counted in full but logged a few lines at a time.
    @Test func aFloodOfJunkIsCountedNotLoggedLineByLine() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (coordinator, job, endpoints) = try launchCoordinator(["job_id": "flood-job", "workers": 1, "join_timeout_seconds": 60.0], in: dir)
        defer { coordinator.terminate() }
        let junk = try RawPeer(connectingTo: endpoints.workers)
        for i in 0..<5000 { try junk.socket.send([.bytes(Array("junk \(i) ".utf8) + [UInt8](repeating: 0xAB, count: 100))]) }
        #expect(waitUntil(timeout: 30) { ((try? job.status(timeoutSeconds: 1))?.rejectedMessages ?? 0) >= 5000 })
        let log = try String(contentsOfFile: dir + "/coordinator.log", encoding: .utf8)
        let lines = log.split(separator: "\n").filter { $0.contains("rejected") }
        #expect(lines.count <= 30, "\(lines.count) log lines for 5000 rejected messages")
        #expect(log.utf8.count < 20_000)
    }

    /// Strangers queueing Joins while a killed coordinator is restarted get no rank: the ranks are kept for
    /// the workers that held them (they prove it with their Welcome's token), and training goes on with them.
    @Test func aRestartedCoordinatorGivesTheRanksBackToTheirWorkers() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let job = try startDetachedJob(["--workers", "2", "--epochs", "5000", "--checkpoint-every", "20"], jobsDir: jobs)
        defer { _ = try? runCommand(Binaries.ddpctl, ["stop", "--job", job.path, "--timeout", "10"], timeout: 30) }
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 60 })
        let workerPids = Set([JobLookup.processes(of: job)["worker-0"], JobLookup.processes(of: job)["worker-1"]].compactMap { $0 }.map(UInt32.init))
        let endpoints = try #require(job.endpoints())
        kill(endpoints.pid, SIGKILL)
        let strangers = try (0..<6).map { _ in try RawPeer(connectingTo: endpoints.workers) }
        var welcomed = 0
        let until = Date().addingTimeInterval(12)
        while Date() < until {
            for (i, stranger) in strangers.enumerated() {
                try stranger.send(WireMessage(jobID: "", body: .join(Join(workerID: "stranger-\(i)", host: "h", pid: 1, modelFingerprint: ""))))
                while let reply = try stranger.next(within: 0.02) { if case .welcome = reply.body { welcomed += 1 } }
            }
        }
        #expect(welcomed == 0, "a stranger got a rank")
        #expect(waitUntil(timeout: 30) { (try? job.status(timeoutSeconds: 1))?.workers.filter { $0.state == "training" }.count == 2 })
        let status = try job.status(timeoutSeconds: 2)
        #expect(Set(status.workers.filter { $0.state == "training" }.map(\.pid)) == workerPids, "\(status.workers)")
        let log = try String(contentsOfFile: job.logPath("coordinator"), encoding: .utf8)
        #expect(log.contains("resumed from checkpoint") && log.contains("kept for their holders"))
    }

    /// Connections that do not join are bounded: a hundred idle peers cost the coordinator no more than the
    /// bound's descriptors, it keeps answering, and once they leave a worker joins and the job completes.
    @Test func idleConnectionsAreBounded() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (coordinator, job, endpoints) = try launchCoordinator(["job_id": "idle-job", "workers": 1, "epochs": 2], in: dir)
        defer { coordinator.terminate() }
        func descriptors() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(coordinator.pid)/fd").count) ?? 0 }
        let before = descriptors()
        var idle: [RawPeer]? = try (0..<100).map { _ in try RawPeer(connectingTo: endpoints.workers) }
        #expect(waitUntil(timeout: 10) { coordinator.isRunning && descriptors() >= before + 30 })
        usleep(500_000)  // let the rest try and be refused
        #expect(descriptors() <= before + 2 * (1 + 1) + 32 + 4, "\(descriptors() - before) descriptors for 100 idle peers")
        #expect(((try? job.status(timeoutSeconds: 2))?.rejectedMessages ?? 0) > 0)
        #expect(try String(contentsOfFile: dir + "/coordinator.log", encoding: .utf8).contains("too many connections waiting to join"))
        idle = nil
        withExtendedLifetime(idle) {}
        let worker = try runCommand(Binaries.ddpd, ["worker", "--connect", endpoints.workers, "--config", dir + "/spec.json"])
        #expect(worker.status == 0, "\(worker.stderr)")
        #expect(coordinator.wait(timeout: 60) == 0)
    }

    /// A 200 MB frame from a stranger is cut off by its size: the coordinator's memory barely moves.
    @Test func anOversizedFrameCostsTheCoordinatorNothing() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (coordinator, job, endpoints) = try launchCoordinator(["job_id": "big-job", "workers": 1], in: dir)
        defer { coordinator.terminate() }
        func residentMB() -> Double {
            let status = (try? String(contentsOfFile: "/proc/\(coordinator.pid)/status", encoding: .utf8)) ?? ""
            let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
            return (Double(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) / 1024
        }
        _ = try job.status(timeoutSeconds: 2)
        let before = residentMB()
        let big = Payload(byteCount: 200 << 20)
        for _ in 0..<3 {
            let stranger = try RawPeer(connectingTo: endpoints.workers)
            try stranger.send(WireMessage(jobID: "", body: .heartbeat(Heartbeat(sentUnixMilliseconds: 0, state: "")),
                                          tensors: [WireTensor(name: "x", shape: [50 << 20], payload: big)]))
            usleep(300_000)
        }
        #expect(try job.status(timeoutSeconds: 2).state == "waiting")
        #expect(residentMB() - before < 8, "RSS grew from \(before) to \(residentMB()) MB")
    }

    /// The rate limit: the first `burst` of a window one line each, the rest summed up in one line.
    @Test func rejectionLogSumsUpWhatItDoesNotLog() {
        let lines = LogLines()
        let logger = Logger(label: "test") { _ in lines }
        var rejections = RejectionLog(burst: 5, window: 10)
        for i in 0..<1000 { rejections.record("junk \(i)", metadata: [:], now: 100 + Double(i) * 0.001, to: logger) }
        #expect(lines.messages.count == 5)
        rejections.tick(now: 105, to: logger)
        #expect(lines.messages.count == 5)
        rejections.tick(now: 111, to: logger)
        #expect(lines.messages.count == 6 && lines.messages.last!.contains("rejected 995 more messages") && lines.messages.last!.contains("junk 999"))
        rejections.record("late", metadata: [:], now: 112, to: logger)
        #expect(lines.messages.last == "rejected message: late")
    }

    func mode(_ path: String) -> mode_t {
        var status = stat()
        return stat(path, &status) == 0 ? status.st_mode & 0o777 : 0
    }
}

/// A log handler that keeps the messages (for tests of what is logged).
final class LogLines: LogHandler, @unchecked Sendable {
    var messages: [String] = []
    var logLevel: Logger.Level = .trace
    var metadata: Logger.Metadata = [:]
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) { messages.append("\(event.message)") }
}
