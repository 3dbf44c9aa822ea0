import Testing
@testable import Autodiff

/// A model written as a user would: parameters, buffers and sub-modules found by reflection.
private final class Block: Module, Layer {
    let conv: Conv2D
    let norm: BatchNorm
    init(channels: Int, generator: inout SeededGenerator) {
        conv = Conv2D(inputChannels: channels, outputChannels: channels, kernelSize: 3, padding: 1, generator: &generator)
        norm = BatchNorm(features: channels)
    }
    func callAsFunction(_ x: Tensor) -> Tensor { norm(conv(x)).relu() + x }
}

private final class Net: Module, Layer {
    let stem: Conv2D
    let blocks: [Block]
    let extra: Linear?
    let missing: Linear? = nil
    let dropout = Dropout(probability: 0.5, seed: 1)
    let head: Linear
    let scale = Tensor.ones([1])
    var steps = 0  // not state of the model
    init(generator: inout SeededGenerator) {
        stem = Conv2D(inputChannels: 1, outputChannels: 2, kernelSize: 3, padding: 1, generator: &generator)
        blocks = [Block(channels: 2, generator: &generator), Block(channels: 2, generator: &generator)]
        extra = Linear(inputs: 2, outputs: 2, generator: &generator)
        head = Linear(inputs: 2 * 4 * 4, outputs: 3, generator: &generator)
    }
    func callAsFunction(_ x: Tensor) -> Tensor {
        head(dropout(blocks.reduce(stem(x)) { $1($0) }.flattened())) * scale
    }
}

private final class Tied: Module, Layer {
    let embedding: Linear
    let output: Linear
    init(generator: inout SeededGenerator) {
        embedding = Linear(inputs: 3, outputs: 3, generator: &generator)
        output = embedding
    }
    func callAsFunction(_ x: Tensor) -> Tensor { output(embedding(x)) }
}

private final class Clash: Module, Layer {
    let a: Linear, b: Linear
    init(generator: inout SeededGenerator) {
        a = Linear(inputs: 2, outputs: 2, generator: &generator)
        b = Linear(inputs: 2, outputs: 2, generator: &generator)
    }
    override var reflectedProperties: [(name: String, value: Any)] { [("layer", a), ("layer", b)] }
    func callAsFunction(_ x: Tensor) -> Tensor { b(a(x)) }
}

/// README's custom model, as written there.
private final class ReadmeNet: Module, Layer {
    let conv: Conv2D, norm: BatchNorm
    let blocks: [Residual]
    let head: Linear
    init(generator g: inout SeededGenerator) {
        conv = Conv2D(inputChannels: 1, outputChannels: 8, kernelSize: 3, padding: 1, generator: &g)
        norm = BatchNorm(features: 8)
        blocks = (0..<2).map { _ in
            Residual(Sequential([Conv2D(inputChannels: 8, outputChannels: 8, kernelSize: 3, padding: 1, generator: &g), Activation(.relu)]))
        }
        head = Linear(inputs: 8 * 8 * 8, outputs: 10, generator: &g)
    }
    func callAsFunction(_ x: Tensor) -> Tensor { head(blocks.reduce(norm(conv(x)).relu()) { $1($0) }.flattened()) }
}

struct ModuleTests {
    @Test func theReadmeModelTrainsAStep() throws {
        var g = SeededGenerator(seed: 1)
        let net = ReadmeNet(generator: &g)
        #expect(net.parameters.map(\.name).prefix(5) == ["conv.weight", "conv.bias", "norm.weight", "norm.bias", "blocks.0.block.0.weight"])
        #expect(net.buffers.map(\.name) == ["norm.running_mean", "norm.running_var"])
        let x = Tensor.randomUniform([4, 1, 8, 8], low: 0, high: 1, generator: &g)
        let before = Loss.softmaxCrossEntropy(net(x), labels: [0, 1, 2, 3]).item
        for _ in 0..<5 {
            net.zeroGrad()
            try Loss.softmaxCrossEntropy(net(x), labels: [0, 1, 2, 3]).backward()
            try SGD(learningRate: 0.05).step(net.parameters)
        }
        #expect(Loss.softmaxCrossEntropy(net(x), labels: [0, 1, 2, 3]).item < before)
    }

