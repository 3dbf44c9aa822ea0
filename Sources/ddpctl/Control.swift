import ArgumentParser
import DDPRuntime
import DDPWire
import Foundation

/// Which job a command is about.
struct JobSelection: ParsableArguments {
    @Option(help: "The job: its id or its directory (default: the newest job).") var job: String?
    @Option(help: "Where job directories are (default: $SWIFTDDP_HOME/jobs or ~/.swiftddp/jobs).") var jobsDir: String?

    func directory() throws -> JobDirectory {
        do { return try JobLookup.find(job, root: JobLookup.root(jobsDir)) } catch { throw CommandFailure.message(error) }
    }
}

/// An error reported as one plain line with exit status 1.
enum CommandFailure {
    static func message(_ error: any Error) -> any Error { Failure(text: "\(error)") }
    struct Failure: Error, CustomStringConvertible { let text: String; var description: String { text } }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a job's state, progress and workers.",
        discussion: """
            Asks the coordinator over its control socket (so it works from another shell, or another host with
            --endpoint); a finished job's status comes from its directory. Exit status: 0 the job runs or completed,
            1 it failed, was stopped, or its coordinator is dead or does not answer within 2 s.
            The --json fields are listed in README.md ("ddpctl status --json").
            Examples:
              ddpctl status
              ddpctl status --job job-20261127-063000-4f2a --json
              ddpctl status --endpoint tcp://10.0.0.5:5556
            """)
    @OptionGroup var selection: JobSelection
    @Option(help: "A coordinator's control endpoint, instead of a job on this host.") var endpoint: String?
    @Option(help: "With --endpoint: the key folder of a secure job (server.pub and client.key).") var keys: String?
    @Flag(help: "Print one JSON line.") var json = false

    func run() throws {
        let status: JobStatus
        do {
            if let endpoint {
                let jobKeys = try keys.map { try JobKeys.load(from: $0) }
                status = JobStatus(reply: try ControlClient(endpoint: endpoint, keys: jobKeys).status(), jobID: "", jobDir: "")
            } else {
                status = try selection.directory().status()
            }
        } catch { throw CommandFailure.message(error) }
        print(json ? status.jsonLine : StatusText.render(status))
        if ["failed", "stopped", "dead"].contains(status.state) { throw ExitCode.failure }
    }
}

/// Human-readable status.
enum StatusText {
    static func duration(_ seconds: Double) -> String {
        let s = Int(seconds.rounded())
        return s >= 3600 ? "\(s / 3600)h\(s % 3600 / 60)m" : s >= 60 ? "\(s / 60)m\(s % 60)s" : String(format: "%.1fs", seconds)
    }

    static func sparkline(_ values: [Float]) -> String {
        guard let low = values.min(), let high = values.max(), high > low else { return String(repeating: "▁", count: values.count) }
        let ticks = Array("▁▂▃▄▅▆▇█")
        return String(values.map { ticks[min(7, Int(($0 - low) / (high - low) * 7.999))] })
    }

