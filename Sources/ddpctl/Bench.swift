import ArgumentParser
import DDPRuntime

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks of a release build (swift build -c release).",
        subcommands: [Step.self])

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

/// Prints a benchmark result as one JSON line or as aligned `key: value` lines.
func printResult(_ result: [String: Any], json: Bool) {
    if json { print(JSONLine.encode(result)); return }
    let width = result.keys.map(\.count).max() ?? 0
    for key in result.keys.sorted() {
        print("\(key.padding(toLength: width, withPad: " ", startingAt: 0))  \(result[key]!)")
    }
}
