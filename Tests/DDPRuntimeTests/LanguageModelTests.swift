import Autodiff

import Foundation
import Testing
@testable import DDPData
@testable import DDPRuntime

/// `model: gpt` jobs: the text as windows, the keys and their checks, training data-parallel against one
/// process, the model file and generation, and bad input refused before a job directory exists.
@Suite(.serialized)
struct LanguageModelTests {
    static let genesis = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../Sources/DDPData/Resources/genesis.txt").standardized.path

    /// The first 4,000 characters of the bundled corpus, as a file in `dir`.
    func smallCorpus(in dir: String) throws -> String {
        let text = String(try String(contentsOfFile: Self.genesis, encoding: .utf8).prefix(4000))
        let path = "\(dir)/small.txt"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    func jobFile(_ corpus: String, in dir: String, extra: String = "") throws -> String {
        let path = "\(dir)/gpt.yaml"
        try """
            model: gpt
            data_path: \(corpus)
            n_layer: 1
            n_head: 2
            n_embd: 16
            block_size: 8
            batch_size: 50
            epochs: 3
            learning_rate: 0.01
            warmup_steps: 3
            seed: 3
            \(extra)
            """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func textBecomesWindowsWithNextTokenTargets() throws {
        let corpus = try TextCorpus(name: "t", text: "abcabcabcab", vocabulary: .char, blockSize: 3, validationFraction: 0.4)
        #expect(corpus.vocabulary.symbols == ["a", "b", "c"])
        #expect(corpus.trainingWindows == 2 && corpus.validationWindows == 1)  // (11 - 1) / 3 = 3 windows
        let (inputs, targets) = corpus.batch([1, 0])
        #expect(inputs == [0, 1, 2, 0, 1, 2] && targets == [1, 2, 0, 1, 2, 0])
        #expect(corpus.vocabulary.decode(corpus.batch([2]).inputs) == "abc")  // window 2 starts at token 6
        let bytes = TextVocabulary(kind: .byte, text: "")
        #expect(try bytes.encode("é!") == [0xC3, 0xA9, 0x21] && bytes.decode([0xC3, 0xA9]) == "é" && bytes.count == 256)
        let bundled = try TextCorpus(path: "", vocabulary: .char, blockSize: 64, validationFraction: 0.1)
        #expect(bundled.vocabulary.count == 71 && bundled.tokens.count == 205_939)
        #expect(bundled.validationWindows == 322 && bundled.trainingWindows == 2895)
    }

    @Test func badTextIsNamed() throws {
        #expect(TextCorpus.firstInvalidUTF8(Array("añb€c😀".utf8)) == nil)
        #expect(TextCorpus.firstInvalidUTF8([0x61, 0xFF, 0x62]) == 1)  // a byte that never starts UTF-8
        #expect(TextCorpus.firstInvalidUTF8([0x61, 0xC3, 0x28]) == 2)  // a continuation byte missing
        #expect(TextCorpus.firstInvalidUTF8([0x61, 0x62, 0xE2, 0x82]) == 2)  // the text ends inside a character
        #expect(TextCorpus.firstInvalidUTF8([0xE0, 0x80, 0xAF]) == 1)  // overlong
        #expect(TextCorpus.firstInvalidUTF8([0xED, 0xA0, 0x80]) == 1)  // a surrogate
        #expect(throws: DataError.malformed("t", "5 tokens are too few: a training and a held-out window of block_size 4 need at least 9")) {
            try TextCorpus(name: "t", text: "hello", vocabulary: .char, blockSize: 4, validationFraction: 0.1)
        }
        let vocabulary = TextVocabulary(kind: .char, text: "abc")
        #expect(throws: DataError.invalidOption("character 'z' (U+7A) at position 2 is not in the model's vocabulary of 3 characters")) {
            try vocabulary.encode("az")
        }
    }

    @Test func theModelKeyBringsLanguageModelDefaultsThatTheJobCanOverride() throws {
        let spec = try JobSpec.load(path: nil, overrides: ["model": "gpt"])
        #expect(spec.dataset == "text" && spec.task == "language_model" && spec.optimizer == "adamw" && spec.learningRate == 1e-3)
        #expect(spec.schedule == "cosine" && spec.clipNorm == 1 && spec.batchSize == 32 && spec.tokensPerSample == 64)
        let given = try JobSpec.load(path: nil, overrides: ["model": "gpt", "optimizer": "sgd", "learning_rate": 0.5, "batch_size": 8])
        #expect(given.optimizer == "sgd" && given.learningRate == 0.5 && given.batchSize == 8 && given.weightDecay == 0.1)
        #expect(try JobSpec.fromJSON(given.json()) == given)  // written out, every key is explicit
        #expect(try JobSpec.load(path: nil).dataset == "digits")
        for (overrides, message) in [
            (["model": "gpt", "n_embd": 30, "n_head": 4] as [String: Any], "n_embd 30 is not divisible by n_head 4"),
            (["model": "gpt", "dataset": "digits"], "model 'gpt' trains on dataset 'text', not 'digits'"),
            (["dataset": "text"], "dataset 'text' is for model 'gpt', not 'mlp'"),
            (["model": "gpt", "vocabulary": "word"], "vocabulary 'word' is unknown (char, byte)"),
            (["model": "gpt", "block_size": 0], "n_layer, n_head, n_embd and block_size must be positive"),
        ] {
            #expect(throws: (any Error).self) { try JobSpec.load(path: nil, overrides: overrides) }
            do { _ = try JobSpec.load(path: nil, overrides: overrides) } catch let error as JobSpecError {
                #expect(error.reason.contains(message), "\(error.reason)")
            }
        }
    }

