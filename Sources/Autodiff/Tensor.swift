/// A float32 tensor: contiguous row-major storage and a shape, plus what reverse-mode autodiff needs
/// (whether it requires a gradient, its gradient, and the tape node that produced it).
///
/// Tensors are reference types: an optimizer updates a parameter in place and every holder sees it.
public final class Tensor {
    /// The size of each dimension, outermost first. A scalar has shape `[]`.
    public let shape: [Int]
    /// The number of elements (the product of `shape`).
    public let count: Int
    private(set) var storage: TensorStorage
    /// Whether `backward()` fills `grad` for this tensor.
    public var requiresGrad: Bool
    /// The accumulated gradient of the last `backward()` calls, `nil` after `zeroGrad()`.
    public var grad: Tensor?
    /// The tensor a fresh gradient is written into (it becomes `grad`), so that it lands where another
    /// reader wants it; nil: a new buffer. Must have this tensor's element count.
    public var gradientDestination: Tensor? {
        didSet { precondition(gradientDestination.map { $0.count == count } ?? true, "Tensor: gradient destination of another size") }
    }
    /// How this tensor was computed, when it was computed by an op from tensors that require gradients.
    var node: TapeNode?

    /// An uninitialised tensor (contents unspecified); ops fill it.
    init(uninitializedShape shape: [Int], requiresGrad: Bool = false) {
        precondition(shape.allSatisfy { $0 >= 0 }, "Tensor: negative dimension in shape \(shape)")
        self.shape = shape
        count = shape.reduce(1, *)
        storage = TensorStorage(count: count)
        self.requiresGrad = requiresGrad
    }

    /// A tensor that shares `storage` (a reshape).
    init(shape: [Int], sharing storage: TensorStorage) {
        self.shape = shape
        count = shape.reduce(1, *)
        precondition(count == storage.count)
        self.storage = storage
        requiresGrad = false
    }

    /// A tensor over `memory` (at least `shape`'s element count of floats) that `owner` keeps alive, for
    /// example a region of a shared-memory segment. The contents are what the memory holds.
    public init(shape: [Int], external memory: UnsafeMutableRawBufferPointer, owner: AnyObject) {
        self.shape = shape
        count = shape.reduce(1, *)
        precondition(memory.count >= count * 4 && Int(bitPattern: memory.baseAddress) % 4 == 0, "Tensor: external memory too small or misaligned")
        storage = TensorStorage(external: memory.baseAddress!.assumingMemoryBound(to: Float.self), count: count, owner: owner)
        requiresGrad = false
    }

    /// Moves this tensor's values into `memory` (as for `init(shape:external:owner:)`) and keeps them
    /// there from now on: for a parameter that another process should read or write in place. With
    /// `keepingValues` false the tensor takes the values `memory` already holds (another process wrote them).
    public func relocate(to memory: UnsafeMutableRawBufferPointer, owner: AnyObject, keepingValues: Bool = true) {
        precondition(memory.count >= count * 4 && Int(bitPattern: memory.baseAddress) % 4 == 0, "Tensor: external memory too small or misaligned")
        let moved = TensorStorage(external: memory.baseAddress!.assumingMemoryBound(to: Float.self), count: count, owner: owner)
        if keepingValues && moved.pointer != storage.pointer { moved.pointer.update(from: storage.pointer, count: count) }
        storage = moved
    }

    /// A tensor holding `values` in row-major order.
    public convenience init(shape: [Int], values: [Float], requiresGrad: Bool = false) {
        self.init(uninitializedShape: shape, requiresGrad: requiresGrad)
        precondition(values.count == count, "Tensor: \(values.count) values do not fill shape \(shape)")
        values.withUnsafeBufferPointer { storage.pointer.update(from: $0.baseAddress!, count: count) }
    }

    /// A tensor with every element equal to `value`.
    public convenience init(shape: [Int], repeating value: Float, requiresGrad: Bool = false) {
        self.init(uninitializedShape: shape, requiresGrad: requiresGrad)
        storage.pointer.update(repeating: value, count: count)
    }

    /// A scalar (shape `[]`).
    public convenience init(_ scalar: Float, requiresGrad: Bool = false) {
        self.init(shape: [], repeating: scalar, requiresGrad: requiresGrad)
    }

    /// All zeros.
    public static func zeros(_ shape: [Int], requiresGrad: Bool = false) -> Tensor {
        Tensor(shape: shape, repeating: 0, requiresGrad: requiresGrad)
    }

