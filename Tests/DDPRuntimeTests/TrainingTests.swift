import Autodiff
import Foundation
import Testing
@testable import DDPRuntime

/// Several worker processes over real sockets train exactly what one process trains.
@Suite(.serialized)
struct TrainingTests {
    static let shortJob = ["--epochs", "3", "--batch-size", "100", "--seed", "11"]

    func parameters(_ summary: JobSummary) throws -> [(name: String, tensor: Tensor)] {
        try SafeTensors.read(path: summary.modelPath).tensors
    }

    /// The largest |a - b| / max|a| over every tensor.
    func relativeDifference(_ a: [(name: String, tensor: Tensor)], _ b: [(name: String, tensor: Tensor)]) -> Float {
        var worst: Float = 0
        for (x, y) in zip(a, b) {
            precondition(x.name == y.name)
            let scale = max(x.tensor.scalars.map(abs).max() ?? 0, 1e-12)
            for (u, v) in zip(x.tensor.scalars, y.tensor.scalars) { worst = max(worst, abs(u - v) / scale) }
        }
        return worst
    }

    @Test func twoAndThreeWorkersMatchOneWorker() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        var runs: [Int: [(name: String, tensor: Tensor)]] = [:]
        for workers in [1, 2, 3] {
            let (summary, result) = try startJob(Self.shortJob + ["--workers", "\(workers)"], jobsDir: jobs)
            let s = try #require(summary, "no summary: \(result.stderr)")
            #expect(s.state == "completed" && s.steps == 3 * 15)
            runs[workers] = try parameters(s)
        }
        #expect(relativeDifference(runs[1]!, runs[2]!) < 1e-5)
        #expect(relativeDifference(runs[1]!, runs[3]!) < 1e-5)
    }

    @Test func oneWorkerIsExactlyInProcessTraining() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let (summary, result) = try startJob(Self.shortJob + ["--workers", "1"], jobsDir: jobs)
        let distributed = try parameters(try #require(summary, "no summary: \(result.stderr)"))

        var spec = try JobSpec.load(path: nil, overrides: ["epochs": 3, "batch_size": 100, "seed": 11])
        spec.workers = 1
        let setup = try TrainingSetup(spec: spec)
        let optimizer = try setup.makeOptimizer()
        for step in 0..<setup.totalSteps {
            let epoch = step / setup.sampler.stepsPerEpoch
            let (x, labels) = setup.train.batch(setup.sampler.globalBatch(
                step: step % setup.sampler.stepsPerEpoch, of: setup.sampler.permutation(epoch: epoch)))
            setup.model.zeroGrad()
            try Loss.softmaxCrossEntropy(setup.model(x), labels: labels).backward()
            optimizer.learningRate = setup.schedule.rate(base: spec.learningRate, at: step)
            optimizer.step(setup.model.parameters)
        }
        for (p, d) in zip(setup.model.parameters, distributed) {
            #expect(p.name == d.name)
            #expect(p.tensor.scalars == d.tensor.scalars, "\(p.name) differs")
        }
    }

    @Test func sameSeedSameWorkersIsBitwiseIdentical() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let first = try #require(try startJob(Self.shortJob + ["--workers", "2"], jobsDir: jobs).0)
        let second = try #require(try startJob(Self.shortJob + ["--workers", "2"], jobsDir: jobs).0)
        for (a, b) in zip(try parameters(first), try parameters(second)) { #expect(a.tensor.scalars == b.tensor.scalars) }
        #expect(first.testAccuracy == second.testAccuracy)
    }

    @Test func automaticBLASThreadsShareTheCPUsAmongLocalWorkers() {
        let cpus = TrainingSetup.availableCPUs()
        #expect(cpus >= 1 && cpus <= ProcessInfo.processInfo.activeProcessorCount)
        #expect(TrainingSetup.automaticBLASThreads(environment: [:]) == cpus)
        #expect(TrainingSetup.automaticBLASThreads(environment: ["DDP_LOCAL_WORKERS": "2"]) == max(1, cpus / 2))
        #expect(TrainingSetup.automaticBLASThreads(environment: ["DDP_LOCAL_WORKERS": "\(4 * cpus)"]) == 1)
    }

    @Test func bucketedPushesTrainBitwiseLikeWholePushes() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let whole = try #require(try startJob(Self.shortJob + ["--workers", "2", "--bucket-kb", "0"], jobsDir: jobs).0)
        let (bucketed, result) = try startJob(Self.shortJob + ["--workers", "2", "--bucket-kb", "1"], jobsDir: jobs)
        let parts = try #require(bucketed, "no summary: \(result.stderr)")
        #expect(parts.state == "completed" && parts.rejectedMessages == 0)
        for (a, b) in zip(try parameters(whole), try parameters(parts)) { #expect(a.tensor.scalars == b.tensor.scalars, "\(a.name)") }
    }

    /// Workers on the coordinator's host use shared memory (f32: parameters and gradients in place), and
    /// train bit for bit what workers sending every tensor in frames train.
    @Test(arguments: ["f32", "bf16", "f16"]) func sharedMemoryTrainsBitwiseLikeFrames(wire: String) throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        var runs: [String: JobSummary] = [:]
        for sharing in ["--shared-memory", "--no-shared-memory"] {
            let (summary, result) = try startJob(Self.shortJob + ["--workers", "2", "--wire-dtype", wire, sharing], jobsDir: jobs)
            let s = try #require(summary, "no summary: \(result.stderr)")
            #expect(s.state == "completed" && s.rejectedMessages == 0)
            let log = try String(contentsOfFile: JobDirectory(path: (s.modelPath as NSString).deletingLastPathComponent).logPath("worker-1"), encoding: .utf8)
            #expect(log.contains(sharing == "--shared-memory" ? "tensors_via=shared memory" : "tensors_via=frames"), "\(log)")
            runs[sharing] = s
        }
        let shared = try parameters(runs["--shared-memory"]!), framed = try parameters(runs["--no-shared-memory"]!)
        for (a, b) in zip(shared, framed) { #expect(a.tensor.scalars == b.tensor.scalars, "\(a.name)") }
    }

    /// K coordinator shards, each averaging and stepping its span of the model (tensors split between
    /// shards included), train bit for bit what one coordinator trains: f32 in shared memory, and bf16
    /// with Adam in frames, and with every step clipped by the global norm; the newest checkpoint's
    /// optimizer state, gathered from the shards' slices, too.
    @Test(arguments: [["--wire-dtype", "f32"], ["--wire-dtype", "bf16", "--no-shared-memory", "--optimizer", "adam", "--lr", "0.01"],
                      ["--clip-norm", "0.02", "--no-shared-memory", "--momentum", "0.9"]])
    func coordinatorShardsTrainBitwiseLikeOne(options: [String]) throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        var runs: [Int: [(name: String, tensor: Tensor)]] = [:], states: [Int: [String: Tensor]] = [:]
        for shards in [1, 2, 3] {
            let (summary, result) = try startJob(Self.shortJob + ["--workers", "3", "--coordinator-shards", "\(shards)"] + options, jobsDir: jobs)
            let s = try #require(summary, "no summary: \(result.stderr)")
            #expect(s.state == "completed" && s.rejectedMessages == 0, "\(s.message)")
            let job = JobDirectory(path: (s.modelPath as NSString).deletingLastPathComponent)
            for shard in 1..<shards {
                let log = try String(contentsOfFile: job.logPath("coordinator-shard-\(shard)"), encoding: .utf8)
                #expect(log.contains("assigned by the leader") && log.contains("follower shard completed"), "\(log)")
            }
            runs[shards] = try parameters(s)
            states[shards] = try #require(Checkpoint.latest(in: job).checkpoint).optimizerState
        }
        let counts = runs[1]!.map(\.tensor.count)
        #expect((0..<counts.count).contains { ShardPlan(elementCounts: counts, shards: 3).owners(of: $0).count > 1 }, "no tensor is split")
        for shards in [2, 3] {
            for (a, b) in zip(runs[1]!, runs[shards]!) { #expect(a.tensor.scalars == b.tensor.scalars, "\(a.name) with \(shards) shards") }
            #expect(states[shards]!.keys.sorted() == states[1]!.keys.sorted())
            for (name, state) in states[1]! { #expect(states[shards]![name]?.scalars == state.scalars, "optimizer state \(name) with \(shards) shards") }
        }
    }

    /// Between checkpoints a job with coordinator shards has its workers score the held-out split (the leader
    /// holds only its part of the model): the history holds bit for bit what one coordinator scores itself,
    /// the last epoch (scored by the leader on the final model) included.
    @Test func workersScoreTheHeldOutSplitAsOneCoordinatorDoes() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        var histories: [Int: [EpochRecord]] = [:]
        for shards in [1, 2] {
            let (summary, result) = try startJob(Self.shortJob + ["--workers", "3", "--coordinator-shards", "\(shards)", "--checkpoint-every", "1000",
                                                                  "--set", "test_fraction=0.7"], jobsDir: jobs)
            let s = try #require(summary, "no summary: \(result.stderr)")
            #expect(s.state == "completed" && s.rejectedMessages == 0, "\(s.message)")
            let job = JobDirectory(path: (s.modelPath as NSString).deletingLastPathComponent)
            histories[shards] = job.history()
            // Two held-out batches among three workers: ranks 0 and 1 score one each after epochs 1 and 2.
            for rank in 0..<3 {
                let log = try String(contentsOfFile: job.logPath("worker-\(rank)"), encoding: .utf8)
                let scored = log.components(separatedBy: "scored held-out batches").count - 1
                #expect(scored == (shards == 1 || rank == 2 ? 0 : 2), "worker \(rank) with \(shards) shards scored \(scored) times")
            }
        }
        let one = try #require(histories[1]), sharded = try #require(histories[2])
        #expect(one.count == 3 && sharded.count == 3 && one.allSatisfy { $0.testAccuracy > 0.2 }, "\(one)")
        #expect(one.map(\.testLoss) == sharded.map(\.testLoss) && one.map(\.testAccuracy) == sharded.map(\.testAccuracy), "\(one) against \(sharded)")
        #expect(one.map(\.trainLoss) == sharded.map(\.trainLoss))
    }

    /// A learning rate that blows the parameters up ends the job as failed, "diverged", at the same step
    /// with one coordinator and with three shards: exit status 1, no model written over with NaN, the
    /// newest checkpoint finite and the same in both, metrics that Prometheus parses.
    @Test func aDivergedRunFailsAndKeepsTheLastFiniteCheckpoint() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        var checkpoints: [[(name: String, tensor: Tensor)]] = []
        var steps: [Int] = []
        for shards in [1, 3] {
            // The rate grows 1000x every 4 steps: finite at first, then the loss overflows.
            let (summary, result) = try startJob(["--workers", "2", "--epochs", "3", "--lr", "0.01", "--momentum", "0", "--schedule", "step",
                                                   "--step-every", "4", "--gamma", "1000", "--checkpoint-every", "1",
                                                   "--coordinator-shards", "\(shards)"], jobsDir: jobs)
            let s = try #require(summary, "no summary: \(result.stderr)")
            #expect(result.status == 1 && s.state == "failed" && s.message.contains("training diverged"), "\(s.message)")
            #expect(s.modelPath.isEmpty && !FileManager.default.fileExists(atPath: jobs + "/" + s.jobID + "/model.safetensors"))
            let job = JobDirectory(path: jobs + "/" + s.jobID)
            let latest = try #require(Checkpoint.latest(in: job).checkpoint, "no checkpoint kept")
            #expect(latest.parameters.values.allSatisfy(\.isFinite) && s.message.contains(latest.path), "\(s.message)")
            checkpoints.append(latest.parameters.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
            steps.append(s.steps)
            let metrics = try String(contentsOfFile: job.metricsPath, encoding: .utf8)
            #expect(!metrics.contains("nan") && !metrics.contains(" inf"), "\(metrics)")
        }
        #expect(steps[0] == steps[1] && steps[0] > 4, "\(steps)")
        for (a, b) in zip(checkpoints[0], checkpoints[1]) { #expect(a.tensor.scalars == b.tensor.scalars, "\(a.name)") }
    }

    @Test func defaultJobReachesNinetyFivePercent() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let (summary, result) = try startJob(["--workers", "2"], jobsDir: jobs)
        let s = try #require(summary, "no summary: \(result.stderr)")
        #expect(result.status == 0)
        #expect(s.state == "completed" && s.workers == 2 && s.epochs == 30)
        #expect(s.testAccuracy >= 0.95, "test accuracy \(s.testAccuracy)")
        #expect(FileManager.default.fileExists(atPath: s.modelPath))
        #expect(s.samplesPerSecond > 0 && s.wallSeconds > 0)
        for key in ["state", "workers", "epochs", "steps", "train_loss", "test_loss", "test_accuracy", "wall_seconds",
                    "samples_per_second", "model_path"] {
            #expect(result.stdout.contains("\"\(key)\""), "summary lacks \(key)")
        }
        #expect(result.stderr.contains("epoch  30/30"))
    }

    @Test func otherModelsAndDataFormatsTrain() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let cnn = try #require(try startJob(["--model", "cnn", "--optimizer", "adam", "--lr", "0.01", "--epochs", "4",
                                              "--workers", "2"], jobsDir: jobs).0)
        #expect(cnn.state == "completed" && cnn.testAccuracy > 0.85, "cnn accuracy \(cnn.testAccuracy)")
        let logistic = try #require(try startJob(["--model", "logistic", "--epochs", "5", "--workers", "2",
                                                   "--schedule", "cosine", "--warmup-steps", "5"], jobsDir: jobs).0)
        #expect(logistic.state == "completed" && logistic.testAccuracy > 0.85)
        let synthetic = try #require(try startJob(["--dataset", "synthetic", "--synthetic-samples", "2000", "--synthetic-features", "20",
                                                    "--synthetic-classes", "3", "--epochs", "3", "--workers", "2",
                                                    "--transport", "tcp"], jobsDir: jobs).0)
        #expect(synthetic.state == "completed" && synthetic.testAccuracy > 0.7)
    }
}

