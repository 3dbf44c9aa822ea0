/// Row lookup in a table: the forward of `Embedding` (gather; its backward scatter-adds).
extension Tensor {
    /// Rows `indices` of this `[rows, width]` table, as a tensor of shape `shape + [width]` (`shape`'s
    /// element count must equal `indices.count`). Every index must lie in `0..<rows`.
    public func gatherRows(_ indices: [Int32], shape: [Int]) -> Tensor {
        precondition(rank == 2, "embedding: the table must be [rows, width], got \(self.shape)")
        precondition(shape.reduce(1, *) == indices.count, "embedding: \(indices.count) indices do not fill shape \(shape)")
        let rows = self.shape[0], width = self.shape[1]
        if let bad = indices.first(where: { $0 < 0 || Int($0) >= rows }) {
            preconditionFailure("embedding: index \(bad) outside the table's \(rows) rows")
        }
        let out = Tensor(uninitializedShape: shape + [width])
        let table = storage.pointer, y = out.storage.pointer
        for (position, index) in indices.enumerated() {
            (y + position * width).update(from: table + Int(index) * width, count: width)
        }
        out.record([self]) { g in
            let gp = g.storage.pointer
            self.accumulateGrad { dw, fresh in
                if fresh { dw.update(repeating: 0, count: rows * width) }
                for (position, index) in indices.enumerated() {
                    let dst = dw + Int(index) * width, src = gp + position * width
                    for i in 0..<width { dst[i] += src[i] }
                }
            }
        }
        return out
    }
}
