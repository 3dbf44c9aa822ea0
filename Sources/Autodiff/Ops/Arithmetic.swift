/// Element-wise add, subtract, multiply and divide with NumPy-style broadcasting. Gradients are
/// summed back to each input's shape.
extension Tensor {
    /// The broadcasting binary op behind `+ - * /`: `forward(a, b)` gives an element, and
    /// `backward(g, a, b)` gives that element's contributions to the gradients of `a` and `b`.
    static func broadcasting(
        _ name: String, _ a: Tensor, _ b: Tensor,
        forward: (Float, Float) -> Float,
        backward: @escaping (_ g: Float, _ a: Float, _ b: Float) -> (Float, Float)
    ) -> Tensor {
        guard let plan = Broadcast(a.shape, b.shape) else {
            preconditionFailure("\(name): shapes \(a.shape) and \(b.shape) do not broadcast")
        }
        let out = Tensor(uninitializedShape: plan.shape)
        let o = out.storage.pointer, x = a.storage.pointer, y = b.storage.pointer
        if a.count == out.count && b.count == out.count {
            for i in 0..<out.count { o[i] = forward(x[i], y[i]) }
        } else if b.count == 1 && a.count == out.count {
            let s = y[0]
            for i in 0..<out.count { o[i] = forward(x[i], s) }
        } else {
            plan.forEachIndex { i, l, r in o[i] = forward(x[l], y[r]) }
        }
        out.record([a, b]) { g in
            let gp = g.storage.pointer, x = a.storage.pointer, y = b.storage.pointer
            let n = plan.shape.reduce(1, *)
            let ga = BufferPool.shared.take(n), gb = BufferPool.shared.take(n)
            defer { BufferPool.shared.give(ga, count: n); BufferPool.shared.give(gb, count: n) }
            plan.forEachIndex { i, l, r in (ga[i], gb[i]) = backward(gp[i], x[l], y[r]) }
            a.accumulateBroadcastGrad(ga, outShape: plan.shape)
            b.accumulateBroadcastGrad(gb, outShape: plan.shape)
        }
        return out
    }

    /// Element-wise sum with broadcasting.
    public static func + (a: Tensor, b: Tensor) -> Tensor {
        guard a.shape == b.shape else { return broadcasting("add", a, b, forward: +) { g, _, _ in (g, g) } }
        let out = Tensor(uninitializedShape: a.shape)  // a residual connection: the gradient passes to both as it is
        let o = out.storage.pointer, x = a.storage.pointer, y = b.storage.pointer
        for i in 0..<out.count { o[i] = x[i] + y[i] }
        out.record([a, b]) { g in
            a.accumulateGrad(g.storage.pointer)
            b.accumulateGrad(g.storage.pointer)
        }
        return out
    }

    /// Element-wise difference with broadcasting.
    public static func - (a: Tensor, b: Tensor) -> Tensor {
        broadcasting("subtract", a, b, forward: -) { g, _, _ in (g, -g) }
    }

    /// Element-wise product with broadcasting.
    public static func * (a: Tensor, b: Tensor) -> Tensor {
        broadcasting("multiply", a, b, forward: *) { g, x, y in (g * y, g * x) }
    }

    /// Element-wise quotient with broadcasting.
    public static func / (a: Tensor, b: Tensor) -> Tensor {
        broadcasting("divide", a, b, forward: /) { g, x, y in (g / y, -g * x / (y * y)) }
    }

    public static func + (a: Tensor, b: Float) -> Tensor { a + Tensor(b) }
    public static func - (a: Tensor, b: Float) -> Tensor { a - Tensor(b) }
    public static func * (a: Tensor, b: Float) -> Tensor { a * Tensor(b) }
    public static func / (a: Tensor, b: Float) -> Tensor { a / Tensor(b) }
    public static func + (a: Float, b: Tensor) -> Tensor { Tensor(a) + b }
    public static func - (a: Float, b: Tensor) -> Tensor { Tensor(a) - b }
    public static func * (a: Float, b: Tensor) -> Tensor { Tensor(a) * b }
    public static func / (a: Float, b: Tensor) -> Tensor { Tensor(a) / b }
}
