/// Sums and maxima over all elements or one axis.
extension Tensor {
    /// The sum of all elements, as a scalar.
    public func sum() -> Tensor {
        var total: Double = 0
        for i in 0..<count { total += Double(storage.pointer[i]) }
        let out = Tensor(Float(total))
        out.record([self]) { g in
            let s = g.storage.pointer[0]
            self.accumulateGrad { dx, fresh in
                if fresh { dx.update(repeating: s, count: self.count) } else { for i in 0..<self.count { dx[i] += s } }
            }
        }
        return out
    }

    /// The mean of all elements, as a scalar.
    public func mean() -> Tensor { sum() * (1 / Float(Swift.max(count, 1))) }

    /// Splits the shape around `axis` into (outer, length, inner) element counts.
    private func around(_ axis: Int, _ op: String) -> (outer: Int, length: Int, inner: Int) {
        precondition(axis >= 0 && axis < rank, "\(op): axis \(axis) out of range for shape \(shape)")
        return (shape[..<axis].reduce(1, *), shape[axis], shape[(axis + 1)...].reduce(1, *))
    }

    private func reducedShape(_ axis: Int, keepingDimension: Bool) -> [Int] {
        var s = shape
        if keepingDimension { s[axis] = 1 } else { s.remove(at: axis) }
        return s
    }

    /// Sums along `axis`; the axis is kept with size 1 when `keepingDimension`.
    public func sum(axis: Int, keepingDimension: Bool = false) -> Tensor {
        let (outer, length, inner) = around(axis, "sum")
        let out = Tensor(shape: reducedShape(axis, keepingDimension: keepingDimension), repeating: 0)
        let x = storage.pointer, y = out.storage.pointer
        for o in 0..<outer {
            for l in 0..<length {
                let row = x + (o * length + l) * inner, dst = y + o * inner
                for i in 0..<inner { dst[i] += row[i] }
            }
        }
        out.record([self]) { g in
            let gp = g.storage.pointer
            self.accumulateGrad { dx, fresh in
                for o in 0..<outer {
                    for l in 0..<length {
                        let dst = dx + (o * length + l) * inner, src = gp + o * inner
                        for i in 0..<inner { dst[i] = (fresh ? 0 : dst[i]) + src[i] }
                    }
                }
            }
        }
        return out
    }

    /// The mean along `axis`.
    public func mean(axis: Int, keepingDimension: Bool = false) -> Tensor {
        sum(axis: axis, keepingDimension: keepingDimension) * (1 / Float(Swift.max(shape[axis], 1)))
    }

    /// The maximum along `axis`; the gradient flows to the (first) maximal element.
    public func max(axis: Int, keepingDimension: Bool = false) -> Tensor {
        let (outer, length, inner) = around(axis, "max")
        precondition(length > 0, "max: axis \(axis) of shape \(shape) is empty")
        let out = Tensor(uninitializedShape: reducedShape(axis, keepingDimension: keepingDimension))
        var winners = [Int](repeating: 0, count: outer * inner)
        let x = storage.pointer, y = out.storage.pointer
        for o in 0..<outer {
            for i in 0..<inner {
                var best = o * length * inner + i
                for l in 1..<length {
                    let j = (o * length + l) * inner + i
                    if x[j] > x[best] { best = j }
                }
                winners[o * inner + i] = best
                y[o * inner + i] = x[best]
            }
        }
        out.record([self]) { g in
            let gp = g.storage.pointer
            self.accumulateGrad { dx, fresh in
                if fresh { dx.update(repeating: 0, count: self.count) }
                for (k, j) in winners.enumerated() { dx[j] += gp[k] }
            }
        }
        return out
    }
}