/// Half-precision wire types keep the coordinator's f32 master parameters and train as well.
@Suite(.serialized)
struct CompressedWireTests {
    @Test(arguments: ["bf16", "f16"])
    func halfPrecisionWireTrainsLikeF32(dtype: String) throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let f32 = try #require(try startJob(["--epochs", "10", "--seed", "4"], jobsDir: jobs).0)
        let (summary, result) = try startJob(["--epochs", "10", "--seed", "4", "--wire-dtype", dtype], jobsDir: jobs)
        let half = try #require(summary, "\(result.stderr)")
        #expect(half.state == "completed" && half.rejectedMessages == 0)
        #expect(abs(half.testAccuracy - f32.testAccuracy) <= 0.02, "\(dtype) \(half.testAccuracy) vs f32 \(f32.testAccuracy)")
        #expect(abs(half.trainLoss - f32.trainLoss) <= 0.05)
    }
}

/// Linear regression through the distributed runtime.
@Suite(.serialized)
struct RegressionTests {
    @Test func linearRegressionFitsAndMatchesOneWorker() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let arguments = ["--task", "regression", "--model", "linear", "--dataset", "synthetic", "--synthetic-samples", "3000",
                         "--synthetic-features", "8", "--epochs", "8", "--lr", "0.05"]
        let two = try #require(try startJob(arguments + ["--workers", "2"], jobsDir: jobs).0)
        #expect(two.state == "completed" && two.task == "regression")
        #expect(two.testAccuracy > 0.99, "R² \(two.testAccuracy)")
        #expect(two.testLoss < 0.02, "MSE \(two.testLoss) against a noise variance of 0.01")
        let one = try #require(try startJob(arguments + ["--workers", "1"], jobsDir: jobs).0)
        #expect(abs(one.testLoss - two.testLoss) <= 1e-4)
        let wrong = try runCommand(Binaries.ddpctl, ["start", "--jobs-dir", jobs, "--model", "linear"])
        #expect(wrong.status == 64 && wrong.stderr.contains("model 'linear' is linear regression: set task to 'regression'"))
    }
}