    @Test func oneWorkerTrainsAsOneProcessAndTwoWorkersMatchIt() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try jobFile(try smallCorpus(in: dir), in: dir)
        var runs: [[(name: String, tensor: Tensor)]] = []
        var summaries: [JobSummary] = []
        for workers in [1, 2] {
            let (summary, result) = try startJob(["--config", config, "--workers", "\(workers)"], jobsDir: "\(dir)/jobs")
            let s = try #require(summary, "no summary: \(result.stderr)")
            #expect(s.state == "completed", "\(result.stderr)")
            runs.append(try SafeTensors.read(path: s.modelPath).tensors)
            summaries.append(s)
        }
        // The same steps in this process: AdamW, warm-up then cosine decay, the gradient clipped to norm 1.
        let spec = try JobSpec.load(path: config, overrides: ["workers": 1])
        let setup = try LanguageModelSetup(spec: spec)
        let optimizer = try TrainingSetup.makeOptimizer(spec)
        let schedule = TrainingSetup.schedule(spec, totalSteps: setup.totalSteps)
        var firstLoss: Float = 0, lastLoss: Float = 0
        for step in 0..<setup.totalSteps {
            let windows = setup.sampler.globalBatch(step: step % setup.sampler.stepsPerEpoch,
                                                    of: setup.sampler.permutation(epoch: step / setup.sampler.stepsPerEpoch))
            setup.zeroGrad()
            let loss = try setup.loss(Array(windows)).loss
            if step == 0 { firstLoss = loss.item }
            lastLoss = loss.item
            try loss.backward()
            clipGradientNorm(setup.model.parameters, maxNorm: spec.clipNorm)
            optimizer.learningRate = schedule.rate(base: spec.learningRate, at: step)
            optimizer.step(setup.model.parameters)
        }
        #expect(lastLoss < firstLoss - 0.5, "the loss went from \(firstLoss) to \(lastLoss)")
        let expected = setup.wireTensors
        #expect(runs[0].map(\.name) == expected.map(\.name))
        for (p, d) in zip(expected, runs[0]) { #expect(p.tensor.scalars == d.tensor.scalars, "\(p.name) differs from one process") }
        var worst: Float = 0
        for (a, b) in zip(runs[0], runs[1]) {
            let scale = max(a.tensor.scalars.map(abs).max() ?? 0, 1e-12)
            for (u, v) in zip(a.tensor.scalars, b.tensor.scalars) { worst = max(worst, abs(u - v) / scale) }
        }
        // Two workers sum each gradient in another order; Adam's normalised steps carry those last-bit
        // differences into every weight with a tiny gradient, so the weights agree to 1e-2 and the loss closer.
        #expect(worst < 1e-2, "2 workers differ from 1 by \(worst) relative")
        #expect(abs(summaries[1].testLoss - summaries[0].testLoss) < 1e-3 * summaries[0].testLoss,
                "held-out loss \(summaries[1].testLoss) with 2 workers, \(summaries[0].testLoss) with 1")
        #expect(summaries[1].testLoss < firstLoss - 0.5 && summaries[1].testAccuracy > 0.15, "\(summaries[1].testLoss) \(summaries[1].testAccuracy)")

        // The model file describes the language model; generate samples from it, seeded; predict refuses it.
        let model = summaries[1].modelPath
        let trained = try TrainedLanguageModel(path: model)
        #expect(trained.description.gpt == spec.gptConfiguration(vocabularySize: setup.corpus.vocabulary.count))
        #expect(trained.vocabulary == setup.corpus.vocabulary)
        let generate = ["generate", "--model", model, "--prompt", "And God", "--tokens", "40", "--temperature", "0.8", "--top-k", "5", "--seed", "7"]
        let first = try runCommand(Binaries.ddpctl, generate), second = try runCommand(Binaries.ddpctl, generate)
        #expect(first.status == 0 && first.stdout.hasPrefix("And God") && first.stdout.count == "And God".count + 40 + 1, "\(first.stderr)")
        #expect(first.stdout == second.stdout)
        let unknown = try runCommand(Binaries.ddpctl, ["generate", "--model", model, "--prompt", "Zeus"])
        #expect(unknown.status == 1 && unknown.stderr.contains("the prompt's character 'Z' (U+5A) at position 1 is not in the model's vocabulary"), "\(unknown.stderr)")
        let predict = try runCommand(Binaries.ddpctl, ["predict", "--model", model, "--data", config])
        #expect(predict.status == 1 && predict.stderr.contains("holds a language model"), "\(predict.stderr)")
    }

    @Test func badTextAndSizesFailBeforeAJobDirectory() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data([0x49, 0x6E, 0x20, 0xC3, 0x28, 0x61]).write(to: URL(fileURLWithPath: "\(dir)/latin1.txt"))
        try "tiny".write(toFile: "\(dir)/tiny.txt", atomically: true, encoding: .utf8)
        for (arguments, message) in [
            (["--data-path", "\(dir)/latin1.txt"], "not UTF-8 text: byte 0x28 at offset 4 does not fit"),
            (["--data-path", "\(dir)/tiny.txt"], "4 tokens are too few"),
            (["--data-path", "\(dir)/missing.txt"], "data file not found: \(dir)/missing.txt"),
            (["--n-embd", "30", "--n-head", "4"], "n_embd 30 is not divisible by n_head 4"),
        ] {
            let result = try runCommand(Binaries.ddpctl, ["start", "--model", "gpt", "--jobs-dir", "\(dir)/jobs"] + arguments, timeout: 60)
            #expect(result.status == 64 && result.stderr.contains(message), "\(result.status): \(result.stderr)")
        }
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: "\(dir)/jobs")) ?? []).isEmpty)
    }
}
