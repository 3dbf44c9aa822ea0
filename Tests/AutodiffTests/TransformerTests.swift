import Testing
@testable import Autodiff

/// The ops and modules of transformers: each backward against finite differences, the values against
/// direct formulas, and the GPT's names against nanoGPT's `state_dict`.
struct TransformerTests {
    let check = GradientTests()
    static func input(_ shape: [Int], seed: UInt64) -> Tensor { GradientTests.input(shape, seed: seed) }

    @Test func batchedMatmulOverLeadingDimensions() throws {
        let a = Self.input([2, 3, 4, 5], seed: 1), b = Self.input([2, 3, 5, 2], seed: 2)
        try check.expectGradients([a, b]) { a.matmul(b) }
        let at = Self.input([2, 3, 5, 4], seed: 3), bt = Self.input([2, 3, 2, 5], seed: 4)
        try check.expectGradients([at, bt]) { at.matmul(bt, transposeSelf: true, transposeOther: true) }
        try check.expectGradients([a, bt]) { a.matmul(bt, transposeOther: true) }
        try check.expectGradients([at, b]) { at.matmul(b, transposeSelf: true) }
        // A 2-D right side multiplies every matrix of the batch, its gradient summed over the batch.
        let w = Self.input([5, 3], seed: 5)
        try check.expectGradients([a, w]) { a.matmul(w) }
        try check.expectGradients([at, w]) { at.matmul(w, transposeSelf: true) }
        // Each matrix of the batch is its own 2-D product.
        let product = a.matmul(b)
        #expect(product.shape == [2, 3, 4, 2])
        let second = a.slice(axis: 1, 1..<2).reshaped([2, 4, 5]).slice(axis: 0, 1..<2).reshaped([4, 5])
            .matmul(b.slice(axis: 1, 1..<2).reshaped([2, 5, 2]).slice(axis: 0, 1..<2).reshaped([5, 2]))
        #expect(product.slice(axis: 0, 1..<2).slice(axis: 1, 1..<2).scalars == second.scalars)
    }

    @Test func permuteAndTransposeOfAnyRank() throws {
        let x = Self.input([2, 3, 4, 2], seed: 6)
        let p = x.permuted([0, 2, 1, 3])
        #expect(p.shape == [2, 4, 3, 2])
        #expect(p[1, 3, 2, 1] == x[1, 2, 3, 1])
        let q = x.permuted([3, 0, 2, 1])
        #expect(q[1, 1, 2, 0] == x[1, 0, 2, 1])
        try check.expectGradients([x]) { x.permuted([0, 2, 1, 3]) }
        try check.expectGradients([x]) { x.permuted([3, 1, 0, 2]) }
        try check.expectGradients([x]) { x.transposed(1, 3) }
        #expect(x.permuted([2, 0, 3, 1]).permuted([1, 3, 0, 2]).scalars == x.scalars)
        let m = Self.input([3, 4], seed: 7)
        #expect(m.transposed()[2, 1] == m[1, 2])
        try check.expectGradients([m]) { m.transposed() }
    }

    @Test func causalMaskAndSoftmaxOverTheLastAxis() throws {
        let scores = Self.input([2, 3, 4, 4], seed: 8)
        let weights = scores.causallyMasked().softmax()
        for row in 0..<4 {
            let values = (0..<4).map { weights[1, 2, row, $0] }
            #expect(abs(values.reduce(0, +) - 1) < 1e-6)
            #expect(values[(row + 1)...].allSatisfy { $0 == 0 }, "row \(row) attends to a later position: \(values)")
        }
        try check.expectGradients([scores]) { scores.causallyMasked().softmax() }
        try check.expectGradients([scores]) { scores.logSoftmax() }
        // Stable for large logits.
        let large = Tensor(shape: [1, 3], values: [1000, 999, -1000])
        #expect(large.softmax().isFinite && abs(large.softmax()[0, 0] - 0.7310586) < 1e-5, "\(large.softmax().scalars)")
    }

    @Test func fusedAttentionEqualsItsComposition() throws {
        let qkv = Self.input([2, 5, 12], seed: 13)
        try check.expectGradients([qkv]) { qkv.causalSelfAttention(heads: 2) }
        var g = SeededGenerator(seed: 4)
        let attention = CausalSelfAttention(GPTConfiguration(vocabularySize: 3, blockSize: 5, layers: 1, heads: 2, embedding: 4), generator: &g)
        let fused = qkv.causalSelfAttention(heads: 2), composed = attention.composedAttention(qkv)
        #expect(zip(fused.scalars, composed.scalars).allSatisfy { abs($0 - $1) < 1e-6 })
        try GradientTests.weightedSum(fused).backward()
        let fusedGradient = qkv.grad!.scalars
        qkv.zeroGrad()
        try GradientTests.weightedSum(composed).backward()
        #expect(zip(fusedGradient, qkv.grad!.scalars).allSatisfy { abs($0 - $1) < 1e-5 })
    }

