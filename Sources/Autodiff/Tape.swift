/// One recorded op: the tensors it read and the rule that turns the gradient of its output into
/// gradients of those inputs.
struct TapeNode {
    let inputs: [Tensor]
    let backward: (_ outputGradient: Tensor) -> Void
}

/// Whether ops record themselves on the tape.
public enum GradMode {
    @TaskLocal static var isEnabled = true

    /// Runs `body` without recording ops (evaluation, optimizer updates).
    public static func withoutGradients<R>(_ body: () throws -> R) rethrows -> R {
        try $isEnabled.withValue(false, operation: body)
    }
}

/// Errors raised by the autodiff API.
public enum AutodiffError: Error, Equatable, CustomStringConvertible {
    /// `backward()` was called on a tensor with more than one element.
    case backwardFromNonScalar(shape: [Int])
    /// `backward()` was called on a tensor that no parameter influences.
    case noGradientPath
    /// A gradient check was asked for a tensor that does not require gradients.
    case tensorDoesNotRequireGradient(index: Int, shape: [Int])
    /// A shape that does not fit what an operation or model expects.
    case shapeMismatch(operation: String, expected: String, got: [Int])
    /// A value outside its allowed range.
    case invalidArgument(String)

    public var description: String {
        switch self {
        case .backwardFromNonScalar(let shape):
            "backward() needs a scalar loss, got a tensor of shape \(shape)"
        case .noGradientPath:
            "backward(): the loss does not depend on any tensor that requires a gradient"
        case .tensorDoesNotRequireGradient(let index, let shape):
            "gradient check: tensor \(index) of shape \(shape) does not require a gradient"
        case .shapeMismatch(let operation, let expected, let got):
            "\(operation): expected shape \(expected), got \(got)"
        case .invalidArgument(let what):
            what
        }
    }
}

extension Tensor {
    /// Records `node` as the producer of this tensor when gradients are wanted.
    func record(_ inputs: [Tensor], backward: @escaping (_ outputGradient: Tensor) -> Void) {
        guard GradMode.isEnabled, inputs.contains(where: { $0.requiresGrad }) else { return }
        requiresGrad = true
        node = TapeNode(inputs: inputs, backward: backward)
    }

    /// Adds to this tensor's gradient through `body(gradient, isFresh)`. When `isFresh` is true the
    /// buffer is uninitialised and `body` must write every element instead of adding.
    func accumulateGrad(_ body: (_ gradient: UnsafeMutablePointer<Float>, _ isFresh: Bool) -> Void) {
        guard requiresGrad else { return }
        if let grad {
            body(grad.storage.pointer, false)
        } else {
            let fresh = gradientDestination ?? Tensor(uninitializedShape: shape)
            body(fresh.storage.pointer, true)
            grad = fresh
        }
    }

    /// Adds `values` (same element count) to the gradient.
    func accumulateGrad(_ values: UnsafePointer<Float>) {
        accumulateGrad { g, fresh in
            if fresh { g.update(from: values, count: count) } else { for i in 0..<count { g[i] += values[i] } }
        }
    }

    /// Back-propagates from this scalar: every tensor on its tape that requires a gradient gets
    /// `dself/dtensor` added to its `grad`. The tape is released afterwards; leaves keep their gradients.
    /// `onLeafReady`, when given, is called with each leaf (a tensor no op produced, such as a parameter)
    /// as soon as its gradient is complete, while the pass goes on: last layers first, as their gradients
    /// are, so that a caller can start sending them.
    public func backward(onLeafReady: ((Tensor) -> Void)? = nil) throws {
        guard count == 1 else { throw AutodiffError.backwardFromNonScalar(shape: shape) }
        guard requiresGrad else { throw AutodiffError.noGradientPath }
        let order = topologicalOrder()
        // How many recorded ops still have to add to each leaf's gradient.
        var pendingUses: [ObjectIdentifier: Int] = [:]
        if onLeafReady != nil {
            for tensor in order {
                for input in Set((tensor.node?.inputs ?? []).filter { $0.node == nil && $0.requiresGrad }.map(ObjectIdentifier.init)) {
                    pendingUses[input, default: 0] += 1
                }
            }
        }
        accumulateGrad { g, fresh in g[0] = fresh ? 1 : g[0] + 1 }
        if node == nil { onLeafReady?(self) }
        for tensor in order.reversed() {
            guard let node = tensor.node else { continue }
            if let gradient = tensor.grad { node.backward(gradient) }
            tensor.node = nil
            tensor.grad = nil  // an intermediate: its gradient buffer goes back to the pool
            guard let onLeafReady else { continue }
            var seen = Set<ObjectIdentifier>()
            for input in node.inputs where input.node == nil && input.requiresGrad && seen.insert(ObjectIdentifier(input)).inserted {
                pendingUses[ObjectIdentifier(input)]! -= 1
                if pendingUses[ObjectIdentifier(input)] == 0 { onLeafReady(input) }
            }
        }
    }

    /// Tensors reachable from this one through recorded ops, each after all of its inputs.
    private func topologicalOrder() -> [Tensor] {
        var order: [Tensor] = []
        var visited = Set<ObjectIdentifier>()
        var stack: [(Tensor, Bool)] = [(self, false)]
        while let (tensor, expanded) = stack.popLast() {
            if expanded { order.append(tensor); continue }
            guard visited.insert(ObjectIdentifier(tensor)).inserted else { continue }
            stack.append((tensor, true))
            for input in tensor.node?.inputs ?? [] where input.requiresGrad && !visited.contains(ObjectIdentifier(input)) {
                stack.append((input, false))
            }
        }
        return order
    }
}
