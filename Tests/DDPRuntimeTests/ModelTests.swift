import Autodiff
import Foundation
import Testing
@testable import DDPRuntime

/// Models described in job files: built with inferred shapes, trained data-parallel, saved with their
/// description; bad descriptions refused before a job directory exists.
@Suite(.serialized)
struct ModelTests {
    static let residualMLP = """
        dataset: digits
        epochs: 4
        batch_size: 100
        seed: 5
        learning_rate: 0.05
        model:
          - flatten
          - linear: 32
          - relu
          - residual: [{linear: 32}, tanh, {linear: 32}]
          - block: {name: head, layers: [relu, {linear: 16}, gelu]}
          - linear
        """

    static let convNet = """
        dataset: digits
        epochs: 2
        batch_size: 100
        seed: 6
        model:
          - conv: 4
          - batchnorm
          - relu
          - residual: {layers: [{conv: {filters: 8, kernel: 3, stride: 2}}, batchnorm], shortcut: [{conv: {filters: 8, kernel: 1, stride: 2, padding: 0}}]}
          - relu
          - flatten
          - linear
        """

    /// The bundled digits as a CSV file (label first).
    static let digitsCSV = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Sources/DDPData/Resources/digits.csv").standardized.path

    func write(_ text: String, in dir: String, as name: String = "job.yaml") throws -> String {
        let path = "\(dir)/\(name)"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func aModelInTheJobFileTrainsAndTwoWorkersMatchOne() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try write(Self.residualMLP, in: dir)
        var runs: [[(name: String, tensor: Tensor)]] = []
        for workers in [1, 2] {
            let (summary, result) = try startJob(["--config", config, "--workers", "\(workers)"], jobsDir: "\(dir)/jobs")
            let s = try #require(summary, "no summary: \(result.stderr)")
            #expect(s.state == "completed" && s.testAccuracy > 0.6, "accuracy \(s.testAccuracy)")
            runs.append(try SafeTensors.read(path: s.modelPath).tensors)
        }
        #expect(runs[0].map(\.name) == ["1.weight", "1.bias", "3.block.0.weight", "3.block.0.bias", "3.block.2.weight", "3.block.2.bias",
                                        "head.1.weight", "head.1.bias", "5.weight", "5.bias"])
        var worst: Float = 0
        for (a, b) in zip(runs[0], runs[1]) {
            let scale = max(a.tensor.scalars.map(abs).max() ?? 0, 1e-12)
            for (u, v) in zip(a.tensor.scalars, b.tensor.scalars) { worst = max(worst, abs(u - v) / scale) }
        }
        #expect(worst < 1e-5)
    }

    @Test func batchNormBuffersTrainAsInOneProcessAndTheModelFileRebuildsTheModel() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try write(Self.convNet, in: dir)
        let (summary, result) = try startJob(["--config", config, "--workers", "1"], jobsDir: "\(dir)/jobs")
        let s = try #require(summary, "no summary: \(result.stderr)")
        let saved = try SafeTensors.read(path: s.modelPath).tensors

        // The same steps in this process: buffers move with every forward, parameters with the optimizer.
        let spec = try JobSpec.load(path: config, overrides: ["workers": 1])
        let setup = try TrainingSetup(spec: spec)
        #expect(setup.train.featureShape == [1, 8, 8])
        let optimizer = try setup.makeOptimizer()
        for step in 0..<setup.totalSteps {
            let indices = setup.sampler.globalBatch(step: step % setup.sampler.stepsPerEpoch,
                                                    of: setup.sampler.permutation(epoch: step / setup.sampler.stepsPerEpoch))
            setup.model.zeroGrad()
            try setup.loss(indices, in: setup.train).loss.backward()
            optimizer.learningRate = setup.schedule.rate(base: spec.learningRate, at: step)
            optimizer.step(setup.model.parameters)
        }
        let expected = setup.wireTensors
        #expect(saved.map(\.name) == expected.map(\.name))
        #expect(expected.map(\.name).contains("3.block.1.running_var") && expected.map(\.name).contains("3.shortcut.0.weight"))
        for (p, d) in zip(expected, saved) { #expect(p.tensor.scalars == d.tensor.scalars, "\(p.name) differs") }

        // predict/evaluate rebuild the model from the file's description alone.
        let trained = try TrainedModel(path: s.modelPath)
        #expect(trained.description.layers?.count == 7)
        let evaluation = try runCommand(Binaries.ddpctl, ["evaluate", "--model", s.modelPath, "--data", Self.digitsCSV, "--json"])
        #expect(evaluation.status == 0, "\(evaluation.stderr)")
    }

    @Test(arguments: [
        ("model: [flatten, {conv: 8}, linear]", "model layer 1 (conv): takes [channels, height, width] samples, got [64]"),
        ("model: [flatten, {linear: 16}]", "model: the last layer gives [16] per sample; the data needs [10]"),
        ("model: [{conv: {filters: 8, kernal: 3}}]", "model layer 0 (conv): unknown field 'kernal'"),
        ("model: [flatten, {residual: [{linear: 8}]}, linear]", "model layer 1 (residual): its layers give [8] but its shortcut gives [64]"),
        ("model: [flatten, spline, linear]", "model layer 1: unknown layer 'spline'"),
        ("model: [{maxpool: 16}, flatten, linear]", "model layer 0 (maxpool): a 16x16 window does not fit samples of [1, 8, 8]"),
        ("model: [flatten, {block: {name: a, layers: [relu]}}, {block: {name: a, layers: [tanh]}}, linear]", "the block name 'a' is used twice"),
        ("model: [flatten, relu]", "the last layer gives [64] per sample"),
    ])
    func aBadDescriptionNamesTheLayerAndLeavesNoJob(line: String, message: String) throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try write("dataset: digits\n" + line + "\n", in: dir)
        let result = try runCommand(Binaries.ddpctl, ["start", "--config", config, "--jobs-dir", "\(dir)/jobs"], timeout: 60)
        #expect(result.status == 64 && result.stderr.contains(message), "\(result.status): \(result.stderr)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: "\(dir)/jobs")) ?? []).isEmpty)
    }
}
