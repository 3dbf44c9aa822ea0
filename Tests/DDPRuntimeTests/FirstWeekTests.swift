import DDPData
import Foundation
import Testing
@testable import DDPRuntime

/// What a new user does after the first job: real data, predict and evaluate, resume, the CLI's answers.
@Suite(.serialized)
struct FirstWeekTests {
    func ddpctl(_ arguments: [String], timeout: Double = 120) throws -> CommandResult {
        try runCommand(Binaries.ddpctl, arguments, timeout: timeout)
    }

    /// A CSV as spreadsheets write it (CRLF, `;`, a quoted header with the delimiter inside, word labels in
    /// the last column) trains; the model file names its classes and the standardization of the training
    /// split; evaluate and predict apply it.
    @Test func realWorldCSVTrainsAndTheModelPredicts() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var generator = SystemRandomNumberGenerator()
        var rows: [String] = []
        let kinds = ["red wine", "white", "rosé"]
        for i in 0..<300 {
            let k = i % 3
            let noise = { (scale: Double) in Double.random(in: -scale...scale, using: &generator) }
            rows.append(String(format: "%.2f;%.5f;\"%@\"", 1000 + Double(k) * 300 + noise(60), 0.01 * Double(k) + noise(0.004), kinds[k]))
        }
        let csv = dir + "/wine.csv"
        try ("\"sulfur; total\";acidity;kind\r\n" + rows.joined(separator: "\r\n") + "\r\n").write(toFile: csv, atomically: true, encoding: .utf8)
        let (summary, result) = try startJob(["--dataset", "csv", "--data-path", csv, "--delimiter", ";", "--label-column", "kind",
                                              "--epochs", "20", "--batch-size", "32"], jobsDir: dir + "/jobs")
        let s = try #require(summary, "\(result.stderr)")
        #expect(s.state == "completed" && s.testAccuracy > 0.95, "\(s)")
        let model = try TrainedModel(path: s.modelPath)
        #expect(model.description.classNames == ["red wine", "rosé", "white"] && model.description.preprocessing.kind == .standardize)
        let train = try DataReader.csv(path: csv, options: CSVOptions(labelColumn: "kind", delimiter: ";")).split(testFraction: 0.2, seed: 0).train
        #expect(model.description.preprocessing == Preprocessing.fit(.standardize, to: train), "statistics of the training split only")

