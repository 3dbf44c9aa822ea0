import Autodiff
import DDPData
import Foundation

/// Samples to predict or evaluate, read for a model: its raw feature rows and, where the file has them,
/// their labels (class names or target values, as text).
public struct ModelInputs {
    public let features: [Float]
    public let labels: [String]?
    /// Where each sample is in its file ("line 7", "sample 3"), for messages.
    public let places: [String]
    public var count: Int { places.count }

    /// Reads `path` (CSV, `.npy`, or an IDX image file) and optionally `labelsPath` (`.npy` or IDX labels)
    /// for `model`. A CSV with one column more than the model's features has the model's label column;
    /// one with exactly its features has no labels.
    public init(path: String, labelsPath: String?, for model: ModelDescription) throws {
        let width = model.featuresPerSample
        let bytes = [UInt8](try Self.read(path).prefix(8))
        if bytes.starts(with: [0x93] + Array("NUMPY".utf8)) {
            let array = try NumpyArray(path: path)
            let count = array.shape.first ?? 0
            guard array.shape.count >= 2, array.shape.dropFirst().reduce(1, *) == width else {
                throw DataError.malformed(path, "features of shape \(array.shape); the model takes samples of \(model.inputShape)")
            }
            features = array.values.map { Float($0) }
            places = (0..<count).map { "sample \($0 + 1)" }
        } else if bytes.count >= 4 && bytes[0] == 0 && bytes[1] == 0 && bytes[2] == 0x08 && bytes[3] == 3 {
            let images = try DataReader.idxImages(path: path)
            guard images.rows * images.columns == width else {
                throw DataError.malformed(path, "images of \(images.rows)x\(images.columns); the model takes samples of \(model.inputShape)")
            }
            features = images.values
            places = (0..<images.count).map { "image \($0 + 1)" }
        } else {
            let data = try Self.read(path)
            guard let text = String(data: data, encoding: .utf8) else { throw DataError.malformed(path, "not UTF-8 text, .npy or IDX") }
            let delimiter = JobSpec.delimiterCharacter(model.delimiter) ?? ","
            let table = try CSVTable(text: text, name: path, delimiter: delimiter)
            let columns = table.header?.count ?? table.rows[0].count
            guard columns == width || columns == width + 1 else {
                throw DataError.malformed(path, "\(columns) columns; the model takes \(width) features (and optionally its label column)")
            }
            let label = columns == width ? nil : try table.column(model.labelColumn, width: columns, name: path)
            features = try table.features(width: columns, skipping: label, name: path)
            places = table.lines.map { "line \($0)" }
            if let label {
                guard labelsPath == nil else {
                    throw DataError.invalidOption("\(path) has a label column already; give no separate labels file")
                }
                labels = table.rows.map { $0[label] }
                return
            }
        }
        guard let labelsPath else { labels = nil; return }
        labels = try Self.labels(labelsPath, count: places.count)
    }

    static func read(_ path: String) throws -> Data {
        guard FileManager.default.fileExists(atPath: path) else { throw DataError.fileNotFound(path) }
        guard let data = FileManager.default.contents(atPath: path) else { throw DataError.malformed(path, "cannot be read") }
        return data
    }

    /// Labels from a `.npy` or IDX label file, as text.
    static func labels(_ path: String, count: Int) throws -> [String] {
        let bytes = [UInt8](try read(path))
        let values: [Double]
        if bytes.starts(with: [0x93] + Array("NUMPY".utf8)) {
            let array = try NumpyArray(path: path)
            guard array.shape.count == 1 else { throw DataError.malformed(path, "labels need shape [n], got \(array.shape)") }
            values = array.values
        } else {
            values = try DataReader.idxLabels(path: path).map { Double($0) }
        }
        guard values.count == count else { throw DataError.malformed(path, "\(values.count) labels for \(count) samples") }
        return values.map { $0 == $0.rounded() && abs($0) < 1e15 ? "\(Int($0))" : "\($0)" }
    }
}

/// How a model did on labelled samples: for classification the loss, accuracy, a confusion matrix and
/// each class's precision and recall; for regression the mean squared error, R² and mean absolute error.
public struct Evaluation: Codable {
    public struct ClassScore: Codable {
        public var name: String
        public var precision: Double
        public var recall: Double
        /// Samples whose label is this class.
        public var support: Int
    }

    public var samples: Int
    public var task: String
    public var loss: Double?
    public var accuracy: Double?
    public var classes: [ClassScore]?
    /// `confusion[true][predicted]` counts.
    public var confusion: [[Int]]?
    public var mse: Double?
    public var r2: Double?
    public var mae: Double?

    enum CodingKeys: String, CodingKey { case samples, task, loss, accuracy, classes, confusion, mse, r2, mae }