    /// All ones.
    public static func ones(_ shape: [Int], requiresGrad: Bool = false) -> Tensor {
        Tensor(shape: shape, repeating: 1, requiresGrad: requiresGrad)
    }

    /// Samples of a normal distribution with the given mean and standard deviation.
    public static func randomNormal(
        _ shape: [Int], mean: Float = 0, standardDeviation: Float = 1,
        generator: inout SeededGenerator, requiresGrad: Bool = false
    ) -> Tensor {
        let t = Tensor(uninitializedShape: shape, requiresGrad: requiresGrad)
        for i in 0..<t.count { t.storage.pointer[i] = mean + standardDeviation * generator.nextNormal() }
        return t
    }

    /// Samples of a uniform distribution on `[low, high)`.
    public static func randomUniform(
        _ shape: [Int], low: Float = 0, high: Float = 1,
        generator: inout SeededGenerator, requiresGrad: Bool = false
    ) -> Tensor {
        let t = Tensor(uninitializedShape: shape, requiresGrad: requiresGrad)
        for i in 0..<t.count { t.storage.pointer[i] = low + (high - low) * generator.nextUnit() }
        return t
    }

    /// Glorot (Xavier) uniform initialisation for a weight with the given fan-in and fan-out.
    public static func glorotUniform(
        _ shape: [Int], fanIn: Int, fanOut: Int, generator: inout SeededGenerator
    ) -> Tensor {
        let limit = (6 / Float(fanIn + fanOut)).squareRoot()
        return randomUniform(shape, low: -limit, high: limit, generator: &generator, requiresGrad: true)
    }

    /// He (Kaiming) normal initialisation for a weight followed by a ReLU.
    public static func heNormal(_ shape: [Int], fanIn: Int, generator: inout SeededGenerator) -> Tensor {
        randomNormal(
            shape, standardDeviation: (2 / Float(fanIn)).squareRoot(), generator: &generator, requiresGrad: true)
    }

    /// The elements in row-major order.
    public var scalars: [Float] { Array(UnsafeBufferPointer(start: storage.pointer, count: count)) }

    /// Whether every element is a finite number (no NaN, no infinity).
    public var isFinite: Bool { UnsafeBufferPointer(start: storage.pointer, count: count).allSatisfy(\.isFinite) }

    /// The single element of a one-element tensor.
    public var item: Float {
        precondition(count == 1, "item: tensor of shape \(shape) has \(count) elements, not 1")
        return storage.pointer[0]
    }

    /// The number of dimensions.
    public var rank: Int { shape.count }

    /// The element at a multi-dimensional index.
    public subscript(_ index: Int...) -> Float {
        get { storage.pointer[flatIndex(index)] }
        set { storage.pointer[flatIndex(index)] = newValue }
    }

    private func flatIndex(_ index: [Int]) -> Int {
        precondition(index.count == shape.count, "index \(index) does not match shape \(shape)")
        var flat = 0
        for (i, dim) in zip(index, shape) {
            precondition(i >= 0 && i < dim, "index \(index) out of range for shape \(shape)")
            flat = flat * dim + i
        }
        return flat
    }

    /// Reads the elements through a pointer that must not escape `body`.
    public func withUnsafeBufferPointer<R>(_ body: (UnsafeBufferPointer<Float>) throws -> R) rethrows -> R {
        try body(UnsafeBufferPointer(start: storage.pointer, count: count))
    }

    /// Writes the elements in place through a pointer that must not escape `body`. Used by
    /// optimizers and the runtime to update parameters without allocating.
    public func withUnsafeMutableBufferPointer<R>(
        _ body: (UnsafeMutableBufferPointer<Float>) throws -> R
    ) rethrows -> R {
        try body(UnsafeMutableBufferPointer(start: storage.pointer, count: count))
    }

    /// Replaces the elements with those of `other` (same element count), in place.
    public func assign(_ other: Tensor) {
        precondition(other.count == count, "assign: shape \(other.shape) into \(shape)")
        storage.pointer.update(from: other.storage.pointer, count: count)
    }

    /// A tensor with the same values that is not on the tape.
    public func detached() -> Tensor {
        let t = Tensor(uninitializedShape: shape)
        t.storage.pointer.update(from: storage.pointer, count: count)
        return t
    }

    /// Forgets the gradient (the next `backward()` starts from zero).
    public func zeroGrad() { grad = nil }
}

extension Tensor: CustomStringConvertible {
    public var description: String {
        let shown = scalars.prefix(8).map { "\($0)" }.joined(separator: ", ")
        return "Tensor(shape: \(shape), [\(shown)\(count > 8 ? ", ..." : "")])"
    }
}
