/// The coordinator's counters and step-time histogram in the Prometheus text format.
struct Metrics {
    var steps = 0
    var samples = 0
    var trainLoss: Float = 0
    var testLoss: Float = 0
    var testAccuracy: Float = 0
    var bytesSent = 0
    var bytesReceived = 0
    var rejectedMessages: UInt64 = 0
    var workersAlive = 0
    var workersLost = 0
    var checkpointFailures = 0
    var writeFailures = 0
    /// A regression job: the held-out score is R² and its loss the mean squared error.
    var regression = false
    static let bucketBounds: [Double] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
    var bucketCounts = [Int](repeating: 0, count: bucketBounds.count)
    var stepSecondsSum = 0.0

    mutating func observeStep(seconds: Double) {
        for (i, bound) in Self.bucketBounds.enumerated() where seconds <= bound { bucketCounts[i] += 1 }
        stepSecondsSum += seconds
    }

    /// The metrics as Prometheus exposition text, labelled `job_id` (Prometheus sets `job` itself, from
    /// its scrape configuration). For a regression job the held-out score is `ddp_test_r2`.
    func text(jobID: String) -> String {
        let label = "job_id=\"\(Self.escaped(jobID))\""
        var lines: [String] = []
        func metric(_ name: String, _ type: String, _ help: String, _ value: String) {
            lines += ["# HELP \(name) \(help)", "# TYPE \(name) \(type)", "\(name){\(label)} \(value)"]
        }
        metric("ddp_steps_total", "counter", "Training steps completed.", "\(steps)")
        metric("ddp_samples_total", "counter", "Training samples processed.", "\(samples)")
        metric("ddp_train_loss", "gauge", "Mean training loss of the last step.", Self.number(trainLoss))
        if regression {
            metric("ddp_test_mse", "gauge", "Held-out mean squared error after the last epoch.", Self.number(testLoss))
            metric("ddp_test_r2", "gauge", "Held-out coefficient of determination (R squared) after the last epoch.", Self.number(testAccuracy))
        } else {
            metric("ddp_test_loss", "gauge", "Held-out cross-entropy after the last epoch.", Self.number(testLoss))
            metric("ddp_test_accuracy", "gauge", "Held-out accuracy (0 to 1) after the last epoch.", Self.number(testAccuracy))
        }
        metric("ddp_bytes_sent_total", "counter", "Bytes the coordinator sent to workers.", "\(bytesSent)")
        metric("ddp_bytes_received_total", "counter", "Bytes the coordinator received from workers.", "\(bytesReceived)")
        metric("ddp_rejected_messages_total", "counter", "Malformed, stale or refused messages dropped.", "\(rejectedMessages)")
        metric("ddp_workers_alive", "gauge", "Workers taking part in the current step.", "\(workersAlive)")
        metric("ddp_workers_lost_total", "counter", "Workers declared lost.", "\(workersLost)")
        metric("ddp_checkpoint_failures_total", "counter", "Checkpoints that could not be written.", "\(checkpointFailures)")
        metric("ddp_write_failures_total", "counter", "Writes of the job's files (metrics, step log, history) that failed.", "\(writeFailures)")
        lines += ["# HELP ddp_step_seconds Wall time of a synchronous step at the coordinator.", "# TYPE ddp_step_seconds histogram"]
        for (bound, count) in zip(Self.bucketBounds, bucketCounts) { lines.append("ddp_step_seconds_bucket{\(label),le=\"\(bound)\"} \(count)") }
        lines += ["ddp_step_seconds_bucket{\(label),le=\"+Inf\"} \(steps)", "ddp_step_seconds_sum{\(label)} \(Self.number(stepSecondsSum))",
                  "ddp_step_seconds_count{\(label)} \(steps)"]
        return lines.joined(separator: "\n") + "\n"
    }

    /// A sample value as Prometheus spells it: `NaN`, `+Inf` and `-Inf` for the values that are not numbers.
    static func number<F: BinaryFloatingPoint & CustomStringConvertible>(_ value: F) -> String {
        value.isNaN ? "NaN" : value.isInfinite ? (value < 0 ? "-Inf" : "+Inf") : value.description
    }

    /// A label value with `\`, `"` and line breaks escaped.
    static func escaped(_ text: String) -> String {
        text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n")
    }
}
