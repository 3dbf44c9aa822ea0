/// The transform applied to raw feature values before the model sees them: `x' = (x - shift) / divisor`,
/// with one shift and divisor for all features or one per feature. Its statistics come from the training
/// split only (the held-out part must not leak into them) and travel in the model file, so that predict
/// and evaluate apply exactly what training did.
public struct Preprocessing: Codable, Sendable, Equatable {
    /// How the statistics are chosen.
    public enum Kind: String, Codable, Sendable, CaseIterable {
        /// Values as they are.
        case none
        /// Divided by the largest absolute value (pixels into [0, 1]; one divisor for all features).
        case max
        /// Each feature mapped to [0, 1] by its minimum and maximum.
        case minmax
        /// Each feature to mean 0 and standard deviation 1.
        case standardize
    }

    public var kind: Kind
    /// One value, or one per feature.
    public var shift: [Float]
    /// One value, or one per feature; never 0 (a constant feature gets 1).
    public var divisor: [Float]

    public init(kind: Kind, shift: [Float], divisor: [Float]) {
        self.kind = kind
        self.shift = shift
        self.divisor = divisor
    }

    /// The transform of `kind` with the statistics of `data`'s features.
    public static func fit(_ kind: Kind, to data: Dataset) -> Preprocessing {
        fit(kind, features: data.features, perSample: data.featuresPerSample)
    }

    /// The transform of `kind` with the statistics of `features` (`perSample` values a sample).
    public static func fit(_ kind: Kind, features: [Float], perSample width: Int) -> Preprocessing {
        let rows = features.count / max(width, 1)
        switch kind {
        case .none:
            return Preprocessing(kind: kind, shift: [0], divisor: [1])
        case .max:
            let top = features.reduce(Float(0)) { Swift.max($0, abs($1)) }
            return Preprocessing(kind: kind, shift: [0], divisor: [top > 0 ? top : 1])
        case .minmax:
            var low = [Float](repeating: .infinity, count: width), high = [Float](repeating: -.infinity, count: width)
            for r in 0..<rows {
                for f in 0..<width {
                    let v = features[r * width + f]
                    low[f] = Swift.min(low[f], v)
                    high[f] = Swift.max(high[f], v)
                }
            }
            return Preprocessing(kind: kind, shift: low, divisor: zip(low, high).map { $1 > $0 ? $1 - $0 : 1 })
        case .standardize:  // two passes: the mean, then the squared deviations from it (no cancellation)
            var mean = [Double](repeating: 0, count: width), squares = [Double](repeating: 0, count: width)
            for r in 0..<rows { for f in 0..<width { mean[f] += Double(features[r * width + f]) } }
            let n = Double(Swift.max(rows, 1))
            for f in 0..<width { mean[f] /= n }
            for r in 0..<rows {
                for f in 0..<width {
                    let d = Double(features[r * width + f]) - mean[f]
                    squares[f] += d * d
                }
            }
            let deviation = squares.map { ($0 / n).squareRoot() }
            return Preprocessing(kind: kind, shift: mean.map { Float($0) }, divisor: deviation.map { $0 > 1e-12 ? Float($0) : 1 })
        }
    }

    /// Whether it changes nothing.
    public var isIdentity: Bool { shift.allSatisfy { $0 == 0 } && divisor.allSatisfy { $0 == 1 } }

    /// Transforms rows of `perSample` values in place.
    public func apply(to values: inout [Float], perSample width: Int) {
        guard !isIdentity else { return }
        let perFeature = shift.count > 1
        values.withUnsafeMutableBufferPointer { v in
            for i in v.indices {
                let f = perFeature ? i % width : 0
                v[i] = (v[i] - shift[f]) / divisor[f]
            }
        }
    }

    /// `data` with its features transformed.
    public func apply(to data: Dataset) -> Dataset {
        var values = data.features
        apply(to: &values, perSample: data.featuresPerSample)
        return data.withFeatures(values)
    }

    /// Checks that it fits samples of `width` features.
    public func check(width: Int) throws {
        guard (shift.count == 1 || shift.count == width) && shift.count == divisor.count else {
            throw DataError.invalidOption("the preprocessing has \(shift.count) statistics; the data has \(width) features a sample")
        }
    }
}
