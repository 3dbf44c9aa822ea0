import Foundation

/// One layer of a model described in a job file (`model:` as a list). In YAML each is a word or a
/// one-key mapping:
///
/// ```yaml
/// model:
///   - conv: {filters: 8}          # kernel 3, padding 1 (same size), stride 1 unless given
///   - batchnorm
///   - relu                        # relu, leaky_relu, sigmoid, tanh, gelu
///   - residual: [{conv: 8}, batchnorm, relu]     # or {layers: [...], shortcut: [...]}
///   - maxpool: 2
///   - flatten
///   - block: {name: head, layers: [{linear: 64}, relu, {dropout: 0.1}]}
///   - linear                      # no size: one output per class (one for regression)
/// ```
public indirect enum LayerSpec: Codable, Equatable, Sendable {
    case linear(outputs: Int?)
    case conv(filters: Int, kernel: Int, stride: Int, padding: Int?)
    case maxPool(size: Int)
    case activation(String)
    case flatten
    case dropout(Float)
    case batchNorm
    case residual(layers: [LayerSpec], shortcut: [LayerSpec]?)
    case block(name: String, layers: [LayerSpec])

    /// The word of each kind, as the job file writes it.
    public static let kinds = ["linear", "conv", "maxpool", "flatten", "dropout", "batchnorm", "residual", "block"] + activations
    public static let activations = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu"]

    /// The word this layer is written with.
    public var kind: String {
        switch self {
        case .linear: "linear"
        case .conv: "conv"
        case .maxPool: "maxpool"
        case .activation(let name): name
        case .flatten: "flatten"
        case .dropout: "dropout"
        case .batchNorm: "batchnorm"
        case .residual: "residual"
        case .block: "block"
        }
    }

    public init(from decoder: any Decoder) throws {
        let path = decoder.codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue }.drop { $0 == "model" }
        let place = "model layer \(path.isEmpty ? "?" : path.joined(separator: "."))"
        if let word = try? decoder.singleValueContainer().decode(String.self) {
            self = try Self.word(word, place: place)
            return
        }
        guard let c = try? decoder.container(keyedBy: AnyKey.self), c.allKeys.count == 1, let key = c.allKeys.first else {
            throw JobSpecError.invalid("\(place): a layer is a word (relu, flatten, linear, ...) or a mapping with one key (conv: {filters: 8}); kinds: \(Self.kinds.joined(separator: ", "))")
        }
        func checkFields() throws {
            guard let fields = try? c.nestedContainer(keyedBy: AnyKey.self, forKey: key) else { return }
            for k in fields.allKeys where !Self.fields(key.stringValue).contains(k.stringValue) {
                throw JobSpecError.invalid("\(place) (\(key.stringValue)): unknown field '\(k.stringValue)' (fields: \(Self.fields(key.stringValue).joined(separator: ", ")))")
            }
        }
        func number<T: Decodable>(_ type: T.Type, _ field: String? = nil) throws -> T? {
            if let field {
                try checkFields()
                guard let fields = try? c.nestedContainer(keyedBy: AnyKey.self, forKey: key), fields.contains(AnyKey(field)) else { return nil }
                do { return try fields.decode(T.self, forKey: AnyKey(field)) } catch {
                    throw JobSpecError.invalid("\(place) (\(key.stringValue)): '\(field)' must be a number")
                }
            }
            return try? c.decode(T.self, forKey: key)
        }
        func layers(_ field: String?) throws -> [LayerSpec]? {
            guard let field else { return try? c.decode([LayerSpec].self, forKey: key) }
            guard let fields = try? c.nestedContainer(keyedBy: AnyKey.self, forKey: key), fields.contains(AnyKey(field)) else { return nil }
            return try fields.decode([LayerSpec].self, forKey: AnyKey(field))
        }
        func required<T>(_ value: T?, _ what: String) throws -> T {
            guard let value else { throw JobSpecError.invalid("\(place) (\(key.stringValue)): needs \(what)") }
            return value
        }
        switch key.stringValue {
        case "linear":
            self = .linear(outputs: try number(Int.self) ?? number(Int.self, "outputs"))
        case "conv":
            let filters = try required(try number(Int.self) ?? number(Int.self, "filters"), "filters (conv: 8, or conv: {filters: 8, kernel: 3})")
            self = .conv(filters: filters, kernel: try number(Int.self, "kernel") ?? 3, stride: try number(Int.self, "stride") ?? 1,
                         padding: try number(Int.self, "padding"))
        case "maxpool":
            self = .maxPool(size: try number(Int.self) ?? number(Int.self, "size") ?? 2)
        case "dropout":
            self = .dropout(try required(try number(Float.self) ?? number(Float.self, "probability"), "a probability (dropout: 0.1)"))
        case "residual":
            if let list = try layers(nil) {
                self = .residual(layers: list, shortcut: nil)
            } else {
                try checkFields()
                self = .residual(layers: try required(try layers("layers"), "its layers (residual: [...] or {layers: [...], shortcut: [...]})"),
                                 shortcut: try layers("shortcut"))
            }
        case "block":
            guard let fields = try? c.nestedContainer(keyedBy: AnyKey.self, forKey: key),
                  let name = try? fields.decode(String.self, forKey: AnyKey("name")), !name.isEmpty else {
                throw JobSpecError.invalid("\(place) (block): needs a name and layers (block: {name: head, layers: [...]})")
            }
            try checkFields()
            guard name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }) else {
                throw JobSpecError.invalid("\(place) (block): the name '\(name)' may hold letters, digits and _ only (it becomes part of parameter names)")
            }
            self = .block(name: name, layers: try required(try layers("layers"), "layers"))
        case let word where Self.kinds.contains(word):
            self = try Self.word(word, place: place)
        case let other:
            throw JobSpecError.invalid("\(place): unknown layer '\(other)' (kinds: \(Self.kinds.joined(separator: ", ")))")
        }
    }

    private static func fields(_ kind: String) -> [String] {
        switch kind {
        case "linear": ["outputs"]
        case "conv": ["filters", "kernel", "stride", "padding"]
        case "maxpool": ["size"]
        case "dropout": ["probability"]
        case "residual": ["layers", "shortcut"]
        case "block": ["name", "layers"]
        default: []
        }
    }

    private static func word(_ word: String, place: String) throws -> LayerSpec {
        switch word {
        case "linear": return .linear(outputs: nil)
        case "flatten": return .flatten
        case "batchnorm": return .batchNorm
        case "maxpool": return .maxPool(size: 2)
        case let name where activations.contains(name): return .activation(name)
        case "conv", "dropout", "residual", "block":
            throw JobSpecError.invalid("\(place): '\(word)' needs its settings (for example \(word == "conv" ? "conv: 8" : word == "dropout" ? "dropout: 0.1" : "\(word): [...]"))")
        default:
            throw JobSpecError.invalid("\(place): unknown layer '\(word)' (kinds: \(kinds.joined(separator: ", ")))")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        switch self {
        case .flatten, .batchNorm, .activation, .linear(outputs: nil):
            var c = encoder.singleValueContainer()
            try c.encode(kind)
        case .linear(let outputs?):
            var c = encoder.container(keyedBy: AnyKey.self)
            try c.encode(outputs, forKey: AnyKey("linear"))
        case .conv(let filters, let kernel, let stride, let padding):
            var c = encoder.container(keyedBy: AnyKey.self)
            var f = c.nestedContainer(keyedBy: AnyKey.self, forKey: AnyKey("conv"))
            try f.encode(filters, forKey: AnyKey("filters"))
            try f.encode(kernel, forKey: AnyKey("kernel"))
            try f.encode(stride, forKey: AnyKey("stride"))
            try f.encodeIfPresent(padding, forKey: AnyKey("padding"))
        case .maxPool(let size):
            var c = encoder.container(keyedBy: AnyKey.self)
            try c.encode(size, forKey: AnyKey("maxpool"))
        case .dropout(let p):
            var c = encoder.container(keyedBy: AnyKey.self)
            try c.encode(p, forKey: AnyKey("dropout"))
        case .residual(let layers, let shortcut):
            var c = encoder.container(keyedBy: AnyKey.self)
            var f = c.nestedContainer(keyedBy: AnyKey.self, forKey: AnyKey("residual"))
            try f.encode(layers, forKey: AnyKey("layers"))
            try f.encodeIfPresent(shortcut, forKey: AnyKey("shortcut"))
        case .block(let name, let layers):
            var c = encoder.container(keyedBy: AnyKey.self)
            var f = c.nestedContainer(keyedBy: AnyKey.self, forKey: AnyKey("block"))
            try f.encode(name, forKey: AnyKey("name"))
            try f.encode(layers, forKey: AnyKey("layers"))
        }
    }
}

/// The job's model: a preset by name, or a list of layers.
public enum ModelChoice: Codable, Equatable, Sendable, ExpressibleByStringLiteral, CustomStringConvertible {
    case preset(String)
    case layers([LayerSpec])

    public init(stringLiteral value: String) { self = .preset(value) }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let name = try? c.decode(String.self) { self = .preset(name); return }
        guard let layers = try? c.decode([LayerSpec].self) else {
            _ = try c.decode([LayerSpec].self)  // throws the layer's own error
            throw JobSpecError.invalid("key 'model' must be a preset name or a list of layers")
        }
        self = .layers(layers)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .preset(let name): try c.encode(name)
        case .layers(let layers): try c.encode(layers)
        }
    }

    /// The preset's name, or `layers`.
    public var name: String {
        switch self {
        case .preset(let name): name
        case .layers: "layers"
        }
    }

    public var description: String {
        switch self {
        case .preset(let name): name
        case .layers(let layers): "layers [\(layers.map(\.kind).joined(separator: ", "))]"
        }
    }
}

extension AnyKey {
    init(_ name: String) { self.init(stringValue: name) }
}