    @Test func parametersBuffersAndModulesAreFoundWithDottedNames() throws {
        var g = SeededGenerator(seed: 1)
        let net = Net(generator: &g)
        #expect(net.parameters.map(\.name) == [
            "stem.weight", "stem.bias",
            "blocks.0.conv.weight", "blocks.0.conv.bias", "blocks.0.norm.weight", "blocks.0.norm.bias",
            "blocks.1.conv.weight", "blocks.1.conv.bias", "blocks.1.norm.weight", "blocks.1.norm.bias",
            "extra.weight", "extra.bias", "head.weight", "head.bias", "scale",
        ])
        #expect(net.buffers.map(\.name) == ["blocks.0.norm.running_mean", "blocks.0.norm.running_var",
                                            "blocks.1.norm.running_mean", "blocks.1.norm.running_var"])
        #expect(net.parameters.allSatisfy { $0.tensor.requiresGrad } && net.buffers.allSatisfy { !$0.tensor.requiresGrad })
        #expect(net.modules.map(\.name).contains("blocks.1.norm") && net.modules.first?.name == "")
        // Found once: the same tensor objects every time.
        #expect(zip(net.parameters, net.parameters).allSatisfy { $0.tensor === $1.tensor })
        try net.checkStructure()
    }

    @Test func sequentialAndResidualNameAsPyTorch() {
        var g = SeededGenerator(seed: 2)
        let model = Sequential([Linear(inputs: 2, outputs: 3, generator: &g), Activation(.relu),
                                Residual(Sequential([Linear(inputs: 3, outputs: 3, generator: &g), BatchNorm(features: 3)]))])
        #expect(model.parameters.map(\.name) == ["0.weight", "0.bias", "2.block.0.weight", "2.block.0.bias", "2.block.1.weight", "2.block.1.bias"])
        #expect(model.buffers.map(\.name) == ["2.block.1.running_mean", "2.block.1.running_var"])
    }

    @Test func tiedTensorsKeepTheirFirstName() {
        var g = SeededGenerator(seed: 3)
        #expect(Tied(generator: &g).parameters.map(\.name) == ["embedding.weight", "embedding.bias"])
    }

    @Test func aNameUsedTwiceAndAModelWithoutParametersAreErrors() {
        var g = SeededGenerator(seed: 4)
        #expect(throws: AutodiffError.invalidArgument("the name 'layer' is used twice in the model (by a Linear and a Linear)")) {
            try Clash(generator: &g).checkStructure()
        }
        #expect(throws: AutodiffError.invalidArgument("the model Sequential has no parameters (no stored Tensor properties were found)")) {
            try Sequential([Flatten(), Activation(.relu)]).checkStructure()
        }
    }

    @Test func trainingModeReachesEverySubModule() {
        var g = SeededGenerator(seed: 5)
        let net = Net(generator: &g)
        net.setTraining(false)
        #expect(net.modules.allSatisfy { !$0.module.isTraining })
        let x = Tensor.randomUniform([2, 1, 4, 4], low: -1, high: 1, generator: &g)
        #expect(net(x).scalars == net(x).scalars)  // no dropout, running statistics: deterministic
        net.setTraining(true)
        #expect(net.dropout.isTraining && net.blocks[1].norm.isTraining)
    }

    @Test func batchNormGradientsMatchFiniteDifferences() throws {
        for shape in [[6, 3], [3, 2, 3, 2]] {
            let x = GradientTests.input(shape, seed: 6)
            let norm = BatchNorm(features: shape[1])
            var g = SeededGenerator(seed: 7)
            norm.weight.assign(.randomUniform([shape[1]], low: 0.5, high: 1.5, generator: &g))
            norm.bias.assign(.randomUniform([shape[1]], low: -0.5, high: 0.5, generator: &g))
            let report = try checkGradients(of: [x, norm.weight, norm.bias]) { GradientTests.weightedSum(norm(x)) }
            #expect(report.worstRelativeError < 2e-2, "shape \(shape): \(report.worstRelativeError)")
            norm.setTraining(false)
            let eval = try checkGradients(of: [x, norm.weight, norm.bias]) { GradientTests.weightedSum(norm(x)) }
            #expect(eval.worstRelativeError < 1e-2, "shape \(shape), evaluation: \(eval.worstRelativeError)")
        }
    }

    @Test func batchNormNormalisesAndMovesRunningStatisticsAsPyTorch() {
        let x = Tensor(shape: [4, 2], values: [1, 10, 2, 20, 3, 30, 4, 40])
        let norm = BatchNorm(features: 2)
        let y = norm(x)
        // Channel 0: mean 2.5, biased variance 1.25; unbiased 5/3.
        #expect(abs(y[0, 0] - (1 - 2.5) / (1.25 + 1e-5).squareRoot()) < 1e-5)
        #expect(abs(norm.runningMean[0] - 0.25) < 1e-6 && abs(norm.runningMean[1] - 2.5) < 1e-5)
        #expect(abs(norm.runningVar[0] - (0.9 + 0.1 * 5 / 3)) < 1e-6)
        norm.setTraining(false)
        let z = norm(x)
        #expect(abs(z[0, 0] - (1 - 0.25) / (norm.runningVar[0] + 1e-5).squareRoot()) < 1e-5)
    }

    @Test func residualGradientsMatchFiniteDifferences() throws {
        var g = SeededGenerator(seed: 8)
        let inner = Linear(inputs: 3, outputs: 3, generator: &g)
        let projection = Linear(inputs: 3, outputs: 3, generator: &g)
        let x = GradientTests.input([4, 3], seed: 9)
        for block in [Residual(inner), Residual(inner, shortcut: projection)] {
            let report = try checkGradients(of: [x] + block.parameters.map(\.tensor)) { GradientTests.weightedSum(block(x)) }
            #expect(report.worstRelativeError < 1e-2)
        }
    }

    @Test func layerNormAndEmbeddingGradientsMatchFiniteDifferences() throws {
        let x = GradientTests.input([3, 2, 5], seed: 10)
        let norm = LayerNorm(width: 5)
        var g = SeededGenerator(seed: 11)
        norm.weight.assign(.randomUniform([5], low: 0.5, high: 1.5, generator: &g))
        norm.bias.assign(.randomUniform([5], low: -0.5, high: 0.5, generator: &g))
        let report = try checkGradients(of: [x, norm.weight, norm.bias]) { GradientTests.weightedSum(norm(x)) }
        #expect(report.worstRelativeError < 2e-2, "layer norm: \(report.worstRelativeError)")
        // Each row is normalised: mean 0, biased variance 1 (with weight 1, bias 0).
        let plain = LayerNorm(width: 5)(x).scalars
        for row in 0..<6 {
            let values = plain[row * 5..<(row + 1) * 5]
            let mean = values.reduce(0, +) / 5
            #expect(abs(mean) < 1e-5 && abs(values.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / 5 - 1) < 1e-3)
        }

        let table = Embedding(count: 4, width: 3, generator: &g)
        let ids: [Int32] = [2, 0, 2, 3, 1, 2]  // row 2 used three times: its gradient adds up
        #expect(table.lookup(ids, shape: [2, 3]).shape == [2, 3, 3])
        #expect(Array(table.lookup(ids, shape: [2, 3]).scalars[0..<3]) == Array(table.weight.scalars[6..<9]))
        let lookup = try checkGradients(of: [table.weight]) { GradientTests.weightedSum(table.lookup(ids, shape: [2, 3])) }
        #expect(lookup.worstRelativeError < 1e-2, "embedding: \(lookup.worstRelativeError)")
        #expect(table.parameters.map(\.name) == ["weight"])
    }
}