    /// Rows as left-aligned columns.
    static func table(_ rows: [[String]]) -> [String] {
        let widths = rows[0].indices.map { c in rows.map { $0[c].count }.max()! }
        return rows.map { row in
            zip(row, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined(separator: "  ")
                .trimmingCharacters(in: .whitespaces)
        }
    }

    static func render(_ s: JobStatus) -> String {
        var lines = ["job \(s.jobID.isEmpty ? "(remote)" : s.jobID): \(s.state)" + (s.message.isEmpty ? "" : " (\(s.message))")]
        let total = s.totalSteps > 0 ? "/\(s.totalSteps)" : ""
        lines.append("epoch \(s.epoch)/\(s.totalEpochs), step \(s.step)\(total), elapsed \(duration(s.elapsedSeconds))"
                     + (s.etaSeconds.map { ", eta \(duration($0))" } ?? ""))
        let scores = s.epoch > 0 ? ScoreText.test(loss: s.testLoss, accuracy: s.testAccuracy, regression: s.isRegression, program: s.isProgram) : "no epoch finished yet"
        lines.append("train loss \(ScoreText.fixed(s.trainLoss)), \(scores), "
                     + ScoreText.throughput(s.samplesPerSecond, tokensPerSample: s.tokensPerSample) + ", \(s.rejectedMessages) rejected messages")
        if !s.recentLosses.isEmpty { lines.append("loss " + sparkline(Array(s.recentLosses.suffix(60)))) }
        if !s.workers.isEmpty {
            let leavesOut = s.workers.contains { $0.leftOutSteps > 0 }
            let rows = [["RANK", "HOST", "PID", "STATE", "STEP", "HEARTBEAT", "LAST STEP", "SAMPLES/S", "LAGS", "RESTARTS", "GRAD NORM", "OUTLIERS"]
                        + (leavesOut ? ["LEFT OUT"] : [])] + s.workers.map { w in
                ["\(w.rank)", w.host, "\(w.pid)", w.state, "\(w.step)", "\(w.lastHeartbeatMs) ms",
                 String(format: "%.2f ms", w.lastStepSeconds * 1000), w.samplesPerSecond > 0 ? String(format: "%.0f", w.samplesPerSecond) : "-",
                 w.lagging ? "yes" : "no", "\(w.restarts)", String(format: "%.3g", w.gradientNorm), "\(w.outlierSteps)"]
                + (leavesOut ? [w.leftOutSteps == 0 ? "0" : "\(w.leftOutSteps) (last step \(w.lastLeftOutStep))"] : [])
            }
            lines += table(rows)
        }
        if !s.coordinatorShards.isEmpty {
            lines.append("coordinator shards: " + s.coordinatorShards.enumerated().map { "\($0.offset + 1) at \($0.element)" }.joined(separator: ", "))
        }
        if !s.metricsURL.isEmpty { lines.append("metrics \(s.metricsURL)") }
        if !s.jobDir.isEmpty { lines.append("directory \(s.jobDir)") }
        return lines.joined(separator: "\n")
    }
}

struct Watch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Follow a job live (status, progress bar, loss sparkline) until it ends.",
        discussion: "Ctrl-C leaves the job running. Example: ddpctl watch --job job-20261127-063000-4f2a")
    @OptionGroup var selection: JobSelection
    @Option(help: "Seconds between refreshes.") var interval = 0.5

    func run() throws {
        let directory = try selection.directory()
        let terminal = isatty(1) == 1
        var lastPrinted = Date.distantPast
        while true {
            let status: JobStatus
            do { status = try directory.status() } catch { throw CommandFailure.message(error) }
            if terminal {
                let fraction = status.totalSteps > 0 ? Double(status.step) / Double(status.totalSteps) : (status.isFinal ? 1 : 0)
                let bar = String(repeating: "█", count: Int(fraction * 40)) + String(repeating: "░", count: 40 - Int(fraction * 40))
                print("\u{1B}[H\u{1B}[2J" + StatusText.render(status) + "\n\(bar) \(String(format: "%.1f%%", fraction * 100))")
            } else if Date().timeIntervalSince(lastPrinted) >= 2 || status.isFinal {
                print("\(status.state) epoch \(status.epoch)/\(status.totalEpochs) step \(status.step) loss \(ScoreText.fixed(status.trainLoss)) "
                      + ScoreText.test(loss: status.testLoss, accuracy: status.testAccuracy, regression: status.isRegression, program: status.isProgram, separator: " "))
                lastPrinted = Date()
            }
            if status.isFinal {
                if status.state != "completed" { throw ExitCode.failure }
                return
            }
            usleep(UInt32(interval * 1_000_000))
        }
    }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop a job: finish the current step, write a checkpoint, end the workers; kill after a deadline.",
        discussion: """
            With --now the step in progress is dropped instead of finished (the checkpoint is of the last step
            completed; resuming computes the dropped step again). Example: ddpctl stop --job job-20261127-063000-4f2a --timeout 30
            """)
    @OptionGroup var selection: JobSelection
    @Option(help: "Seconds to wait for a graceful stop before killing the job's processes.") var timeout = 30.0
    @Flag(help: "Stop at once: drop the step in progress instead of finishing it.") var now = false

    func run() throws {
        let directory = try selection.directory()
        if let summary = directory.summary() {
            print("job \(summary.jobID) already ended: \(summary.state)")
            return
        }
        let processes = JobLookup.processes(of: directory)
        directory.recordStopRequest("ddpctl stop")  // final: the supervisor restarts nothing after this
        if let endpoints = directory.endpoints(), !JobLookup.isAlive(endpoints.pid), !FileManager.default.fileExists(atPath: directory.restartingPath) {
            // A dead coordinator cannot stop anything: end what is left and say so in a summary.
            var killed: [String] = []
            for (name, pid) in processes.sorted(by: { $0.key < $1.key }) where JobLookup.isProcess(pid, of: directory) {
                kill(pid, SIGKILL)
                killed.append("\(name) (pid \(pid))")
            }
            let spec = (try? JobSpec.fromJSON(try String(contentsOfFile: directory.specPath, encoding: .utf8))) ?? JobSpec()
            let summary = directory.writeFailedSummary(
                spec: spec, message: "the coordinator (pid \(endpoints.pid)) was not running and left no summary; ended by ddpctl stop")
            print("job \(summary.jobID): the coordinator was not running; the job is marked failed" + (killed.isEmpty ? "" : "; killed \(killed.joined(separator: ", "))"))
            return
        }
        var graceful = false
        if let endpoints = directory.endpoints(), JobLookup.isAlive(endpoints.pid) {
            let deadline = Date().addingTimeInterval(timeout)
            let spec = try JobSpec.fromJSON(try String(contentsOfFile: directory.specPath, encoding: .utf8))
            let client = try ControlClient(endpoint: endpoints.control, jobID: spec.jobID, keys: try spec.keys())
            if let reply = try? client.stop(reason: "ddpctl stop", graceful: !now, timeoutSeconds: min(2, timeout)) {
                print("asked the coordinator to stop at step \(reply.step)")
            } else {
                print("the coordinator did not answer; waiting up to \(timeout) s for it to end")
            }
            while JobLookup.isAlive(endpoints.pid) && Date() < deadline { usleep(50_000) }  // the whole --timeout
            graceful = !JobLookup.isAlive(endpoints.pid) && directory.summary() != nil
        }
        var killed: [String] = []
        let deadline = Date().addingTimeInterval(graceful ? 5 : 0)
        for (name, pid) in processes.sorted(by: { $0.key < $1.key }) where name != "supervisor" {
            while JobLookup.isProcess(pid, of: directory) && Date() < deadline { usleep(50_000) }
            if JobLookup.isProcess(pid, of: directory) { kill(pid, SIGKILL); killed.append("\(name) (pid \(pid))") }
        }
        let checkpoint = (try? FileManager.default.contentsOfDirectory(atPath: directory.checkpointsPath))?.sorted().last
        if graceful, let summary = directory.summary() {
            print("stopped job \(summary.jobID) after step \(summary.steps): \(summary.state)")
        }
        if let checkpoint { print("checkpoint \(directory.checkpointsPath)/\(checkpoint)") }
        if !killed.isEmpty { print("killed \(killed.joined(separator: ", "))") }
        if !graceful { print("the coordinator did not stop gracefully within \(timeout) s") ; throw ExitCode.failure }
    }
}

