import Foundation
import Testing
@testable import DDPRuntime

/// ddpctl's control commands against detached jobs: real processes, real sockets.
@Suite(.serialized)
struct ControlTests {
    func ddpctl(_ arguments: [String], timeout: Double = 60) throws -> CommandResult {
        try runCommand(Binaries.ddpctl, arguments, timeout: timeout)
    }

    func startDetached(_ jobs: String, _ extra: [String] = []) throws -> String {
        let started = try ddpctl(["start", "--detach", "--json", "--jobs-dir", jobs, "--epochs", "1000"] + extra)
        #expect(started.status == 0, "\(started.stderr)")
        let object = try JSONSerialization.jsonObject(with: Data(started.stdout.utf8)) as? [String: Any]
        return try #require(object?["job_id"] as? String)
    }

    func status(_ jobs: String, _ job: String) throws -> (JobStatus?, CommandResult) {
        let result = try ddpctl(["status", "--jobs-dir", jobs, "--job", job, "--json"])
        return (try? JSONDecoder().decode(JobStatus.self, from: Data(result.stdout.utf8)), result)
    }

    @Test func detachedJobStatusStopAndList() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let job = try startDetached(jobs, ["--workers", "3"])
        var live: JobStatus?
        for _ in 0..<100 {  // until every worker trains
            live = try status(jobs, job).0
            if live?.workers.filter({ $0.state == "training" }).count == 3 { break }
            usleep(100_000)
        }
        let s = try #require(live)
        #expect(s.source == "coordinator" && s.state == "training")
        #expect(s.workers.map(\.rank) == [0, 1, 2] && s.workers.allSatisfy { $0.pid > 0 && !$0.host.isEmpty })

        let stop = try ddpctl(["stop", "--jobs-dir", jobs, "--job", job])
        #expect(stop.status == 0, "\(stop.stdout) \(stop.stderr)")
        #expect(stop.stdout.contains("checkpoint") && stop.stdout.contains("stopped job"))
        let checkpoints = try FileManager.default.contentsOfDirectory(atPath: "\(jobs)/\(job)/checkpoints")
        #expect(!checkpoints.isEmpty)
        let checkpoint = Checkpoint.latest(in: JobDirectory(path: "\(jobs)/\(job)")).checkpoint
        #expect(checkpoint?.parameters.count == 4)

        let list = try ddpctl(["list", "--jobs-dir", jobs])
        #expect(list.stdout.contains(job) && list.stdout.contains("stopped"))
        let after = try status(jobs, job)
        #expect(after.0?.state == "stopped" && after.0?.source == "directory" && after.1.status != 0)
    }

    @Test func statusOfADeadCoordinatorSaysSoQuickly() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let job = try startDetached(jobs)
        let directory = JobDirectory(path: "\(jobs)/\(job)")
        // The supervisor records itself once it has started everything; killed, it restarts nothing.
        #expect(waitUntil(timeout: 10) { JobLookup.processes(of: directory)["supervisor"] != nil })
        let processes = JobLookup.processes(of: directory)
        kill(try #require(processes["supervisor"]), SIGKILL)  // nobody writes a summary
        let coordinator = try #require(directory.endpoints()).pid
        kill(coordinator, SIGKILL)
        #expect(waitUntil(timeout: 10) { !JobLookup.isAlive(coordinator) })  // SIGKILL takes effect asynchronously
        let start = Date()
        let (s, result) = try status(jobs, job)
        #expect(Date().timeIntervalSince(start) < 2)
        #expect(result.status != 0)
        #expect(s?.state == "dead" && s?.message.contains("is not running") == true, "\(result.stdout)")
        for (_, pid) in processes { kill(pid, SIGKILL) }
    }

    @Test func reportHasOnePointPerFinishedEpoch() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let run = try startJob(["--epochs", "6", "--workers", "2"], jobsDir: jobs)
        let summary = try #require(run.0)
        let out = jobs + "/report.html"
        let report = try ddpctl(["report", "--jobs-dir", jobs, "--job", summary.jobID, "--out", out])
        #expect(report.status == 0)
        let html = try String(contentsOfFile: out, encoding: .utf8)
        for series in ["train_loss", "test_loss", "train_accuracy", "test_accuracy"] {
            #expect(html.components(separatedBy: "<circle data-series=\"\(series)\"").count - 1 == 6, "\(series)")
        }
        #expect(html.contains("data-series=\"worker_0\"") && html.contains("data-series=\"worker_1\""))
        #expect(!html.contains("http://") || html.contains("xmlns=\"http://www.w3.org/2000/svg\""))
        #expect(!html.contains("<script"))
        let metrics = try ddpctl(["metrics", "--jobs-dir", jobs, "--job", summary.jobID])
        #expect(metrics.stdout.contains("ddp_steps_total{job_id=\"\(summary.jobID)\"} \(summary.steps)"))
        #expect(metrics.stdout.contains("ddp_step_seconds_bucket"))
    }

    @Test func twoJobsAtOnceDoNotCollide() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let group = DispatchGroup()
        nonisolated(unsafe) var results: [JobSummary?] = [nil, nil]
        for (i, transport) in ["ipc", "tcp"].enumerated() {
            group.enter()
            Thread.detachNewThread {
                results[i] = try? startJob(["--epochs", "8", "--transport", transport, "--seed", "\(i)"], jobsDir: jobs).0
                group.leave()
            }
        }
        group.wait()
        #expect(results.allSatisfy { $0?.state == "completed" })
        #expect(Set(results.compactMap { $0?.jobID }).count == 2)
        let logs = try ddpctl(["logs", "--jobs-dir", jobs, "--job", results[0]!.jobID, "--rank", "1"])
        #expect(logs.stdout.contains("welcomed"))
    }

    @Test func doctorChecksHostAndCoordinator() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let local = try ddpctl(["doctor", "--jobs-dir", jobs])
        #expect(local.status == 0 && local.stdout.contains("ok    libzmq"))
        let unreachable = try ddpctl(["doctor", "--jobs-dir", jobs, "--endpoint", "tcp://127.0.0.1:1"])
        #expect(unreachable.status != 0 && unreachable.stdout.contains("FAIL  coordinator") && unreachable.stdout.contains("fix:"))
        let job = try startDetached(jobs)
        let endpoints = try #require(JobDirectory(path: "\(jobs)/\(job)").endpoints())
        let remote = try ddpctl(["doctor", "--jobs-dir", jobs, "--endpoint", endpoints.control])
        #expect(remote.status == 0, "\(remote.stdout)")
        #expect(remote.stdout.contains("ok    round trip") && remote.stdout.contains("ok    bandwidth"))
        _ = try ddpctl(["stop", "--jobs-dir", jobs, "--job", job])
    }
}
