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
    /// The steps of this epoch completed without each rank (backup workers).
    private var epochLeftOut: [Int32: Int] = [:]
    private(set) var samplesTrained = 0
    private var stepLog: [String] = []
    private var lastMetricsWrite = 0.0
    /// Checkpoints that failed in a row (0 after one that was written), and the last failure.
    private(set) var failedCheckpointsInARow = 0
    private(set) var lastCheckpointFailure = ""
    /// The job's files whose last write failed (file -> why): a full disk stops none of training.
    private(set) var failedWrites: [String: String] = [:]
    /// The scalars as TensorBoard event files in `DIR/tensorboard`, and the HTTP endpoint serving the metrics.
    var tensorBoard: TensorBoardWriter?
    var metricsServer: MetricsHTTPServer?

    /// What went wrong with the job's files, for status and the summary (empty when nothing did).
    var problems: String {
        var parts: [String] = []
        if metrics.checkpointFailures > 0 {
            parts.append("\(metrics.checkpointFailures) checkpoint(s) could not be written (last: \(lastCheckpointFailure))")
        }
        if !failedWrites.isEmpty {
            parts.append("\(metrics.writeFailures) write(s) failed: " + failedWrites.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", "))
        }
        return parts.joined(separator: "; ")
    }

    /// Notes the loss of a step that did not complete because it was not finite (it ended the job).
    mutating func recordDivergedLoss(_ loss: Float) {
        recentLosses.append(loss)
        metrics.trainLoss = loss
    }

    /// Notes a failed or successful write of `file`.
    private mutating func wrote(_ file: String, failure: String?) {
        guard let failure else { failedWrites[file] = nil; return }
        if failedWrites[file] == nil { log.error("could not write \(file): \(failure)") }
        failedWrites[file] = failure
        metrics.writeFailures += 1
    }

    init(directory: JobDirectory?, log: Logger) {
        self.directory = directory
        self.log = log
    }

    /// Takes up a resumed job's record: the counters of its checkpoint, the history and step log cut back
    /// to its step, and the totals of the epoch it resumes in from the steps of that epoch already logged
    /// (so that the epoch's train loss, accuracy and left-out steps cover all its steps).
    mutating func resume(from checkpoint: Checkpoint, stepsPerEpoch: Int) {
        metrics.steps = checkpoint.step
        metrics.samples = checkpoint.samplesTrained
        guard let directory else { return }
        do { history = try directory.cutBack(toStep: checkpoint.step) } catch {
            history = directory.history().filter { $0.step <= checkpoint.step }
            log.error("could not cut the history and step log back to step \(checkpoint.step): \(error)")
        }
        let epochStart = checkpoint.step - checkpoint.step % max(stepsPerEpoch, 1)
        // The last line of each step counts (a step log that could not be cut back may hold a step twice).
        let steps = Dictionary(directory.loggedSteps().map { ($0.step, $0) }) { _, last in last }
        for logged in steps.values.sorted(by: { $0.step < $1.step }) where logged.step >= epochStart && logged.step < checkpoint.step {
            guard let trained = logged.trained else { continue }  // a line from before the step log counted them
            epochLoss.sum += Double(logged.loss) * Double(trained)
            epochLoss.correct += logged.correct ?? 0
            epochLoss.samples += trained
            for rank in logged.leftOut ?? [] { epochLeftOut[rank, default: 0] += 1 }
        }
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
    /// times, assigned samples and the ranks it was completed without (for the step log); writes the
    /// metrics at most once a second.
    mutating func recordStep(_ step: Int, seconds: Double, loss: Float, learningRate: Float, samples: Int, correct: Int,
                             workerSeconds: [(Int32, Double)], workerSamples: [(Int32, Int)] = [], leftOut: [Int32] = [],
                             late: [(rank: Int32, step: Int, samples: Int)] = [], liveWorkers: Int,
                             jobID: String, now: Double) {
        recentStepSeconds.append(seconds)
        if recentStepSeconds.count > 50 { recentStepSeconds.removeFirst() }
        recentLosses.append(loss)
        if recentLosses.count > 256 { recentLosses.removeFirst() }
        epochLoss.sum += Double(loss) * Double(samples)
        epochLoss.correct += correct
        epochLoss.samples += samples
        samplesTrained += samples
        for rank in leftOut { epochLeftOut[rank, default: 0] += 1 }
        let workers = workerSeconds.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",")
        let shares = workerSamples.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",")
        stepLog.append("{\"step\":\(step),\"seconds\":\(seconds),\"loss\":\(JobJSON.number(loss)),\"learning_rate\":\(JobJSON.number(learningRate)),\"workers\":{\(workers)},\"samples\":{\(shares)},\"trained\":\(samples),\"correct\":\(correct)\(leftOut.isEmpty ? "" : ",\"left_out\":[\(leftOut.map(String.init).joined(separator: ","))]")\(late.isEmpty ? "" : ",\"late\":[\(late.map { "{\"rank\":\($0.rank),\"step\":\($0.step),\"samples\":\($0.samples)}" }.joined(separator: ","))]")}")
        metrics.steps = step + 1
        metrics.samples += samples
        metrics.trainLoss = loss
        metrics.workersAlive = liveWorkers
        metrics.observeStep(seconds: seconds)
        if let tensorBoard {
            let wall = Date().timeIntervalSince1970
            tensorBoard.add("train/loss", loss, step: step + 1, wallTime: wall)
            tensorBoard.add("train/learning_rate", learningRate, step: step + 1, wallTime: wall)
            tensorBoard.add("train/step_seconds", Float(seconds), step: step + 1, wallTime: wall)
            tensorBoard.add("train/samples_per_second", seconds > 0 ? Float(Double(samples) / seconds) : 0, step: step + 1, wallTime: wall)
        }
        if now - lastMetricsWrite > 1 { writeMetrics(liveWorkers: liveWorkers, jobID: jobID, now: now) }
    }

    /// Closes epoch `epoch` at `step` with its held-out loss and accuracy: a history record (written to
    /// the directory), logged, and the metrics.
    mutating func endEpoch(_ epoch: Int, step: Int, test: (loss: Float, accuracy: Float)?, elapsed: Double, liveWorkers: Int,
                           totalEpochs: Int, jobID: String, now: Double) {
        publishEpoch(closeEpoch(epoch, step: step, elapsed: elapsed, liveWorkers: liveWorkers), test: test, totalEpochs: totalEpochs,
                     jobID: jobID, now: now)
    }

    /// The training side of epoch `epoch`'s record, which starts the next epoch's sums; its held-out
    /// side follows with `publishEpoch` (at once, or once the workers scored it).
    mutating func closeEpoch(_ epoch: Int, step: Int, elapsed: Double, liveWorkers: Int) -> EpochRecord {
        let record = EpochRecord(
            epoch: epoch, step: step, trainLoss: Float(epochLoss.sum / Double(max(epochLoss.samples, 1))),
            trainAccuracy: Float(epochLoss.correct) / Float(max(epochLoss.samples, 1)), testLoss: 0,
            testAccuracy: 0, elapsedSeconds: elapsed, workers: liveWorkers,
            leftOutSteps: epochLeftOut.isEmpty ? nil : Dictionary(uniqueKeysWithValues: epochLeftOut.map { ("\($0.key)", $0.value) }))
        epochLoss = (0, 0, 0)
        epochLeftOut = [:]
        return record
    }

    /// Records a closed epoch with its held-out loss and accuracy (nil: none, as for a program's job, whose
    /// data and so its held-out split stay with its workers): history, log, metrics, TensorBoard.
    mutating func publishEpoch(_ closed: EpochRecord, test measured: (loss: Float, accuracy: Float)?, totalEpochs: Int, jobID: String, now: Double) {
        let test = measured ?? (0, 0)
        var record = closed
        record.testLoss = test.loss
        record.testAccuracy = test.accuracy
        let (epoch, step, liveWorkers) = (record.epoch, record.step, record.workers)
        history.append(record)
        log.info("epoch \(epoch)/\(totalEpochs)", metadata: [
            "step": "\(step)", "train_loss": "\(record.trainLoss)", "test_loss": "\(measured.map { "\($0.loss)" } ?? "none")",
            "test_accuracy": "\(measured.map { "\($0.accuracy)" } ?? "none")", "workers": "\(liveWorkers)",
        ])
        metrics.testLoss = test.loss
        metrics.testAccuracy = test.accuracy
        if let tensorBoard {
            let wall = Date().timeIntervalSince1970
            let names = metrics.regression ? ("test/mse", "test/r2") : ("test/loss", "test/accuracy")
            if measured != nil {
                tensorBoard.add(names.0, test.loss, step: step, wallTime: wall)
                tensorBoard.add(names.1, test.accuracy, step: step, wallTime: wall)
            }
            tensorBoard.add("epoch/train_loss", record.trainLoss, step: step, wallTime: wall)
            if !metrics.regression { tensorBoard.add("epoch/train_accuracy", record.trainAccuracy, step: step, wallTime: wall) }
        }
        if let directory {
            let line = (try? JobJSON.encoder([.sortedKeys]).encode(record)).map { String(decoding: $0, as: UTF8.self) + "\n" } ?? ""
            wrote("history.jsonl", failure: SafeOutput.append(line, to: directory.historyPath))
        }
        writeMetrics(liveWorkers: liveWorkers, jobID: jobID, now: now)
    }

    /// Writes a checkpoint; a failure is logged, counted (status, summary, metrics) and the job goes on.
    mutating func writeCheckpoint(step: Int, stepsPerEpoch: Int, shard: ShardState, spec: JobSpec, model: ModelDescription,
                                  rankTokens: [Int32: [UInt8]], carried: [Range<Int>] = []) {
        guard let directory else { return }
        flushStepLog()  // the step log is whole up to every checkpoint, which a resume cuts it back to
        do {
            let path = try Checkpoint.save(
                step: step, stepsPerEpoch: stepsPerEpoch, parameters: shard.parameters, optimizer: shard.optimizer, spec: spec,
                samplesTrained: metrics.samples, rankTokens: rankTokens, carriedSamples: carried, model: model, in: directory,
                keep: spec.keepCheckpoints)
            failedCheckpointsInARow = 0
            log.debug("checkpoint written", metadata: ["path": "\(path)", "step": "\(step)"])
        } catch {
            failedCheckpointsInARow += 1
            metrics.checkpointFailures += 1
            lastCheckpointFailure = "step \(step): \(error)"
            log.error("checkpoint at step \(step) failed: \(error)")
        }
    }

    /// Writes the Prometheus metrics file and appends the buffered per-step records.
    mutating func writeMetrics(liveWorkers: Int, jobID: String, now: Double) {
        lastMetricsWrite = now
        guard let directory else { return }
        metrics.workersAlive = liveWorkers
        let text = metrics.text(jobID: jobID)
        metricsServer?.update(text)
        wrote("metrics.prom", failure: Result { try AtomicFile.write(text, to: directory.metricsPath) }.failureText)
        if let tensorBoard { wrote("tensorboard", failure: Result { try tensorBoard.flush() }.failureText) }
        flushStepLog()
    }

    /// Appends the buffered per-step records to the step log.
    private mutating func flushStepLog() {
        guard let directory, !stepLog.isEmpty else { return }
        let lines = stepLog.joined(separator: "\n") + "\n"
        stepLog.removeAll(keepingCapacity: true)
        wrote("steps.jsonl", failure: SafeOutput.append(lines, to: directory.stepLogPath))
    }

    /// Logs the rejections not logged one by one; call at the end.
    mutating func flushRejections() { rejectionLog.flush(to: log) }
}

extension Result where Failure == any Error {
    /// The error's text, or nil on success.
    var failureText: String? {
        if case .failure(let error) = self { return "\(error)" }
        return nil
    }
}
