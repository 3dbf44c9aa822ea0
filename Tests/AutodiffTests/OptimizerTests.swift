import Testing
@testable import Autodiff

/// Optimizers: the update rules against hand-computed values, and an update applied in chunks (as the
/// coordinator does, chunk by chunk while in cache) equal bit for bit to the whole update.
struct OptimizerTests {
    @Test func sgdWithMomentumMatchesTheFormula() throws {
        let w = Tensor(shape: [2], values: [1, -2], requiresGrad: true)
        let optimizer = try SGD(learningRate: 0.5, momentum: 0.9, weightDecay: 0.1)
        let p = NamedParameter(name: "w", tensor: w)
        var v: [Float] = [0, 0], expected: [Float] = [1, -2]
        for g in [[Float](arrayLiteral: 0.2, 0.4), [-0.1, 0.3]] {
            w.grad = Tensor(shape: [2], values: g)
            optimizer.step([p])
            for i in 0..<2 {
                v[i] = 0.9 * v[i] + g[i] + 0.1 * expected[i]
                expected[i] -= 0.5 * v[i]
            }
            #expect(w.scalars == expected)
        }
        #expect(optimizer.stepCount == 2 && optimizer.state.map(\.name) == ["w.momentum"])
    }

    @Test(arguments: ["sgd", "momentum", "nesterov", "adam", "adamw"])
    func chunkedUpdatesEqualTheWholeUpdate(kind: String) throws {
        func make() throws -> any Optimizer {
            switch kind {
            case "sgd": try SGD(learningRate: 0.1, weightDecay: 0.01)
            case "momentum": try SGD(learningRate: 0.1, momentum: 0.9, weightDecay: 0.01)
            case "nesterov": try SGD(learningRate: 0.1, momentum: 0.9, nesterov: true)
            case "adam": try Adam(learningRate: 0.01, weightDecay: 0.01)
            default: try Adam.adamW(learningRate: 0.01)
            }
        }
        var generator = SeededGenerator(seed: 7)
        let start = Tensor.randomNormal([1000], generator: &generator)
        let whole = NamedParameter(name: "w", tensor: start.detached()), chunked = NamedParameter(name: "w", tensor: start.detached())
        let a = try make(), b = try make()
        for _ in 0..<3 {
            let gradient = Tensor.randomNormal([1000], generator: &generator)
            whole.tensor.grad = gradient.detached()
            chunked.tensor.grad = gradient.detached()
            a.step([whole])
            b.beginStep()
            for lower in stride(from: 0, to: 1000, by: 300) { b.update(chunked, range: lower..<min(lower + 300, 1000)) }
        }
        #expect(whole.tensor.scalars == chunked.tensor.scalars)
        #expect(a.state.map { $0.tensor.scalars } == b.state.map { $0.tensor.scalars })
    }
}
