/// A fully connected layer, `y = x Wᵀ + b`, with PyTorch's default initialisation
/// (uniform in ±1/sqrt(fan-in)).
public final class Linear: Module, Layer {
    public let weight: Tensor
    public let bias: Tensor

    public init(inputs: Int, outputs: Int, generator: inout SeededGenerator) {
        let bound = 1 / Float(inputs).squareRoot()
        weight = .randomUniform([outputs, inputs], low: -bound, high: bound, generator: &generator, requiresGrad: true)
        bias = .randomUniform([outputs], low: -bound, high: bound, generator: &generator, requiresGrad: true)
    }

    /// A layer with the given `weight` `[out, in]` and `bias` `[out]`.
    public init(weight: Tensor, bias: Tensor) {
        precondition(weight.rank == 2 && bias.shape == [weight.shape[0]], "Linear: bias \(bias.shape) does not fit weight \(weight.shape)")
        self.weight = weight
        self.bias = bias
    }

    public func callAsFunction(_ input: Tensor) -> Tensor { input.linear(weight: weight, bias: bias) }
}

/// A 2-D convolution layer over `[n, c, h, w]` inputs.
public final class Conv2D: Module, Layer {
    public let weight: Tensor
    public let bias: Tensor
    public let stride: Int
    public let padding: Int

    public init(
        inputChannels: Int, outputChannels: Int, kernelSize: Int, stride: Int = 1, padding: Int = 0,
        generator: inout SeededGenerator
    ) {
        let fanIn = inputChannels * kernelSize * kernelSize
        let bound = 1 / Float(fanIn).squareRoot()
        weight = .randomUniform(
            [outputChannels, inputChannels, kernelSize, kernelSize], low: -bound, high: bound,
            generator: &generator, requiresGrad: true)
        bias = .randomUniform([outputChannels], low: -bound, high: bound, generator: &generator, requiresGrad: true)
        self.stride = stride
        self.padding = padding
    }

    public func callAsFunction(_ input: Tensor) -> Tensor {
        input.conv2d(weight: weight, bias: bias, stride: stride, padding: padding)
    }
}

/// Max pooling over square windows.
public final class MaxPool2D: Module, Layer {
    public let size: Int
    public let stride: Int
    public init(size: Int, stride: Int? = nil) {
        self.size = size
        self.stride = stride ?? size
    }
    public func callAsFunction(_ input: Tensor) -> Tensor { input.maxPool2d(size: size, stride: stride) }
}

/// Flattens every dimension after the first.
public final class Flatten: Module, Layer {
    public override init() {}
    public func callAsFunction(_ input: Tensor) -> Tensor { input.flattened() }
}

/// An element-wise activation function as a layer.
public final class Activation: Module, Layer {
    /// The supported functions.
    public enum Kind: String, CaseIterable, Sendable {
        case relu, leakyRelu = "leaky_relu", sigmoid, tanh, gelu
    }
    public let kind: Kind
    public init(_ kind: Kind) { self.kind = kind }
    public func callAsFunction(_ input: Tensor) -> Tensor {
        switch kind {
        case .relu: input.relu()
        case .leakyRelu: input.leakyRelu()
        case .sigmoid: input.sigmoid()
        case .tanh: input.tanh()
        case .gelu: input.gelu()
        }
    }
}

/// Dropout that is active only in training mode; its mask stream is seeded.
public final class Dropout: Module, Layer {
    public let probability: Float
    public var generator: SeededGenerator

    public init(probability: Float, seed: UInt64) {
        precondition(probability >= 0 && probability < 1, "Dropout: probability \(probability) must be in [0, 1)")
        self.probability = probability
        generator = SeededGenerator(seed: seed)
    }

    public func callAsFunction(_ input: Tensor) -> Tensor {
        isTraining && probability > 0 ? input.dropout(probability, generator: &generator) : input
    }
}

/// Layers applied in order; parameters are named `INDEX.NAME` as in PyTorch's `nn.Sequential`, or
/// by the names given (`named:`, as an `OrderedDict` names them).
public final class Sequential: Module, Layer {
    public let layers: [any Layer]
    /// Each layer's name in parameter names.
    public let names: [String]
    public init(_ layers: [any Layer]) {
        self.layers = layers
        names = layers.indices.map { "\($0)" }
    }
    public init(named layers: [(String, any Layer)]) {
        self.layers = layers.map(\.1)
        names = layers.map(\.0)
    }

