/// NumPy-style broadcasting of two shapes: dimensions are aligned from the right, and a dimension of
/// size 1 (or a missing one) stretches to the other's size.
struct Broadcast {
    let shape: [Int]
    /// Strides of each input in the output's index space (0 where the input is stretched).
    let leftStrides: [Int]
    let rightStrides: [Int]

    init?(_ left: [Int], _ right: [Int]) {
        let rank = max(left.count, right.count)
        let l = Array(repeating: 1, count: rank - left.count) + left
        let r = Array(repeating: 1, count: rank - right.count) + right
        var shape: [Int] = []
        for (a, b) in zip(l, r) {
            guard a == b || a == 1 || b == 1 else { return nil }
            shape.append(a == 1 ? b : a)
        }
        self.shape = shape
        leftStrides = Broadcast.strides(of: l, in: shape)
        rightStrides = Broadcast.strides(of: r, in: shape)
    }

    /// Row-major strides of `shape`, with 0 where `shape` has 1 and `outShape` more.
    static func strides(of shape: [Int], in outShape: [Int]) -> [Int] {
        var strides = Array(repeating: 0, count: shape.count)
        var step = 1
        for d in stride(from: shape.count - 1, through: 0, by: -1) {
            strides[d] = (shape[d] == 1 && outShape[d] != 1) ? 0 : step
            step *= shape[d]
        }
        return strides
    }

    /// Calls `body(out, left, right)` with the flat indices of every output element in order.
    func forEachIndex(_ body: (Int, Int, Int) -> Void) {
        let total = shape.reduce(1, *)
        guard total > 0 else { return }
        let rank = shape.count
        guard rank > 0 else { body(0, 0, 0); return }
        var index = Array(repeating: 0, count: rank)
        var l = 0, r = 0
        let inner = shape[rank - 1], ls = leftStrides[rank - 1], rs = rightStrides[rank - 1]
        var out = 0
        while out < total {
            for i in 0..<inner { body(out + i, l + i * ls, r + i * rs) }
            out += inner
            // advance the odometer over the outer dimensions
            var d = rank - 2
            while d >= 0 {
                index[d] += 1
                l += leftStrides[d]; r += rightStrides[d]
                if index[d] < shape[d] { break }
                l -= leftStrides[d] * shape[d]; r -= rightStrides[d] * shape[d]
                index[d] = 0
                d -= 1
            }
        }
    }
}

extension Tensor {
    /// Adds `values`, laid out in the broadcast shape `outShape`, into this tensor's gradient, summing
    /// over the dimensions along which this tensor was stretched.
    func accumulateBroadcastGrad(_ values: UnsafePointer<Float>, outShape: [Int]) {
        guard requiresGrad else { return }
        if outShape.reduce(1, *) == count { accumulateGrad(values); return }
        let padded = Array(repeating: 1, count: outShape.count - shape.count) + shape
        let plan = Broadcast(padded, outShape)!
        accumulateGrad { g, fresh in
            if fresh { g.update(repeating: 0, count: count) }
            plan.forEachIndex { out, mine, _ in g[mine] += values[out] }
        }
    }
}
