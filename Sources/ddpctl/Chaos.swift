import ArgumentParser
import DDPRuntime
import Foundation

/// `ddpctl chaos`: real jobs with faults at random moments, checked against what the README promises.
struct Chaos: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run local jobs with injected faults (kills, pauses, a corrupt checkpoint) and check each outcome.",
        discussion: """
            Each round starts a digits job, injects 1-3 faults at random steps (SIGKILL or SIGSTOP/SIGCONT of a worker
            or the coordinator, a corrupt newest checkpoint then a coordinator kill), and checks that the job completes,
            counts every sample exactly once (the clean run's ddp_samples_total), ends bitwise like the clean run when
            only the coordinator was disturbed (else within 1 point of accuracy), leaves no process behind and that no
            process crashed. The seed is printed; the same seed gives the same fault schedule. --set adds job keys
            (with backup_workers or balance: speed, whose steps depend on timing, no round is held to bitwise equality;
            with sync_every > 1, none that resumed from a checkpoint older than the last round).
            Examples: ddpctl chaos --rounds 3; ddpctl chaos --minutes 10 --seed 42; ddpctl chaos --set sync_every=4
            Exit status: 0 every round passed, 1 one failed (its job directory is kept).
            """)
    @Option(help: "Rounds to run (with --minutes: at most).") var rounds: Int?
    @Option(help: "Run rounds for this long.") var minutes: Double?
    @Option(help: "The seed of the fault schedule (default: random, printed).") var seed: UInt64?
    @Option(help: "Worker processes per job.") var workers = 3
    @Option(help: "Epochs per job.") var epochs = 60
    @Option(help: "Where the jobs go (default: a new temporary folder).") var jobsDir: String?
    @Option(help: "A job key for every run: KEY=VALUE, as for ddpctl start (repeatable).") var set: [String] = []

    func run() throws {
        let seed = seed ?? UInt64.random(in: 0...UInt64(UInt32.max))
        let dir = jobsDir ?? NSTemporaryDirectory() + "ddp-chaos-\(seed)"
        var chaos: ChaosRun
        do {
            chaos = try ChaosRun(ddpctl: currentExecutable(), jobsDir: dir, seed: seed, workers: workers, epochs: epochs, keys: set)
        } catch {
            throw invalidJob(error)
        }
        print("chaos: seed \(seed), jobs in \(dir)" + (set.isEmpty ? "" : ", keys \(set.joined(separator: " "))")
              + (chaos.repeatsBitwise ? "" : " (steps depend on timing: no round is held to bitwise equality)"))
        let limit = rounds ?? (minutes == nil ? 3 : Int.max)
        let done = try chaos.run(rounds: limit, seconds: (minutes ?? 1e9) * 60) { index, round in
            let faults = round.faults.map(\.rawValue).joined(separator: ", ")
            print(String(format: "round %d (%.1f s): %@ -> %@", index, round.seconds, faults.isEmpty ? "no fault (the job ended first)" : faults,
                         round.failures.isEmpty ? "ok" : "FAILED: " + round.failures.joined(separator: "; ")))
        }
        var injected: [String: (all: Int, survived: Int)] = [:]
        for round in done {
            for fault in round.faults {
                injected[fault.rawValue, default: (0, 0)].all += 1
                if round.failures.isEmpty { injected[fault.rawValue]!.survived += 1 }
            }
        }
        let passed = done.filter(\.failures.isEmpty).count
        print("\(passed)/\(done.count) rounds passed; faults survived: "
              + injected.sorted { $0.key < $1.key }.map { "\($0.value.survived)/\($0.value.all) \($0.key)" }.joined(separator: ", "))
        if passed < done.count { throw ExitCode.failure }
    }
}
