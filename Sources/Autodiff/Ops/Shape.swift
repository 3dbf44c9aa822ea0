/// Ops that move elements without arithmetic: reshape, flatten, transpose and permute, concatenation, slicing.
extension Tensor {
    /// The same elements in a new shape with the same element count; one dimension may be -1.
    public func reshaped(_ newShape: [Int]) -> Tensor {
        var resolved = newShape
        if let unknown = newShape.firstIndex(of: -1) {
            let known = newShape.filter { $0 != -1 }.reduce(1, *)
            precondition(known > 0 && count % known == 0, "reshape: \(shape) cannot become \(newShape)")
            resolved[unknown] = count / known
        }
        precondition(resolved.reduce(1, *) == count, "reshape: \(shape) has \(count) elements, \(newShape) does not")
        let out = Tensor(shape: resolved, sharing: storage)
        out.record([self]) { g in self.accumulateGrad(g.storage.pointer) }
        return out
    }

    /// Keeps the first dimension and flattens the rest: `[n, a, b, ...]` becomes `[n, a*b*...]`.
    public func flattened() -> Tensor {
        precondition(rank >= 1, "flatten: needs at least one dimension, got a scalar")
        return reshaped([shape[0], count / Swift.max(shape[0], 1)])
    }

    /// The transpose of a 2-D tensor.
    public func transposed() -> Tensor {
        precondition(rank == 2, "transpose: needs a 2-D tensor, got \(shape)")
        return permuted([1, 0])
    }

    /// This tensor with dimensions `first` and `second` swapped (a copy in the new order).
    public func transposed(_ first: Int, _ second: Int) -> Tensor {
        precondition(first >= 0 && first < rank && second >= 0 && second < rank,
                     "transpose: axes \(first) and \(second) out of range for \(shape)")
        var axes = Array(0..<rank)
        axes.swapAt(first, second)
        return permuted(axes)
    }

    /// The elements with dimensions reordered: dimension `i` of the result is dimension `axes[i]` of this
    /// tensor (PyTorch's `permute`), copied contiguous. The backward applies the inverse order.
    public func permuted(_ axes: [Int]) -> Tensor {
        precondition(axes.count == rank && axes.sorted() == Array(0..<rank),
                     "permute: \(axes) is not an order of the \(rank) dimensions of \(shape)")
        let out = Tensor(uninitializedShape: axes.map { shape[$0] })
        Tensor.permute(storage.pointer, shape: shape, axes: axes, into: out.storage.pointer, adding: false)
        out.record([self]) { g in
            var inverse = [Int](repeating: 0, count: axes.count)
            for (i, axis) in axes.enumerated() { inverse[axis] = i }
            self.accumulateGrad { dx, fresh in
                Tensor.permute(g.storage.pointer, shape: out.shape, axes: inverse, into: dx, adding: !fresh)
            }
        }
        return out
    }

    /// Writes (or adds) `src` of `shape` with its dimensions in the order `axes` into contiguous `dst`.
    /// The result's last dimension is walked innermost, with the source's stride for it.
    private static func permute(
        _ src: UnsafePointer<Float>, shape: [Int], axes: [Int], into dst: UnsafeMutablePointer<Float>, adding: Bool
    ) {
        let count = shape.reduce(1, *)
        guard count > 0 else { return }
        var strides = [Int](repeating: 1, count: shape.count)
        for d in stride(from: shape.count - 2, through: 0, by: -1) { strides[d] = strides[d + 1] * shape[d + 1] }
        let outShape = axes.map { shape[$0] }, outStrides = axes.map { strides[$0] }
        let inner = outShape.last ?? 1, innerStride = outStrides.last ?? 1
        let outer = Array(outShape.dropLast())
        var index = [Int](repeating: 0, count: outer.count)
        var source = 0
        for row in 0..<(count / inner) {
            let s = src + source, d = dst + row * inner
            if adding {
                for j in 0..<inner { d[j] += s[j * innerStride] }
            } else if innerStride == 1 {
                d.update(from: s, count: inner)
            } else {
                for j in 0..<inner { d[j] = s[j * innerStride] }
            }
            var axis = outer.count - 1  // the next row: an odometer over the outer dimensions
            while axis >= 0 {
                index[axis] += 1
                source += outStrides[axis]
                if index[axis] < outer[axis] { break }
                source -= outStrides[axis] * outer[axis]
                index[axis] = 0
                axis -= 1
            }
        }
    }

    /// Joins tensors along `axis`; all other dimensions must agree.
    public static func concat(_ tensors: [Tensor], axis: Int) -> Tensor {
        precondition(!tensors.isEmpty, "concat: no tensors")
        let first = tensors[0].shape
        precondition(axis >= 0 && axis < first.count, "concat: axis \(axis) out of range for \(first)")
        for t in tensors {
            precondition(
                t.rank == first.count && (0..<first.count).allSatisfy { $0 == axis || t.shape[$0] == first[$0] },
                "concat: shape \(t.shape) does not fit \(first) along axis \(axis)")
        }
        let outer = first[..<axis].reduce(1, *), inner = first[(axis + 1)...].reduce(1, *)
        var outShape = first
        outShape[axis] = tensors.reduce(0) { $0 + $1.shape[axis] }
        let out = Tensor(uninitializedShape: outShape)
        let rowLength = outShape[axis] * inner
        var offset = 0
        var offsets: [Int] = []
        for t in tensors {
            offsets.append(offset)
            let chunk = t.shape[axis] * inner
            for o in 0..<outer {
                (out.storage.pointer + o * rowLength + offset).update(from: t.storage.pointer + o * chunk, count: chunk)
            }
            offset += chunk
        }
        out.record(tensors) { g in
            for (t, start) in zip(tensors, offsets) {
                let chunk = t.shape[axis] * inner
                t.accumulateGrad { dt, fresh in
                    for o in 0..<outer {
                        let src = g.storage.pointer + o * rowLength + start, dst = dt + o * chunk
                        if fresh { dst.update(from: src, count: chunk) } else { for i in 0..<chunk { dst[i] += src[i] } }
                    }
                }
            }
        }
        return out
    }

    /// The elements whose index along `axis` lies in `range`.
    public func slice(axis: Int, _ range: Range<Int>) -> Tensor {
        precondition(axis >= 0 && axis < rank, "slice: axis \(axis) out of range for \(shape)")
        precondition(
            range.lowerBound >= 0 && range.upperBound <= shape[axis],
            "slice: range \(range) out of bounds for dimension \(axis) of \(shape)")
        let outer = shape[..<axis].reduce(1, *), inner = shape[(axis + 1)...].reduce(1, *)
        var outShape = shape
        outShape[axis] = range.count
        let out = Tensor(uninitializedShape: outShape)
        let chunk = range.count * inner, rowLength = shape[axis] * inner, start = range.lowerBound * inner
        for o in 0..<outer {
            (out.storage.pointer + o * chunk).update(from: storage.pointer + o * rowLength + start, count: chunk)
        }
        out.record([self]) { g in
            self.accumulateGrad { dx, fresh in
                if fresh { dx.update(repeating: 0, count: self.count) }
                for o in 0..<outer {
                    let src = g.storage.pointer + o * chunk, dst = dx + o * rowLength + start
                    for i in 0..<chunk { dst[i] += src[i] }
                }
            }
        }
        return out
    }
}
