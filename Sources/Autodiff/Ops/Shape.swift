/// Ops that move elements without arithmetic: reshape, flatten, transpose, concatenation, slicing.
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
        let rows = shape[0], cols = shape[1]
        let out = Tensor(uninitializedShape: [cols, rows])
        Tensor.transpose(storage.pointer, rows: rows, cols: cols, into: out.storage.pointer, adding: false)
        out.record([self]) { g in
            self.accumulateGrad { dx, fresh in
                Tensor.transpose(g.storage.pointer, rows: cols, cols: rows, into: dx, adding: !fresh)
            }
        }
        return out
    }

    private static func transpose(
        _ src: UnsafePointer<Float>, rows: Int, cols: Int, into dst: UnsafeMutablePointer<Float>, adding: Bool
    ) {
        for r in 0..<rows {
            for c in 0..<cols {
                if adding { dst[c * rows + r] += src[r * cols + c] } else { dst[c * rows + r] = src[r * cols + c] }
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
