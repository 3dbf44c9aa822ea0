import Autodiff
import DDPData
import DDPWire
import Foundation

/// How a job's steps of the data (its global batches) are grouped into rounds of coordination: with
/// `sync_every: H` (local SGD, DiLoCo) H steps a round, the last round of an epoch shorter, no round across
/// an epoch; with 1 every step is a round. The coordinator counts rounds as its steps.
public struct RoundPlan: Equatable, Sendable {
    /// The data's steps per epoch, and the steps a round holds.
    public let stepsPerEpoch: Int
    public let syncEvery: Int

    public init(stepsPerEpoch: Int, syncEvery: Int) {
        self.stepsPerEpoch = stepsPerEpoch
        self.syncEvery = max(1, syncEvery)
    }

    public var roundsPerEpoch: Int { (stepsPerEpoch + syncEvery - 1) / syncEvery }

    /// The data steps (0-based within the epoch) of round `round` (0-based within the epoch).
    public func steps(ofRound round: Int) -> Range<Int> { round * syncEvery..<min((round + 1) * syncEvery, stepsPerEpoch) }

    /// Round `round` of the job cut among `workers` (in rank order): each one's share of each of the
    /// round's global batches, one run per inner step (an empty run where a share has no sample), equal or
    /// in proportion to `weights`; and the round as its updates name it.
    func shares(ofRound round: Int, sampler: EpochSampler, workers: Int, weights: [Double]?) -> (runs: [[SampleRange]], round: LocalRound) {
        let steps = steps(ofRound: round % roundsPerEpoch)
        var runs = [[SampleRange]](repeating: [], count: workers)
        for dataStep in steps {
            let batch = StepBatch(carried: [], batch: sampler.batchRange(step: dataStep))
            for (worker, share) in batch.shares(workers: workers, weights: weights).enumerated() {
                runs[worker].append(share.first ?? SampleRange(start: 0, count: 0))
            }
        }
        let first = (round / roundsPerEpoch) * stepsPerEpoch + steps.lowerBound
        return (runs, LocalRound(innerSteps: UInt32(steps.count), firstInnerStep: UInt64(first)))
    }
}

/// A round of local SGD as an update names it: its inner steps, and the first one's index in the job.
struct LocalRound {
    let innerSteps: UInt32
    let firstInnerStep: UInt64
}

/// A worker's side of local SGD (`sync_every` > 1): the values and optimizer state a round starts from,
/// the round's inner steps with the job's optimizer on the worker's own samples, and the parameter change
/// it pushes (start minus end, DiLoCo's outer gradient). The optimizer state carries over from round to
/// round; a resent round starts again from the same values and state, so that it computes the same.
final class LocalRounds {
    private let spec: JobSpec
    private var optimizer: any Optimizer
    private let schedule: LearningRateSchedule
    /// Where a round began: its coordinator step, the values (parameters and buffers, in wire order), and
    /// the optimizer's state and step count then.
    private struct Start {
        let step: Int
        let values: [Tensor]
        let state: [String: Tensor]
        let stepCount: Int
    }
    /// The newest round's start, and the one before: a coordinator resumed from the checkpoint written as
    /// the newest round began, or from the one before it, sends one of them again.
    private var current: Start?
    private var previous: Start?

    /// For `spec`, whose data has `stepsPerEpoch` global batches an epoch (the schedule runs over all of them).
    init(spec: JobSpec, stepsPerEpoch: Int) throws {
        self.spec = spec
        optimizer = try TrainingSetup.makeOptimizer(spec)
        schedule = TrainingSetup.schedule(spec, totalSteps: stepsPerEpoch * spec.epochs)
    }

    /// Whether the tensors have moved away from the newest round's start by its inner steps, so that a
    /// half-precision update (changes to the round's start) must put the start back first. A Welcome's or
    /// a whole update's values settle them.
    private(set) var moved = false

    /// Puts the newest round's starting values `elements` of tensor `index` back into `tensor`, if the
    /// inner steps moved it.
    func restoreStart(_ index: Int, elements: Range<Int>, into tensor: Tensor) {
        guard moved, let current else { return }
        current.values[index].withUnsafeBufferPointer { start in
            tensor.withUnsafeMutableBufferPointer { dst in (dst.baseAddress! + elements.lowerBound).update(from: start.baseAddress! + elements.lowerBound, count: elements.count) }
        }
    }

    /// The tensors hold the coordinator's values again (a Welcome, or an update wholly applied).
    func settle() { moved = false }

    /// Begins the round of coordinator step `step` from `tensors` as they are now (its update loaded);
    /// a round begun before (resent after a worker was lost, or after a coordinator's resume) begins
    /// again from where it began then, values and optimizer state.
    func begin(step: Int, tensors: [NamedParameter]) throws {
        if let again = [current, previous].compactMap({ $0 }).first(where: { $0.step == step }) {
            for (t, held) in zip(tensors, again.values) { t.tensor.assign(held) }
            if again.state.isEmpty { optimizer = try TrainingSetup.makeOptimizer(spec) } else { try optimizer.restoreState(again.state) }
            optimizer.stepCount = again.stepCount
            if again.step != current?.step { (current, previous) = (again, nil) }
            return
        }
        previous = current
        current = Start(step: step, values: tensors.map { $0.tensor.detached() },
                        state: Dictionary(uniqueKeysWithValues: optimizer.state.map { ($0.name, $0.tensor.detached()) }), stepCount: optimizer.stepCount)
    }

    /// Takes the round's inner steps: for each run of samples (none: the step is skipped) the loss, its
    /// gradient, clipping and a step of the job's optimizer at the schedule's rate for inner step
    /// `firstInnerStep + i`. Returns the sample-weighted mean loss and the correct ones over the round.
    func run(_ runs: [[Int]], firstInnerStep: Int, task: any WorkerTask, trained: [NamedParameter]) throws -> (loss: Float, correct: Int) {
        var lossSum = 0.0, correct = 0, samples = 0
        moved = true
        for (i, run) in runs.enumerated() where !run.isEmpty {
            task.zeroGrad()
            let (loss, right) = try task.loss(run)
            try loss.backward()
            if spec.clipNorm > 0 { clipGradientNorm(trained, maxNorm: spec.clipNorm) }
            optimizer.learningRate = schedule.rate(base: spec.learningRate, at: firstInnerStep + i)
            optimizer.step(trained)
            lossSum += Double(loss.item) * Double(run.count)
            correct += right
            samples += run.count
        }
        return (Float(lossSum / Double(max(samples, 1))), correct)
    }

    /// Writes each trained parameter's change over the round (start minus now) into its gradient, which
    /// the push carries (a buffer's push is its value).
    func writeChange(_ tensors: [NamedParameter], isBuffer: [Bool]) {
        for (index, p) in tensors.enumerated() where !isBuffer[index] {
            let change = p.tensor.grad ?? p.tensor.gradientDestination ?? Tensor.zeros(p.tensor.shape)
            change.withUnsafeMutableBufferPointer { out in
                current!.values[index].withUnsafeBufferPointer { from in
                    p.tensor.withUnsafeBufferPointer { now in for i in 0..<out.count { out[i] = from[i] - now[i] } }
                }
            }
            p.tensor.grad = change
        }
    }
}
