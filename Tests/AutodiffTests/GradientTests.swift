import Foundation
import Testing
@testable import Autodiff

/// Every primitive's backward against central finite differences.
struct GradientTests {
    /// A tensor requiring gradients, with values kept away from 0 (so kinks such as relu's are not
    /// straddled by the finite difference).
    static func input(_ shape: [Int], seed: UInt64, positive: Bool = false) -> Tensor {
        var g = SeededGenerator(seed: seed)
        let t = Tensor.randomUniform(shape, low: 0.2, high: 1.5, generator: &g, requiresGrad: true)
        if !positive {
            t.withUnsafeMutableBufferPointer { b in for i in b.indices where g.nextUnit() < 0.5 { b[i] = -b[i] } }
        }
        return t
    }

    /// Reduces `y` to a scalar with fixed, uneven weights so every element's gradient differs.
    static func weightedSum(_ y: Tensor) -> Tensor {
        let w = Tensor(shape: y.shape, values: (0..<y.count).map { Float($0 % 7) * 0.3 - 0.8 })
        return (y * w).sum()
    }

    func expectGradients(_ tensors: [Tensor], tolerance: Float = 1e-2, _ f: @escaping () -> Tensor) throws {
        let report = try checkGradients(of: tensors) { Self.weightedSum(f()) }
        #expect(report.worstRelativeError < tolerance,
                "worst relative error \(report.worstRelativeError): analytic \(report.analytic), numeric \(report.numeric)")
        #expect(report.elementsChecked == tensors.reduce(0) { $0 + $1.count })
    }

    @Test func addSubtractMultiplyDivideWithBroadcasting() throws {
        let a = Self.input([3, 4], seed: 1), b = Self.input([4], seed: 2), c = Self.input([3, 1], seed: 3)
        try expectGradients([a, b]) { a + b }
        try expectGradients([a, c]) { a - c }
        try expectGradients([a, b]) { a * b }
        try expectGradients([a, c]) { a / c }
        try expectGradients([b, c]) { c * b }  // both stretched: [3,1] x [4] -> [3,4]
        let s = Self.input([], seed: 4)
        try expectGradients([a, s]) { a * s + s }
    }

    @Test func unaryFunctions() throws {
        let x = Self.input([2, 5], seed: 5), p = Self.input([2, 5], seed: 6, positive: true)
        try expectGradients([x]) { -x }
        try expectGradients([x]) { x.exp() }
        try expectGradients([p]) { p.log() }
        try expectGradients([p]) { p.sqrt() }
        try expectGradients([p]) { p.pow(2.5) }
        try expectGradients([x]) { x.squared() }
        try expectGradients([x]) { x.relu() }
        try expectGradients([x]) { x.leakyRelu(slope: 0.1) }
        try expectGradients([x]) { x.sigmoid() }
        try expectGradients([x]) { x.tanh() }
        try expectGradients([x]) { x.gelu() }
        try expectGradients([x]) { x.geluTanh() }
        // The tanh form stays within 1e-3 of the exact one (PyTorch: max difference about 4.7e-4).
        let grid = Tensor(shape: [81], values: (0..<81).map { Float($0 - 40) / 10 })
        #expect(zip(grid.gelu().scalars, grid.geluTanh().scalars).allSatisfy { abs($0 - $1) < 1e-3 })
        // The vectorised exact form against erf in double precision, tails included (an odd count: the
        // elements after the last whole vector too).
        let wide = Tensor(shape: [2001], values: (0..<2001).map { Float($0 - 1000) / 50 })
        for (v, y) in zip(wide.scalars, wide.gelu().scalars) {
            let exact = 0.5 * Double(v) * (1 + erf(Double(v) / 2.0.squareRoot()))
            #expect(abs(Double(y) - exact) <= 5e-7 * max(1, abs(exact)), "gelu(\(v)) = \(y), exact \(exact)")
        }
    }

    @Test func matmulWithEveryTransposeCombination() throws {
        let a = Self.input([3, 4], seed: 7), b = Self.input([4, 2], seed: 8)
        let at = Self.input([4, 3], seed: 9), bt = Self.input([2, 4], seed: 10)
        try expectGradients([a, b]) { a.matmul(b) }
        try expectGradients([at, b]) { at.matmul(b, transposeSelf: true) }
        try expectGradients([a, bt]) { a.matmul(bt, transposeOther: true) }
        try expectGradients([at, bt]) { at.matmul(bt, transposeSelf: true, transposeOther: true) }
    }

    @Test func linearMatchesMatmulPlusBias() throws {
        let x = Self.input([5, 3], seed: 11), w = Self.input([4, 3], seed: 12), b = Self.input([4], seed: 13)
        try expectGradients([x, w, b]) { x.linear(weight: w, bias: b) }
        let fused = x.linear(weight: w, bias: b).scalars
        let composed = (x.matmul(w, transposeOther: true) + b).scalars
        for (f, c) in zip(fused, composed) { #expect(abs(f - c) < 1e-5) }
    }

    @Test func shapeOps() throws {
        let x = Self.input([2, 3, 4], seed: 14), y = Self.input([2, 2, 4], seed: 15), m = Self.input([3, 5], seed: 16)
        try expectGradients([x]) { x.reshaped([6, 4]) }
        try expectGradients([x]) { x.flattened() }
        try expectGradients([m]) { m.transposed() }
        try expectGradients([x, y]) { Tensor.concat([x, y], axis: 1) }
        try expectGradients([x]) { x.slice(axis: 2, 1..<3) }
    }

    @Test func reductions() throws {
        let x = Self.input([3, 4, 2], seed: 17)
        try expectGradients([x]) { x.sum() }
        try expectGradients([x]) { x.mean() }
        try expectGradients([x]) { x.sum(axis: 1) }
        try expectGradients([x]) { x.mean(axis: 0, keepingDimension: true) }
        try expectGradients([x]) { x.max(axis: 2) }
    }

    @Test func softmaxAndLogSoftmax() throws {
        let x = Self.input([3, 5], seed: 18)
        try expectGradients([x]) { x.softmax() }
        try expectGradients([x]) { x.logSoftmax() }
    }

    @Test func convolutionAndPooling() throws {
        let x = Self.input([2, 2, 5, 5], seed: 19), w = Self.input([3, 2, 3, 3], seed: 20), b = Self.input([3], seed: 21)
        try expectGradients([x, w, b]) { x.conv2d(weight: w, bias: b, stride: 1, padding: 1) }
        try expectGradients([x, w]) { x.conv2d(weight: w, bias: nil, stride: 2, padding: 0) }
        let p = Tensor(shape: [1, 2, 4, 4], values: (0..<32).map { Float(($0 * 7) % 32) * 0.1 }, requiresGrad: true)
        try expectGradients([p]) { p.maxPool2d(size: 2) }
    }

    @Test func dropoutIsSeededAndDifferentiable() throws {
        let x = Self.input([4, 6], seed: 22)
        try expectGradients([x]) {
            var g = SeededGenerator(seed: 99)  // the same mask on every evaluation
            return x.dropout(0.5, generator: &g)
        }
        var g1 = SeededGenerator(seed: 5), g2 = SeededGenerator(seed: 5)
        #expect(x.dropout(0.3, generator: &g1).scalars == x.dropout(0.3, generator: &g2).scalars)
    }

    @Test func losses() throws {
        let logits = Self.input([4, 3], seed: 23), target = Self.input([4, 3], seed: 24)
        let labels: [Int32] = [0, 2, 1, 2]
        try expectGradients([logits]) { Loss.softmaxCrossEntropy(logits, labels: labels) }
        try expectGradients([logits, target]) { Loss.meanSquaredError(logits, target) }
        let probabilities = Tensor(shape: [4, 3], values: (0..<12).map { Float($0) / 12 }, requiresGrad: true)
        try expectGradients([logits, probabilities]) { Loss.binaryCrossEntropyWithLogits(logits, probabilities) }
    }

    @Test func crossEntropyEqualsComposedLogSoftmax() {
        let logits = Self.input([4, 3], seed: 25)
        let labels: [Int32] = [1, 0, 2, 2]
        let fused = Loss.softmaxCrossEntropy(logits, labels: labels).item
        let logp = logits.logSoftmax().scalars
        let composed = -labels.enumerated().map { logp[$0.offset * 3 + Int($0.element)] }.reduce(0, +) / 4
        #expect(abs(fused - composed) < 1e-5)
    }

    @Test func gradientsAccumulateAcrossBackwardCalls() throws {
        let x = Self.input([3], seed: 26)
        try (x * x).sum().backward()
        let once = x.grad!.scalars
        try (x * x).sum().backward()
        #expect(x.grad!.scalars == once.map { $0 * 2 })
        x.zeroGrad()
        #expect(x.grad == nil)
    }

    @Test func gradientsLandInTheirDestinationAndParametersMoveToOtherMemory() throws {
        final class Memory { let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 64); deinit { bytes.deallocate() } }
        let x = Self.input([3], seed: 31), w = Self.input([3], seed: 32)
        let expected = try { try (x * w).sum().backward(); defer { w.zeroGrad(); x.zeroGrad() }; return w.grad!.scalars }()

        // A parameter moved into outside memory keeps its values and is read from there by later ops.
        let values = Memory(), gradient = Memory()
        let before = w.scalars
        w.relocate(to: values.bytes, owner: values)
        #expect(w.scalars == before && Array(values.bytes.bindMemory(to: Float.self).prefix(3)) == before)
        // Its fresh gradient is written into the destination, which becomes `grad`; a second backward adds to it.
        let destination = Tensor(shape: [3], external: gradient.bytes, owner: gradient)
        w.gradientDestination = destination
        try (x * w).sum().backward()
        #expect(w.grad === destination && Array(gradient.bytes.bindMemory(to: Float.self).prefix(3)) == expected)
        try (x * w).sum().backward()
        #expect(destination.scalars == expected.map { 2 * $0 })
        values.bytes.bindMemory(to: Float.self)[0] = 42  // written by another party, seen by the tensor
        #expect(w.scalars[0] == 42)
    }

    @Test func leavesAreReportedOnceWithTheirFinishedGradientLastLayerFirst() throws {
        var g = SeededGenerator(seed: 28)
        let model = Sequential([Linear(inputs: 5, outputs: 6, generator: &g), Activation(.tanh), Linear(inputs: 6, outputs: 3, generator: &g)])
        let x = Self.input([4, 5], seed: 29)
        let shared = Self.input([3], seed: 30)  // used twice: ready only after both uses
        let names = Dictionary(uniqueKeysWithValues: model.parameters.map { (ObjectIdentifier($0.tensor), $0.name) } + [(ObjectIdentifier(shared), "shared")])
        var reported: [(name: String, gradient: [Float])] = []
        let loss = Loss.softmaxCrossEntropy(model(x) * shared + shared, labels: [0, 1, 2, 1])
        try loss.backward { leaf in reported.append((names[ObjectIdentifier(leaf)] ?? "input", leaf.grad?.scalars ?? [])) }
        let order = reported.map(\.name)
        #expect(Set(order) == Set(names.values).union(["input"]) && order.count == names.count + 1, "\(order)")
        #expect(order.firstIndex(of: "2.weight")! < order.firstIndex(of: "0.weight")!, "\(order)")
        for (name, gradient) in reported where name != "input" {
            let tensor = name == "shared" ? shared : model.parameters.first { $0.name == name }!.tensor
            #expect(tensor.grad!.scalars == gradient, "\(name) changed after it was reported ready")
        }
    }

    @Test func badCallsThrowNamedErrors() throws {
        let x = Self.input([2, 2], seed: 27)
        #expect(throws: AutodiffError.backwardFromNonScalar(shape: [2, 2])) { try (x * x).backward() }
        let constant = Tensor.ones([2])
        #expect(throws: AutodiffError.tensorDoesNotRequireGradient(index: 1, shape: [2])) {
            try checkGradients(of: [x, constant]) { x.sum() }
        }
        #expect(throws: AutodiffError.noGradientPath) { try constant.sum().backward() }
        #expect(AutodiffError.backwardFromNonScalar(shape: [2, 2]).description.contains("[2, 2]"))
    }

    @Test func noGradModeRecordsNothing() {
        let x = Self.input([3], seed: 28)
        let y = GradMode.withoutGradients { x * x }
        #expect(!y.requiresGrad)
    }
}
