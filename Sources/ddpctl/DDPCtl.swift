import ArgumentParser
import DDPRuntime

@main
struct DDPCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ddpctl",
        abstract: "Start, watch and stop SwiftDDP training jobs; measure the machine.",
        subcommands: [Start.self, Status.self, Watch.self, Stop.self, Logs.self, List.self, Report.self,
                      Metrics.self, Doctor.self, Keygen.self, Bench.self, Supervise.self])
}
