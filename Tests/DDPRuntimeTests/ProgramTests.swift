import Autodiff
import Foundation
import Testing
@testable import DDPRuntime

/// A user's own Swift program as the job's workers: the example package under Examples/ built and
/// trained with 1 and 2 workers; a program that fails before joining; ranks whose models differ.
@Suite(.serialized)
struct ProgramTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../..").standardized.path
    static let example = repository + "/Examples/ResidualSpirals"

    /// Builds the example once (a package of its own that depends on this one by path).
    static let built: Result<String, BuildFailure> = {
        do {
            let result = try runCommand("/usr/bin/env", ["swift", "build", "--package-path", example], timeout: 900)
            guard result.status == 0 else { return .failure(BuildFailure(output: result.stdout + result.stderr)) }
            return .success(example + "/.build/debug/residual-spirals")
        } catch {
            return .failure(BuildFailure(output: "\(error)"))
        }
    }()

    struct BuildFailure: Error { let output: String }

    func program() throws -> String {
        switch Self.built {
        case .success(let path): return path
        case .failure(let failure): throw failure
        }
    }

    func executable(_ text: String, in dir: String, named name: String) throws -> String {
        let path = "\(dir)/\(name)"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o755)
        return path
    }

    @Test func theExampleTrainsWithTwoWorkersAsWithOneAndWithCoordinatorShards() throws {
        let program = try program()
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var models: [[(name: String, tensor: Tensor)]] = []
        var summaries: [JobSummary] = []
        for (workers, shards) in [(1, 1), (2, 1), (2, 2)] {
            let (summary, result) = try startJob(["--program", program, "--workers", "\(workers)", "--coordinator-shards", "\(shards)",
                                                  "--epochs", "4", "--batch-size", "100",
                                                  "--lr", "0.05", "--", "--hidden", "16", "--blocks", "2", "--samples", "1200"],
                                                 jobsDir: "\(dir)/jobs")
            let s = try #require(summary, "no summary: \(result.stderr)")
            #expect(s.state == "completed" && s.steps == 4 * 12 && s.task == "program", "\(s.state) \(s.message)")
            models.append(try SafeTensors.read(path: s.modelPath).tensors)
            summaries.append(s)
        }
        #expect(models[0].map(\.name) == ["input.weight", "input.bias", "blocks.0.block.0.weight", "blocks.0.block.0.bias",
                                          "blocks.0.block.2.weight", "blocks.0.block.2.bias", "blocks.1.block.0.weight",
                                          "blocks.1.block.0.bias", "blocks.1.block.2.weight", "blocks.1.block.2.bias",
                                          "output.weight", "output.bias"])
        var worst: Float = 0
        for (a, b) in zip(models[0], models[1]) {
            let scale = max(a.tensor.scalars.map(abs).max() ?? 0, 1e-12)
            for (u, v) in zip(a.tensor.scalars, b.tensor.scalars) { worst = max(worst, abs(u - v) / scale) }
        }
        #expect(worst < 1e-5, "2 workers differ from 1 by \(worst)")
        for (x, y) in zip(models[1], models[2]) {  // two coordinator shards, each learning the model from the leader
            #expect(x.name == y.name && x.tensor.scalars == y.tensor.scalars, "\(x.name) differs with 2 coordinator shards")
        }
        // The model file says what made it; the loss fell below ln 3 (chance).
        let metadata = try SafeTensors.read(path: summaries[1].modelPath).metadata
        let description = try JSONDecoder().decode(ModelDescription.self, from: Data(try #require(metadata["swiftddp_model"]).utf8))
        #expect(description.model == "program" && description.program?.program == "residual-spirals")
        #expect(description.program?.configuration == ["hidden": "16", "blocks": "2", "samples": "1200"])
        #expect(summaries[1].trainLoss < log(3) - 0.01, "\(summaries[1].trainLoss)")
        #expect(throws: SafeTensorsError.self) { try TrainedModel(path: summaries[1].modelPath) }  // built-in predict refuses, naming the program
    }

    @Test func aProgramThatExitsBeforeJoiningFailsTheJobNamingIt() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let broken = try executable("#!/bin/sh\necho \"cannot read the training data\" >&2\nexit 3\n", in: dir, named: "broken-trainer")
        let started = Date()
        let result = try runCommand(Binaries.ddpctl, ["start", "--program", broken, "--jobs-dir", "\(dir)/jobs"], timeout: 60)
        #expect(result.status == 1, "\(result.status): \(result.stderr)")
        let output = result.stdout + result.stderr
        #expect(output.contains("the program \(broken)") && output.contains("exited with status 3 before joining")
                && output.contains("cannot read the training data"), "\(output)")
        #expect(Date().timeIntervalSince(started) < 30, "it waited for the join timeout")
        let missing = try runCommand(Binaries.ddpctl, ["start", "--program", dir + "/nothing", "--jobs-dir", "\(dir)/jobs"], timeout: 30)
        #expect(missing.status == 64 && missing.stderr.contains("not found"), "\(missing.stderr)")
    }

    @Test func aRankWhoseModelDiffersIsRefusedNamingTheParameter() throws {
        let program = try program()
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let mixed = try executable("""
            #!/bin/sh
            if [ "$DDP_RANK" = 1 ]; then exec "\(program)" --hidden 8; else exec "\(program)" --hidden 16; fi

            """, in: dir, named: "mixed")
        let result = try runCommand(Binaries.ddpctl, ["start", "--program", mixed, "--workers", "2", "--join-timeout-seconds", "20",
                                                      "--jobs-dir", "\(dir)/jobs"], timeout: 90)
        #expect(result.status == 1)
        let output = result.stdout + result.stderr
        #expect(output.contains("differs from the job's") && output.contains("'input.weight'")
                && output.contains("[8, 2]") && output.contains("[16, 2]"), "\(output)")
    }

    /// A program's job stopped midway and resumed (the coordinator takes the model from the checkpoint)
    /// ends bitwise equal to the same job run straight; `ddpd worker` with `program:` in the job file
    /// becomes the program (as every deploy/ script runs workers).
    @Test func aProgramsJobResumesBitwiseAndDdpdWorkerRunsIt() throws {
        let program = try program()
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let jobs = dir + "/jobs"
        let arguments = ["--program", program, "--epochs", "200", "--batch-size", "100", "--checkpoint-every", "5",
                         "--", "--hidden", "16", "--samples", "600"]
        let (straight, result) = try startJob(arguments, jobsDir: jobs)
        let a = try #require(straight, "\(result.stderr)")
        let job = try startDetachedJob(arguments, jobsDir: jobs)
        #expect(waitUntil(timeout: 60) { currentStep(job) >= 60 })
        #expect(try runCommand(Binaries.ddpctl, ["stop", "--jobs-dir", jobs, "--job", job.path]).status == 0)
        #expect(waitUntil(timeout: 30) { job.summary() != nil })
        #expect(job.summary()?.state == "stopped" && job.summary()!.steps < a.steps)
        let resumed = try runCommand(Binaries.ddpctl, ["start", "--json", "--jobs-dir", jobs, "--resume", job.path])
        let b = try #require(try? JobJSON.decoder().decode(JobSummary.self, from: Data((resumed.stdout.split(separator: "\n").last ?? "").utf8)),
                             "\(resumed.stderr)")
        #expect(b.state == "completed" && b.steps == a.steps)
        for (x, y) in zip(try SafeTensors.read(path: a.modelPath).tensors, try SafeTensors.read(path: b.modelPath).tensors) {
            #expect(x.name == y.name && x.tensor.scalars == y.tensor.scalars, "\(x.name)")
        }

        // By hand: a coordinator, and `ddpd worker` with the job file naming the program.
        let config = dir + "/job.yaml"
        try "program: \(program)\nprogram_args: [--hidden, '16', --samples, '600']\nworkers: 1\nepochs: 2\nbatch_size: 100\n"
            .write(toFile: config, atomically: true, encoding: .utf8)
        let (coordinator, manual, endpoints) = try launchCoordinator(["program": program, "program_args": ["--hidden", "16", "--samples", "600"],
                                                                      "workers": 1, "epochs": 2, "batch_size": 100], in: dir)
        defer { coordinator.terminate() }
        let worker = try runCommand(Binaries.ddpd, ["worker", "--connect", endpoints.workers, "--config", config], timeout: 60)
        #expect(worker.status == 0, "\(worker.stderr)")
        #expect(coordinator.wait(timeout: 30) == 0)
        #expect(manual.summary()?.state == "completed" && manual.summary()?.steps == 12, "\(String(describing: manual.summary()))")
    }
}
