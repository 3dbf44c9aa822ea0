import Foundation

/// `ddpctl report`: one self-contained HTML page (inline SVG, no scripts, no network) with a job's loss
/// and accuracy per epoch, each worker's step time over the run, and its summary.
public enum JobReport {
    struct Series {
        let id: String
        let label: String
        let color: String
        let points: [(x: Double, y: Double)]
        /// Draw a marker per point (epoch series) or only the line (dense step series).
        let markers: Bool
    }

    /// The page for the job in `directory`.
    public static func html(for directory: JobDirectory) throws -> String {
        let spec = try JobSpec.fromJSON(try String(contentsOfFile: directory.specPath, encoding: .utf8))
        let history = directory.history()
        let status = (try? directory.status(timeoutSeconds: 1)) ?? JobStatus(directory: directory, state: "dead", message: "")
        let epochs = history.map { Double($0.epoch) }
        func points(_ values: [Float], scale: Double = 1) -> [(x: Double, y: Double)] {
            zip(epochs, values).map { ($0, Double($1) * scale) }
        }
        let regression = spec.task == "regression"
        let loss = chart(title: regression ? "Mean squared error per epoch" : "Loss per epoch", xLabel: "epoch",
                         yLabel: regression ? "MSE" : "cross-entropy", series: [
            Series(id: "train_loss", label: regression ? "train MSE" : "train loss", color: "#1f77b4", points: points(history.map(\.trainLoss)), markers: true),
            Series(id: "test_loss", label: regression ? "test MSE" : "test loss", color: "#d62728", points: points(history.map(\.testLoss)), markers: true),
        ])
        let accuracy = regression
            ? chart(title: "R² per epoch (held-out)", xLabel: "epoch", yLabel: "R²", series: [
                Series(id: "test_r2", label: "test R²", color: "#d62728", points: points(history.map(\.testAccuracy)), markers: true)])
            : chart(title: "Accuracy per epoch", xLabel: "epoch", yLabel: "accuracy (%)", percent: true, series: [
                Series(id: "train_accuracy", label: "train accuracy", color: "#1f77b4", points: points(history.map(\.trainAccuracy), scale: 100), markers: true),
                Series(id: "test_accuracy", label: "test accuracy", color: "#d62728", points: points(history.map(\.testAccuracy), scale: 100), markers: true),
            ])
        let rates = learningRates(directory)
        let rateChart = chart(title: "Learning rate per step", xLabel: "step", yLabel: "learning rate", series: [
            Series(id: "learning_rate", label: "learning rate", color: "#ff7f0e", points: downsample(rates, to: 600), markers: false)])
        let palette = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
        let perWorker = stepTimes(directory)
        let stepChart = chart(title: "Compute time per step, by worker", xLabel: "step", yLabel: "ms", series: perWorker.keys.sorted().enumerated().map { i, rank in
            Series(id: "worker_\(rank)", label: "rank \(rank)", color: palette[i % palette.count],
                   points: downsample(perWorker[rank]!, to: 600).map { ($0.x, $0.y * 1000) }, markers: false)
        })
        let rows: [(String, String)] = [
            ("job", spec.jobID), ("state", status.state), ("dataset", spec.dataset), ("model", "\(spec.model) \(spec.hidden)"),
            ("optimizer", "\(spec.optimizer), learning rate \(spec.learningRate)"), ("workers", "\(spec.workers)"),
            ("epochs", "\(status.epoch) of \(spec.epochs)"), ("steps", "\(status.step)"),
            regression ? ("test R²", ScoreText.fixed(status.testAccuracy)) : ("test accuracy", ScoreText.percent(status.testAccuracy)),
            (regression ? "test MSE" : "test loss", ScoreText.fixed(status.testLoss)),
            ("wall time", String(format: "%.1f s", status.elapsedSeconds)), ("samples/s", String(format: "%.0f", status.samplesPerSecond)),
            ("rejected messages", "\(status.rejectedMessages)"), ("note", status.message),
        ] + (spec.balance == "equal" ? [] : [("shares of a step", "by speed (balance: \(spec.balance))")])
          + (spec.backupWorkers == 0 ? [] : [("steps completed without a late worker", leftOutText(directory, backupWorkers: spec.backupWorkers))])
        let table = rows.map { "<tr><th>\(escape($0.0))</th><td>\(escape($0.1))</td></tr>" }.joined(separator: "\n")
        return """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>SwiftDDP job \(escape(spec.jobID))</title>
            <style>
            body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1000px; }
            table { border-collapse: collapse; margin-bottom: 2em; } th, td { text-align: left; padding: 4px 12px; border-bottom: 1px solid #ddd; }
            svg { margin-bottom: 2em; background: #fff; } .axis { stroke: #444; } .grid { stroke: #eee; } text { font-size: 12px; fill: #333; }
            </style></head><body>
            <h1>SwiftDDP job \(escape(spec.jobID))</h1>
            <table>\(table)</table>
            \(loss)
            \(accuracy)
            \(rateChart)
            \(stepChart)
            </body></html>
            """
    }

