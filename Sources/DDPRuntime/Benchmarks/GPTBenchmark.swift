#if canImport(Glibc)
import Glibc
#endif
import Autodiff

/// `ddpctl bench gpt`: one training step (forward, cross-entropy over every position, backward, AdamW)
/// of a GPT on random tokens in one process; tokens/s, GFLOP/s as a fraction of sgemm on the model's
/// widest product measured in the same run, and the process's peak resident memory.
public struct GPTBenchmark {
    public var configuration: GPTConfiguration
    public var batch: Int
    public var threads: Int
    public var repeats: Int
    public var minimumBlockSeconds: Double

    public init(layers: Int, heads: Int, embedding: Int, blockSize: Int, vocabularySize: Int, batch: Int, threads: Int,
                repeats: Int = 5, minimumBlockSeconds: Double = 1) {
        configuration = GPTConfiguration(vocabularySize: vocabularySize, blockSize: blockSize, layers: layers, heads: heads, embedding: embedding)
        self.batch = batch
        self.threads = threads
        self.repeats = repeats
        self.minimumBlockSeconds = minimumBlockSeconds
    }

    /// Runs the benchmark and returns its result fields.
    public func run() throws -> [String: Any] {
        guard batch > 0, repeats > 0 else { throw AutodiffError.invalidArgument("bench gpt: batch and repeats must be positive") }
        BLAS.threads = threads
        var generator = SeededGenerator(seed: 0)
        let model = try GPT(configuration, generator: &generator)
        let time = configuration.blockSize, vocabulary = UInt64(configuration.vocabularySize)
        let stream = (0...(batch * time)).map { _ in Int32(generator.next() % vocabulary) }
        let tokens = Array(stream.prefix(batch * time)), targets = Array(stream.dropFirst())
        let optimizer = try Adam.adamW(learningRate: 1e-3, weightDecay: 0.1)
        var lastLoss: Float = 0
        let stepTimes = try Measure.perIteration(warmup: 3, repeats: repeats, minimumBlockSeconds: minimumBlockSeconds) {
            model.zeroGrad()
            let loss = model.loss(tokens, targets: targets, batch: batch, time: time)
            lastLoss = loss.item
            try loss.backward()
            optimizer.step(model.parameters)
        }
        let step = Measure.median(stepTimes)
        let tokensPerStep = Double(batch * time)
        let flops = configuration.flopsPerToken(context: time) * tokensPerStep
        let sgemm = sgemmGFLOPs(rows: batch * time, generator: &generator)
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return [
            "benchmark": "gpt", "n_layer": configuration.layers, "n_head": configuration.heads, "n_embd": configuration.embedding,
            "block_size": time, "vocab_size": configuration.vocabularySize, "batch": batch, "threads": threads,
            "parameters": model.parameterCount, "ms_per_step": step * 1e3, "ms_per_step_min": stepTimes.min()! * 1e3,
            "ms_per_step_max": stepTimes.max()! * 1e3, "tokens_per_second": tokensPerStep / step,
            "gflops": flops / step / 1e9, "sgemm_gflops": sgemm, "fraction_of_sgemm": flops / step / 1e9 / sgemm,
            "peak_rss_mb": Double(usage.ru_maxrss) / 1024, "loss": lastLoss,
        ]
    }

    /// GFLOP/s of sgemm alone on the MLP's widening product (`[B T, C] · [C, 4C]`), the model's largest.
    private func sgemmGFLOPs(rows: Int, generator: inout SeededGenerator) -> Double {
        let c = configuration.embedding
        let x = Tensor.randomNormal([rows, c], generator: &generator), w = Tensor.randomNormal([4 * c, c], generator: &generator)
        let y = Tensor.zeros([rows, 4 * c])
        let times = Measure.perIteration(warmup: 3, repeats: repeats, minimumBlockSeconds: minimumBlockSeconds / 2) {
            BLAS.multiply(x, w, transposeB: true, into: y)
        }
        return 2 * Double(rows * c * 4 * c) / Measure.median(times) / 1e9
    }
}