        let evaluation = try ddpctl(["evaluate", "--model", s.modelPath, "--data", csv, "--json"])
        let scores = try JSONDecoder().decode(Evaluation.self, from: Data(evaluation.stdout.utf8))
        #expect(scores.samples == 300 && (scores.accuracy ?? 0) > 0.95 && scores.confusion?.flatMap { $0 }.reduce(0, +) == 300, "\(evaluation)")
        try "a;b\n900;-0.003\n1600;0.02\n".write(toFile: dir + "/new.csv", atomically: true, encoding: .utf8)
        let predicted = try ddpctl(["predict", "--model", s.modelPath, "--data", dir + "/new.csv"])
        #expect(predicted.stdout == "class\nred wine\nrosé\n", "\(predicted)")
        let unlabelled = try ddpctl(["evaluate", "--model", s.modelPath, "--data", dir + "/new.csv"])
        #expect(unlabelled.status == 1 && unlabelled.stderr.contains("no labels to evaluate against"), "\(unlabelled)")
        let npy = try ddpctl(["predict", "--model", s.modelPath, "--data", csv, "--probabilities", "--out", dir + "/p.npy"])
        #expect(npy.status == 0)
        let probabilities = try NumpyArray(path: dir + "/p.npy")
        #expect(probabilities.shape == [300, 3] && abs(probabilities.values.prefix(3).reduce(0, +) - 1) < 1e-5)
    }

    /// Labels 0 and 100000 make two classes, not 100001; a column of unique values is refused before
    /// any job directory is made.
    @Test func sparseLabelsAreMappedAndAbsurdOnesRefused() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try (0..<40).map { "\($0 % 2 == 0 ? 0 : 100000),\(Double($0 % 2) + Double($0) / 400)" }.joined(separator: "\n")
            .write(toFile: dir + "/sparse.csv", atomically: true, encoding: .utf8)
        let (summary, result) = try startJob(["--dataset", "csv", "--data-path", dir + "/sparse.csv", "--epochs", "2", "--batch-size", "8"],
                                             jobsDir: dir + "/jobs")
        let s = try #require(summary, "\(result.stderr)")
        #expect(try TrainedModel(path: s.modelPath).description.classNames == ["0", "100000"])
        try (0..<300).map { "\($0 * 7),\($0)" }.joined(separator: "\n").write(toFile: dir + "/ids.csv", atomically: true, encoding: .utf8)
        let refused = try ddpctl(["start", "--jobs-dir", dir + "/refused", "--dataset", "csv", "--data-path", dir + "/ids.csv"])
        #expect(refused.status == 64 && refused.stderr.contains("300 distinct labels in 300 samples"), "\(refused)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/refused") || JobLookup.all(root: dir + "/refused").isEmpty)
    }

    /// A job stopped part-way and continued with `start --resume` ends with the parameters, bitwise, of
    /// the same job run straight through; while it runs, status says so.
    @Test func aResumedJobEndsAsIfNeverStopped() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let jobs = dir + "/jobs"
        let arguments = ["--epochs", "60", "--seed", "5", "--checkpoint-every", "7"]
        let (straight, result) = try startJob(arguments, jobsDir: jobs)
        let a = try #require(straight, "\(result.stderr)")
        let job = try startDetachedJob(arguments, jobsDir: jobs)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 30 })
        #expect(try ddpctl(["stop", "--jobs-dir", jobs]).status == 0, "the running job is the default")
        #expect(job.summary()?.state == "stopped" && job.summary()!.steps < a.steps)
        let early = try ddpctl(["start", "--jobs-dir", jobs, "--resume", job.path, "--lr", "0.5"])
        #expect(early.status == 64 && early.stderr.contains("only --epochs may change"), "\(early)")
        let resumed = try ddpctl(["start", "--json", "--jobs-dir", jobs, "--resume", job.path])
        let b = try #require(try? JobJSON.decoder().decode(JobSummary.self, from: Data((resumed.stdout.split(separator: "\n").last ?? "").utf8)),
                             "\(resumed)")
        #expect(b.state == "completed" && b.steps == a.steps && FileManager.default.fileExists(atPath: job.path + "/previous-summary.json"))
        let first = try SafeTensors.read(path: a.modelPath).tensors, second = try SafeTensors.read(path: b.modelPath).tensors
        for (x, y) in zip(first, second) { #expect(x.name == y.name && x.tensor.scalars == y.tensor.scalars, "\(x.name)") }
        let again = try ddpctl(["start", "--jobs-dir", jobs, "--resume", job.path])
        #expect(again.status == 64 && again.stderr.contains("give --epochs N to train longer"), "\(again)")
        // init_from: a near-zero learning rate keeps the loaded parameters.
        let (tuned, tunedResult) = try startJob(["--init-from", a.modelPath, "--epochs", "1", "--lr", "1e-9"], jobsDir: jobs)
        let t = try #require(tuned, "\(tunedResult.stderr)")
        for (x, y) in zip(first, try SafeTensors.read(path: t.modelPath).tensors) {
            #expect(zip(x.tensor.scalars, y.tensor.scalars).allSatisfy { abs($0 - $1) < 1e-4 }, "\(x.name)")
        }
        let mismatch = try ddpctl(["start", "--jobs-dir", jobs, "--init-from", a.modelPath, "--hidden", "32"])
        #expect(mismatch.status == 64 && mismatch.stderr.contains("has shape [128, 64]; the model's is [32, 64]"), "\(mismatch)")
    }

    /// The CLI's own answers: version, defaults in help, every key a flag, values that look like flags,
    /// clear errors with exit status 64 and no job directory, doctor on a closed port, metrics over HTTP.
    @Test func theCommandLineSaysWhatItMeans() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let jobs = dir + "/jobs"
        #expect(try ddpctl(["--version"]).stdout.contains("SwiftDDP \(SwiftDDPVersion.number)"))
        let help = try ddpctl(["start", "--help"]).stdout
        #expect(help.contains("(default: 30)"), "epochs' default is shown")
        for key in JobSpec.keys where key != "output" {
            #expect(help.contains("--" + key.replacingOccurrences(of: "_", with: "-")) || (key == "learning_rate" && help.contains("--lr"))
                    || (key == "program_args" && help.contains("Arguments for --program, after '--'")), "no flag for \(key)")
        }
        let cases: [([String], String)] = [
            (["--hidden", "abc"], "--hidden 'abc' is not a comma-separated list"),
            (["--lr", "-0.1"], "learning_rate must be positive, got -0.1"),
            (["--config", dir], "is a directory"),
            (["--set", "epochs=0"], "epochs must be positive, got 0"),
            (["--dataset", "csv", "--data-path", dir + "/none.csv"], "data file not found"),
        ]
        for (arguments, message) in cases {
            let result = try ddpctl(["start", "--jobs-dir", jobs] + arguments)
            #expect(result.status == 64 && result.stderr.contains(message), "\(arguments): \(result)")
        }
        #expect(JobLookup.all(root: jobs).isEmpty, "no directory for an invalid job")
        let unwritable = try ddpctl(["start", "--jobs-dir", "/etc/hostname/jobs", "--epochs", "1"])
        #expect(unwritable.status != 0 && !unwritable.stderr.contains("NSCocoaErrorDomain") && unwritable.stderr.contains("/etc/hostname"), "\(unwritable)")

        let closed = try ddpctl(["doctor", "--endpoint", "tcp://127.0.0.1:1"])
        #expect(closed.status == 1 && closed.stdout.contains("FAIL  port 1: nothing listens") && closed.stdout.contains("--keys"), "\(closed)")

        let job = try startDetachedJob(["--epochs", "3000", "--set", "metrics_address=127.0.0.1:0"], jobsDir: jobs)
        defer { _ = try? ddpctl(["stop", "--now", "--jobs-dir", jobs, "--job", job.path]) }
        #expect(waitUntil(timeout: 30) { currentStep(job) > 5 })
        let url = try #require(job.endpoints()?.metrics)
        let text = try httpGet(url)
        #expect(text.contains("ddp_steps_total{job_id=") && !text.contains("{job="), "\(text)")
        if let promtool = DeployTests.which("promtool") {
            try text.write(toFile: dir + "/metrics.txt", atomically: true, encoding: .utf8)
            let checked = try runCommand("/bin/sh", ["-c", "\(promtool) check metrics < \(dir)/metrics.txt"])
            #expect(checked.status == 0, "\(checked)")
        }
        #expect(try ddpctl(["status", "--jobs-dir", jobs]).stdout.contains("metrics \(url)"))
        let listed = try ddpctl(["rm", "--jobs-dir", jobs, job.path])
        #expect(listed.status == 1 && listed.stdout.contains("it is running"), "rm refuses a running job")
    }

    /// Whether python3 can import tensorboard (.ci/run installs it; a fresh machine may not have it).
    static let pythonHasTensorBoard: Bool = DeployTests.which("python3").map { python in
        ((try? runCommand(python, ["-c", "import tensorboard"], timeout: 60))?.status ?? 1) == 0
    } ?? false

    /// TensorBoard's own reader loads the job's event files: one train/loss point per step, equal to the step log.
    @Test(.enabled(if: pythonHasTensorBoard, "python3 with tensorboard is not installed (pip install tensorboard)"))
    func tensorBoardReadsTheEvents() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (summary, result) = try startJob(["--epochs", "2"], jobsDir: dir)
        let s = try #require(summary, "\(result.stderr)")
        let script = """
            import sys
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
            a = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0}); a.Reload()
            print(sorted(a.Tags()["scalars"]))
            print(",".join(repr(e.value) for e in a.Scalars("train/loss")))
            """
        let read = try runCommand(DeployTests.which("python3")!, ["-c", script, dir + "/" + s.jobID + "/tensorboard"])
        let lines = read.stdout.split(separator: "\n")
        #expect(read.status == 0 && lines.count == 2, "\(read)")
        #expect(lines.first?.contains("test/accuracy") == true && lines.first?.contains("train/learning_rate") == true, "\(read.stdout)")
        let losses = lines.last.map { $0.split(separator: ",").compactMap { Float($0) } } ?? []
        let logged = try String(contentsOfFile: dir + "/" + s.jobID + "/steps.jsonl", encoding: .utf8).split(separator: "\n").compactMap {
            (try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["loss"] as? Double
        }.map { Float($0) }
        #expect(losses.count == s.steps && losses == logged, "\(losses.count) points, \(s.steps) steps")
    }

    /// The job files under Examples/jobs are valid jobs.
    @Test func exampleJobFilesAreValid() throws {
        let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Examples/jobs").standardized.path
        let files = try FileManager.default.contentsOfDirectory(atPath: folder).filter { $0.hasSuffix(".yaml") }
        #expect(files.count >= 3)
        for file in files { #expect(throws: Never.self, "\(file)") { _ = try JobSpec.load(path: folder + "/" + file) } }
    }

    /// The body of an HTTP GET of `url` (`http://HOST:PORT/PATH`) over a plain socket, within 5 s.
    func httpGet(_ url: String) throws -> String {
        let rest = url.dropFirst("http://".count)
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        let hostPort = rest[..<slash].split(separator: ":")
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(hostPort[1])!.bigEndian
        address.sin_addr.s_addr = inet_addr(String(hostPort[0]))
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { throw ControlError.failed("cannot connect to \(url)") }
        let request = "GET \(rest[slash...]) HTTP/1.1\r\nHost: x\r\n\r\n"
        _ = request.withCString { send(fd, $0, strlen($0), 0) }
        var response = Data(), buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            response.append(contentsOf: buffer[0..<n])
        }
        let text = String(decoding: response, as: UTF8.self)
        return text.range(of: "\r\n\r\n").map { String(text[$0.upperBound...]) } ?? text
    }
}