    /// Each worker's compute seconds per step, from the job's `steps.jsonl`.
    static func stepTimes(_ directory: JobDirectory) -> [Int: [(x: Double, y: Double)]] {
        let text = (try? String(contentsOfFile: directory.stepLogPath, encoding: .utf8)) ?? ""
        var result: [Int: [(x: Double, y: Double)]] = [:]
        for line in text.split(separator: "\n") {
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                let step = object["step"] as? Double, let workers = object["workers"] as? [String: Double] else { continue }
            for (rank, seconds) in workers { if let r = Int(rank) { result[r, default: []].append((step, seconds)) } }
        }
        return result
    }

    /// Which ranks steps completed without (backup workers), how often and last when, from `steps.jsonl`.
    static func leftOutText(_ directory: JobDirectory, backupWorkers: Int) -> String {
        let text = (try? String(contentsOfFile: directory.stepLogPath, encoding: .utf8)) ?? ""
        var counts: [Int: (steps: Int, last: Int)] = [:]
        for line in text.split(separator: "\n") {
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let step = object["step"] as? Int, let ranks = object["left_out"] as? [Int] else { continue }
            for rank in ranks { counts[rank] = ((counts[rank]?.steps ?? 0) + 1, step) }
        }
        let named = counts.keys.sorted().map { "rank \($0): \(counts[$0]!.steps) steps (last \(counts[$0]!.last))" }
        return "backup_workers \(backupWorkers): " + (named.isEmpty ? "none" : named.joined(separator: ", ")) + "; their samples were trained in the next step"
    }