    public func callAsFunction(_ input: Tensor) -> Tensor {
        layers.reduce(input) { x, layer in layer(x) }
    }

    public override var reflectedProperties: [(name: String, value: Any)] {
        zip(names, layers).map { ($0, $1 as Any) }
    }
}

/// `block(x) + shortcut(x)`, the shortcut the identity when there is none (a residual block, as in
/// ResNet); parameters are named `block.*` and `shortcut.*`.
public final class Residual: Module, Layer {
    public let block: any Layer
    public let shortcut: (any Layer)?
    public init(_ block: any Layer, shortcut: (any Layer)? = nil) {
        self.block = block
        self.shortcut = shortcut
    }

    public func callAsFunction(_ input: Tensor) -> Tensor {
        block(input) + (shortcut.map { $0(input) } ?? input)
    }
}

/// Batch normalisation over the channels of `[n, c]` (BatchNorm1d) or `[n, c, h, w]` (BatchNorm2d)
/// inputs, as PyTorch's: in training, each channel is normalised with the batch's mean and biased
/// variance and the running statistics move by `momentum` (the variance unbiased); in evaluation the
/// running statistics are used. `weight` and `bias` are the learned scale and shift.
public final class BatchNorm: Module, Layer {
    public let weight: Tensor
    public let bias: Tensor
    @Buffer public var runningMean: Tensor
    @Buffer public var runningVar: Tensor
    public let momentum: Float
    public let epsilon: Float

    public init(features: Int, momentum: Float = 0.1, epsilon: Float = 1e-5) {
        weight = .ones([features], requiresGrad: true)
        bias = .zeros([features], requiresGrad: true)
        runningMean = .zeros([features])
        runningVar = .ones([features])
        self.momentum = momentum
        self.epsilon = epsilon
    }

    /// PyTorch's names: `weight`, `bias`, `running_mean`, `running_var`.
    public override var reflectedProperties: [(name: String, value: Any)] {
        [("weight", weight), ("bias", bias), ("running_mean", _runningMean), ("running_var", _runningVar)]
    }

    public func callAsFunction(_ input: Tensor) -> Tensor {
        if isTraining {
            return input.batchNormalized(weight: weight, bias: bias, epsilon: epsilon,
                                         updating: (runningMean, runningVar, momentum))
        }
        return input.channelAffine(mean: runningMean, variance: runningVar, weight: weight, bias: bias, epsilon: epsilon)
    }
}

/// A table of `count` learned vectors of `width` (PyTorch's `nn.Embedding`, initialised from N(0, 1)):
/// `lookup` gives the rows of token ids.
public final class Embedding: Module {
    public let weight: Tensor

    public init(count: Int, width: Int, generator: inout SeededGenerator) {
        weight = .randomNormal([count, width], generator: &generator, requiresGrad: true)
    }

    /// A table with the given rows `[count, width]`.
    public init(weight: Tensor) {
        precondition(weight.rank == 2, "Embedding: the table must be [count, width], got \(weight.shape)")
        self.weight = weight
    }

    /// The rows of `ids` (each in `0..<count`), shaped `shape + [width]`.
    public func lookup(_ ids: [Int32], shape: [Int]) -> Tensor { weight.gatherRows(ids, shape: shape) }
}

/// Layer normalisation over the last axis (PyTorch's `nn.LayerNorm(width)`): `weight` 1, `bias` 0.
public final class LayerNorm: Module, Layer {
    public let weight: Tensor
    public let bias: Tensor
    public let epsilon: Float

    public init(width: Int, epsilon: Float = 1e-5) {
        weight = .ones([width], requiresGrad: true)
        bias = .zeros([width], requiresGrad: true)
        self.epsilon = epsilon
    }

    public func callAsFunction(_ input: Tensor) -> Tensor { input.layerNormalized(weight: weight, bias: bias, epsilon: epsilon) }
}
