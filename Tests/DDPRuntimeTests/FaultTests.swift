@testable import DDPWire
import Foundation
import Testing
@testable import DDPRuntime

/// Killed workers and coordinators, hostile peers and secure jobs.
@Suite(.serialized)
struct FaultTests {
    /// With whole pushes, with pushes in many parts (1 KiB buckets), some of which are lost with the
    /// worker, and with two coordinator shards (the restarted worker joins both).
    @Test(arguments: [("1024", 1), ("1", 1), ("1024", 2)])
    func killedWorkerIsNamedRestartedAndTheJobCompletes(bucketKB: String, shards: Int) throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let arguments = ["--workers", "3", "--epochs", "30", "--seed", "5", "--bucket-kb", bucketKB, "--coordinator-shards", "\(shards)"]
        let clean = try #require(try startJob(arguments, jobsDir: jobs).0)

        let job = try startDetachedJob(arguments, jobsDir: jobs)
        let killAt = Int.random(in: 40...150)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= killAt })
        let victim = try #require(JobLookup.processes(of: job)["worker-1"])
        kill(victim, SIGKILL)
        #expect(waitUntil(timeout: 120) { job.summary() != nil })
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.steps == clean.steps)
        #expect(summary.lostWorkers.contains(1))
        #expect(abs(summary.testAccuracy - clean.testAccuracy) <= 0.01, "\(summary.testAccuracy) vs clean \(clean.testAccuracy)")
        let log = try String(contentsOfFile: job.logPath("coordinator"), encoding: .utf8)
        #expect(log.contains("worker lost") && log.contains("pid=\(victim) rank=1"))
        #expect(log.contains("rank=1 restarts=1"), "the restarted worker did not rejoin")
        #expect(log.contains("sent again"), "the interrupted step was not re-divided")
        // No sample was skipped: every epoch trained the whole training split, as in the clean run.
        func samples(_ job: JobDirectory) -> String? {
            (try? String(contentsOfFile: job.metricsPath, encoding: .utf8))?.split(separator: "\n")
                .first { $0.hasPrefix("ddp_samples_total") }.map { String($0.split(separator: " ").last!) }
        }
        let cleanJob = JobDirectory(path: (clean.modelPath as NSString).deletingLastPathComponent)
        #expect(samples(job) != nil && samples(job) == samples(cleanJob), "\(samples(job) ?? "-") vs \(samples(cleanJob) ?? "-")")
        let status = try job.status()
        #expect(status.source == "directory" && status.state == "completed")
    }

    @Test func theOnlyWorkerKilledIsRestartedAndTheJobCompletes() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let job = try startDetachedJob(["--workers", "1", "--epochs", "30"], jobsDir: jobs)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 50 })
        kill(try #require(JobLookup.processes(of: job)["worker-0"]), SIGKILL)
        #expect(waitUntil(timeout: 120) { job.summary() != nil })
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.steps == 360 && summary.lostWorkers == [0], "\(summary.message)")
        #expect(summary.testAccuracy >= 0.95)
    }

    @Test func belowMinWorkersTheJobFailsWithTheReason() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        try "heartbeat_interval_ms: 300\nheartbeat_timeout_ms: 1500\n".write(toFile: jobs + "/job.yaml", atomically: true, encoding: .utf8)
        let job = try startDetachedJob(["--config", jobs + "/job.yaml", "--workers", "2", "--min-workers", "2", "--epochs", "500",
                                        "--max-restarts", "0"], jobsDir: jobs)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 20 })
        let victim = try #require(JobLookup.processes(of: job)["worker-1"])
        kill(victim, SIGKILL)
        let atKill = currentStep(job)
        #expect(waitUntil(timeout: 60) { job.summary() != nil }, "the job hung below min_workers")
        let summary = try #require(job.summary())
        #expect(summary.state == "failed")
        #expect(summary.steps <= atKill + 1, "no step is trained below min_workers (\(atKill) at the kill, \(summary.steps) at the end)")
        #expect(summary.message.contains("below min_workers 2 for 3 s") && summary.message.contains("rank 1"), "\(summary.message)")
        #expect(summary.message.contains("pid \(victim)"))
    }

    /// A coordinator that cannot resume (every checkpoint fails to verify) ends the job with a summary that
    /// says why, instead of leaving the supervisor to guess.
    @Test func aCoordinatorThatCannotResumeSaysWhyInTheSummary() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let done = try #require(try startJob(["--workers", "1", "--epochs", "2", "--checkpoint-every", "5"], jobsDir: jobs).0)
        let job = JobDirectory(path: (done.modelPath as NSString).deletingLastPathComponent)
        let checkpoints = Checkpoint.list(in: job)
        #expect(!checkpoints.isEmpty)
        for path in checkpoints {
            var bytes = try #require(FileManager.default.contents(atPath: path))
            for i in (bytes.count - 64)..<bytes.count { bytes[i] ^= 0x5A }
            try bytes.write(to: URL(fileURLWithPath: path))
        }
        try FileManager.default.removeItem(atPath: job.summaryPath)
        let result = try runCommand(Binaries.ddpd, ["coordinator", "--config", job.specPath, "--job-dir", job.path, "--resume",
                                                    "--bind", "ipc://\(jobs)/workers.sock", "--control", "ipc://\(jobs)/control.sock"])
        #expect(result.status == 1)
        let summary = try #require(job.summary(), "no summary written: \(result.stderr)")
        #expect(summary.state == "failed" && summary.message.contains("no checkpoint verifies"), "\(summary.message)")
    }

    /// With two coordinator shards the leader is killed: its follower is assigned again from the checkpoint.
    @Test(arguments: [1, 2])
    func killedCoordinatorResumesToTheSameParameters(shards: Int) throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let arguments = ["--workers", "2", "--epochs", "25", "--seed", "9", "--checkpoint-every", "25", "--coordinator-shards", "\(shards)"]
        let cleanSummary = try #require(try startJob(arguments, jobsDir: jobs).0)
        let clean = try finalParameters(JobDirectory(path: (cleanSummary.modelPath as NSString).deletingLastPathComponent))

        let job = try startDetachedJob(arguments, jobsDir: jobs)
        // 12 steps an epoch and a checkpoint every 25: killed past step 90 (however late the kill lands), it
        // resumes inside an epoch (75, 100, 125, ...: none of them a multiple of 12 before the job's 300th step).
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 90 })
        let coordinator = try #require(job.endpoints()).pid
        kill(coordinator, SIGKILL)
        #expect(waitUntil(timeout: 120) { job.summary() != nil })
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.steps == cleanSummary.steps)
        let log = try String(contentsOfFile: job.logPath("coordinator"), encoding: .utf8)
        #expect(log.contains("resumed from checkpoint"))
        let resumedAt = log.split(separator: "\n").first { $0.contains("resumed from checkpoint") }
            .flatMap { $0.components(separatedBy: "step=").last }.flatMap { Int($0.prefix { $0.isNumber }) }
        #expect(resumedAt.map { $0 % 12 != 0 } == true, "resumed at step \(resumedAt.map(String.init) ?? "?"): not inside an epoch")
        // The counters carry on from the checkpoint and the step log holds each step once.
        func samples(_ dir: JobDirectory) throws -> String? {
            try String(contentsOfFile: dir.metricsPath, encoding: .utf8).split(separator: "\n").first { $0.hasPrefix("ddp_samples_total") }
                .map { String($0.split(separator: " ").last!) }
        }
        let cleanJob = JobDirectory(path: (cleanSummary.modelPath as NSString).deletingLastPathComponent)
        #expect(try samples(job) == samples(cleanJob) && samples(job) != nil)
        let steps = try String(contentsOfFile: job.stepLogPath, encoding: .utf8).split(separator: "\n")
            .compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }.compactMap { $0["step"] as? Int }
        #expect(steps == Array(0..<cleanSummary.steps), "each step once, in order")
        #expect(job.history().map(\.epoch) == Array(1...25))
        // The epoch it resumed in counts its steps from before the kill too.
        // Bitwise equality holds for a fixed membership: a worker declared lost (a starved machine) regroups the sums.
        let membership = "lost workers: clean run \(cleanSummary.lostWorkers), resumed run \(summary.lostWorkers)"
        #expect(job.history().map(\.trainLoss) == cleanJob.history().map(\.trainLoss), "\(membership)")
        #expect(job.history().map(\.trainAccuracy) == cleanJob.history().map(\.trainAccuracy))
        let resumed = try finalParameters(job)
        #expect(resumed.map(\.name) == clean.map(\.name))
        for (a, b) in zip(resumed, clean) { #expect(a.values == b.values, "\(a.name) differs from the uninterrupted run; \(membership)") }
        if shards > 1 {
            let follower = try String(contentsOfFile: job.logPath("coordinator-shard-1"), encoding: .utf8)
            #expect(follower.components(separatedBy: "assigned by the leader").count == 3, "\(follower)")
        }
    }

    /// A follower shard killed mid-job fails the job at once, naming it; no process is left behind and the
    /// A full disk under the jobs directory crashes no process: the job fails with the reason (the
    /// checkpoints in a row it could not write), the exit status says so, no process is left behind.
    @Test(.enabled(if: getuid() == 0, "mounting a small tmpfs needs root"))
    func aFullDiskFailsTheJobWithTheReasonAndCrashesNothing() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let disk = dir + "/disk"
        try FileManager.default.createDirectory(atPath: disk, withIntermediateDirectories: true)
        #expect(try runCommand("/bin/mount", ["-t", "tmpfs", "-o", "size=300k", "tmpfs", disk]).status == 0)
        defer { _ = try? runCommand("/bin/umount", ["-l", disk]) }
        let result = try runCommand(Binaries.ddpctl, ["start", "--json", "--jobs-dir", disk + "/j", "--workers", "3", "--epochs", "300",
                                                      "--batch-size", "32", "--seed", "3"], timeout: 180)
        #expect(result.status == 1, "\(result.stderr.suffix(500))")
        let summary = try #require(try? JobJSON.decoder().decode(JobSummary.self, from: Data((result.stdout.split(separator: "\n").last ?? "").utf8)))
        #expect(summary.state == "failed" && summary.message.contains("checkpoints in a ro"), "\(summary.message)")
        let leftover = try runCommand("/usr/bin/pgrep", ["-f", disk])
        #expect(leftover.stdout.isEmpty, "processes left: \(leftover.stdout)")
    }

    /// With only checkpoints/ full and checkpoint_failure_limit 0, training goes on to the end and every
    /// failed checkpoint shows: in status, the summary and the metrics.
    @Test(.enabled(if: getuid() == 0, "mounting a small tmpfs needs root"))
    func failedCheckpointsAreReported() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let checkpoints = jobs + "/cp-job/checkpoints"
        try FileManager.default.createDirectory(atPath: checkpoints, withIntermediateDirectories: true)
        #expect(try runCommand("/bin/mount", ["-t", "tmpfs", "-o", "size=16k", "tmpfs", checkpoints]).status == 0)
        defer { _ = try? runCommand("/bin/umount", ["-l", checkpoints]) }
        try "job_id: cp-job\ncheckpoint_failure_limit: 0\n".write(toFile: jobs + "/job.yaml", atomically: true, encoding: .utf8)
        let (summary, result) = try startJob(["--config", jobs + "/job.yaml", "--epochs", "5"], jobsDir: jobs)
        let s = try #require(summary, "\(result.stderr)")
        #expect(s.state == "completed" && s.message.contains("checkpoint(s) could not be written"), "\(s.message)")
        let metrics = try String(contentsOfFile: jobs + "/cp-job/metrics.prom", encoding: .utf8)
        #expect(metrics.contains("ddp_checkpoint_failures_total{job_id=\"cp-job\"} 5"), "\(metrics)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: checkpoints)) ?? []).isEmpty, "no temporary file is left")
    }

    /// A stop sticks: with the coordinator frozen (SIGSTOP), `ddpctl stop --timeout 3` waits the 3 s, kills
    /// the job's processes, and the supervisor restarts nothing: the job ends `stopped`. A pid in
    /// processes.json that now belongs to another program is left alone.
    @Test func aStopIsFinalAndKillsOnlyTheJobsProcesses() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let job = try startDetachedJob(["--epochs", "3000"], jobsDir: jobs)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 50 })
        let stranger = try ChildProcess("/bin/sleep", ["60"])
        defer { stranger.terminate() }
        var processes = JobLookup.processes(of: job)
        processes["worker-9"] = stranger.pid
        try JSONEncoder().encode(processes).write(to: URL(fileURLWithPath: job.processesPath))
        let coordinator = try #require(job.endpoints()).pid
        kill(coordinator, SIGSTOP)
        let asked = Date()
        let stop = try runCommand(Binaries.ddpctl, ["stop", "--job", job.path, "--timeout", "3"], timeout: 60)
        #expect(Date().timeIntervalSince(asked) >= 3, "the whole timeout is waited")
        #expect(stop.stdout.contains("killed") && stop.stdout.contains("coordinator"), "\(stop.stdout)")
        #expect(waitUntil(timeout: 20) { job.summary() != nil })
        #expect(job.summary()?.state == "stopped", "\(job.summary()?.message ?? "")")
        #expect(waitUntil(timeout: 10) { (try? runCommand("/usr/bin/pgrep", ["-f", job.path]))?.stdout.isEmpty == true })
        #expect(stranger.isRunning, "a pid that is no longer the job's is not signalled")
        let log = try String(contentsOfFile: job.logPath("coordinator"), encoding: .utf8)
        #expect(!log.contains("resumed from checkpoint"))
    }

    /// The chaos run's short form: two rounds of random faults on real jobs, each checked (complete, every
    /// sample once, bitwise or within a point of the clean run, nothing left behind, no crash); synchronous,
    /// with a backup worker, and local SGD.
    @Test(arguments: [[String](), ["--set", "backup_workers=1"], ["--set", "sync_every=4", "--set", "outer_momentum=0.5"]])
    func chaosRoundsPassTheirChecks(keys: [String]) throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let result = try runCommand(Binaries.ddpctl, ["chaos", "--rounds", "2", "--seed", "5", "--jobs-dir", dir + "/chaos"] + keys, timeout: 400)
        #expect(result.status == 0 && result.stdout.contains("2/2 rounds passed"), "\(result.stdout)\n\(result.stderr.suffix(500))")
    }

    /// Keys that make no valid job stop a chaos run before any job starts, naming the key.
    @Test func chaosRefusesAnInvalidJob() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let result = try runCommand(Binaries.ddpctl, ["chaos", "--rounds", "1", "--jobs-dir", dir + "/chaos", "--set", "backup_workers=3"])
        #expect(result.status == 64 && result.stderr.contains("backup_workers"), "\(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/chaos"))
    }

    /// A worker sent SIGTERM leaves cleanly: it says Leave, its rank is `left` at once (no deadline
    /// waited out) and the job goes on with the others.
    @Test func aTerminatedWorkerLeavesAndTheJobGoesOn() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let job = try startDetachedJob(["--workers", "3", "--epochs", "3000", "--max-restarts", "0"], jobsDir: jobs)
        defer { _ = try? runCommand(Binaries.ddpctl, ["stop", "--job", job.path, "--timeout", "10"], timeout: 30) }
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 50 })
        let worker = try #require(JobLookup.processes(of: job)["worker-2"])
        kill(worker, SIGTERM)
        let sent = Date()
        let left = waitUntil(timeout: 10) { (try? job.status(timeoutSeconds: 1))?.workers.first { $0.rank == 2 }?.state == "left" }
        let workerLog = ((try? String(contentsOfFile: job.logPath("worker-2"), encoding: .utf8)) ?? "").suffix(1500)
        let coordinatorLog = ((try? String(contentsOfFile: job.logPath("coordinator"), encoding: .utf8)) ?? "").split(separator: "\n")
            .filter { !$0.contains("epoch") }.suffix(12).joined(separator: "\n")
        #expect(left, "worker-2: \(workerLog)\ncoordinator: \(coordinatorLog)")
        #expect(Date().timeIntervalSince(sent) < 3, "left at once, not after a deadline")
        let step = currentStep(job)
        #expect(waitUntil(timeout: 20) { currentStep(job) > step + 20 })
        let log = try String(contentsOfFile: job.logPath("coordinator"), encoding: .utf8)
        #expect(log.contains("worker left") && log.contains("SIGTERM received"))
    }

    /// A worker paused (SIGSTOP) past the step deadline is declared lost; once resumed (SIGCONT) it is told
    /// it is no longer a member, joins again with its rank and takes part: the same process, no restart.
    @Test(arguments: [true, false])
    func aPausedWorkerLearnsItWasDroppedAndRejoins(sharedMemory: Bool) throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        try "epochs: 3000\nstep_timeout_seconds: 1\nheartbeat_interval_ms: 200\nheartbeat_timeout_ms: 1000\nshared_memory: \(sharedMemory)\n"
            .write(toFile: jobs + "/job.yaml", atomically: true, encoding: .utf8)
        let job = try startDetachedJob(["--config", jobs + "/job.yaml", "--max-restarts", "0"], jobsDir: jobs)
        defer { _ = try? runCommand(Binaries.ddpctl, ["stop", "--job", job.path, "--timeout", "10"], timeout: 30) }
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 50 })
        let paused = try #require(JobLookup.processes(of: job)["worker-1"])
        kill(paused, SIGSTOP)
        #expect(waitUntil(timeout: 20) { (try? job.status(timeoutSeconds: 1))?.workers.first { $0.rank == 1 }?.state == "lost" })
        let stepWhileLost = currentStep(job)
        #expect(waitUntil(timeout: 20) { currentStep(job) > stepWhileLost + 20 }, "the job goes on with one worker")
        kill(paused, SIGCONT)
        #expect(waitUntil(timeout: 20) {
            guard let w = (try? job.status(timeoutSeconds: 1))?.workers.first(where: { $0.rank == 1 }) else { return false }
            return w.state == "training" && w.pid == UInt32(paused) && w.restarts == 1
        }, "the woken worker rejoins with its rank")
        #expect(JobLookup.isAlive(paused) && JobLookup.processes(of: job)["worker-1"] == paused)
        let log = try String(contentsOfFile: job.logPath("worker-1"), encoding: .utf8)
        #expect(log.contains("joining again"), "\(log.suffix(2000))")
    }

    /// checkpoints written so far stay.
    @Test func killedFollowerShardFailsTheJobNamingIt() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let job = try startDetachedJob(["--workers", "2", "--epochs", "400", "--coordinator-shards", "3", "--checkpoint-every", "50"], jobsDir: jobs)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 120 })
        let shards = try job.status().coordinatorShards  // status names the followers while the job runs
        #expect(shards == ["ipc://\(job.path)/shard-1.sock", "ipc://\(job.path)/shard-2.sock"], "\(shards)")
        let processes = JobLookup.processes(of: job)
        let victim = try #require(processes["coordinator-shard-2"])
        kill(victim, SIGKILL)
        let killed = Date()
        #expect(waitUntil(timeout: 30) { job.summary() != nil })
        #expect(Date().timeIntervalSince(killed) < 10)
        let summary = try #require(job.summary())
        #expect(summary.state == "failed" && summary.message.contains("coordinator shard 2"), "\(summary.message)")
        #expect(summary.modelPath.isEmpty, "a model without shard 2's current tensors was written")
        #expect(Checkpoint.latest(in: job).checkpoint != nil)
        #expect(waitUntil(timeout: 15) { processes.values.allSatisfy { kill($0, 0) != 0 } }, "processes left: \(processes)")
    }

    @Test func hostileMessagesChangeNothing() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let arguments = ["--workers", "2", "--epochs", "20", "--seed", "3"]
        let clean = try #require(try startJob(arguments, jobsDir: jobs).0)
        let job = try startDetachedJob(arguments, jobsDir: jobs)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 5 })
        let spec = try JobSpec.fromJSON(try String(contentsOfFile: job.specPath, encoding: .utf8))
        let endpoint = try #require(job.endpoints()).workers

        let context = ZMQContext()
        let hostile = try ZMQSocket(context: context, kind: .dealer)
        try hostile.connect(endpoint)
        func send(_ message: WireMessage, version: UInt32 = wireProtocolVersion) throws {
            try hostile.send(WireCodec.encode(message, protocolVersion: version))
        }
        let nan = WireTensor(name: "1.weight", shape: [128, 64], payload: Payload(floats: Array(repeating: .nan, count: 128 * 64)))
        var rng = SystemRandomNumberGenerator()
        for round in 0..<20 {
            try hostile.send([.bytes((0..<Int.random(in: 1...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })])
            try send(WireMessage(jobID: spec.jobID, step: UInt64(round), rank: 0, body: .gradientPush(GradientPush(sampleCount: 64, localLoss: 1)), tensors: [nan]))
            try send(WireMessage(jobID: "another-job", step: UInt64(round), rank: 1, body: .gradientPush(GradientPush(sampleCount: 64, localLoss: 1))))
            try send(WireMessage(jobID: spec.jobID, body: .join(Join(workerID: "intruder", host: "x", pid: 1, modelFingerprint: "bad"))))
            try send(WireMessage(jobID: spec.jobID, body: .join(Join(workerID: "squatter", host: "x", pid: 1, modelFingerprint: ""))))
            try send(WireMessage(jobID: spec.jobID, body: .leave(reason: "not a member")), version: 7)
            try hostile.send([.bytes([0x0a, 0x05]), .bytes([1, 2, 3])])  // truncated envelope plus a stray frame
            try send(WireMessage(jobID: spec.jobID, step: 1_000_000, rank: 1, body: .gradientPush(GradientPush(sampleCount: 1, localLoss: 0))))
            try send(WireMessage(jobID: spec.jobID, body: .statusReply(StatusReply(jobState: "fake"))))
        }
        #expect(waitUntil(timeout: 120) { job.summary() != nil })
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.rejectedMessages >= 20 * 8)
        let cleanParameters = try finalParameters(JobDirectory(path: (clean.modelPath as NSString).deletingLastPathComponent))
        for (a, b) in zip(try finalParameters(job), cleanParameters) { #expect(a.values == b.values, "\(a.name) changed") }
    }

    @Test func badGradientsFromAMemberAreSkippedAndNamed() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let overrides: [String: Any] = ["workers": 2, "min_workers": 1, "epochs": 3, "job_id": "nan-job"]
        let spec = try JobSpec.load(path: nil, overrides: overrides)
        let (coordinator, job, endpoints) = try launchCoordinator(overrides, in: dir)
        defer { coordinator.terminate() }
        let logPath = dir + "/coordinator.log"
        let endpoint = endpoints.workers

        // A member that sends NaN, then a wrong shape, then the same step twice, then a push in parts that
        // repeats a tensor, then a push whose first part is missing, then leaves.
        let context = ZMQContext()
        let fake = try ZMQSocket(context: context, kind: .dealer)
        try fake.connect(endpoint)
        try fake.send(WireCodec.encode(WireMessage(jobID: "nan-job", body: .join(Join(workerID: "fake", host: "test", pid: 2, modelFingerprint: "")))))
        let real = try ChildProcess(Binaries.ddpd, ["worker", "--connect", endpoint, "--config", dir + "/spec.json"])
        defer { real.terminate() }
        var rank: Int32 = -1, pushes = 0
        let setup = try TrainingSetup(spec: spec)
        while pushes < 5, let frames = try fake.receive(timeoutMilliseconds: 10_000) {
            let message = try WireCodec.decode(frames)
            if case .welcome(let w) = message.body {
                rank = w.rank
                try fake.send(WireCodec.encode(WireMessage(jobID: "nan-job", rank: rank, body: .heartbeat(Heartbeat(sentUnixMilliseconds: 0, state: Heartbeat.ready)))))
            }
            guard case .parameterUpdate = message.body else { continue }
            let shapes = setup.model.parameters
            let tensors: [WireTensor] = shapes.map { p in
                let values: [Float] = pushes == 0 ? Array(repeating: .nan, count: p.tensor.count) : Array(repeating: 0, count: p.tensor.count)
                let shape = pushes == 1 && p.name == "1.bias" ? [p.tensor.count, 1] : p.tensor.shape
                return WireTensor(name: p.name, shape: shape, payload: Payload(floats: values))
            }
            let push = WireMessage(jobID: "nan-job", step: message.step, rank: rank, body: .gradientPush(GradientPush(sampleCount: 64, localLoss: 1)), tensors: tensors)
            if pushes == 4 {
                let header = GradientPush(sampleCount: 64, localLoss: 1, part: 1, moreParts: false)
                try fake.send(WireCodec.encode(WireMessage(jobID: "nan-job", step: message.step, rank: rank, body: .gradientPush(header), tensors: tensors)))
                pushes += 1
                continue
            }
            if pushes == 3 {
                for (part, range) in [0..<2, 1..<tensors.count].enumerated() {
                    let header = GradientPush(sampleCount: 64, localLoss: 1, part: UInt32(part), moreParts: part == 0)
                    try fake.send(WireCodec.encode(WireMessage(jobID: "nan-job", step: message.step, rank: rank, body: .gradientPush(header),
                                                               tensors: Array(tensors[range]))))
                }
                pushes += 1
                continue
            }
            try fake.send(WireCodec.encode(push))
            if pushes == 2 { try fake.send(WireCodec.encode(push)) }  // a duplicate
            pushes += 1
        }
        try fake.send(WireCodec.encode(WireMessage(jobID: "nan-job", rank: rank, body: .leave(reason: "done lying"))))
        #expect(coordinator.wait(timeout: 120) == 0)
        #expect(real.wait(timeout: 30) == 0)
        let summary = try #require(job.summary())
        #expect(summary.state == "completed")
        #expect(summary.rejectedMessages >= 5)
        let log = try String(contentsOfFile: logPath, encoding: .utf8)
        #expect(log.contains("skipped: tensor '1.weight' element 0 is NaN or infinite"))
        #expect(log.contains("has shape [128, 1], expected [128]"))
        #expect(log.contains("duplicate push"))
        #expect(log.contains("tensor '1.bias' sent twice"), "\(log)")
        #expect(log.contains("part 1 of the push arrived where part 0 was due"), "\(log)")
        #expect(log.contains("worker left"))
    }

    @Test func unauthorisedClientsCannotJoinASecureJob() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try JobKeys.generate(into: dir + "/keys")
        try JobKeys.generate(into: dir + "/stranger")
        let (coordinator, job, endpoints) = try launchCoordinator(
            ["workers": 1, "epochs": 2, "job_id": "secure", "keys_dir": dir + "/keys"], in: dir)
        defer { coordinator.terminate() }
        let endpoint = endpoints.workers

        // The stranger knows the server's public key but holds an unauthorised client key.
        try FileManager.default.removeItem(atPath: dir + "/stranger/server.pub")
        try FileManager.default.copyItem(atPath: dir + "/keys/server.pub", toPath: dir + "/stranger/server.pub")
        try FileManager.default.removeItem(atPath: dir + "/stranger/server.key")
        let stranger = try runCommand(Binaries.ddpd, ["worker", "--connect", endpoint, "--keys", dir + "/stranger", "--join-timeout", "5"])
        #expect(stranger.status != 0 && stranger.stderr.contains("did not accept this worker's CURVE key"), "\(stranger.stderr)")
        // A client without CURVE gets nothing back.
        let context = ZMQContext()
        let plain = try ZMQSocket(context: context, kind: .dealer)
        try plain.setLinger(milliseconds: 0)
        try plain.connect(endpoint)
        try plain.send(WireCodec.encode(WireMessage(jobID: "secure", body: .join(Join(workerID: "plain", host: "x", pid: 1, modelFingerprint: "")))))
        #expect(try plain.receive(timeoutMilliseconds: 1000) == nil)

        let good = try runCommand(Binaries.ddpd, ["worker", "--connect", endpoint, "--config", dir + "/spec.json"])
        #expect(good.status == 0, "\(good.stderr)")
        coordinator.wait(timeout: 120)
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.rejectedMessages >= 1)
    }

    @Test func secureTrafficIsNotPlainText() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try JobKeys.generate(into: dir + "/keys")
        func captured(secure: Bool) throws -> Data {
            let jobDir = dir + "/job-\(secure)"
            var overrides: [String: Any] = ["workers": 1, "epochs": 1, "job_id": "visible-job-name", "shared_memory": false]  // every tensor through the relay
            if secure { overrides["keys_dir"] = dir + "/keys" }
            let (coordinator, _, endpoints) = try launchCoordinator(overrides, in: jobDir)
            defer { coordinator.terminate() }
            let target = endpoints.workers
            let relay = try TCPRelay(to: UInt16(target.split(separator: ":").last!)!)
            let worker = try runCommand(Binaries.ddpd, ["worker", "--connect", "tcp://127.0.0.1:\(relay.port)", "--config", jobDir + "/spec.json"])
            #expect(worker.status == 0, "\(worker.stderr)")
            coordinator.wait(timeout: 120)
            return relay.stop()
        }
        let plain = try captured(secure: false), secret = try captured(secure: true)
        let marker = Data("visible-job-name".utf8)
        #expect(plain.range(of: marker) != nil, "the check itself must see plain text")
        #expect(secret.count > 10_000 && secret.range(of: marker) == nil)
        #expect(secret.range(of: Data("learning_rate".utf8)) == nil)
    }

    @Test func sixteenWorkersFiveHundredStepsWithOneKilled() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let job = try startDetachedJob(["--workers", "16", "--epochs", "42", "--hidden", "32"], jobsDir: jobs)
        #expect(waitUntil(timeout: 120) { currentStep(job) >= 150 })
        kill(try #require(JobLookup.processes(of: job)["worker-7"]), SIGKILL)
        #expect(waitUntil(timeout: 600) { job.summary() != nil }, "the job hung")
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.steps == 504 && summary.epochs == 42)
        #expect(summary.lostWorkers == [7])
        #expect(summary.testAccuracy > 0.9)
        let log = try String(contentsOfFile: job.logPath("coordinator"), encoding: .utf8)
        #expect(log.contains("rank=7 restarts=1"))
    }
}

