import Foundation
import Testing
@testable import DDPRuntime

/// `balance: speed` against real processes: a worker held stopped half the time gets a smaller share of
/// each step, and every epoch still assigns each training sample once.
@Suite(.serialized)
struct BalanceTests {
    @Test func aWorkerStoppedHalfTheTimeGetsASmallerShareAndNoSampleIsLost() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let job = try startDetachedJob(["--workers", "2", "--balance", "speed", "--dataset", "synthetic", "--synthetic-samples", "6000",
                                        "--hidden", "512,512", "--epochs", "3", "--blas-threads", "1"], jobsDir: "\(dir)/jobs")
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 1 }, "the job did not start training")
        let pids = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: job.processesPath))) as? [String: Int])
        let slowed = pid_t(try #require(pids["worker-1"]))
        // Worker 1 runs 10 ms of every 20 until the job ends (or 120 s pass).
        let deadline = Date().addingTimeInterval(120)
        while job.summary() == nil && Date() < deadline {
            kill(slowed, SIGSTOP)
            usleep(10_000)
            kill(slowed, SIGCONT)
            usleep(10_000)
        }
        kill(slowed, SIGCONT)
        let summary = try #require(job.summary(), "the job did not end within 120 s")
        #expect(summary.state == "completed", "\(summary.message)")

        let steps = try String(contentsOfFile: job.stepLogPath, encoding: .utf8).split(separator: "\n").compactMap {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
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
}
