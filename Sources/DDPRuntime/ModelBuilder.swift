import Autodiff

/// Builds a model from its layer description, inferring every layer's sizes from the shape of one
/// sample; a layer that does not fit the shape it receives is an error naming the layer and the shapes.
/// The presets (`mlp`, `cnn`, `logistic`, `linear`) are such descriptions (`presetLayers`).
public struct ModelBuilder {
    /// Outputs of a `linear` without a size: the class count (1 for regression).
    public let outputs: Int
    private var generator: SeededGenerator
    private let seed: UInt64
    private var dropouts: UInt64 = 0

    public init(outputs: Int, seed: UInt64) {
        self.outputs = outputs
        self.seed = seed
        generator = SeededGenerator(seed: seed &+ 0x4D4F_4445_4C)
    }

    /// The model of `layers` for samples of `inputShape`; its output must be one value per class.
    public mutating func build(_ layers: [LayerSpec], inputShape: [Int]) throws -> Sequential {
        guard !layers.isEmpty else { throw JobSpecError.invalid("model: the list of layers is empty") }
        let (model, shape) = try sequence(layers, shape: inputShape, path: "")
        guard shape == [outputs] else {
            throw JobSpecError.invalid("model: the last layer gives \(shape) per sample; the data needs [\(outputs)] (end with `linear`, which takes the class count)")
        }
        try model.checkStructure()
        return model
    }

    private mutating func sequence(_ layers: [LayerSpec], shape: [Int], path: String) throws -> (Sequential, [Int]) {
        var shape = shape
        var built: [(String, any Layer)] = []
        for (index, spec) in layers.enumerated() {
            let place = path.isEmpty ? "\(index)" : "\(path).\(index)"
            let (layer, out) = try self.layer(spec, shape: shape, place: place)
            if case .block(let name, _) = spec {
                guard !built.contains(where: { $0.0 == name }) else { throw JobSpecError.invalid("model layer \(place): the block name '\(name)' is used twice") }
                built.append((name, layer))
            } else {
                built.append(("\(index)", layer))
            }
            shape = out
        }
        return (Sequential(named: built), shape)
    }

    private mutating func layer(_ spec: LayerSpec, shape: [Int], place: String) throws -> (any Layer, [Int]) {
        func fail(_ why: String) -> JobSpecError { JobSpecError.invalid("model layer \(place) (\(spec.kind)): \(why)") }
        func image() throws -> (c: Int, h: Int, w: Int) {
            guard shape.count == 3 else { throw fail("takes [channels, height, width] samples, got \(shape)") }
            return (shape[0], shape[1], shape[2])
        }
        switch spec {
        case .linear(let size):
            guard shape.count == 1 else { throw fail("takes flat samples, got \(shape) (put flatten before it)") }
            let outputs = size ?? self.outputs
            guard outputs > 0 else { throw fail("outputs must be positive, got \(outputs)") }
            return (Linear(inputs: shape[0], outputs: outputs, generator: &generator), [outputs])
        case .conv(let filters, let kernel, let stride, let padding):
            let (c, h, w) = try image()
            let padding = padding ?? kernel / 2
            guard filters > 0, kernel > 0, stride > 0, padding >= 0 else {
                throw fail("filters, kernel and stride must be positive and padding not negative (got \(filters), \(kernel), \(stride), \(padding))")
            }
            let oh = (h + 2 * padding - kernel) / stride + 1, ow = (w + 2 * padding - kernel) / stride + 1
            guard h + 2 * padding >= kernel, w + 2 * padding >= kernel else {
                throw fail("a \(kernel)x\(kernel) kernel does not fit samples of \(shape) with padding \(padding)")
            }
            return (Conv2D(inputChannels: c, outputChannels: filters, kernelSize: kernel, stride: stride, padding: padding, generator: &generator),
                    [filters, oh, ow])
        case .maxPool(let size):
            let (c, h, w) = try image()
            guard size > 0, h >= size, w >= size else { throw fail("a \(size)x\(size) window does not fit samples of \(shape)") }
            return (MaxPool2D(size: size), [c, h / size, w / size])
        case .activation(let name):
            guard let kind = Activation.Kind(rawValue: name) else { throw fail("unknown activation") }
            return (Activation(kind), shape)
        case .flatten:
            return (Flatten(), [shape.reduce(1, *)])
        case .dropout(let p):
            guard p >= 0 && p < 1 else { throw fail("the probability must be in [0, 1), got \(p)") }
            dropouts += 1
            return (Dropout(probability: p, seed: seed &+ 0x44524F50 &+ dropouts), shape)
        case .batchNorm:
            guard shape.count == 1 || shape.count == 3 else { throw fail("takes [features] or [channels, height, width] samples, got \(shape)") }
            return (BatchNorm(features: shape[0]), shape)
        case .residual(let layers, let shortcut):
            guard !layers.isEmpty else { throw fail("has no layers") }
            let (block, out) = try sequence(layers, shape: shape, path: "\(place).block")
            var projection: Sequential?
            var other = shape
            if let shortcut, !shortcut.isEmpty { (projection, other) = try sequence(shortcut, shape: shape, path: "\(place).shortcut") }
            guard out == other else {
                throw fail("its layers give \(out) but its shortcut gives \(other); both sides must have one shape (add a shortcut that maps \(shape) to \(out))")
            }
            return (Residual(block, shortcut: projection), out)
        case .block(_, let layers):
            guard !layers.isEmpty else { throw fail("has no layers") }
            return try sequence(layers, shape: shape, path: place)
        }
    }

    /// The layers of a preset for samples of `inputShape`: `logistic`/`linear` (one linear layer),
    /// `mlp` (`hidden` sizes with `activation`), `cnn` (two conv-activation-pool stages of 8 and 16
    /// filters while the image is at least 2x2, then a dense layer of `hidden[0]` (64 without)).
    public static func presetLayers(_ name: String, hidden: [Int], activation: String, inputShape: [Int]) throws -> [LayerSpec] {
        switch name {
        case "logistic", "linear":
            return [.flatten, .linear(outputs: nil)]
        case "mlp":
            return [.flatten] + hidden.flatMap { [LayerSpec.linear(outputs: $0), .activation(activation)] } + [.linear(outputs: nil)]
        case "cnn":
            guard inputShape.count == 3 else { throw JobSpecError.invalid("model 'cnn' needs [channels, height, width] inputs") }
            var height = inputShape[1], width = inputShape[2]
            var layers: [LayerSpec] = []
            for filters in [8, 16] where height >= 2 && width >= 2 {
                layers += [.conv(filters: filters, kernel: 3, stride: 1, padding: 1), .activation(activation), .maxPool(size: 2)]
                height /= 2
                width /= 2
            }
            return layers + [.flatten, .linear(outputs: hidden.first ?? 64), .activation(activation), .linear(outputs: nil)]
        default:
            throw JobSpecError.invalid("model '\(name)' is unknown (mlp, cnn, logistic, linear, or a list of layers)")
        }
    }

    /// Whether samples must be images (`[channels, height, width]`) for `layers`: a conv or pooling
    /// layer comes before the first flatten or linear layer.
    public static func takesImages(_ layers: [LayerSpec]) -> Bool {
        for layer in layers {
            switch layer {
            case .conv, .maxPool: return true
            case .flatten, .linear: return false
            case .residual(let inner, _), .block(_, let inner): if takesImages(inner) { return true }
            case .activation, .dropout, .batchNorm: continue
            }
        }
        return false
    }
}
