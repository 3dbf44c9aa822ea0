import DDPRuntime
import Foundation

/// Live progress of a job: one line per epoch, and on a terminal a redrawn bar with the step, loss,
/// throughput and time left.
final class ProgressDisplay {
    private let descriptor: Int32
    private let isTerminal: Bool
    private let regression: Bool
    private let program: Bool
    /// For a language model: tokens in a sample (its window), so that throughput shows in tokens/s.
    private let tokensPerSample: Int
    private var barShown = false

    init(toStandardError: Bool, regression: Bool, program: Bool = false, tokensPerSample: Int = 0) {
        self.program = program
        self.tokensPerSample = tokensPerSample
        descriptor = toStandardError ? 2 : 1
        isTerminal = isatty(toStandardError ? 2 : 1) == 1
        self.regression = regression
    }

    private func write(_ text: String) { SafeOutput.print(text, to: descriptor) }

    /// A message on a line of its own.
    func line(_ text: String) {
        if barShown { write("\r\u{1B}[K"); barShown = false }
        write(text + "\n")
    }

    func show(_ status: StatusReply, epochs: [EpochRecord]) {
        for e in epochs {
            let train = regression ? "train MSE \(ScoreText.fixed(e.trainLoss))"
                : "train loss \(ScoreText.fixed(e.trainLoss))  train acc \(ScoreText.percent(e.trainAccuracy))"
            line(String(format: "epoch %3d/%d  step %5d  ", e.epoch, Int(status.totalEpochs), e.step) + train + "  "
                 + ScoreText.test(loss: e.testLoss, accuracy: e.testAccuracy, regression: regression, program: program, separator: "  ")
                 + String(format: "  %5.1f s", e.elapsedSeconds))
        }
        guard isTerminal, status.totalSteps > 0, status.jobState == "training" else { return }
        write("\r\u{1B}[K" + Self.bar(status, tokensPerSample: tokensPerSample))
        barShown = true
    }

    /// `█████░░░░░  42.0%  step 151/360  loss 0.1234  5,120 samples/s  2 workers  ETA 12s` (tokens/s for
    /// a language model).
    static func bar(_ status: StatusReply, tokensPerSample: Int = 0, width: Int = 30) -> String {
        let fraction = min(1, Double(status.step) / Double(max(status.totalSteps, 1)))
        let filled = Int(fraction * Double(width))
        let bar = String(repeating: "█", count: filled) + String(repeating: "░", count: width - filled)
        let live = status.workers.filter { $0.state == "training" }.count
        let remaining = status.step > 0 && status.totalSteps > status.step
            ? status.elapsedSeconds / Double(status.step) * Double(status.totalSteps - status.step) : nil
        return String(format: "%@ %5.1f%%  step %d/%d  loss %@  %@  %d workers  ETA %@", bar, fraction * 100, Int(status.step),
                      Int(status.totalSteps), ScoreText.fixed(status.trainLoss), ScoreText.throughput(status.samplesPerSecond, tokensPerSample: tokensPerSample), live,
                      remaining.map { StatusText.duration($0) } ?? "-")
    }

    func finish() { if barShown { write("\r\u{1B}[K"); barShown = false } }
}
