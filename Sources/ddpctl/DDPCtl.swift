import ArgumentParser
import DDPRuntime

@main
struct DDPCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ddpctl",
        abstract: "Start, watch and stop SwiftDDP training jobs; measure the machine.",
        discussion: """
            Jobs live in $SWIFTDDP_HOME/jobs (default ~/.swiftddp/jobs).
            Commands take the newest job unless given --job. Examples:
              ddpctl start --workers 2      (train the bundled digits)
              ddpctl start --detach         (then: ddpctl watch)
              ddpctl status --json          (fields in README.md)
            Exit status: 0 success, 1 failure (a one-line reason), 64 bad arguments.
            """,
        version: SwiftDDPVersion.text,
        subcommands: [Start.self, Status.self, Watch.self, Stop.self, Logs.self, List.self, Remove.self, Prune.self, Report.self,
                      Metrics.self, Predict.self, Evaluate.self, Generate.self, Doctor.self, Keygen.self, Bench.self, Chaos.self, Supervise.self])

    /// Runs the command; Foundation's file errors are reported as sentences (see `Readable`).
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            exit(withError: Readable.error(error))
        }
    }
}