/// A TCP relay on loopback that records every byte it forwards in both directions.
final class TCPRelay: @unchecked Sendable {
    let port: UInt16
    private let listener: Int32
    private var recorded = Data()
    private let lock = NSLock()
    private var running = true

    init(to targetPort: UInt16) throws {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.listener = listener
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var size = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, size) } }
        listen(listener, 8)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &size) } }
        port = UInt16(bigEndian: address.sin_port)
        Thread.detachNewThread { [self] in
            while running {
                let client = accept(listener, nil, nil)
                guard client >= 0 else { return }
                let upstream = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                var target = sockaddr_in()
                target.sin_family = sa_family_t(AF_INET)
                target.sin_addr.s_addr = inet_addr("127.0.0.1")
                target.sin_port = targetPort.bigEndian
                _ = withUnsafePointer(to: &target) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(upstream, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
                pump(from: client, to: upstream)
                pump(from: upstream, to: client)
            }
        }
    }

    private func pump(from source: Int32, to destination: Int32) {
        Thread.detachNewThread { [self] in
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = read(source, &buffer, buffer.count)
                if n <= 0 { shutdown(destination, Int32(SHUT_WR)); return }
                lock.lock(); recorded.append(contentsOf: buffer[0..<n]); lock.unlock()
                var sent = 0
                while sent < n {
                    let m = buffer[sent..<n].withUnsafeBytes { write(destination, $0.baseAddress, n - sent) }
                    if m <= 0 { return }
                    sent += m
                }
            }
        }
    }

    /// Stops accepting and returns everything recorded.
    func stop() -> Data {
        running = false
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        lock.lock(); defer { lock.unlock() }
        return recorded
    }
}
