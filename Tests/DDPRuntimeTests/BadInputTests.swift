@testable import DDPWire
import Foundation
import Testing
@testable import DDPRuntime

/// Wrong jobs, files and peers get clear errors; a coordinator refuses a bad worker and keeps going.
@Suite(.serialized)
struct BadInputTests {
    @Test func unknownKeysAndValuesAreNamed() throws {
        #expect(throws: JobSpecError.invalid("unknown key 'epoch' (did you mean 'epochs'?)")) {
            try JobSpec.load(path: nil, overrides: ["epoch": 3])
        }
        #expect(throws: JobSpecError.invalid("model 'transformer' is unknown (mlp, cnn, logistic, linear, gpt, or a list of layers)")) {
            try JobSpec.load(path: nil, overrides: ["model": "transformer"])
        }
        #expect(throws: JobSpecError.invalid("optimizer 'rmsprop' is unknown (sgd, adam, adamw)")) {
            try JobSpec.load(path: nil, overrides: ["optimizer": "rmsprop"])
        }
        #expect(throws: JobSpecError.invalid("key 'epochs' must be an integer")) {
            try JobSpec.load(path: nil, overrides: ["epochs": "many"])
        }
        #expect(throws: JobSpecError.invalid("coordinator_shards must be between 1 and 64, got 0")) {
            try JobSpec.load(path: nil, overrides: ["coordinator_shards": 0])
        }
        #expect(try JobSpec.load(path: nil, overrides: ["coordinator_shards": 2, "clip_norm": 1.0]).clipNorm == 1)  // the shards share the norm
        #expect(throws: JobSpecError.invalid("backup_workers must be at least 0 and below workers (2), got 2")) {
            try JobSpec.load(path: nil, overrides: ["backup_workers": 2])
        }
        #expect(throws: JobSpecError.invalid("backup_workers needs coordinator_shards = 1 (the leader alone decides which pushes a step uses)")) {
            try JobSpec.load(path: nil, overrides: ["workers": 3, "backup_workers": 1, "coordinator_shards": 2])
        }
        #expect(throws: JobSpecError.invalid("staleness needs coordinator_shards = 1 (a late push is applied by the leader alone)")) {
            try JobSpec.load(path: nil, overrides: ["workers": 3, "backup_workers": 1, "staleness": 2, "coordinator_shards": 2])
        }
        #expect(throws: JobSpecError.invalid("staleness needs backup_workers >= 1 (only a step completed without a worker leaves a push to come late)")) {
            try JobSpec.load(path: nil, overrides: ["staleness": 2])
        }
        #expect(throws: JobSpecError.invalid("sync_every must be at least 1 (1: synchronous SGD), got 0")) {
            try JobSpec.load(path: nil, overrides: ["sync_every": 0])
        }
        #expect(throws: JobSpecError.invalid("outer_optimizer 'adam' is unknown (nesterov, sgd)")) {
            try JobSpec.load(path: nil, overrides: ["sync_every": 8, "outer_optimizer": "adam"])
        }
        #expect(throws: JobSpecError.invalid("outer_lr must be positive, got -0.5")) {
            try JobSpec.load(path: nil, overrides: ["sync_every": 8, "outer_lr": -0.5])
        }
        #expect(throws: JobSpecError.invalid("backup_workers needs sync_every = 1 (a round of local steps is waited for whole)")) {
            try JobSpec.load(path: nil, overrides: ["sync_every": 8, "backup_workers": 1])
        }
    }

    /// Equal spans of the model's elements in parameter order: every element owned exactly once, one
    /// contiguous slice per shard and tensor, loads within the alignment, cuts aligned.
    @Test func shardPlansSplitTheModelIntoEqualSpans() {
        let counts = [8192, 128, 1280, 10, 100_352, 512]
        let plan = ShardPlan(elementCounts: counts, shards: 3)
        for (index, count) in counts.enumerated() {
            let parts = plan.owners(of: index).map { plan.range(of: index, in: $0) }
            #expect(parts.first?.lowerBound == 0 && parts.last?.upperBound == count)
            #expect(zip(parts, parts.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound })
        }
        let loads = (0..<3).map { s in counts.indices.reduce(0) { $0 + plan.range(of: $1, in: s).count } }
        #expect(loads.reduce(0, +) == counts.reduce(0, +) && loads.max()! - loads.min()! <= ShardPlan.alignment)
        #expect(plan.indices(of: 0) == [0, 1, 2, 3, 4] && plan.indices(of: 1) == [4] && plan.indices(of: 2) == [4, 5])
        #expect(plan.range(of: 4, in: 1).lowerBound % ShardPlan.alignment == 0)  // the big tensor is cut in three
        #expect(plan.slice(of: 0, in: 0) == nil && plan.slice(of: 4, in: 1) == plan.range(of: 4, in: 1))  // whole tensors travel unsliced
        #expect(ShardPlan(elementCounts: [5, 5, 5], shards: 1).indices(of: 0) == [0, 1, 2])
        #expect(ShardPlan(elementCounts: [5], shards: 3).owners(of: 0).count == 1)  // smaller than a span: one owner
    }

    @Test func yamlAndJSONJobFiles() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "epochs: 7\nhidden: [32, 16]\noptimizer: adam\nlearning_rate: 0.01\n".write(toFile: dir + "/job.yaml", atomically: true, encoding: .utf8)
        let yaml = try JobSpec.load(path: dir + "/job.yaml", overrides: ["workers": 3])
        #expect(yaml.epochs == 7 && yaml.hidden == [32, 16] && yaml.optimizer == "adam" && yaml.workers == 3)
        try "{\"epochs\": 2, \"batch_size\": 64}".write(toFile: dir + "/job.json", atomically: true, encoding: .utf8)
        #expect(try JobSpec.load(path: dir + "/job.json").batchSize == 64)
        #expect(throws: JobSpecError.self) { try JobSpec.load(path: dir + "/missing.yaml") }
        try "epochs: [".write(toFile: dir + "/broken.yaml", atomically: true, encoding: .utf8)
        #expect(throws: JobSpecError.self) { try JobSpec.load(path: dir + "/broken.yaml") }
    }

    @Test func startRefusesBadJobsBeforeTraining() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let unknownModel = try runCommand(Binaries.ddpctl, ["start", "--jobs-dir", jobs, "--model", "resnet"])
        #expect(unknownModel.status != 0 && unknownModel.stderr.contains("model 'resnet' is unknown"))
        let missingFile = try runCommand(Binaries.ddpctl, ["start", "--jobs-dir", jobs, "--dataset", "csv", "--data-path", "/nonexistent.csv"])
        #expect(missingFile.status != 0)
        #expect((missingFile.stdout + missingFile.stderr).contains("data file not found: /nonexistent.csv"))
        let malformed = jobs + "/bad.csv"
        try "label,a,b\n1,2,3\n0,x,1\n".write(toFile: malformed, atomically: true, encoding: .utf8)
        let bad = try runCommand(Binaries.ddpctl, ["start", "--jobs-dir", jobs, "--dataset", "csv", "--data-path", malformed])
        #expect(bad.status != 0 && (bad.stdout + bad.stderr).contains("line 3, column 2: 'x' is not a finite number"))
    }

    /// A coordinator for one worker of job "the-job".
    func coordinator(_ dir: String, extra: [String: Any] = [:]) throws -> (ChildProcess, Endpoints) {
        let (process, _, endpoints) = try launchCoordinator(["workers": 1, "epochs": 2, "job_id": "the-job"].merging(extra) { $1 }, in: dir)
        return (process, endpoints)
    }

    @Test func coordinatorRefusesWrongWorkersAndKeepsGoing() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (process, endpoints) = try coordinator(dir)
        defer { process.terminate() }

        // A worker that builds another model (another hidden size): refused by fingerprint.
        let other = dir + "/other.yaml"
        try "hidden: [64]\njob_id: the-job\n".write(toFile: other, atomically: true, encoding: .utf8)
        let impostor = try runCommand(Binaries.ddpd, ["worker", "--connect", endpoints.workers, "--config", other, "--join-timeout", "10"])
        #expect(impostor.status != 0 && impostor.stderr.contains("model fingerprint"), "\(impostor.stderr)")

        // A worker of another job.
        try "job_id: another-job\n".write(toFile: other, atomically: true, encoding: .utf8)
        let stranger = try runCommand(Binaries.ddpd, ["worker", "--connect", endpoints.workers, "--config", other, "--join-timeout", "10"])
        #expect(stranger.status != 0 && stranger.stderr.contains("job 'another-job'"), "\(stranger.stderr)")

        // A client speaking another protocol version.
        let context = ZMQContext()
        let socket = try ZMQSocket(context: context, kind: .dealer)
        try socket.connect(endpoints.workers)
        try socket.send(WireCodec.encode(WireMessage(jobID: "the-job", body: .join(Join(workerID: "v2", host: "h", pid: 1, modelFingerprint: ""))), protocolVersion: 2))
        let reply = try #require(try socket.receive(timeoutMilliseconds: 5000))
        guard case .error(let error) = try WireCodec.decode(reply).body else { Issue.record("expected an error reply"); return }
        #expect(error.code == .versionMismatch && error.reason.contains("protocol version 2"))

        // The job still runs to completion with a proper worker.
        let good = try runCommand(Binaries.ddpd, ["worker", "--connect", endpoints.workers, "--config", dir + "/spec.json"])
        #expect(good.status == 0, "\(good.stderr)")
        #expect(process.wait(timeout: 60) == 0)
        let summary = try #require(JobDirectory(path: dir).summary())
        #expect(summary.state == "completed" && summary.rejectedMessages >= 3)
    }

    /// A real worker joined to a fake coordinator (a ROUTER the test drives) of job `jobID` and welcomed
    /// with the job's values; with it the process, its identity, the tensors and the log's path.
    func welcomedWorker(jobID: String, in dir: String) throws -> (router: ZMQSocket, identity: [UInt8], tensors: [WireTensor], worker: ChildProcess, log: String) {
        let spec = try JobSpec.load(path: nil, overrides: ["job_id": jobID, "workers": 1])
        let parameters = try TrainingSetup(spec: spec).model.parameters
        let router = try ZMQSocket(context: ZMQContext(), kind: .router)  // a coordinator that breaks the protocol
        let endpoint = try router.bind("ipc://\(dir)/workers.sock")
        let worker = try ChildProcess(Binaries.ddpd, ["worker", "--connect", endpoint, "--join-timeout", "10"], standardError: dir + "/worker.log")
        var identity: [UInt8] = []
        while identity.isEmpty, let frames = try router.receive(timeoutMilliseconds: 10_000) {
            if case .join = try WireCodec.decode(Array(frames.dropFirst())).body { identity = frames[0].bytes }
        }
        if identity.isEmpty { worker.terminate() }
        try #require(!identity.isEmpty, "the worker never asked to join")
        let tensors = parameters.map { WireTensor(name: $0.name, shape: $0.tensor.shape, payload: Payload(floats: $0.tensor.scalars)) }
        let welcome = Welcome(rank: 0, worldSize: 1, jobSpecJSON: spec.json(), startStep: 0, epoch: 0)
        try router.send([.bytes(identity)] + WireCodec.encode(WireMessage(jobID: jobID, rank: 0, body: .welcome(welcome), tensors: tensors)))
        return (router, identity, tensors, worker, dir + "/worker.log")
    }

    @Test func workerRefusesAnUpdateWhosePartsComeOutOfOrder() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (router, identity, tensors, worker, logPath) = try welcomedWorker(jobID: "parts-job", in: dir)
        defer { worker.terminate() }
        let secondPart = ParameterUpdate(learningRate: 0.1, fullCopy: true, epoch: 0, worldSize: 1, trainLoss: 0, part: 1, moreParts: true)
        try router.send([.bytes(identity)] + WireCodec.encode(WireMessage(jobID: "parts-job", step: 0, rank: 0, body: .parameterUpdate(secondPart),
                                                                          tensors: Array(tensors.prefix(1)))))
        #expect(worker.wait(timeout: 30) != 0)
        let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        #expect(log.contains("part 1 of the update for step 0 arrived where a first part was due"), "\(log)")
    }

    @Test func workerRefusesAnUpdateThatKeepsTheParametersButCarriesTensors() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (router, identity, tensors, worker, logPath) = try welcomedWorker(jobID: "keeps-job", in: dir)
        defer { worker.terminate() }
        let keeping = ParameterUpdate(learningRate: 0.1, fullCopy: true, epoch: 0, worldSize: 1, trainLoss: 0, keepsParameters: true)
        try router.send([.bytes(identity)] + WireCodec.encode(WireMessage(jobID: "keeps-job", step: 0, rank: 0, body: .parameterUpdate(keeping),
                                                                          tensors: Array(tensors.prefix(1)))))
        #expect(worker.wait(timeout: 30) != 0)
        let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        #expect(log.contains("an update for step 0 that keeps the parameters came with 1 tensors"), "\(log)")
    }

    @Test func coordinatorFailsClearlyWhenWorkersNeverCome() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (process, _) = try coordinator(dir, extra: ["join_timeout_seconds": 1.0])
        #expect(process.wait(timeout: 60) == 1)
        let summary = try #require(JobDirectory(path: dir).summary())
        #expect(summary.state == "failed" && summary.message.contains("only 0 of 1 workers joined within 1.0 s"))
    }
}
