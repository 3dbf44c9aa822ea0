import Foundation
import Testing
@testable import DDPRuntime

/// Stragglers against real processes, a worker held stopped three quarters of the time (so that it stays
/// clearly the slower one while other tests load the machine): with `balance: speed` it gets
/// a smaller share of each step; with `backup_workers` steps complete without it and its samples are
/// trained in the next step. Either way every epoch trains each training sample once.
@Suite(.serialized)
struct BalanceTests {
    @Test func aStoppedWorkerGetsASmallerShareAndNoSampleIsLost() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (job, summary, statuses) = try runWithWorkerOneSlowed(["--balance", "speed"], in: dir)
        // Balanced step times are alike; status still names the stopped worker by its samples per second.
        #expect(statuses.contains { $0.workers.count == 2 && $0.workers[1].lagging && !$0.workers[0].lagging },
                "no status named rank 1 lagging: \(statuses.map { $0.workers.map(\.samplesPerSecond) })")
        let steps = try stepLog(job)
        let shares = steps.map { step -> (Int, Int) in
            let samples = step["samples"] as? [String: Int] ?? [:]
            return (samples["0"] ?? 0, samples["1"] ?? 0)
        }
        #expect(shares.count == summary.steps)
        #expect(shares.allSatisfy { $0.0 + $0.1 == 128 || $0.0 + $0.1 == 4800 % 128 }, "every step's shares make its batch")
        let later = shares.dropFirst(shares.count / 3)
        let fast = later.reduce(0) { $0 + $1.0 }, slow = later.reduce(0) { $0 + $1.1 }
        #expect(Double(fast) > 1.3 * Double(slow), "the stopped worker's share did not shrink: \(fast) against \(slow) samples")
        // 4,800 training samples an epoch (6,000 less the 20% held out), 38 steps an epoch.
        let perEpoch = stride(from: 0, to: shares.count, by: 38).map { start in shares[start..<min(start + 38, shares.count)].reduce(0) { $0 + $1.0 + $1.1 } }
        #expect(perEpoch == [4800, 4800, 4800])
    }

    @Test func backupWorkersTrainTheLateWorkersSamplesInTheNextStepAndNameIt() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (job, summary, statuses) = try runWithWorkerOneSlowed(["--backup-workers", "1"], in: dir)
        let steps = try stepLog(job)
        #expect(steps.count == summary.steps)
        let leftOut = steps.map { Set(($0["left_out"] as? [Int]) ?? []) }
        let withoutOne = leftOut.filter { $0 == [1] }.count
        #expect(withoutOne > steps.count / 4, "the stopped worker was left out of \(withoutOne) of \(steps.count) steps")
        // 4,800 training samples an epoch (6,000 less the 20% held out), 38 steps an epoch; a step trains the
        // shares of the workers it was not completed without.
        let trained = zip(steps, leftOut).map { step, out in
            (step["samples"] as? [String: Int] ?? [:]).filter { !out.contains(Int($0.key)!) }.values.reduce(0, +)
        }
        let perEpoch = stride(from: 0, to: trained.count, by: 38).map { trained[$0..<min($0 + 38, trained.count)].reduce(0, +) }
        #expect(perEpoch == [4800, 4800, 4800], "samples trained per epoch")
        #expect(stride(from: 37, to: leftOut.count, by: 38).allSatisfy { leftOut[$0].isEmpty }, "an epoch's last step waits for every worker")
        // Status names the stopped worker: left out of steps (and the other far less often, if at all).
        let named = statuses.last { $0.workers.count == 2 && $0.workers[1].leftOutSteps > 0 }
        let last = try #require(named, "no status showed rank 1 left out")
        #expect(last.workers[1].leftOutSteps > 2 * last.workers[0].leftOutSteps && last.workers[1].lastLeftOutStep > 0)
        // The history counts them per epoch, and the report names them.
        let history = job.history()
        #expect(history.count == 3 && history.allSatisfy { ($0.leftOutSteps?["1"] ?? 0) > 0 }, "\(history.map(\.leftOutSteps))")
        #expect(history.reduce(0) { $0 + ($1.leftOutSteps?["1"] ?? 0) } == withoutOne + leftOut.filter { $0 == [0, 1] }.count)
        let report = try JobReport.html(for: job)
        #expect(report.contains("steps completed without a late worker") && report.contains("rank 1: "))
    }

    /// Bounded staleness: the stopped worker's late pushes (in parts, as the backward pass sends them) are
    /// applied in later steps, and each epoch still trains its 4,800 samples once: the shares of the workers
    /// a step waited for, plus the late pushes it applied, the carried samples counted where trained.
    @Test func latePushesWithinTheStalenessAreAppliedAndNoSampleIsLost() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (job, summary, _) = try runWithWorkerOneSlowed(["--backup-workers", "1", "--staleness", "2"], in: dir)
        let steps = try stepLog(job)
        #expect(steps.count == summary.steps)
        let late = steps.flatMap { ($0["late"] as? [[String: Int]]) ?? [] }
        #expect(late.count > 3 && late.filter { $0["rank"] == 1 }.count > late.count / 2, "applied late pushes: \(late)")
        let trained = steps.map { step in
            let out = Set((step["left_out"] as? [Int]) ?? [])
            let shares = (step["samples"] as? [String: Int] ?? [:]).filter { !out.contains(Int($0.key)!) }.values.reduce(0, +)
            return shares + ((step["late"] as? [[String: Int]]) ?? []).reduce(0) { $0 + ($1["samples"] ?? 0) }
        }
        let perEpoch = stride(from: 0, to: trained.count, by: 38).map { trained[$0..<min($0 + 38, trained.count)].reduce(0, +) }
        #expect(perEpoch == [4800, 4800, 4800], "samples trained per epoch")
    }

    /// Runs a 2-worker job (3 epochs of 6,000 synthetic samples, batch 128) with `options` while worker 1
    /// runs 3 ms of every 12 (a cycle shorter than its share of a step with these layers, so that every
    /// step of it is slowed; with a cycle longer than its step, a share could fit in one running window); returns the job, its summary and the statuses asked for about once a second.
    func runWithWorkerOneSlowed(_ options: [String], in dir: String) throws -> (JobDirectory, JobSummary, [JobStatus]) {
        let job = try startDetachedJob(["--workers", "2", "--dataset", "synthetic", "--synthetic-samples", "6000",
                                        "--hidden", "1024,1024", "--epochs", "3", "--blas-threads", "1"] + options, jobsDir: "\(dir)/jobs")
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 1 }, "the job did not start training")
        let pids = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: job.processesPath))) as? [String: Int])
        let slowed = pid_t(try #require(pids["worker-1"]))
        // Worker 1 runs 3 ms of every 12 until the job ends (or 120 s pass).
        let deadline = Date().addingTimeInterval(120)
        var statuses: [JobStatus] = [], cycles = 0
        while job.summary() == nil && Date() < deadline {
            kill(slowed, SIGSTOP)
            usleep(9_000)
            kill(slowed, SIGCONT)
            usleep(3_000)
            cycles += 1
            if cycles % 80 == 0, let status = try? job.status(timeoutSeconds: 1) { statuses.append(status) }
        }
        kill(slowed, SIGCONT)
        let summary = try #require(job.summary(), "the job did not end within 120 s")
        #expect(summary.state == "completed", "\(summary.message)")
        return (job, summary, statuses)
    }

    func stepLog(_ job: JobDirectory) throws -> [[String: Any]] {
        try String(contentsOfFile: job.stepLogPath, encoding: .utf8).split(separator: "\n").compactMap {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
    }
}
