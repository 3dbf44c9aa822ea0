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

/// Runs `executable` with `arguments`, killing it after `timeout` seconds.
func runCommand(_ executable: String, _ arguments: [String], timeout: Double = 120) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let outData = ReadAll(out.fileHandleForReading), errData = ReadAll(err.fileHandleForReading)
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning && Date() < deadline { usleep(20_000) }
    if process.isRunning { process.terminate() }
    process.waitUntilExit()
    return CommandResult(status: process.terminationStatus, stdout: outData.text(), stderr: errData.text())
}

/// Reads a pipe to its end on a background thread (so a chatty child never blocks on a full pipe).
final class ReadAll: @unchecked Sendable {
    private var data = Data()
    private let done = DispatchSemaphore(value: 0)
    init(_ handle: FileHandle) {
        Thread.detachNewThread { [self] in
            data = handle.readDataToEndOfFile()
            done.signal()
        }
    }
    func text() -> String {
        done.wait()
        return String(decoding: data, as: UTF8.self)
    }
}

/// Runs `ddpctl start --json` with `arguments` and decodes the summary line.
func startJob(_ arguments: [String], jobsDir: String) throws -> (JobSummary?, CommandResult) {
    let result = try runCommand(Binaries.ddpctl, ["start", "--json", "--jobs-dir", jobsDir] + arguments)
    let line = result.stdout.split(separator: "\n").last.map(String.init) ?? ""
    return (try? JSONDecoder().decode(JobSummary.self, from: Data(line.utf8)), result)
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
/// dir/coordinator.log); returns once it listens.
func launchCoordinator(_ overrides: [String: Any], in dir: String) throws -> (process: Process, job: JobDirectory, endpoints: Endpoints) {
    var spec = try JobSpec.load(path: nil, overrides: overrides)
    spec.output = dir
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    try spec.json().write(toFile: dir + "/spec.json", atomically: true, encoding: .utf8)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: Binaries.ddpd)
    process.arguments = ["coordinator", "--config", dir + "/spec.json", "--job-dir", dir]
    process.standardOutput = FileHandle.nullDevice
    _ = FileManager.default.createFile(atPath: dir + "/coordinator.log", contents: nil)
    process.standardError = FileHandle(forWritingAtPath: dir + "/coordinator.log")
    try process.run()
    let job = JobDirectory(path: dir)
    guard waitUntil(timeout: 10, { job.endpoints() != nil }), let endpoints = job.endpoints() else {
        process.terminate()
        throw ControlError.failed("the coordinator did not start listening within 10 s")
    }
    return (process, job, endpoints)
}
