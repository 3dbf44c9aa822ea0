import Testing
@testable import Autodiff
@testable import DDPData

/// Models trained to convergence in one process with the autodiff core.
struct SingleProcessTrainingTests {
    func accuracy(_ model: Sequential, _ data: Dataset) -> Double {
        model.setTraining(false)
        defer { model.setTraining(true) }
        let (x, labels) = data.batch(0..<data.count)
        let logits = GradMode.withoutGradients { model(x) }.scalars
        let classes = data.classCount
        var correct = 0
        for (r, label) in labels.enumerated() {
            let row = logits[r * classes..<(r + 1) * classes]
            if row.indices.max(by: { row[$0] < row[$1] })! - r * classes == Int(label) { correct += 1 }
        }
        return Double(correct) / Double(labels.count)
    }

    @Test func xor() throws {
        var g = SeededGenerator(seed: 3)
        let model = Sequential([Linear(inputs: 2, outputs: 8, generator: &g), Activation(.tanh),
                                Linear(inputs: 8, outputs: 1, generator: &g)])
        let x = Tensor(shape: [4, 2], values: [0, 0, 0, 1, 1, 0, 1, 1]), y = Tensor(shape: [4, 1], values: [0, 1, 1, 0])
        let optimizer = try Adam(learningRate: 0.05)
        for _ in 0..<500 {
            model.zeroGrad()
            try Loss.binaryCrossEntropyWithLogits(model(x), y).backward()
            optimizer.step(model.parameters)
        }
        let predictions = model(x).sigmoid().scalars
        #expect(predictions[0] < 0.1 && predictions[1] > 0.9 && predictions[2] > 0.9 && predictions[3] < 0.1)
    }

    @Test func digitsMLPReachesNinetyFivePercent() throws {
        let (train, test) = try BundledData.digits().split(testFraction: 0.2, seed: 0)
        var g = SeededGenerator(seed: 1)
        let model = Sequential([Linear(inputs: 64, outputs: 128, generator: &g), Activation(.relu),
                                Linear(inputs: 128, outputs: 10, generator: &g)])
        let optimizer = try SGD(learningRate: 0.1, momentum: 0.9)
        let sampler = try EpochSampler(sampleCount: train.count, globalBatchSize: 64, seed: 2)
        for epoch in 0..<30 {
            let order = sampler.permutation(epoch: epoch)
            for step in 0..<sampler.stepsPerEpoch {
                let (x, labels) = train.batch(sampler.globalBatch(step: step, of: order))
                model.zeroGrad()
                try Loss.softmaxCrossEntropy(model(x), labels: labels).backward()
                optimizer.step(model.parameters)
            }
        }
        let result = accuracy(model, test)
        #expect(result >= 0.95, "test accuracy \(result)")
    }

    @Test func smallCNNLearnsDigits() throws {
        let (train, test) = try BundledData.digits().reshaped(featureShape: [1, 8, 8]).split(testFraction: 0.2, seed: 0)
        var g = SeededGenerator(seed: 4)
        let model = Sequential([
            Conv2D(inputChannels: 1, outputChannels: 8, kernelSize: 3, padding: 1, generator: &g), Activation(.relu),
            MaxPool2D(size: 2), Flatten(), Linear(inputs: 8 * 4 * 4, outputs: 10, generator: &g),
        ])
        let optimizer = try Adam(learningRate: 0.01)
        let sampler = try EpochSampler(sampleCount: train.count, globalBatchSize: 64, seed: 5)
        for epoch in 0..<8 {
            let order = sampler.permutation(epoch: epoch)
            for step in 0..<sampler.stepsPerEpoch {
                let (x, labels) = train.batch(sampler.globalBatch(step: step, of: order))
                model.zeroGrad()
                try Loss.softmaxCrossEntropy(model(x), labels: labels).backward()
                optimizer.step(model.parameters)
            }
        }
        let result = accuracy(model, test)
        #expect(result >= 0.93, "test accuracy \(result)")
    }
}
