import Foundation
import SwiftDDP

/// Three interleaved spirals in the plane, with a little noise: a data set that a straight line cannot
/// separate, generated from a seed so that every worker holds the same samples.
struct Spirals: IndexedDataset {
    let points: [Float]
    let labels: [Int32]

    init(count: Int, seed: UInt64) {
        var generator = SeededGenerator(seed: seed)
        var points: [Float] = [], labels: [Int32] = []
        for i in 0..<count {
            let arm = i % 3
            let t = Float(i / 3) / Float(max(count / 3, 1))  // 0 ..< 1 along the arm
            let angle = t * 3 * .pi + Float(arm) * 2 * .pi / 3
            let noise = { (generator.nextUnit() - 0.5) * 0.1 }
            points += [t * cos(angle) + noise(), t * sin(angle) + noise()]
            labels.append(Int32(arm))
        }
        self.points = points
        self.labels = labels
    }

    var count: Int { labels.count }

    func batch(_ indices: [Int]) -> (inputs: Tensor, labels: [Int32]) {
        (Tensor(shape: [indices.count, 2], values: indices.flatMap { [points[2 * $0], points[2 * $0 + 1]] }), indices.map { labels[$0] })
    }
}

/// An input layer, residual blocks (`x + W2 tanh(W1 x)`), and a classifier: parameters are found for
/// it and named `input.weight`, `blocks.0.block.0.weight`, ..., `output.bias`.
final class ResidualMLP: Module, Layer {
    let input: Linear
    let blocks: [Residual]
    let output: Linear

    init(hidden: Int, blocks count: Int, classes: Int, generator: inout SeededGenerator) {
        input = Linear(inputs: 2, outputs: hidden, generator: &generator)
        blocks = (0..<count).map { _ in
            Residual(Sequential([Linear(inputs: hidden, outputs: hidden, generator: &generator), Activation(.tanh),
                                 Linear(inputs: hidden, outputs: hidden, generator: &generator)]))
        }
        output = Linear(inputs: hidden, outputs: classes, generator: &generator)
    }

    func callAsFunction(_ x: Tensor) -> Tensor {
        output(blocks.reduce(input(x).tanh()) { h, block in block(h) })
    }
}

/// `--hidden N --blocks N --samples N` (the model's sizes and the data set's).
func option(_ name: String, default value: Int) -> Int {
    let arguments = Array(CommandLine.arguments.dropFirst())
    guard let at = arguments.firstIndex(of: "--\(name)") else { return value }
    guard at + 1 < arguments.count, let parsed = Int(arguments[at + 1]), parsed > 0 else {
        FileHandle.standardError.write(Data("residual-spirals: --\(name) needs a positive integer\n".utf8))
        exit(64)
    }
    return parsed
}

let hidden = option("hidden", default: 32), blocks = option("blocks", default: 2), samples = option("samples", default: 3000)
guard DataParallel.isWorker else {
    print("residual-spirals: a SwiftDDP worker. Run it as a job's workers:")
    print("  ddpctl start --program \(CommandLine.arguments[0]) --workers 2 -- --hidden \(hidden) --blocks \(blocks)")
    exit(0)
}

var generator = SeededGenerator(seed: 7)
let model = ResidualMLP(hidden: hidden, blocks: blocks, classes: 3, generator: &generator)
DataParallel.runWorker(name: "residual-spirals", configuration: ["hidden": "\(hidden)", "blocks": "\(blocks)", "samples": "\(samples)"],
                       model: model, data: Spirals(count: samples, seed: 1)) { model, batch in
    let logits = model(batch.inputs)
    let predicted = logits.scalars.chunks(of: 3).map { row in row.indices.max { row[$0] < row[$1] }! - row.startIndex }
    let correct = zip(predicted, batch.labels).filter { $0 == Int($1) }.count
    return (Loss.softmaxCrossEntropy(logits, labels: batch.labels), correct)
}

extension Array {
    func chunks(of size: Int) -> [ArraySlice<Element>] {
        stride(from: 0, to: count, by: size).map { self[$0..<Swift.min($0 + size, count)] }
    }
}