struct Logs: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a job's log: the coordinator's, or one worker's.",
        discussion: "Examples: ddpctl logs; ddpctl logs --rank 1 --follow")
    @OptionGroup var selection: JobSelection
    @Option(help: "A worker's rank (default: the coordinator).") var rank: Int?
    @Flag(help: "Keep printing new lines until the job ends (Ctrl-C to quit).") var follow = false

    func run() throws {
        let directory = try selection.directory()
        let path = directory.logPath(rank.map { "worker-\($0)" } ?? "coordinator")
        guard let handle = FileHandle(forReadingAtPath: path) else { throw CommandFailure.message(ControlError.failed("no log at \(path)")) }
        SafeOutput.write(handle.readDataToEndOfFile(), to: 1)
        guard follow else { return }
        while true {
            let chunk = handle.readDataToEndOfFile()
            if !chunk.isEmpty { SafeOutput.write(chunk, to: 1) }
            if directory.summary() != nil, chunk.isEmpty { return }
            usleep(200_000)
        }
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the jobs on this host with their state.",
        discussion: "Examples: ddpctl list; ddpctl list --jobs-dir /srv/jobs --json")
    @Option(help: "Where job directories are (default: $SWIFTDDP_HOME/jobs or ~/.swiftddp/jobs).") var jobsDir: String?
    @Flag(help: "One JSON line per job.") var json = false

    func run() throws {
        let jobs = JobLookup.all(root: JobLookup.root(jobsDir))
        if jobs.isEmpty && !json { print("no jobs in \(JobLookup.root(jobsDir))") }
        var rows = [["JOB", "STATE", "EPOCH", "TEST SCORE", "DIRECTORY"]]
        for job in jobs {
            let status = (try? job.status(timeoutSeconds: 1)) ?? JobStatus(directory: job, state: "unreachable", message: "")
            if json { print(status.jsonLine); continue }
            rows.append([status.jobID, status.state, "\(status.epoch)/\(status.totalEpochs)",
                         status.epoch == 0 || status.isProgram ? "-" : status.isRegression ? "R² \(ScoreText.fixed(status.testAccuracy))" : "acc \(ScoreText.percent(status.testAccuracy))",
                         job.path])
        }
        if !json && !jobs.isEmpty { StatusText.table(rows).forEach { print($0) } }
    }
}

struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a self-contained HTML report: loss and accuracy per epoch, step times per worker, summary.",
        discussion: "Example: ddpctl report --out report.html")
    @OptionGroup var selection: JobSelection
    @Option(help: "The HTML file to write.") var out = "report.html"

    func run() throws {
        let directory = try selection.directory()
        try JobReport.html(for: directory).write(toFile: out, atomically: true, encoding: .utf8)
        print("wrote \(out)")
    }
}

struct Metrics: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a job's metrics in the Prometheus text format.",
        discussion: """
            Steps, samples, losses, accuracy, bytes sent and received, rejected messages, live and lost workers and a
            step-time histogram; the coordinator rewrites the file (metrics.prom in the job directory) every second.
            Example: ddpctl metrics --job job-20261127-063000-4f2a
            """)
    @OptionGroup var selection: JobSelection

    func run() throws {
        let directory = try selection.directory()
        guard let text = try? String(contentsOfFile: directory.metricsPath, encoding: .utf8) else {
            throw CommandFailure.message(ControlError.failed("no metrics yet at \(directory.metricsPath)"))
        }
        print(text, terminator: "")
    }
}

struct Doctor: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check this host before a job (libraries, sockets, directories) and, with --endpoint, the coordinator.",
        discussion: "Example: ddpctl doctor --endpoint tcp://10.0.0.5:5556   (the coordinator's control endpoint)")
    @Option(help: "A coordinator's control endpoint to check reachability, version, round trip and bandwidth.") var endpoint: String?
    @Option(help: "Where job directories are made.") var jobsDir: String?
    @Option(help: "The key folder of a secure job (server.pub and client.key).") var keys: String?

    func run() throws {
        let jobKeys: JobKeys?
        do { jobKeys = try keys.map { try JobKeys.load(from: $0) } } catch { throw CommandFailure.message(error) }
        let checks = DDPRuntime.Doctor.run(jobsRoot: JobLookup.root(jobsDir), endpoint: endpoint, keys: jobKeys)
        for c in checks {
            print(c.passed ? "ok    \(c.name): \(c.detail)" : "FAIL  \(c.name): \(c.detail)\n      fix: \(c.fix)")
        }
        if checks.contains(where: { !$0.passed }) { throw ExitCode.failure }
    }
}

struct Keygen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write CURVE keys for a secure job: a server pair, client pairs and the authorised list.",
        discussion: """
            The folder gets server.key (the coordinator's secret: keep it on the coordinator host), server.pub,
            client.key (and client-N.key with --clients N) and authorized_keys. Give the job the folder with
            keys_dir (or --keys-dir); workers need server.pub and a client key, the coordinator server.key and
            authorized_keys. Example: ddpctl keygen --out keys --clients 4
            """)
    @Option(help: "The folder to write.") var out: String
    @Option(help: "Client key pairs to make (all authorised).") var clients = 1

    func run() throws {
        guard !FileManager.default.fileExists(atPath: out + "/server.key") else {
            throw ValidationError("\(out) already holds keys; choose another folder")
        }
        try JobKeys.generate(into: out, clients: clients)
        print("wrote keys to \(out): server.key, server.pub, \(clients) client key(s), authorized_keys")
    }
}
