/// A named parameter of a model; names are stable (`0.weight`, `0.bias`, ...) because the wire and
/// checkpoints identify tensors by them.
public struct NamedParameter {
    public let name: String
    public let tensor: Tensor
    public init(name: String, tensor: Tensor) {
        self.name = name
        self.tensor = tensor
    }
}

/// A differentiable function with parameters.
public protocol Layer: AnyObject {
    /// Applies the layer to a batch.
    func callAsFunction(_ input: Tensor) -> Tensor
    /// The parameters in a stable order.
    var parameters: [NamedParameter] { get }
    /// Switches between training (dropout active) and evaluation.
    func setTraining(_ training: Bool)
}

extension Layer {
    public var parameters: [NamedParameter] { [] }
    public func setTraining(_ training: Bool) {}

    /// Forgets every parameter's gradient.
    public func zeroGrad() { for p in parameters { p.tensor.zeroGrad() } }

    /// The total number of parameter elements.
    public var parameterCount: Int { parameters.reduce(0) { $0 + $1.tensor.count } }
}

/// A fully connected layer, `y = x Wᵀ + b`, with PyTorch's default initialisation
/// (uniform in ±1/sqrt(fan-in)).
public final class Linear: Layer {
    public let weight: Tensor
    public let bias: Tensor

    public init(inputs: Int, outputs: Int, generator: inout SeededGenerator) {
        let bound = 1 / Float(inputs).squareRoot()
        weight = .randomUniform([outputs, inputs], low: -bound, high: bound, generator: &generator, requiresGrad: true)
        bias = .randomUniform([outputs], low: -bound, high: bound, generator: &generator, requiresGrad: true)
    }

    public func callAsFunction(_ input: Tensor) -> Tensor { input.linear(weight: weight, bias: bias) }
    public var parameters: [NamedParameter] { [.init(name: "weight", tensor: weight), .init(name: "bias", tensor: bias)] }
}

/// A 2-D convolution layer over `[n, c, h, w]` inputs.
public final class Conv2D: Layer {
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
    public var parameters: [NamedParameter] { [.init(name: "weight", tensor: weight), .init(name: "bias", tensor: bias)] }
}

/// Max pooling over square windows.
public final class MaxPool2D: Layer {
    public let size: Int
    public let stride: Int
    public init(size: Int, stride: Int? = nil) {
        self.size = size
        self.stride = stride ?? size
    }
    public func callAsFunction(_ input: Tensor) -> Tensor { input.maxPool2d(size: size, stride: stride) }
}

/// Flattens every dimension after the first.
public final class Flatten: Layer {
    public init() {}
    public func callAsFunction(_ input: Tensor) -> Tensor { input.flattened() }
}

/// An element-wise activation function as a layer.
public final class Activation: Layer {
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
public final class Dropout: Layer {
    public let probability: Float
    public var generator: SeededGenerator
    public private(set) var isTraining = true

    public init(probability: Float, seed: UInt64) {
        precondition(probability >= 0 && probability < 1, "Dropout: probability \(probability) must be in [0, 1)")
        self.probability = probability
        generator = SeededGenerator(seed: seed)
    }

    public func callAsFunction(_ input: Tensor) -> Tensor {
        isTraining && probability > 0 ? input.dropout(probability, generator: &generator) : input
    }
    public func setTraining(_ training: Bool) { isTraining = training }
}

/// Layers applied in order; parameters are named `INDEX.NAME` as in PyTorch's `nn.Sequential`.
public final class Sequential: Layer {
    public let layers: [any Layer]
    public init(_ layers: [any Layer]) { self.layers = layers }

    public func callAsFunction(_ input: Tensor) -> Tensor {
        layers.reduce(input) { x, layer in layer(x) }
    }

    public var parameters: [NamedParameter] {
        layers.enumerated().flatMap { index, layer in
            layer.parameters.map { NamedParameter(name: "\(index).\($0.name)", tensor: $0.tensor) }
        }
    }

    public func setTraining(_ training: Bool) { for layer in layers { layer.setTraining(training) } }
}
