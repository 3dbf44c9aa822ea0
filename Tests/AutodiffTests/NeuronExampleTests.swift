import Testing
@testable import Autodiff

/// The worked example: one neuron `y_hat = f(w*x + b)` with `L = 1/2 (y_hat - y)^2`, so that
/// `dL/dw = (y_hat - y) f'(z) x` and `dL/db = (y_hat - y) f'(z)`.
struct NeuronExampleTests {
    let x: Float = 1.5, y: Float = 0.2

    func sigmoid(_ z: Float) -> Float { 1 / (1 + expf(-z)) }

    @Test func tapeMatchesTheChainRuleAndFiniteDifferences() throws {
        let w = Tensor(0.8, requiresGrad: true), b = Tensor(-0.3, requiresGrad: true)
        func loss() -> Tensor { Loss.halfSquaredError((w * x + b).sigmoid(), Tensor(y)) }
        try loss().backward()

        let z = 0.8 * x - 0.3, yHat = sigmoid(z), fPrime = yHat * (1 - yHat)
        #expect(abs(w.grad!.item - (yHat - y) * fPrime * x) < 1e-6)
        #expect(abs(b.grad!.item - (yHat - y) * fPrime) < 1e-6)
        let report = try checkGradients(of: [w, b], loss: loss)
        #expect(report.worstRelativeError < 1e-3)
    }

    @Test func gradientDescentDrivesTheLossDown() throws {
        let w = Tensor(0.8, requiresGrad: true), b = Tensor(-0.3, requiresGrad: true)
        let optimizer = try SGD(learningRate: 2)
        var losses: [Float] = []
        for _ in 0..<200 {
            w.zeroGrad(); b.zeroGrad()
            let loss = Loss.halfSquaredError((w * x + b).sigmoid(), Tensor(y))
            losses.append(loss.item)
            try loss.backward()
            optimizer.step([.init(name: "w", tensor: w), .init(name: "b", tensor: b)])
        }
        #expect(losses.last! < losses.first! / 100)
        #expect(zip(losses, losses.dropFirst()).allSatisfy { $1 <= $0 + 1e-7 })
    }
}

#if canImport(Glibc)
import Glibc
#endif
