import Autodiff
import DDPWire
import Foundation
import Logging

/// What a coordinator records of its job: rejected messages, the losses and times of steps, the
/// per-epoch history, the metrics file and step log, and the checkpoints, in the job directory when it
/// has one.
struct Recorder {
    let directory: JobDirectory?
    let log: Logger
    var history: [EpochRecord] = []
    var metrics = Metrics()
    private(set) var rejected: UInt64 = 0
    private var rejectionLog = RejectionLog()
    private(set) var recentStepSeconds: [Double] = []
    private(set) var recentLosses: [Float] = []
    private var epochLoss = (sum: 0.0, correct: 0, samples: 0)
    private(set) var samplesTrained = 0
    private var stepLog: [String] = []
    private var lastMetricsWrite = 0.0

    init(directory: JobDirectory?, log: Logger) {
        self.directory = directory
        self.log = log
    }

    /// Counts a rejected message and logs it, rate-limited (a flood of junk must not fill the disk).
    mutating func reject(_ reason: String, rank: Int32?, now: Double) {
        rejected += 1
        metrics.rejectedMessages = rejected
        rejectionLog.record(reason, metadata: rank.map { ["rank": "\($0)"] } ?? [:], now: now, to: log)
    }

    /// Sums up suppressed rejection lines once their window has passed (call it now and then).
    mutating func tick(now: Double) { rejectionLog.tick(now: now, to: log) }

    /// The step deadline: at least `configured`, and ten times the median step.
    func stepTimeout(configured: Double) -> Double {
        max(configured, recentStepSeconds.isEmpty ? 0 : 10 * Measure.median(recentStepSeconds))
    }

    /// Records a completed step: its time, mean loss, samples and correct ones, and the workers' compute
    /// times (for the step log); writes the metrics at most once a second.
    mutating func recordStep(_ step: Int, seconds: Double, loss: Float, samples: Int, correct: Int, workerSeconds: [(Int32, Double)],
                             liveWorkers: Int, jobID: String, now: Double) {
        recentStepSeconds.append(seconds)
        if recentStepSeconds.count > 50 { recentStepSeconds.removeFirst() }
        recentLosses.append(loss)
        if recentLosses.count > 256 { recentLosses.removeFirst() }
        epochLoss.sum += Double(loss) * Double(samples)
        epochLoss.correct += correct
        epochLoss.samples += samples
        samplesTrained += samples
        let workers = workerSeconds.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",")
        stepLog.append("{\"step\":\(step),\"seconds\":\(seconds),\"loss\":\(loss),\"workers\":{\(workers)}}")
        metrics.steps = step + 1
        metrics.samples += samples
        metrics.trainLoss = loss
        metrics.workersAlive = liveWorkers
        metrics.observeStep(seconds: seconds)
        if now - lastMetricsWrite > 1 { writeMetrics(liveWorkers: liveWorkers, jobID: jobID, now: now) }
    }

    /// Closes epoch `epoch` at `step` with its held-out loss and accuracy: a history record (written to
    /// the directory), logged, and the metrics.
    mutating func endEpoch(_ epoch: Int, step: Int, test: (loss: Float, accuracy: Float), elapsed: Double, liveWorkers: Int,
                           totalEpochs: Int, jobID: String, now: Double) {
        let record = EpochRecord(
            epoch: epoch, step: step, trainLoss: Float(epochLoss.sum / Double(max(epochLoss.samples, 1))),
            trainAccuracy: Float(epochLoss.correct) / Float(max(epochLoss.samples, 1)), testLoss: test.loss,
            testAccuracy: test.accuracy, elapsedSeconds: elapsed, workers: liveWorkers)
        history.append(record)
        epochLoss = (0, 0, 0)
        log.info("epoch \(epoch)/\(totalEpochs)", metadata: [
            "step": "\(step)", "train_loss": "\(record.trainLoss)", "test_loss": "\(test.loss)",
            "test_accuracy": "\(test.accuracy)", "workers": "\(liveWorkers)",
        ])
        metrics.testLoss = test.loss
        metrics.testAccuracy = test.accuracy
        if let directory { try? directory.write(history, to: directory.historyPath) }
        writeMetrics(liveWorkers: liveWorkers, jobID: jobID, now: now)
    }

    /// Writes a checkpoint; a failure is logged and the job goes on.
    func writeCheckpoint(step: Int, stepsPerEpoch: Int, shard: ShardState, spec: JobSpec, rankTokens: [Int32: [UInt8]]) {
        guard let directory else { return }
        do {
            let path = try Checkpoint.save(
                step: step, stepsPerEpoch: stepsPerEpoch, parameters: shard.parameters, optimizer: shard.optimizer, spec: spec,
                history: history, rankTokens: rankTokens, in: directory, keep: spec.keepCheckpoints)
            log.debug("checkpoint written", metadata: ["path": "\(path)", "step": "\(step)"])
        } catch {
            log.error("checkpoint at step \(step) failed: \(error)")
        }
    }

    /// Writes the Prometheus metrics file and appends the buffered per-step records.
    mutating func writeMetrics(liveWorkers: Int, jobID: String, now: Double) {
        lastMetricsWrite = now
        guard let directory else { return }
        metrics.workersAlive = liveWorkers
        try? AtomicFile.write(metrics.text(jobID: jobID), to: directory.metricsPath)
        guard !stepLog.isEmpty else { return }
        let text = stepLog.joined(separator: "\n") + "\n"
        stepLog.removeAll(keepingCapacity: true)
        if let handle = FileHandle(forWritingAtPath: directory.stepLogPath) {
            handle.seekToEndOfFile()
            handle.write(Data(text.utf8))
            try? handle.close()
        } else {
            _ = FileManager.default.createFile(atPath: directory.stepLogPath, contents: Data(text.utf8))
        }
    }

    /// Logs the rejections not logged one by one; call at the end.
    mutating func flushRejections() { rejectionLog.flush(to: log) }
}
