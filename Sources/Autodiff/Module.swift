/// A named tensor of a model; names are stable dotted paths (`blocks.0.conv.weight`, as PyTorch's
/// `state_dict` gives them) because the wire and checkpoints identify tensors by them.
public struct NamedParameter {
    public let name: String
    public let tensor: Tensor
    public init(name: String, tensor: Tensor) {
        self.name = name
        self.tensor = tensor
    }
}

/// Marks a stored tensor of a module as a buffer: state the model keeps but does not train (batch
/// norm's running statistics). Buffers are saved with the parameters; in a data-parallel job the
/// coordinator sets each to the sample-weighted mean of the workers' values after every step.
@propertyWrapper
public struct Buffer {
    public var wrappedValue: Tensor
    public init(wrappedValue: Tensor) { self.wrappedValue = wrappedValue }
}

/// A model or a part of one. Subclasses declare their parameters (`Tensor`), buffers (`@Buffer`) and
/// sub-modules (a `Module`, optional, in arrays, nested) as stored properties; they are found by
/// reflection once, on first use, and named by their property path (arrays by index). A tensor or
/// module reached twice (tied weights) keeps its first name. The structure must not change afterwards.
///
/// ```swift
/// final class TwoLayers: Module, Layer {
///     let hidden: Linear, output: Linear
///     init(generator: inout SeededGenerator) {
///         hidden = Linear(inputs: 64, outputs: 32, generator: &generator)
///         output = Linear(inputs: 32, outputs: 10, generator: &generator)
///     }
///     func callAsFunction(_ x: Tensor) -> Tensor { output(hidden(x).relu()) }
/// }
/// ```
open class Module {
    /// Whether the module is in training mode (dropout active, batch norm on batch statistics).
    public final private(set) var isTraining = true
    private var found: Structure?

    public init() {}

    /// The properties reflection walks, named. Override only to name sub-modules otherwise (as
    /// `Sequential` names its layers `0`, `1`, ...).
    open var reflectedProperties: [(name: String, value: Any)] {
        var properties: [(name: String, value: Any)] = []
        var mirror: Mirror? = Mirror(reflecting: self)
        var levels: [[(name: String, value: Any)]] = []
        while let m = mirror, m.subjectType != Module.self {
            levels.append(m.children.compactMap { child in child.label.map { (Self.propertyName($0), child.value) } })
            mirror = m.superclassMirror
        }
        for level in levels.reversed() { properties += level }  // a superclass's properties come first
        return properties
    }

    /// The trained tensors, in declaration order.
    public final var parameters: [NamedParameter] { structure.parameters }
    /// The untrained state tensors (`@Buffer`), in declaration order.
    public final var buffers: [NamedParameter] { structure.buffers }
    /// This module (named "") and every sub-module, by path.
    public final var modules: [(name: String, module: Module)] { structure.modules }

    /// Switches this module and every sub-module between training and evaluation.
    public final func setTraining(_ training: Bool) {
        for (_, module) in structure.modules { module.isTraining = training }
    }

    /// Forgets every parameter's gradient.
    public final func zeroGrad() { for p in parameters { p.tensor.zeroGrad() } }

    /// The total number of parameter elements.
    public final var parameterCount: Int { parameters.reduce(0) { $0 + $1.tensor.count } }

    /// Throws when the model cannot be trained: no parameters, or a name used by two tensors.
    public final func checkStructure() throws {
        if let problem = structure.problems.first { throw AutodiffError.invalidArgument(problem) }
        guard !parameters.isEmpty else {
            throw AutodiffError.invalidArgument("the model \(type(of: self)) has no parameters (no stored Tensor properties were found)")
        }
    }

    private var structure: Structure {
        if let found { return found }
        var structure = Structure()
        structure.visit(self, path: "")
        found = structure
        return structure
    }

    /// `_name` of a property wrapper and `$__lazy_storage_$_name` of a lazy property are `name`.
    private static func propertyName(_ label: String) -> String {
        if label.hasPrefix("$__lazy_storage_$_") { return String(label.dropFirst("$__lazy_storage_$_".count)) }
        return label.hasPrefix("_") ? String(label.dropFirst()) : label
    }

    /// What reflection found, walked once.
    private struct Structure {
        var parameters: [NamedParameter] = []
        var buffers: [NamedParameter] = []
        var modules: [(name: String, module: Module)] = []
        var problems: [String] = []
        var seen = Set<ObjectIdentifier>()
        var names: [String: String] = [:]

        mutating func visit(_ value: Any, path: String) {
            switch value {
            case let tensor as Tensor:
                guard claim(tensor, path) else { return }
                tensor.requiresGrad = true
                parameters.append(NamedParameter(name: path, tensor: tensor))
            case let buffer as Buffer:
                guard claim(buffer.wrappedValue, path) else { return }
                buffers.append(NamedParameter(name: path, tensor: buffer.wrappedValue))
            case let module as Module:
                guard claim(module, path) else { return }
                modules.append((path, module))
                for (name, child) in module.reflectedProperties { visit(child, path: path.isEmpty ? name : "\(path).\(name)") }
            default:
                let mirror = Mirror(reflecting: value)
                switch mirror.displayStyle {
                case .optional: if let wrapped = mirror.children.first { visit(wrapped.value, path: path) }
                case .collection:
                    for (index, element) in mirror.children.enumerated() { visit(element.value, path: "\(path).\(index)") }
                default: break  // numbers, generators, closures: not part of the model's state
                }
            }
        }

        /// Whether `object` is new (a tied tensor or shared module keeps its first name); a name used
        /// twice is a problem.
        private mutating func claim(_ object: AnyObject, _ path: String) -> Bool {
            guard seen.insert(ObjectIdentifier(object)).inserted else { return false }
            if let kind = names[path], !path.isEmpty {
                problems.append("the name '\(path)' is used twice in the model (by a \(kind) and a \(type(of: object)))")
            }
            names[path] = "\(type(of: object))"
            return true
        }
    }
}

/// A module that maps one tensor to one: what `Sequential` chains.
public protocol Layer: Module {
    /// Applies the layer to a batch.
    func callAsFunction(_ input: Tensor) -> Tensor
}
