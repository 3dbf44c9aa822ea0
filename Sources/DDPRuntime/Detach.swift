import Foundation

/// Starting a process that outlives its parent and its terminal.
public enum Detach {
    /// Starts `executable` with `arguments` in a new session (no controlling terminal, immune to the
    /// terminal's SIGINT and SIGHUP), with standard input from /dev/null and both outputs appended to
    /// `logPath`. Returns its process id.
    public static func spawn(
        _ executable: String, _ arguments: [String], logPath: String, environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> Int32 {
        try spawn(executable, arguments, standardOutput: logPath, standardError: nil, environment: environment)
    }

    /// Starts `executable` with `arguments` in a new session (its own process group, so `kill(-pid, ...)`
    /// reaches everything it started there), standard input from /dev/null, standard output appended to
    /// `standardOutput` and standard error to `standardError` (or to the same file when nil). No other
    /// descriptor is inherited: a pipe or socket held open by a daemon the process leaves behind would
    /// otherwise keep whoever waits on it waiting. Returns its process id; the caller reaps it.
    public static func spawn(
        _ executable: String, _ arguments: [String], standardOutput: String, standardError: String?,
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> Int32 {
        var actions = posix_spawn_file_actions_t()
        var attributes = posix_spawnattr_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawnattr_init(&attributes)
        defer {
            posix_spawn_file_actions_destroy(&actions)
            posix_spawnattr_destroy(&attributes)
        }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, standardOutput, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        if let standardError {
            posix_spawn_file_actions_addopen(&actions, 2, standardError, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        } else {
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }
        closeInheritedDescriptors(&actions)
        // A new session, with no signal blocked or ignored: whatever the caller masked (a test runner, a
        // shell's background job) must not keep a job's processes from hearing SIGTERM.
        let setSession: Int16 = 0x80  // POSIX_SPAWN_SETSID (glibc)
        var none = sigset_t(), all = sigset_t()
        sigemptyset(&none)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, setSession | Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in argv + envp { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
        guard rc == 0 else { throw ControlError.failed("cannot start \(executable): \(String(cString: strerror(rc)))") }
        return pid
    }

    /// Adds "close every descriptor above 2" to `actions`: in one step with glibc's closefrom action (2.34
    /// and later, which also covers descriptors other threads open meanwhile), else one by one.
    private static func closeInheritedDescriptors(_ actions: inout posix_spawn_file_actions_t) {
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
        if let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np"),
            unsafeBitCast(symbol, to: CloseFrom.self)(&actions, 3) == 0 {
            return
        }
        for fd in openDescriptors() where fd > 2 { posix_spawn_file_actions_addclose(&actions, fd) }
    }

    /// The file descriptors open in this process.
    static func openDescriptors() -> [Int32] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return names.compactMap { Int32($0) }.filter { fcntl($0, F_GETFD) != -1 }
    }
}