    @Test func crossEntropyOverTimeWithAnIgnoreIndex() throws {
        let logits = Self.input([2, 3, 5], seed: 9)
        let labels: [Int32] = [1, -1, 4, 0, 2, -1]
        try check.expectGradients([logits]) { Loss.softmaxCrossEntropy(logits, labels: labels, ignoreIndex: -1) }
        // The mean over the kept rows equals the 2-D loss of just those rows.
        let kept = [0, 2, 3, 4]
        let rows = Tensor(shape: [4, 5], values: kept.flatMap { r in (0..<5).map { logits.scalars[r * 5 + $0] } })
        let expected = Loss.softmaxCrossEntropy(rows, labels: kept.map { labels[$0] }).item
        #expect(abs(Loss.softmaxCrossEntropy(logits, labels: labels, ignoreIndex: -1).item - expected) < 1e-6)
        let huge = Tensor(shape: [1, 1, 3], values: [2000, -2000, 0])
        #expect(Loss.softmaxCrossEntropy(huge, labels: [1]).item == 4000)
    }

    @Test func linearOverTimeAndScaling() throws {
        let x = Self.input([2, 3, 4], seed: 10), w = Self.input([5, 4], seed: 11), b = Self.input([5], seed: 12)
        try check.expectGradients([x, w, b]) { x.linear(weight: w, bias: b) }
        #expect(x.linear(weight: w, bias: b).scalars == x.reshaped([6, 4]).linear(weight: w, bias: b).scalars)
        try check.expectGradients([x]) { x.scaled(by: -0.7) }
        let y = Self.input([2, 3, 4], seed: 14)
        try check.expectGradients([x, y]) { x + y }  // same shapes: the residual connection's fast path
        try check.expectGradients([x]) { x + x }
    }

    static let tiny = GPTConfiguration(vocabularySize: 7, blockSize: 4, layers: 2, heads: 2, embedding: 4)

    @Test func gptParametersAreNamedAsNanoGPTsStateDict() throws {
        var g = SeededGenerator(seed: 1)
        let model = try GPT(Self.tiny, generator: &g)
        let names = model.parameters.map(\.name)
        #expect(names.prefix(14) == [
            "transformer.wte.weight", "transformer.wpe.weight",
            "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
            "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
            "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
            "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
            "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
            "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"])
        #expect(names.suffix(2) == ["transformer.ln_f.weight", "transformer.ln_f.bias"])
        #expect(names.count == 2 + 12 * 2 + 2)
        let shapes = Dictionary(uniqueKeysWithValues: model.parameters.map { ($0.name, $0.tensor.shape) })
        #expect(shapes["transformer.h.1.attn.c_attn.weight"] == [12, 4])  // PyTorch's [out, in]
        #expect(shapes["transformer.h.1.mlp.c_fc.weight"] == [16, 4])
        // nanoGPT's count: 12 C^2 + 13 C per block, V C + T C + 2 C outside.
        #expect(model.parameterCount == 2 * (12 * 16 + 13 * 4) + 7 * 4 + 4 * 4 + 2 * 4)
        #expect(throws: AutodiffError.invalidArgument("n_embd 6 is not divisible by n_head 4")) {
            try GPT(GPTConfiguration(vocabularySize: 7, blockSize: 4, layers: 1, heads: 4, embedding: 6), generator: &g)
        }
    }

    @Test func gptGradientsMatchFiniteDifferences() throws {
        var g = SeededGenerator(seed: 2)
        let model = try GPT(Self.tiny, generator: &g)
        // Larger weights than the 0.02 initialisation, so every path carries a measurable gradient.
        for p in model.parameters {
            p.tensor.withUnsafeMutableBufferPointer { b in for i in b.indices { b[i] += 0.3 * g.nextNormal() } }
        }
        let tokens: [Int32] = [1, 5, 2, 6, 0, 3, 3, 4], targets: [Int32] = [5, 2, 6, -1, 3, 3, 4, 1]
        let report = try checkGradients(of: model.parameters.map(\.tensor), epsilon: 1e-2) {
            model.loss(tokens, targets: targets, batch: 2, time: 4)
        }
        #expect(report.worstRelativeError < 2e-2, "worst \(report.worstRelativeError) in tensor \(model.parameters[report.worstTensor].name)")
    }

    @Test func attentionIsCausalAndGenerationIsSeeded() throws {
        var g = SeededGenerator(seed: 3)
        let model = try GPT(Self.tiny, generator: &g)
        // Changing a later token leaves the logits of earlier positions as they were.
        let a = model([1, 2, 3, 4], batch: 1, time: 4).scalars, b = model([1, 2, 6, 0], batch: 1, time: 4).scalars
        #expect(a[..<14] == b[..<14])
        #expect(a[14...] != b[14...])
        var first = SeededGenerator(seed: 9), second = SeededGenerator(seed: 9)
        let sampled = model.generate([1, 2], count: 10, temperature: 0.8, topK: 3, generator: &first)
        #expect(sampled.count == 12 && sampled.prefix(2) == [1, 2] && sampled.allSatisfy { $0 >= 0 && $0 < 7 })
        #expect(model.generate([1, 2], count: 10, temperature: 0.8, topK: 3, generator: &second) == sampled)
        // Temperature 0 takes the likeliest token; top-k 1 the same.
        var h = SeededGenerator(seed: 1)
        let greedy = model.generate([3], count: 3, temperature: 0, generator: &h)
        #expect(model.generate([3], count: 3, topK: 1, generator: &h) == greedy)
        #expect(GPT.sample([0.1, 3, -2], temperature: 0, topK: nil, generator: &h) == 1)
    }
}
