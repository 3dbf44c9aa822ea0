import DDPRuntime
import Foundation

/// Live progress of a job: a redrawn bar on a terminal, one plain line per epoch otherwise.
final class ProgressDisplay {
    private let descriptor: Int32
    private let isTerminal: Bool
    private var barShown = false

    init(toStandardError: Bool) {
        descriptor = toStandardError ? 2 : 1
        isTerminal = isatty(toStandardError ? 2 : 1) == 1
    }

    private func write(_ text: String) { SafeOutput.print(text, to: descriptor) }

    /// A message on a line of its own.
    func line(_ text: String) {
        if barShown { write("\r\u{1B}[K"); barShown = false }
        write(text + "\n")
    }

    func show(_ status: StatusReply, epochs: [EpochRecord]) {
        for e in epochs {
            line(String(format: "epoch %3d/%d  step %5d  train loss %.4f  train acc %6.2f%%  test loss %.4f  test acc %6.2f%%  %5.1f s",
                        e.epoch, Int(status.totalEpochs), e.step, e.trainLoss, e.trainAccuracy * 100, e.testLoss,
                        e.testAccuracy * 100, e.elapsedSeconds))
        }
        guard isTerminal, status.totalSteps > 0, status.jobState == "training" else { return }
        let fraction = Double(status.step) / Double(status.totalSteps)
        let width = 30, filled = Int(fraction * Double(width))
        let bar = String(repeating: "█", count: filled) + String(repeating: "░", count: width - filled)
        let live = status.workers.filter { $0.state == "training" }.count
        write(String(format: "\r\u{1B}[K%@ %5.1f%%  step %d/%d  loss %.4f  %d workers  %@",
                     bar, fraction * 100, Int(status.step), Int(status.totalSteps), status.trainLoss, live, status.jobState))
        barShown = true
    }

    func finish() { if barShown { write("\r\u{1B}[K"); barShown = false } }
}
