import Foundation
import Logging

/// One line per event on standard error: UTC time, level, the process's role, message, metadata.
public struct LineLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    private let label: String

    public init(label: String, level: Logger.Level) {
        self.label = label
        logLevel = level
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        let fields = merged.sorted { $0.key < $1.key }.map { " \($0.key)=\($0.value)" }.joined()
        let time = Date().formatted(.iso8601.year().month().day().dateSeparator(.dash).time(includingFractionalSeconds: true).timeSeparator(.colon))
        SafeOutput.print("\(time) \(event.level) \(label): \(event.message)\(fields)\n", to: 2)  // a full disk loses the line, not the process
    }
}

/// Process-wide logging set-up for the executables.
public enum DDPLogging {
    /// Sends every logger to `LineLogHandler` at `level`. Call once, first thing.
    public static func bootstrap(level: Logger.Level) {
        LoggingSystem.bootstrap { LineLogHandler(label: $0, level: level) }
    }
}

extension Logger.Level {
    /// Parses a `--log-level` value.
    public init?(flag: String) { self.init(rawValue: flag.lowercased()) }
}
