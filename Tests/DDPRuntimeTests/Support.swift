import Foundation
import Testing
@testable import DDPRuntime

/// The built executables of this package (beside the test bundle).
enum Binaries {
    static var directory: URL {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var url = URL(fileURLWithPath: exe).deletingLastPathComponent()
        if url.lastPathComponent == "MacOS" { url = url.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent() }
        return url
    }
    static var ddpd: String { directory.appendingPathComponent("ddpd").path }
    static var ddpctl: String { directory.appendingPathComponent("ddpctl").path }
}

/// A fresh temporary directory (short, so ipc:// socket paths fit).
func temporaryDirectory() throws -> String {
    let path = "/tmp/ddpt-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// The result of running a command to its end.
struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// A process a test starts: in its own session and process group, inheriting no descriptor but its
/// standard ones (so a daemon it leaves behind can never keep the test waiting), and every wait bounded.
final class ChildProcess: @unchecked Sendable {
    let pid: Int32
    private var status: Int32?

    init(_ executable: String, _ arguments: [String], standardOutput: String = "/dev/null", standardError: String = "/dev/null",
         environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        pid = try Detach.spawn(executable, arguments, standardOutput: standardOutput, standardError: standardError, environment: environment)
    }

    /// Whether it has not ended yet (reaps it when it has).
    var isRunning: Bool { reap(blocking: false) == nil }

    /// Waits at most `timeout` seconds for it to end, then kills its process group. Returns its exit status
    /// (128 + the signal's number when a signal ended it).
    @discardableResult
    func wait(timeout: Double) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let status = reap(blocking: false) { return status }
            usleep(20_000)
        }
        kill(-pid, SIGKILL)
        return reap(blocking: true) ?? 128 + SIGKILL
    }

    /// Asks it (and its process group) to end with SIGTERM, and kills the group after `grace` seconds.
    func terminate(grace: Double = 5) {
        guard isRunning else { return }
        kill(-pid, SIGTERM)
        wait(timeout: grace)
    }

    private func reap(blocking: Bool) -> Int32? {
        if let status { return status }
        var raw: Int32 = 0
        let rc = waitpid(pid, &raw, blocking ? 0 : WNOHANG)
        guard rc == pid else { return rc == 0 ? nil : 128 + SIGKILL }
        let signal = raw & 0x7f
        status = signal == 0 ? (raw >> 8) & 0xff : 128 + signal
        return status
    }
}

/// Runs `executable` with `arguments` to its end, killing it (and what it started in its process group)
/// after `timeout` seconds. Its outputs go through files, never pipes, for the reason ChildProcess gives.
func runCommand(_ executable: String, _ arguments: [String], timeout: Double = 120,
                environment: [String: String] = ProcessInfo.processInfo.environment) throws -> CommandResult {
    let dir = try temporaryDirectory()
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let child = try ChildProcess(executable, arguments, standardOutput: dir + "/out", standardError: dir + "/err", environment: environment)
    let deadline = Date().addingTimeInterval(timeout)
    let status = child.wait(timeout: timeout)
    let text = { (name: String) in (try? String(contentsOfFile: "\(dir)/\(name)", encoding: .utf8)) ?? "" }
    let timedOut = Date() >= deadline ? "\n(killed: \(executable) did not end within \(timeout) s)" : ""
    return CommandResult(status: status, stdout: text("out"), stderr: text("err") + timedOut)
}

/// Runs `ddpctl start --json` with `arguments` and decodes the summary line.
func startJob(_ arguments: [String], jobsDir: String) throws -> (JobSummary?, CommandResult) {
    let result = try runCommand(Binaries.ddpctl, ["start", "--json", "--jobs-dir", jobsDir] + arguments)
    let line = result.stdout.split(separator: "\n").last.map(String.init) ?? ""
    return (try? JobJSON.decoder().decode(JobSummary.self, from: Data(line.utf8)), result)
}

/// Starts `ddpctl start --detach` and returns the job's directory.
func startDetachedJob(_ arguments: [String], jobsDir: String) throws -> JobDirectory {
    let started = try runCommand(Binaries.ddpctl, ["start", "--detach", "--json", "--jobs-dir", jobsDir] + arguments, timeout: 30)
    guard started.status == 0,
        let object = try? JSONSerialization.jsonObject(with: Data(started.stdout.utf8)) as? [String: Any],
        let path = object["job_dir"] as? String
    else { throw ControlError.failed("start --detach failed: \(started.stderr)") }
    return JobDirectory(path: path)
}

/// Waits (at most `timeout` seconds) until `condition` holds, polling every 50 ms.
func waitUntil(timeout: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if condition() { return true }
        usleep(50_000)
    }
    return condition()
}

/// The current step of a running job, from its coordinator (0 when it does not answer).
func currentStep(_ job: JobDirectory) -> Int { Int((try? job.status(timeoutSeconds: 1))?.step ?? 0) }

/// Parameters of a finished job's final model, in file order.
func finalParameters(_ job: JobDirectory) throws -> [(name: String, values: [Float])] {
    try SafeTensors.read(path: job.modelPath).tensors.map { ($0.name, $0.tensor.scalars) }
}

/// A coordinator process for a job with `overrides`, in `dir` (spec at dir/spec.json, standard error in
/// dir/coordinator.log), on loopback TCP (plain text unless the overrides give keys_dir: `--insecure`,
/// as these tests speak to it with sockets of their own); returns once it listens.
func launchCoordinator(_ overrides: [String: Any], in dir: String) throws -> (process: ChildProcess, job: JobDirectory, endpoints: Endpoints) {
    var spec = try JobSpec.load(path: nil, overrides: overrides)
    spec.output = dir
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    try spec.json().write(toFile: dir + "/spec.json", atomically: true, encoding: .utf8)
    let process = try ChildProcess(Binaries.ddpd, ["coordinator", "--config", dir + "/spec.json", "--job-dir", dir, "--insecure"],
                                   standardError: dir + "/coordinator.log")
    let job = JobDirectory(path: dir)
    guard waitUntil(timeout: 10, { job.endpoints() != nil }), let endpoints = job.endpoints() else {
        process.terminate()
        throw ControlError.failed("the coordinator did not start listening within 10 s")
    }
    return (process, job, endpoints)
}
