import Autodiff
import Foundation
import Testing
@testable import DDPRuntime

/// Local SGD / DiLoCo (`sync_every` > 1) with real worker processes: it is plain training for one worker
/// whose outer step takes its change whole, bitwise reproducible for a fixed membership (frames and half
/// precision too), and a worker killed during its inner steps costs no sample.
@Suite(.serialized)
struct LocalSGDTests {
    static let job = ["--epochs", "3", "--batch-size", "100", "--seed", "11", "--optimizer", "adam", "--lr", "0.01"]

    func parameters(_ summary: JobSummary) throws -> [(name: String, tensor: Tensor)] {
        try SafeTensors.read(path: summary.modelPath).tensors
    }

    /// One worker, outer SGD at rate 1 without momentum: the coordinator's parameters become the worker's
    /// after each round, so the job trains as synchronous SGD does (to float rounding of start - change).
    @Test func oneWorkerWithTheWholeChangeIsPlainTraining() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let plain = try #require(try startJob(Self.job + ["--workers", "1"], jobsDir: jobs).0)
        let (summary, result) = try startJob(Self.job + ["--workers", "1", "--sync-every", "4", "--outer-optimizer", "sgd", "--outer-lr", "1",
                                                         "--outer-momentum", "0"], jobsDir: jobs)
        let local = try #require(summary, "no summary: \(result.stderr)")
        // 1,437 training samples in batches of 100: 15 steps an epoch, rounds of 4, 4, 4 and 3.
        #expect(plain.steps == 45 && local.steps == 12 && local.state == "completed")
        var worst: Float = 0
        for (a, b) in zip(try parameters(plain), try parameters(local)) {
            #expect(a.name == b.name)
            let scale = max(a.tensor.scalars.map(abs).max() ?? 0, 1e-12)
            for (u, v) in zip(a.tensor.scalars, b.tensor.scalars) { worst = max(worst, abs(u - v) / scale) }
        }
        #expect(worst < 1e-4, "largest relative difference \(worst)")
        #expect(abs(local.testAccuracy - plain.testAccuracy) <= 0.01)
    }

    /// Two workers with an outer Nesterov step (momentum 0.5: DiLoCo's 0.9 suits rounds of hundreds of steps,
    /// not this job's 24 rounds): the same job twice gives the same bits, through shared memory in f32 and in
    /// frames with bf16 changes, and with two coordinator shards; and it learns.
    @Test(arguments: [[String](), ["--wire-dtype", "bf16", "--no-shared-memory"]])
    func twoWorkersAreBitwiseReproducible(wire: [String]) throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let arguments = Self.job + ["--workers", "2", "--sync-every", "4", "--epochs", "6", "--outer-momentum", "0.5"] + wire
        let first = try #require(try startJob(arguments, jobsDir: jobs).0)
        let second = try #require(try startJob(arguments, jobsDir: jobs).0)
        #expect(first.state == "completed" && first.steps == 24)
        for (a, b) in zip(try parameters(first), try parameters(second)) { #expect(a.tensor.scalars == b.tensor.scalars, "\(a.name) differs") }
        if wire.isEmpty {  // two coordinator shards, each stepping its tensors with the outer optimizer, agree too
            let sharded = try #require(try startJob(arguments + ["--coordinator-shards", "2"], jobsDir: jobs).0)
            for (a, b) in zip(try parameters(first), try parameters(sharded)) { #expect(a.tensor.scalars == b.tensor.scalars, "\(a.name) differs with shards") }
        }
        #expect(first.testAccuracy == second.testAccuracy && first.testAccuracy > 0.9, "test accuracy \(first.testAccuracy)")
        let history = JobDirectory(path: (first.modelPath as NSString).deletingLastPathComponent).history()
        #expect(history.count == 6 && history.last!.testLoss < history.first!.testLoss)
    }

    /// A worker killed while it takes its inner steps: the round is sent again to the other, which starts
    /// it over from the round's parameters; the killed worker is restarted and rejoins; every epoch still
    /// trains all its samples.
    @Test func aWorkerKilledDuringItsInnerStepsCostsNoSample() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let job = try startDetachedJob(["--workers", "2", "--dataset", "synthetic", "--synthetic-samples", "6000", "--hidden", "512,512",
                                        "--epochs", "4", "--sync-every", "8", "--blas-threads", "1"], jobsDir: jobs)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 2 }, "the job did not get to its third round")
        let victim = try #require(JobLookup.processes(of: job)["worker-1"])
        kill(victim, SIGKILL)
        #expect(waitUntil(timeout: 120) { job.summary() != nil })
        let summary = try #require(job.summary())
        // 4,800 training samples an epoch in batches of 128: 38 steps, rounds of 8 (the last of 6): 5 rounds.
        #expect(summary.state == "completed" && summary.steps == 20 && summary.lostWorkers == [1], "\(summary.message)")
        let log = try String(contentsOfFile: job.logPath("coordinator"), encoding: .utf8)
        #expect(log.contains("rank=1 restarts=1"), "the restarted worker did not rejoin")
        #expect(log.contains("sent again"), "the interrupted round was not re-divided")
        let rounds = try String(contentsOfFile: job.stepLogPath, encoding: .utf8).split(separator: "\n").compactMap {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        let trained = rounds.map { ($0["samples"] as? [String: Int] ?? [:]).values.reduce(0, +) }
        #expect(stride(from: 0, to: trained.count, by: 5).map { trained[$0..<min($0 + 5, trained.count)].reduce(0, +) } == [4800, 4800, 4800, 4800])
    }

    /// The coordinator killed mid-job, with a checkpoint every round: `ddpctl start` resumes it from the
    /// newest; the workers, which live on, begin that round again from its start (their inner optimizer
    /// state as it was then), so the job ends bitwise where an uninterrupted one does. Checkpoints hold the
    /// outer optimizer's momentum.
    @Test func aKilledCoordinatorResumesBitwiseWithACheckpointEveryRound() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let arguments = ["--workers", "2", "--epochs", "16", "--seed", "9", "--sync-every", "4", "--outer-momentum", "0.5",
                         "--checkpoint-every", "1"]
        let clean = try #require(try startJob(arguments, jobsDir: jobs).0)
        let job = try startDetachedJob(arguments, jobsDir: jobs)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 30 })
        kill(try #require(job.endpoints()).pid, SIGKILL)
        #expect(waitUntil(timeout: 120) { job.summary() != nil })
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.steps == clean.steps && clean.steps == 16 * 3)
        #expect(try String(contentsOfFile: job.logPath("coordinator"), encoding: .utf8).contains("resumed from checkpoint"))
        let cleanJob = JobDirectory(path: (clean.modelPath as NSString).deletingLastPathComponent)
        for (a, b) in zip(try finalParameters(job), try finalParameters(cleanJob)) { #expect(a.values == b.values, "\(a.name) differs") }
        let checkpoint = try #require(Checkpoint.latest(in: job).checkpoint)
        #expect(checkpoint.optimizerState.keys.contains { $0.hasSuffix(".momentum") }, "\(checkpoint.optimizerState.keys.sorted())")
    }

    /// A worker's rounds in-process: a round begun again (resent) from the same start and optimizer state
    /// ends on the same bits; the start goes back into a tensor before a half-precision update only while the
    /// round's steps have moved it, not after a Welcome's values settled it.
    @Test func aRoundBegunAgainEndsTheSameAndAWelcomeSettlesTheStart() throws {
        let spec = try JobSpec.load(path: nil, overrides: ["sync_every": 4, "optimizer": "adam", "learning_rate": 0.01])
        let setup = try TrainingSetup(spec: spec)
        let rounds = try LocalRounds(spec: spec, stepsPerEpoch: setup.sampler.stepsPerEpoch)
        let tensors = setup.wireTensors
        let runs = [Array(0..<32), Array(32..<64), Array(64..<96)]
        try rounds.begin(step: 0, tensors: tensors)
        _ = try rounds.run(runs, firstInnerStep: 0, task: setup, trained: tensors)
        let round0 = tensors.map(\.tensor.scalars)
        try rounds.begin(step: 1, tensors: tensors)
        _ = try rounds.run(runs, firstInnerStep: 3, task: setup, trained: tensors)
        let round1 = tensors.map(\.tensor.scalars)
        try rounds.begin(step: 1, tensors: tensors)  // resent: from round 1's start and optimizer state
        #expect(tensors.map(\.tensor.scalars) == round0)
        _ = try rounds.run(runs, firstInnerStep: 3, task: setup, trained: tensors)
        #expect(tensors.map(\.tensor.scalars) == round1, "round 1 begun again ends on other bits")
        let moved = tensors[0].tensor.scalars
        rounds.restoreStart(0, elements: 2..<5, into: tensors[0].tensor)  // a slice (a tensor split between coordinator shards)
        #expect(tensors[0].tensor.scalars == Array(moved[0..<2] + round0[0][2..<5] + moved[5...]), "only the slice goes back")
        rounds.restoreStart(0, elements: 0..<tensors[0].tensor.count, into: tensors[0].tensor)
        #expect(tensors[0].tensor.scalars == round0[0], "moved by the steps: the start goes back")
        tensors[1].tensor.assign(Tensor.zeros(tensors[1].tensor.shape))  // a Welcome's values
        rounds.settle()
        rounds.restoreStart(1, elements: 0..<tensors[1].tensor.count, into: tensors[1].tensor)
        #expect(tensors[1].tensor.scalars.allSatisfy { $0 == 0 }, "settled: the Welcome's values stay")
    }
}