    /// The learning rate of every step, from the job's `steps.jsonl`.
    static func learningRates(_ directory: JobDirectory) -> [(x: Double, y: Double)] {
        let text = (try? String(contentsOfFile: directory.stepLogPath, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let step = object["step"] as? Double, let rate = object["learning_rate"] as? Double else { return nil }
            return (step, rate)
        }
    }

    /// The coordinator's wall time of every step, from the job's `steps.jsonl`.
    static func stepSeconds(_ directory: JobDirectory) -> [Double] {
        let text = (try? String(contentsOfFile: directory.stepLogPath, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["seconds"] as? Double
        }
    }

    static func downsample(_ points: [(x: Double, y: Double)], to limit: Int) -> [(x: Double, y: Double)] {
        guard points.count > limit else { return points }
        let stride = Double(points.count) / Double(limit)
        return (0..<limit).map { points[Int(Double($0) * stride)] }
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
            .replacingOccurrences(of: "\"", with: "&quot;")
    }

    /// A line chart as inline SVG: axes with round tick values, axis labels, one polyline per series,
    /// markers where asked, a legend. Points that are not finite (a diverged run) are left out and counted
    /// under the title.
    static func chart(title: String, xLabel: String, yLabel: String, percent: Bool = false, series: [Series]) -> String {
        let width = 900.0, height = 320.0, left = 70.0, right = 160.0, top = 30.0, bottom = 44.0
        let finiteSeries = series.map { s in Series(id: s.id, label: s.label, color: s.color,
                                                    points: s.points.filter { $0.x.isFinite && $0.y.isFinite }, markers: s.markers) }
        let dropped = zip(series, finiteSeries).reduce(0) { $0 + $1.0.points.count - $1.1.points.count }
        let all = finiteSeries.flatMap(\.points)
        guard !all.isEmpty else {
            return "<svg width=\"\(Int(width))\" height=\"60\" role=\"img\"><text x=\"10\" y=\"35\">\(escape(title)): no data yet</text></svg>"
        }
        let xs = all.map(\.x), ys = all.map(\.y)
        let xTicks = ticks(low: xs.min()!, high: max(xs.max()!, xs.min()! + 1), integers: true)
        let yTicks = percent ? ticks(low: min(ys.min()!, 0), high: 100) : ticks(low: min(ys.min()!, 0), high: ys.max()!)
        let xMin = xTicks.first!, xMax = xTicks.last!, yMin = yTicks.first!, yMax = yTicks.last!
        func px(_ x: Double) -> Double { left + (x - xMin) / (xMax - xMin) * (width - left - right) }
        func py(_ y: Double) -> Double { height - bottom - (y - yMin) / (yMax - yMin) * (height - top - bottom) }
        var svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" role=\"img\" aria-label=\"\(escape(title))\">"
        svg += "<text x=\"\(left)\" y=\"18\" font-weight=\"bold\">\(escape(title))"
            + (dropped > 0 ? " (\(dropped) values that are not numbers not drawn)" : "") + "</text>"
        for y in yTicks {
            svg += String(format: "<line class=\"grid\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>", left, py(y), width - right, py(y))
            svg += String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%@</text>", left - 6, py(y) + 4, label(y) + (percent ? "%" : ""))
        }
        for x in xTicks {
            svg += String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%@</text>", px(x), height - bottom + 16, label(x))
        }
        svg += String(format: "<line class=\"axis\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>", left, height - bottom, width - right, height - bottom)
        svg += String(format: "<line class=\"axis\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>", left, top, left, height - bottom)
        svg += String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%@</text>", (left + width - right) / 2, height - 6, escape(xLabel))
        svg += String(format: "<text x=\"14\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 14 %.1f)\">%@</text>",
                      (top + height - bottom) / 2, (top + height - bottom) / 2, escape(yLabel))
        for (i, s) in finiteSeries.enumerated() {
            let path = s.points.map { String(format: "%.1f,%.1f", px($0.x), py($0.y)) }.joined(separator: " ")
            svg += "<polyline data-series=\"\(s.id)\" fill=\"none\" stroke=\"\(s.color)\" stroke-width=\"2\" points=\"\(path)\"/>"
            if s.markers {
                for p in s.points {
                    svg += String(format: "<circle data-series=\"%@\" cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%@\"><title>%@ %@: %@</title></circle>",
                                  s.id, px(p.x), py(p.y), s.color, xLabel, label(p.x), label(p.y) + (percent ? "%" : ""))
                }
            }
            let ly = top + 18 * Double(i)
            svg += String(format: "<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"12\" fill=\"%@\"/>", width - right + 12, ly, s.color)
            svg += String(format: "<text x=\"%.1f\" y=\"%.1f\">%@</text>", width - right + 30, ly + 10, escape(s.label))
        }
        return svg + "</svg>"
    }

    /// Round tick values (1, 2 or 5 times a power of ten apart) from at most `low` to at least `high`,
    /// about five of them; whole numbers only with `integers`.
    static func ticks(low: Double, high: Double, integers: Bool = false) -> [Double] {
        let span = high > low ? high - low : max(abs(high), 1)
        let raw = span / 5
        let power = pow(10, (log10(raw)).rounded(.down))
        var step = [1.0, 2, 5, 10].map { $0 * power }.first { $0 >= raw } ?? 10 * power
        if integers { step = max(1, step.rounded()) }
        let first = (low / step).rounded(.down) * step
        var values: [Double] = []
        var value = first
        repeat {
            values.append(value)
            value = first + Double(values.count) * step
        } while values.last! < high && values.count < 50
        return values.count >= 2 ? values : [first, first + step]
    }

    static func label(_ v: Double) -> String {
        if v == v.rounded() && abs(v) < 1e6 { return String(Int(v)) }
        if abs(v) < 0.001 || abs(v) >= 1e6 { return String(format: "%.3g", v) }
        return abs(v) >= 100 ? String(format: "%.0f", v) : abs(v) >= 1 ? String(format: "%.2f", v) : String(format: "%.3f", v)
    }
}
