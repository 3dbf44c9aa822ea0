import ArgumentParser
import DDPRuntime
import Foundation

/// Removing job directories: of named jobs (`rm`) or of old ended ones (`prune`). A job that runs is never removed.
enum JobRemoval {
    /// Removes `job`'s directory unless it runs; returns why not, or nil when it is gone.
    static func remove(_ job: JobDirectory, dryRun: Bool) -> String? {
        if JobLookup.isRunning(job) { return "it is running (stop it first: ddpctl stop --job \(job.path))" }
        if dryRun { return nil }
        do { try FileManager.default.removeItem(atPath: job.path) } catch { return Readable.message(error) }
        return nil
    }

    /// The size of a directory's files in bytes.
    static func size(of path: String) -> Int {
        guard let files = FileManager.default.enumerator(atPath: path) else { return 0 }
        var total = 0
        for case let name as String in files {
            total += ((try? FileManager.default.attributesOfItem(atPath: path + "/" + name))?[.size] as? Int) ?? 0
        }
        return total
    }

    static func megabytes(_ bytes: Int) -> String { String(format: "%.1f MB", Double(bytes) / 1_000_000) }
}

struct Remove: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rm",
        abstract: "Remove jobs' directories (model, checkpoints, logs): jobs that have ended, by id or directory.",
        discussion: "Examples: ddpctl rm job-20261127-063000-4f2a; ddpctl rm --dry-run ID1 ID2")
    @Argument(help: "Job ids or directories.") var jobs: [String]
    @Option(help: "Where job directories are (default: $SWIFTDDP_HOME/jobs or ~/.swiftddp/jobs).") var jobsDir: String?
    @Flag(help: "Say what would be removed, and remove nothing.") var dryRun = false

    func validate() throws {
        if jobs.isEmpty { throw ValidationError("name at least one job (ddpctl list shows them; ddpctl prune removes old ones)") }
    }

    func run() throws {
        var failures = 0
        for name in jobs {
            let job: JobDirectory
            do { job = try JobLookup.find(name, root: JobLookup.root(jobsDir)) } catch {
                print("not removed \(name): \(error)")
                failures += 1
                continue
            }
            let bytes = JobRemoval.size(of: job.path)
            if let why = JobRemoval.remove(job, dryRun: dryRun) {
                print("not removed \(job.path): \(why)")
                failures += 1
            } else {
                print("\(dryRun ? "would remove" : "removed") \(job.path) (\(JobRemoval.megabytes(bytes)))")
            }
        }
        if failures > 0 { throw ExitCode.failure }
    }
}

struct Prune: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove ended jobs: those older than --older-than, beyond the newest --keep, in the given states.",
        discussion: """
            Running jobs are never removed. Without --older-than and --keep, every ended job in the states goes.
            Examples:
              ddpctl prune --older-than 7d               # ended jobs started more than a week ago
              ddpctl prune --keep 10 --state failed,stopped --dry-run
            """)
    @Option(help: "Where job directories are (default: $SWIFTDDP_HOME/jobs or ~/.swiftddp/jobs).") var jobsDir: String?
    @Option(help: "Only jobs older than this: a number with s, m, h or d (e.g. 36h, 7d).") var olderThan: String?
    @Option(help: "Keep the newest N ended jobs whatever their age.") var keep: Int?
    @Option(help: "States to remove, comma-separated.") var state = "completed,stopped,failed,dead"
    @Flag(help: "Say what would be removed, and remove nothing.") var dryRun = false

    /// Seconds in a duration such as `90s`, `30m`, `36h`, `7d`.
    static func seconds(_ text: String) -> Double? {
        let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
        guard let unit = text.last, let scale = units[unit], let value = Double(text.dropLast()), value >= 0 else { return nil }
        return value * scale
    }

    func validate() throws {
        if let olderThan, Self.seconds(olderThan) == nil { throw ValidationError("--older-than '\(olderThan)' is not a duration such as 36h or 7d") }
        if let keep, keep < 0 { throw ValidationError("--keep must be >= 0, got \(keep)") }
    }

    func run() throws {
        let states = Set(state.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
        let cutoff = olderThan.flatMap(Self.seconds).map { Date().addingTimeInterval(-$0) }
        let ended = JobLookup.all(root: JobLookup.root(jobsDir)).filter { !JobLookup.isRunning($0) }
        let protected = Set(ended.suffix(keep ?? 0).map(\.path))
        var removed = 0, bytes = 0, failures = 0
        for job in ended where !protected.contains(job.path) {
            let status = (try? job.status(timeoutSeconds: 0.5))?.state ?? "dead"
            guard states.contains(status) else { continue }
            if let cutoff, JobLookup.created(job) > cutoff { continue }
            let size = JobRemoval.size(of: job.path)
            if let why = JobRemoval.remove(job, dryRun: dryRun) {
                print("not removed \(job.path): \(why)")
                failures += 1
                continue
            }
            print("\(dryRun ? "would remove" : "removed") \(job.path) (\(status), \(JobRemoval.megabytes(size)))")
            removed += 1
            bytes += size
        }
        print("\(dryRun ? "would remove" : "removed") \(removed) job(s), \(JobRemoval.megabytes(bytes))")
        if failures > 0 { throw ExitCode.failure }
    }
}
