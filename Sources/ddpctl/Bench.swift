import ArgumentParser
import Foundation
import DDPRuntime
import DDPWire

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks of a release build (swift build -c release).",
        subcommands: [Step.self, GPT.self, Train.self, Wire.self, Exchange.self, WireEcho.self, ExchangeWorker.self])

    struct Step: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Time one MLP training step in one process, against sgemm alone on the same shapes.",
            discussion: "Example: ddpctl bench step --layers 784,512,512,10 --batch 128 --threads 1 --json")

        @Option(help: "Layer sizes, input first, comma-separated.")
        var layers: String = "784,512,512,10"
        @Option(help: "Batch size.") var batch: Int = 128
        @Option(help: "BLAS threads.") var threads: Int = 1
        @Option(help: "Timed blocks (the median is reported).") var repeats: Int = 7
        @Flag(help: "Print one JSON line.") var json = false

        func run() throws {
            let sizes = layers.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
            guard sizes.count == layers.split(separator: ",").count else {
                throw ValidationError("--layers: '\(layers)' is not a comma-separated list of integers")
            }
            let result = try StepBenchmark(layers: sizes, batch: batch, threads: threads, repeats: repeats).run()
            printResult(result, json: json)
        }
    }
}

extension Bench {
    struct GPT: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Time one GPT training step (AdamW) in one process; tokens/s, GFLOP/s against sgemm, peak memory.",
            discussion: "Example: ddpctl bench gpt --n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch 32 --threads 1 --json")
        @Option(help: "Transformer blocks.") var nLayer = 4
        @Option(help: "Attention heads.") var nHead = 4
        @Option(help: "Embedding width.") var nEmbd = 128
        @Option(help: "Context length in tokens.") var blockSize = 64
        @Option(help: "Vocabulary size (65: a character vocabulary of Shakespeare).") var vocabSize = 65
        @Option(help: "Sequences per step.") var batch = 32
        @Option(help: "BLAS threads.") var threads = 1
        @Option(help: "Timed blocks (the median is reported).") var repeats = 5
        @Flag(help: "Print one JSON line.") var json = false

        func run() throws {
            let benchmark = GPTBenchmark(layers: nLayer, heads: nHead, embedding: nEmbd, blockSize: blockSize, vocabularySize: vocabSize,
                                         batch: batch, threads: threads, repeats: repeats)
            printResult(try benchmark.run(), json: json)
        }
    }

    struct Wire: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send a tensor to a second process and back over ZeroMQ; report one-way bandwidth.",
            discussion: "Example: ddpctl bench wire --elements 10000000 --json")

        @Option(help: "Floats per message.") var elements: Int = 10_000_000
        @Option(help: "Timed round trips (the median is reported).") var repeats: Int = 20
        @Option(help: "Endpoint to bind (tcp://127.0.0.1:0 or ipc://PATH).") var endpoint: String = "tcp://127.0.0.1:0"
        @Flag(help: "Print one JSON line.") var json = false

        func run() throws {
            let result = try WireBenchmark(elements: elements, repeats: repeats, endpoint: endpoint)
                .run(executable: currentExecutable(), echoArguments: ["bench", "wire-echo"])
            printResult(result, json: json)
        }
    }

    struct WireEcho: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The echo side of 'bench wire' (started by it).", shouldDisplay: false)
        @Argument(help: "The endpoint to connect to.") var endpoint: String
        func run() throws { try WireBenchmark.echo(endpoint: endpoint) }
    }
}

extension Bench {
    struct Train: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Time training steps of a real local job: digits 64-128-10, MNIST-sized 784-512-512-10 or wide 784-2048-2048-10, batch 128.",
            discussion: "Example: ddpctl bench train --workload mnist --workers 2 --epochs 1 --json")
        @Option(help: "digits, mnist (synthetic 60000x784), wide (synthetic 12000x784, 2048-wide layers) or gpt (n_layer 4, n_embd 128, block 64, batch 32 on the bundled text).") var workload = "digits"
        @Option(help: "Worker processes.") var workers = 2
        @Option(help: "Epochs (default: 20 for digits, 1 for the others).") var epochs: Int?
        @Option(name: .customLong("bucket-kb"), help: "Gradient bucket size in KiB (default: the job default; 0: whole pushes).")
        var bucketKB: Int?
        @Option(help: "Coordinator processes (default: 1).") var coordinatorShards: Int?
        @Option(help: "The ddpd executable (default: beside ddpctl).") var ddpd: String?
        @Flag(help: "Print one JSON line.") var json = false

        func run() throws {
            let result = try TrainBenchmark(
                workload: workload, workers: workers, epochs: epochs ?? (workload == "digits" ? 20 : 1),
                ddpd: ddpd ?? sibling("ddpd"), jobsRoot: NSTemporaryDirectory(), bucketKB: bucketKB,
                coordinatorShards: coordinatorShards
            ).run()
            printResult(result, json: json)
        }
    }
}

extension Bench {
    struct Exchange: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Time one gradient round: W worker processes push N floats, the coordinator averages and sends back.",
            discussion: "Example: ddpctl bench exchange --elements 10000000 --workers 2 --dtype bf16 --json")
        @Option(help: "Floats per tensor.") var elements: Int = 10_000_000
        @Option(help: "Worker processes.") var workers: Int = 2
        @Option(help: "Wire type: f32, bf16 or f16.") var dtype: String = "f32"
        @Option(help: "Timed rounds (the median is reported).") var rounds: Int = 20
        @Flag(inversion: .prefixedNo, help: "Pass tensors through shared memory, as a coordinator does with the workers on its host (else in frames over ipc).")
        var sharedMemory = true
        @Flag(help: "Print one JSON line.") var json = false

        func run() throws {
            guard let type = DType(rawValue: dtype) else { throw ValidationError("--dtype: '\(dtype)' is not f32, bf16 or f16") }
            let result = try ExchangeBenchmark(elements: elements, workers: workers, dtype: type, rounds: rounds, sharedMemory: sharedMemory)
                .run(executable: currentExecutable(), workerArguments: ["bench", "exchange-worker"])
            printResult(result, json: json)
        }
    }

    struct ExchangeWorker: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "A worker of 'bench exchange' (started by it).", shouldDisplay: false)
        @Argument var endpoint: String
        @Option var elements: Int
        @Option var dtype: String
        @Flag var sharedMemory = false
        func run() throws {
            try ExchangeBenchmark.worker(endpoint: endpoint, elements: elements, dtype: DType(rawValue: dtype) ?? .f32, sharedMemory: sharedMemory)
        }
    }
}

/// The path of the running executable (to start helper processes of the same build).
func currentExecutable() -> String {
    (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
}

/// Prints a benchmark result as one JSON line or as aligned `key: value` lines.
func printResult(_ result: [String: Any], json: Bool) {
    if json { print(JSONLine.encode(result)); return }
    let width = result.keys.map(\.count).max() ?? 0
    for key in result.keys.sorted() {
        print("\(key.padding(toLength: width, withPad: " ", startingAt: 0))  \(result[key]!)")
    }
}
