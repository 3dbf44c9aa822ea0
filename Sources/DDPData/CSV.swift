import Foundation

/// How a CSV file is read: which column holds the label (or regression target), what separates fields.
public struct CSVOptions: Sendable, Equatable {
    /// The label column: a header name, or a 0-based index (negative counts from the end: -1 is the last).
    public var labelColumn: String
    /// The field separator (`,`, `;`, a tab, ...).
    public var delimiter: Character
    /// Whether the label is a real-valued target instead of a class.
    public var regression: Bool

    public init(labelColumn: String = "0", delimiter: Character = ",", regression: Bool = false) {
        self.labelColumn = labelColumn
        self.delimiter = delimiter
        self.regression = regression
    }
}

/// The rows of a CSV text (RFC 4180: fields in double quotes may hold the delimiter, line breaks and `""`
/// for a quote; LF, CRLF and CR line endings), with the 1-based line on which each row starts. A first row
/// with a field that is not a number, outside the label column, is the header.
public struct CSVTable: Sendable {
    public let header: [String]?
    public let rows: [[String]]
    /// The 1-based line number of each row, for messages.
    public let lines: [Int]

    /// Parses `text`; `name` (the file) appears in errors.
    public init(text: String, name: String, delimiter: Character = ",") throws {
        var rows: [[String]] = [], lines: [Int] = []
        var field = "", row: [String] = []
        var quoted = false, fieldWasQuoted = false
        var line = 1, rowLine = 1
        var iterator = text.unicodeScalars.makeIterator()
        var pending: Unicode.Scalar? = nil
        func endRow() {
            row.append(fieldWasQuoted ? field : field.trimmingCharacters(in: .whitespaces))
            if !(row.count == 1 && row[0].isEmpty && !fieldWasQuoted) { rows.append(row); lines.append(rowLine) }
            row = []; field = ""; fieldWasQuoted = false
        }
        let delimiterScalar = delimiter.unicodeScalars.first!
        while let c = pending ?? iterator.next() {
            pending = nil
            if quoted {
                if c == "\"" {
                    let next = iterator.next()
                    if next == "\"" { field.unicodeScalars.append("\"") } else { quoted = false; pending = next }
                } else {
                    if c == "\n" { line += 1 }
                    field.unicodeScalars.append(c)
                }
                continue
            }
            switch c {
            case "\"" where field.trimmingCharacters(in: .whitespaces).isEmpty && !fieldWasQuoted:
                quoted = true; fieldWasQuoted = true; field = ""
            case delimiterScalar:
                row.append(fieldWasQuoted ? field : field.trimmingCharacters(in: .whitespaces))
                field = ""; fieldWasQuoted = false
            case "\r", "\n":
                if c == "\r" { let next = iterator.next(); if next != "\n" { pending = next } }
                endRow()
                line += 1
                rowLine = line
            default:
                if fieldWasQuoted && c != " " && c != "\t" {
                    throw DataError.malformed(name, "line \(line): text after a closing quote")
                }
                if !fieldWasQuoted { field.unicodeScalars.append(c) }
            }
        }
        if quoted { throw DataError.malformed(name, "line \(rowLine): a quoted field is not closed") }
        if !field.isEmpty || !row.isEmpty || fieldWasQuoted { endRow() }
        guard let first = rows.first else { throw DataError.malformed(name, "no data rows") }
        // A header has a field that is not a number; data rows may have a text label in any one column,
        // so the first row is a header when more than one of its fields is text, or its only text field
        // is also text in no other row (a label column of words makes every row have one).
        let textColumns = first.indices.filter { Float(first[$0]) == nil }
        let isHeader: Bool
        if textColumns.count > 1 { isHeader = true } else if let column = textColumns.first {
            isHeader = rows.count > 1 && rows.dropFirst().allSatisfy { column < $0.count && Float($0[column]) != nil }
        } else { isHeader = false }
        header = isHeader ? first : nil
        self.rows = isHeader ? Array(rows.dropFirst()) : rows
        self.lines = isHeader ? Array(lines.dropFirst()) : lines
        guard !self.rows.isEmpty else { throw DataError.malformed(name, "no data rows after the header") }
    }

    /// The column `labelColumn` names (a header name or a 0-based index, negative from the end) in rows
    /// of `width` fields.
    public func column(_ labelColumn: String, width: Int, name: String) throws -> Int {
        if let index = Int(labelColumn) {
            let resolved = index < 0 ? width + index : index
            guard resolved >= 0 && resolved < width else {
                throw DataError.invalidOption("label column \(labelColumn) is outside the \(width) columns of \(name)")
            }
            return resolved
        }
        guard let header else {
            throw DataError.invalidOption("label column '\(labelColumn)' is a name, but \(name) has no header row; give its index")
        }
        guard let index = header.firstIndex(of: labelColumn) else {
            throw DataError.invalidOption("\(name) has no column '\(labelColumn)' (columns: \(header.joined(separator: ", ")))")
        }
        return index
    }

    /// The features of every row, all columns but `skipping`, as numbers; every row must have `width` fields.
    public func features(width: Int, skipping label: Int?, name: String) throws -> [Float] {
        var features: [Float] = []
        features.reserveCapacity(rows.count * (width - (label == nil ? 0 : 1)))
        for (row, line) in zip(rows, lines) {
            guard row.count == width else {
                let expected = label == nil ? "\(width) features" : "\(width) fields (a label and \(width - 1) features)"
                throw DataError.malformed(name, "line \(line): \(row.count) fields, expected \(expected)")
            }
            for (column, field) in row.enumerated() where column != label {
                guard let value = Float(field), value.isFinite else {
                    throw DataError.malformed(name, "line \(line), column \(column + 1): '\(field)' is not a finite number")
                }
                features.append(value)
            }
        }
        return features
    }
}

extension DataReader {
    /// A CSV file of one label column (a class: an integer or a word; or, with `regression`, a real-valued
    /// target) and numeric features (see `CSVTable` and `CSVOptions`).
    public static func csv(path: String, options: CSVOptions = CSVOptions()) throws -> Dataset {
        let data = try read(path)
        guard let text = String(data: data, encoding: .utf8) else { throw DataError.malformed(path, "not UTF-8 text") }
        return try csv(text: text, name: path, options: options)
    }

    /// Parses CSV text as `csv(path:options:)` does; `name` appears in errors.
    public static func csv(text: String, name: String, options: CSVOptions = CSVOptions()) throws -> Dataset {
        let table = try CSVTable(text: text, name: name, delimiter: options.delimiter)
        let width = table.header?.count ?? table.rows[0].count
        guard width >= 2 else { throw DataError.malformed(name, "line \(table.lines[0]): needs a label and at least one feature") }
        let label = try table.column(options.labelColumn, width: width, name: name)
        let features = try table.features(width: width, skipping: label, name: name)
        let labelTexts = table.rows.map { $0[label] }
        if options.regression {
            var targets: [Float] = []
            for (text, line) in zip(labelTexts, table.lines) {
                guard let target = Float(text), target.isFinite else {
                    throw DataError.malformed(name, "line \(line): target '\(text)' is not a finite number")
                }
                targets.append(target)
            }
            return try Dataset(name: name, featureShape: [width - 1], features: features, targets: targets)
        }
        let classes = try ClassLabels(labelTexts, source: name, where: { "line \(table.lines[$0])" })
        return try Dataset(name: name, featureShape: [width - 1], features: features, labels: classes.ids, classNames: classes.names)
    }
}
