import Autodiff
import DDPData
import Foundation

/// The pieces of a `model: gpt` job that coordinator and workers build alike from its spec: the text
/// cut into windows (training ones first, the held-out end of the text after them), the GPT, and the
/// sampler over the training windows. A sample is a window of `block_size` tokens and their next tokens.
public struct LanguageModelSetup {
    public let spec: JobSpec
    public let corpus: TextCorpus
    public let model: GPT
    public let sampler: EpochSampler

    public init(spec: JobSpec) throws {
        self.spec = spec
        guard let kind = TextVocabulary.Kind(rawValue: spec.vocabulary) else {
            throw JobSpecError.invalid("vocabulary '\(spec.vocabulary)' is unknown (char, byte)")
        }
        corpus = try TextCorpus(path: spec.dataPath, vocabulary: kind, blockSize: spec.blockSize, validationFraction: spec.testFraction)
        var generator = SeededGenerator(seed: spec.seed)
        do { model = try GPT(spec.gptConfiguration(vocabularySize: corpus.vocabulary.count), generator: &generator) } catch {
            throw JobSpecError.invalid("\(error)")
        }
        sampler = try EpochSampler(sampleCount: corpus.trainingWindows, globalBatchSize: spec.batchSize, seed: spec.seed)
    }

    /// The model's sizes.
    public var configuration: GPTConfiguration { model.configuration }
}

extension LanguageModelSetup: BuiltInTask {
    public var module: Module { model }
    public var trainingSampleCount: Int { corpus.trainingWindows }

    /// The mean next-token cross-entropy of training windows `samples`; "correct" counts the windows'
    /// tokens whose likeliest prediction is the next token, as a share of a window (so that correct /
    /// samples is the token accuracy).
    public func loss(_ samples: [Int]) throws -> (loss: Tensor, correct: Int) {
        model.setTraining(true)
        let (inputs, targets) = corpus.batch(samples)
        let logits = model(inputs, batch: samples.count, time: corpus.blockSize)
        let loss = Loss.softmaxCrossEntropy(logits, labels: targets, ignoreIndex: -1)
        let hits = GradMode.withoutGradients { TrainingSetup.correctCount(logits.reshaped([-1, logits.shape[2]]), targets) }
        return (loss, (hits + corpus.blockSize / 2) / corpus.blockSize)
    }

    /// Held-out windows per evaluation batch.
    static let evaluationBatch = 32

    public var heldOutBatches: Int { (corpus.validationWindows + Self.evaluationBatch - 1) / Self.evaluationBatch }

    /// Per held-out batch of windows: its summed next-token cross-entropy and its hits.
    public func scoreHeldOut(_ batches: Range<Int>) -> [HeldOutScore] {
        model.setTraining(false)
        defer { model.setTraining(true) }
        let end = corpus.trainingWindows + corpus.validationWindows
        return GradMode.withoutGradients {
            batches.map { batch in
                let first = corpus.trainingWindows + batch * Self.evaluationBatch
                let chunk = Array(first..<min(first + Self.evaluationBatch, end))
                let (inputs, targets) = corpus.batch(chunk)
                let logits = model(inputs, batch: chunk.count, time: corpus.blockSize)
                return HeldOutScore(lossSum: Double(Loss.softmaxCrossEntropy(logits, labels: targets).item) * Double(targets.count),
                                    correct: TrainingSetup.correctCount(logits.reshaped([-1, logits.shape[2]]), targets))
            }
        }
    }

    /// Mean next-token cross-entropy and token accuracy over the held-out windows.
    public func heldOutMetrics(_ scores: [HeldOutScore]) -> (loss: Float, accuracy: Float) {
        let tokens = Double(corpus.validationWindows * corpus.blockSize)
        return (Float(scores.reduce(0.0) { $0 + $1.lossSum } / tokens), Float(Double(scores.reduce(0) { $0 + $1.correct }) / tokens))
    }

    public func modelDescription(step: Int) -> ModelDescription {
        ModelDescription(languageModel: configuration, vocabulary: corpus.vocabulary, spec: spec, step: step)
    }
}

/// A language model loaded from its file, for generation.
public struct TrainedLanguageModel {
    public let description: ModelDescription
    public let model: GPT
    public let vocabulary: TextVocabulary

    /// Reads a model file of a `model: gpt` job (its `model.safetensors`, or a checkpoint).
    public init(path: String) throws {
        let contents = try SafeTensors.read(path: path)
        let description = try ModelDescription(metadataOf: contents, path: path)
        guard let configuration = description.gpt, let vocabulary = description.vocabulary else {
            throw SafeTensorsError.invalid(path, "holds \(description.summary), not a language model: use 'ddpctl predict' or 'ddpctl evaluate'")
        }
        var generator = SeededGenerator(seed: 0)
        model = try GPT(configuration, generator: &generator)
        try TrainedModel.load(contents.tensors, into: model.parameters + model.buffers, from: path)
        self.description = description
        self.vocabulary = vocabulary
    }

    /// `prompt` and `tokens` more characters (or bytes) sampled from the model (see `GPT.generate`).
    /// A prompt with a character outside the vocabulary is an error naming it.
    public func generate(prompt: String, tokens: Int, temperature: Float, topK: Int?, seed: UInt64) throws -> String {
        let ids: [Int32]
        do { ids = try vocabulary.encode(prompt) } catch let DataError.invalidOption(reason) {
            throw AutodiffError.invalidArgument("the prompt's \(reason)")
        }
        guard !ids.isEmpty else { throw AutodiffError.invalidArgument("the prompt is empty: give at least one character") }
        var generator = SeededGenerator(seed: seed)
        return vocabulary.decode(model.generate(ids, count: tokens, temperature: temperature, topK: topK, generator: &generator))
    }
}