    /// Scores `model` on `inputs`, which must have labels the model knows.
    public init(model: TrainedModel, inputs: ModelInputs) throws {
        guard let labels = inputs.labels else {
            throw DataError.invalidOption("the data has no labels to evaluate against (a CSV with the label column, or --labels FILE)")
        }
        let outputs = model.outputs(rawFeatures: inputs.features).scalars
        samples = inputs.count
        task = model.description.task
        if model.description.isRegression {
            var targets: [Double] = []
            for (label, place) in zip(labels, inputs.places) {
                guard let y = Double(label), y.isFinite else { throw DataError.malformed(place, "target '\(label)' is not a finite number") }
                targets.append(y)
            }
            let mean = targets.reduce(0, +) / Double(max(targets.count, 1))
            var squared = 0.0, absolute = 0.0, total = 0.0
            for (p, y) in zip(outputs, targets) {
                squared += (Double(p) - y) * (Double(p) - y)
                absolute += abs(Double(p) - y)
                total += (y - mean) * (y - mean)
            }
            let n = Double(max(targets.count, 1))
            mse = squared / n
            mae = absolute / n
            r2 = total > 0 ? 1 - squared / total : 0
            return
        }
        let names = model.description.classNames
        let id = Dictionary(uniqueKeysWithValues: names.enumerated().map { ($0.element, $0.offset) })
        var matrix = Array(repeating: Array(repeating: 0, count: names.count), count: names.count)
        var totalLoss = 0.0, correct = 0
        for (row, (label, place)) in zip(labels, inputs.places).enumerated() {
            guard let truth = id[ClassLabels.canonical(label)] else {
                throw DataError.malformed(place, "label '\(label)' is not a class of the model (\(names.prefix(20).joined(separator: ", "))\(names.count > 20 ? ", ..." : ""))")
            }
            let probabilities = outputs[row * names.count..<(row + 1) * names.count]
            let predicted = probabilities.indices.max { probabilities[$0] < probabilities[$1] }! - row * names.count
            matrix[truth][predicted] += 1
            if predicted == truth { correct += 1 }
            totalLoss -= log(max(Double(probabilities[row * names.count + truth]), 1e-45))
        }
        loss = totalLoss / Double(max(samples, 1))
        accuracy = Double(correct) / Double(max(samples, 1))
        confusion = matrix
        classes = names.indices.map { c in
            let predictedAs = matrix.reduce(0) { $0 + $1[c] }, actual = matrix[c].reduce(0, +)
            return ClassScore(name: names[c], precision: predictedAs > 0 ? Double(matrix[c][c]) / Double(predictedAs) : 0,
                              recall: actual > 0 ? Double(matrix[c][c]) / Double(actual) : 0, support: actual)
        }
    }

    /// The report as text: the scores, then (classification) a table per class and the confusion matrix.
    public var text: String {
        if let mse, let r2, let mae {
            return String(format: "%d samples: MSE %.6g, R² %.4f, MAE %.6g", samples, mse, r2, mae)
        }
        var lines = [String(format: "%d samples: loss %.4f, accuracy %.2f%%", samples, loss ?? 0, (accuracy ?? 0) * 100)]
        guard let classes, let confusion else { return lines[0] }
        let width = max(5, classes.map(\.name.count).max() ?? 0)
        lines.append("")
        lines.append("class".padding(toLength: width, withPad: " ", startingAt: 0) + "  precision  recall  support")
        for c in classes {
            lines.append(c.name.padding(toLength: width, withPad: " ", startingAt: 0)
                         + String(format: "  %9.4f  %6.4f  %7d", c.precision, c.recall, c.support))
        }
        lines.append("")
        lines.append("confusion matrix (rows: true class, columns: predicted)")
        let cell = max(width, confusion.flatMap { $0 }.map { "\($0)".count }.max() ?? 1)
        func pad(_ s: String) -> String { String(repeating: " ", count: max(0, cell - s.count)) + s }
        lines.append(pad("") + " " + classes.map { pad($0.name) }.joined(separator: " "))
        for (c, row) in zip(classes, confusion) { lines.append(pad(c.name) + " " + row.map { pad("\($0)") }.joined(separator: " ")) }
        return lines.joined(separator: "\n")
    }
}

/// Writes predictions: CSV (a `class` column, or one probability column per class, or `value`) or `.npy`
/// (class ids as int64, probabilities or values as float32).
public enum PredictionOutput {
    /// The predictions of `outputs` (from `TrainedModel.outputs`) as file bytes for `path` (`.npy` or CSV).
    public static func encode(_ outputs: Tensor, model: ModelDescription, probabilities: Bool, npy: Bool) -> Data {
        let rows = outputs.shape[0], width = outputs.shape[1]
        let values = outputs.scalars
        let best = (0..<rows).map { r in (0..<width).max { values[r * width + $0] < values[r * width + $1] } ?? 0 }
        if npy {
            if model.isRegression { return NumpyArray.encode(float32: values, shape: [rows]) }
            return probabilities ? NumpyArray.encode(float32: values, shape: [rows, width]) : NumpyArray.encode(int64: best.map(Int64.init), shape: [rows])
        }
        var text: String
        if model.isRegression {
            text = "value\n" + values.map { "\($0)" }.joined(separator: "\n")
        } else if probabilities {
            text = "class," + model.classNames.map { csvField("p_" + $0) }.joined(separator: ",")
            for r in 0..<rows {
                text += "\n" + csvField(model.classNames[best[r]]) + "," + (0..<width).map { String(format: "%.6g", values[r * width + $0]) }.joined(separator: ",")
            }
        } else {
            text = "class\n" + best.map { csvField(model.classNames[$0]) }.joined(separator: "\n")
        }
        return Data((text + "\n").utf8)
    }

    /// A CSV field, quoted when it holds a comma, a quote or a line break.
    static func csvField(_ text: String) -> String {
        text.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" })
            ? "\"" + text.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : text
    }
}
