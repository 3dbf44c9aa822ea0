import Autodiff

/// `ddpctl bench step`: the time of one full training step (forward, softmax cross-entropy, backward,
/// SGD with momentum) of an MLP on random data in one process, and the same GEMMs through
/// `cblas_sgemm` alone, as the ceiling the step can reach.
public struct StepBenchmark {
    public var layers: [Int]
    public var batch: Int
    public var threads: Int
    public var repeats: Int
    public var minimumBlockSeconds: Double

    public init(layers: [Int], batch: Int, threads: Int, repeats: Int = 7, minimumBlockSeconds: Double = 0.5) {
        self.layers = layers
        self.batch = batch
        self.threads = threads
        self.repeats = repeats
        self.minimumBlockSeconds = minimumBlockSeconds
    }

    /// FLOPs of forward, input-gradient and weight-gradient products (as the PyTorch peer counts them).
    var flopsPerStep: Double {
        3 * zip(layers, layers.dropFirst()).reduce(0) { $0 + 2 * Double(batch) * Double($1.0) * Double($1.1) }
    }

    /// Runs the benchmark and returns its result fields.
    public func run() throws -> [String: Any] {
        guard layers.count >= 2, layers.allSatisfy({ $0 > 0 }), batch > 0 else {
            throw AutodiffError.invalidArgument("bench step: needs at least two positive layer sizes and a positive batch")
        }
        BLAS.threads = threads
        var generator = SeededGenerator(seed: 0)
        var modules: [any Layer] = []
        for (i, (inputs, outputs)) in zip(layers, layers.dropFirst()).enumerated() {
            modules.append(Linear(inputs: inputs, outputs: outputs, generator: &generator))
            if i < layers.count - 2 { modules.append(Activation(.relu)) }
        }
        let model = Sequential(modules)
        let optimizer = try SGD(learningRate: 0.01, momentum: 0.9)
        let x = Tensor.randomNormal([batch, layers[0]], generator: &generator)
        let labels = (0..<batch).map { _ in Int32(generator.next() % UInt64(layers.last!)) }
        let stepTimes = try Measure.perIteration(warmup: 20, repeats: repeats, minimumBlockSeconds: minimumBlockSeconds) {
            model.zeroGrad()
            try Loss.softmaxCrossEntropy(model(x), labels: labels).backward()
            optimizer.step(model.parameters)
        }
        let gemmTimes = gemmOnly(generator: &generator)
        let step = Measure.median(stepTimes), gemm = Measure.median(gemmTimes)
        return [
            "benchmark": "step", "layers": layers, "batch": batch, "threads": threads,
            "steps_per_second": 1 / step, "ms_per_step": step * 1e3, "ms_per_step_min": stepTimes.min()! * 1e3,
            "ms_per_step_max": stepTimes.max()! * 1e3, "gflops": flopsPerStep / step / 1e9,
            "sgemm_only_ms": gemm * 1e3, "sgemm_only_gflops": flopsPerStep / gemm / 1e9,
            "fraction_of_sgemm": gemm / step,
        ]
    }

    /// The three products per layer of one step, through sgemm alone into preallocated outputs.
    private func gemmOnly(generator: inout SeededGenerator) -> [Double] {
        let shapes = Array(zip(layers, layers.dropFirst()))
        let weights = shapes.map { Tensor.randomNormal([$0.1, $0.0], generator: &generator) }
        let activations = layers.map { Tensor.randomNormal([batch, $0], generator: &generator) }
        let weightGrads = shapes.map { Tensor.zeros([$0.1, $0.0]) }
        return Measure.perIteration(warmup: 5, repeats: repeats, minimumBlockSeconds: minimumBlockSeconds) {
            for (i, w) in weights.enumerated() {
                BLAS.multiply(activations[i], w, transposeB: true, into: activations[i + 1])  // forward
                BLAS.multiply(activations[i + 1], transposeA: true, activations[i], into: weightGrads[i])  // dW
                BLAS.multiply(activations[i + 1], w, into: activations[i])  // dX
            }
        }
    }
}
