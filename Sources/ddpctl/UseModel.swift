import ArgumentParser
import DDPRuntime
import Foundation

/// Where a model file is: `--model FILE`, or the model of a job (`--job`, the newest by default).
struct ModelSelection: ParsableArguments {
    @Option(help: "A model file (a job's model.safetensors, or a checkpoint).") var model: String?
    @OptionGroup var selection: JobSelection

    func load() throws -> TrainedModel {
        do {
            if let model { return try TrainedModel(path: model) }
            let directory = try selection.directory()
            return try TrainedModel(path: directory.modelPath)
        } catch { throw CommandFailure.message(error) }
    }
}

struct Predict: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Predict with a trained model: the class (or probabilities, or value) of each sample of a file.",
        discussion: """
            The data is a CSV (its features, with or without the label column the model was trained with), a .npy
            of features or an IDX image file; the model file's own preprocessing is applied. Output: CSV (a
            'class' column, 'class' and one 'p_NAME' column per class with --probabilities, or 'value' for
            regression) on standard output or --out; --out FILE.npy writes class ids (int64), probabilities or
            values (float32) instead.
            Examples:
              ddpctl predict --model ~/.swiftddp/jobs/ID/model.safetensors --data new.csv
              ddpctl predict --data images.npy --probabilities --out predictions.csv   # the newest job's model
            """)
    @OptionGroup var model: ModelSelection
    @Option(help: "The samples: CSV, .npy or IDX images.") var data: String
    @Option(help: "Write the predictions here (.npy or CSV) instead of standard output.") var out: String?
    @Flag(help: "Class probabilities instead of the class alone.") var probabilities = false

    func run() throws {
        let trained = try model.load()
        do {
            let inputs = try ModelInputs(path: data, labelsPath: nil, for: trained.description)
            let bytes = PredictionOutput.encode(trained.outputs(rawFeatures: inputs.features), model: trained.description,
                                                probabilities: probabilities, npy: out?.hasSuffix(".npy") == true)
            if let out {
                try bytes.write(to: URL(fileURLWithPath: out))
                SafeOutput.print("wrote \(inputs.count) predictions to \(out)\n", to: 2)
            } else {
                SafeOutput.write(bytes, to: 1)
            }
        } catch { throw CommandFailure.message(Readable.error(error)) }
    }
}

struct Evaluate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Score a trained model on labelled samples: loss, accuracy, per-class precision and recall, confusion matrix.",
        discussion: """
            For regression: mean squared error, R² and mean absolute error. The data is a CSV with the model's label
            column, or a .npy / IDX file with --labels; the model file's own preprocessing is applied.
            Examples:
              ddpctl evaluate --model model.safetensors --data test.csv
              ddpctl evaluate --data t10k-images-idx3-ubyte --labels t10k-labels-idx1-ubyte --json
            """)
    @OptionGroup var model: ModelSelection
    @Option(help: "The samples: CSV (with the label column), .npy or IDX images.") var data: String
    @Option(help: "The labels of a .npy or IDX data file (.npy or IDX labels).") var labels: String?
    @Flag(help: "Print one JSON object.") var json = false

    func run() throws {
        let trained = try model.load()
        let evaluation: Evaluation
        do {
            let inputs = try ModelInputs(path: data, labelsPath: labels, for: trained.description)
            evaluation = try Evaluation(model: trained, inputs: inputs)
        } catch { throw CommandFailure.message(Readable.error(error)) }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
            print(String(decoding: try encoder.encode(evaluation), as: UTF8.self))
        } else {
            print(evaluation.text)
        }
    }
}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Sample text from a trained language model (a job of --model gpt).",
        discussion: """
            Prints the prompt and the sampled continuation. Each token is drawn from the softmax of the model's
            next-token logits divided by --temperature (0: always the likeliest), among the --top-k likeliest when
            given; the same --seed gives the same text. The context is the last block_size tokens.
            Examples:
              ddpctl generate --prompt "In the beginning" --tokens 200          # the newest job's model
              ddpctl generate --model ~/.swiftddp/jobs/ID/model.safetensors --prompt "And God" --temperature 0.8 --top-k 10
            """)
    @Option(help: "A model file (a job's model.safetensors, or a checkpoint).") var model: String?
    @OptionGroup var selection: JobSelection
    @Option(help: "The text to continue (every character must be in the model's vocabulary).") var prompt: String
    @Option(help: "Tokens to sample.") var tokens = 200
    @Option(parsing: .unconditional, help: "Divides the logits: below 1 more predictable, above 1 more varied; 0 takes the likeliest.")
    var temperature: Float = 1
    @Option(help: "Sample among the k likeliest tokens only.") var topK: Int?
    @Option(help: "Random seed of the sampling.") var seed: UInt64 = 0

    func validate() throws {
        guard tokens >= 0 else { throw ValidationError("--tokens must be >= 0, got \(tokens)") }
        guard temperature >= 0 && temperature.isFinite else { throw ValidationError("--temperature must be >= 0, got \(temperature)") }
        if let topK, topK < 1 { throw ValidationError("--top-k must be at least 1, got \(topK)") }
    }

    func run() throws {
        do {
            let path = try model ?? selection.directory().modelPath
            let trained = try TrainedLanguageModel(path: path)
            let text = try trained.generate(prompt: prompt, tokens: tokens, temperature: temperature, topK: topK, seed: seed)
            SafeOutput.print(text + "\n", to: 1)
        } catch { throw CommandFailure.message(Readable.error(error)) }
    }
}
