/// Class labels as a file gives them (integers or words) turned into class ids `0..<names.count`.
///
/// Integers that are dense from 0 (the largest below 100 or twice the number of distinct values) keep their
/// value as their id; other integers (sparse ones, negative ones such as -1/1) and words are numbered in
/// sorted order. `names[id]` is the label as written (integers without a fraction), so that predictions
/// can be given back in the file's own terms.
public struct ClassLabels: Sendable, Equatable {
    /// The class id of each sample.
    public let ids: [Int32]
    /// The label of each class id.
    public let names: [String]
    /// The most distinct labels a classification set may have; more means the column is not a class.
    public static let largestClassCount = 10_000

    /// Encodes `labels`; `source` names the file and `place(i)` the position of sample i ("line 7") in errors.
    public init(_ labels: [String], source: String, where place: (Int) -> String) throws {
        guard !labels.isEmpty else { throw DataError.malformed(source, "no samples") }
        for (i, label) in labels.enumerated() where label.isEmpty {
            throw DataError.malformed(source, "\(place(i)): the label is empty")
        }
        let integers = labels.map(Self.integer)
        let distinct: Int
        if integers.allSatisfy({ $0 != nil }) {
            let values = integers.map { $0! }
            let unique = Set(values)
            distinct = unique.count
            if values.min()! >= 0 && (values.max()! < 2 * unique.count || values.max()! < 100) {
                ids = values.map { Int32($0) }
                names = (0...values.max()!).map { "\($0)" }
            } else {
                let sorted = unique.sorted()
                let id = Dictionary(uniqueKeysWithValues: sorted.enumerated().map { ($0.element, Int32($0.offset)) })
                ids = values.map { id[$0]! }
                names = sorted.map { "\($0)" }
            }
        } else {
            let sorted = Set(labels).sorted()
            distinct = sorted.count
            let id = Dictionary(uniqueKeysWithValues: sorted.enumerated().map { ($0.element, Int32($0.offset)) })
            ids = labels.map { id[$0]! }
            names = sorted
        }
        if distinct > Self.largestClassCount || (distinct > 100 && 2 * distinct > labels.count) {
            throw DataError.malformed(source, "\(distinct) distinct labels in \(labels.count) samples: that is not a class column "
                + "(choose the label with label_column, or set task: regression for a real-valued target)")
        }
    }

    /// Integer labels (from IDX or `.npy` files) encoded by the same rule.
    public init(integers: [Int64], source: String, where place: (Int) -> String) throws {
        try self.init(integers.map { "\($0)" }, source: source, where: place)
    }

    /// The integer a label spells (`3`, `3.0`, `-1`), if it spells one.
    static func integer(_ text: String) -> Int? {
        if let value = Int(text) { return value }
        guard let value = Double(text), value == value.rounded(), abs(value) < 1e15 else { return nil }
        return Int(value)
    }

    /// The label `text` in the spelling `names` use (`3.0` is `3`).
    public static func canonical(_ text: String) -> String { integer(text).map { "\($0)" } ?? text }
}
