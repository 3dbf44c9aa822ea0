import Foundation
import Testing
@testable import DDPRuntime

/// deploy/: scripts checked, units and manifests validated, and real runs across network namespaces (with
/// the SSH launcher) and under a real single-node Slurm. Tests that need root, iproute2, Slurm or a
/// validator say so and skip where those are missing; CI installs them and runs as root.
@Suite(.serialized)
struct DeployTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    static func which(_ tool: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":").map(String.init)
            + ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
            let path = "\(dir)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return nil
    }
    static var isRoot: Bool { getuid() == 0 }
    static let scripts = ["deploy/slurm/swiftddp.sbatch", "deploy/ssh/launch.sh", "scripts/netns-hosts.sh", "scripts/slurm-single-node.sh",
                          "scripts/setup.sh", "scripts/test.sh", "scripts/demo.sh", "scripts/generate-proto.sh", "scripts/fuzz-wire.sh", ".ci/run",
                          "Benchmarks/stragglers.sh"]

    @Test func shellScriptsParse() throws {
        for script in Self.scripts {
            let result = try runCommand("/bin/bash", ["-n", "\(Self.root)/\(script)"])
            #expect(result.status == 0, "\(script): \(result.stderr)")
        }
    }

    @Test(.enabled(if: which("shellcheck") != nil, "shellcheck is not installed (apt-get install shellcheck)"))
    func shellScriptsPassShellcheck() throws {
        let result = try runCommand(Self.which("shellcheck")!, Self.scripts.map { "\(Self.root)/\($0)" })
        #expect(result.status == 0, "\(result.stdout)")
    }

    @Test(.enabled(if: which("systemd-analyze") != nil, "systemd-analyze is not installed"))
    func systemdUnitsVerify() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var units: [String] = []
        for name in ["ddpd-coordinator", "ddpd-worker"] {
            let text = try String(contentsOfFile: "\(Self.root)/deploy/systemd/\(name)@.service", encoding: .utf8)
                .replacingOccurrences(of: "/usr/local/bin/ddpd", with: Binaries.ddpd)
                .replacingOccurrences(of: "EnvironmentFile=/etc/swiftddp/%i.env", with: "EnvironmentFile=\(Self.root)/deploy/systemd/swiftddp.env")
            let path = "\(dir)/\(name)@job.service"
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            units.append(path)
        }
        let result = try runCommand(Self.which("systemd-analyze")!, ["verify", "--man=no"] + units)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(!result.stderr.contains("ignoring"), "\(result.stderr)")
    }

    @Test(.enabled(if: which("kubernetes-validate") != nil, "kubernetes-validate is not installed (pip install kubernetes-validate)"))
    func kubernetesManifestsValidate() throws {
        let dir = "\(Self.root)/deploy/kubernetes"
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".yaml") }.sorted()
        #expect(files.count >= 4)
        let result = try runCommand(Self.which("kubernetes-validate")!, ["--strict"] + files.map { "\(dir)/\($0)" })
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.components(separatedBy: "passed").count - 1 >= 6)
    }

    @Test(.enabled(if: isRoot && which("ip") != nil, "needs root and iproute2 for network namespaces"))
    func jobAcrossNetworkNamespacesSurvivesACutHost() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let hosts3 = try NetnsHosts(prefix: "dd", count: 3)
        defer { hosts3.down() }
        let (prefix, subnet, netns) = (hosts3.prefix, hosts3.subnet, NetnsHosts.script)

        #expect(try runCommand(Binaries.ddpctl, ["keygen", "--out", dir + "/keys"]).status == 0)
        // The namespaces share this machine's memory; shared_memory off makes every tensor cross their links,
        // as between real hosts.
        try "epochs: 150\nkeys_dir: \(dir)/keys\nshared_memory: false\n".write(toFile: dir + "/job.yaml", atomically: true, encoding: .utf8)
        let jobDir = dir + "/job"
        let launcherPath = "\(Self.root)/deploy/ssh/launch.sh"
        let environment = try hosts3.sshEnvironment(in: dir)
        // A coordinator shard beside the leader, reached by the workers at the leader host's address.
        let hosts = ["--coordinator", "\(prefix)0", "--address", "\(subnet).10", "--workers", "\(prefix)1,\(prefix)2", "--job-dir", jobDir,
                     "--shards", "\(prefix)0", "--shard-addresses", "\(subnet).10"]
        let started = try runCommand(launcherPath, ["start"] + hosts + ["--config", dir + "/job.yaml", "--keys", dir + "/keys", "--ddpd", Binaries.ddpd, "--no-wait"],
                                     timeout: 60, environment: environment)
        #expect(started.status == 0, "\(started.stdout)\(started.stderr)")
        defer { _ = try? runCommand(launcherPath, ["stop"] + hosts, timeout: 60, environment: environment) }
        let job = JobDirectory(path: jobDir)
        #expect(waitUntil(timeout: 120) { job.history().count >= 5 }, "the job did not train across the namespaces")
        let cut = try runCommand(netns, ["cut", "\(prefix)2"])
        #expect(cut.status == 0)

        #expect(waitUntil(timeout: 180) { job.summary() != nil }, "the job hung after a host was cut off")
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.epochs == 150)
        let log = try String(contentsOfFile: jobDir + "/coordinator.log", encoding: .utf8)
        #expect(summary.lostWorkers == [1], "\(log.split(separator: "\n").filter { !$0.contains("epoch") }.suffix(8).joined(separator: "\n"))")
        #expect(summary.testAccuracy >= 0.95)
        #expect(log.contains("security=CURVE") && log.contains("worker lost"))
        #expect(log.contains("coordinator shard joined endpoint=tcp://\(subnet).10:5557"), "\(log)")
        let shardLog = (try? String(contentsOfFile: jobDir + "/shard-1.log", encoding: .utf8)) ?? ""
        #expect(shardLog.contains("follower shard completed"), "\(shardLog)")
    }

    /// A worker host's link cut and restored: the worker is declared lost, and once its link is back it
    /// joins again with its rank (told NOT_JOINED, or after the coordinator's silence) and the job completes.
    @Test(.enabled(if: isRoot && which("ip") != nil, "needs root and iproute2 for network namespaces"))
    func aWorkerWhoseLinkIsRestoredRejoins() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let hosts3 = try NetnsHosts(prefix: "dr", count: 3)
        defer { hosts3.down() }
        let (prefix, subnet, netns) = (hosts3.prefix, hosts3.subnet, NetnsHosts.script)
        try "epochs: 400\nshared_memory: false\nstep_timeout_seconds: 2\nheartbeat_interval_ms: 300\nheartbeat_timeout_ms: 1500\n"
            .write(toFile: dir + "/job.yaml", atomically: true, encoding: .utf8)
        let jobDir = dir + "/job"
        let launcherPath = "\(Self.root)/deploy/ssh/launch.sh"
        let environment = try hosts3.sshEnvironment(in: dir)
        let hosts = ["--coordinator", "\(prefix)0", "--address", "\(subnet).10", "--workers", "\(prefix)1,\(prefix)2", "--job-dir", jobDir]
        let started = try runCommand(launcherPath, ["start"] + hosts + ["--config", dir + "/job.yaml", "--ddpd", Binaries.ddpd, "--no-wait"],
                                     timeout: 60, environment: environment)
        #expect(started.status == 0, "\(started.stdout)\(started.stderr)")
        defer { _ = try? runCommand(launcherPath, ["stop"] + hosts, timeout: 60, environment: environment) }
        let job = JobDirectory(path: jobDir)
        func log() -> String { (try? String(contentsOfFile: jobDir + "/coordinator.log", encoding: .utf8)) ?? "" }
        #expect(waitUntil(timeout: 120) { job.history().count >= 5 }, "the job did not train across the namespaces")
        #expect(try runCommand(netns, ["cut", "\(prefix)2"]).status == 0)
        #expect(waitUntil(timeout: 60) { log().contains("worker lost") }, "the cut-off worker was not declared lost")
        #expect(try runCommand(netns, ["restore", "\(prefix)2"]).status == 0)
        #expect(waitUntil(timeout: 60) { log().contains("restarts=1") }, "the worker did not rejoin: \(log().suffix(1500))")
        #expect(waitUntil(timeout: 240) { job.summary() != nil }, "the job hung after the link came back")
        let summary = try #require(job.summary())
        #expect(summary.state == "completed" && summary.epochs == 400 && summary.lostWorkers == [1])
        #expect(summary.testAccuracy >= 0.95)
    }

    @Test(.enabled(if: isRoot && which("slurmctld") != nil && which("munged") != nil, "needs root, slurm-wlm and munge"))
    func slurmScriptRunsUnderRealSlurm() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cluster = "\(Self.root)/scripts/slurm-single-node.sh"
        let up = try runCommand(cluster, ["up", dir + "/slurm", "4"], timeout: 60)
        #expect(up.status == 0, "\(up.stderr)")
        defer { _ = try? runCommand(cluster, ["down", dir + "/slurm"]) }
        try "epochs: 5\n".write(toFile: dir + "/job.yaml", atomically: true, encoding: .utf8)
        let environment = ProcessInfo.processInfo.environment.merging(
            ["SLURM_CONF": dir + "/slurm/slurm.conf", "DDPD": Binaries.ddpd, "DDP_SHARDS": "2"]) { $1 }
        let sbatch = try runCommand(Self.which("sbatch")!, ["--ntasks=2", "--wait", "--chdir", dir, "\(Self.root)/deploy/slurm/swiftddp.sbatch", dir + "/job.yaml"],
                                    timeout: 180, environment: environment)
        #expect(sbatch.status == 0, "\(sbatch.stderr)")
        let jobDirs = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix("swiftddp-") && !$0.hasSuffix(".out") }
        let summary = try #require(jobDirs.first.flatMap { JobDirectory(path: "\(dir)/\($0)").summary() })
        #expect(summary.state == "completed" && summary.workers == 2 && summary.jobID.hasPrefix("slurm-"))
        let output = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".out") }
            .map { (try? String(contentsOfFile: "\(dir)/\($0)", encoding: .utf8)) ?? "" }.joined()
        #expect(output.contains("coordinator-shard-1: follower shard completed"), "\(output)")
    }

    /// Whether python3 can import safetensors and numpy (.ci/run installs them; a fresh machine may not have them).
    static let pythonHasSafetensors: Bool = which("python3").map { python in
        ((try? runCommand(python, ["-c", "import safetensors, numpy"], timeout: 60))?.status ?? 1) == 0
    } ?? false

    @Test(.enabled(if: pythonHasSafetensors, "python3 with safetensors and numpy is not installed (pip install safetensors numpy)"))
    func pythonSafetensorsReadsCheckpoints() throws {
        let jobs = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: jobs) }
        let summary = try #require(try startJob(["--epochs", "2"], jobsDir: jobs).0)
        let job = JobDirectory(path: (summary.modelPath as NSString).deletingLastPathComponent)
        let checkpoint = try #require(Checkpoint.latest(in: job).checkpoint)
        let script = """
            import json, sys
            from safetensors import safe_open
            from safetensors.numpy import load_file
            model = load_file(sys.argv[1]); ckpt = load_file(sys.argv[2])
            with safe_open(sys.argv[2], "np") as f: meta = f.metadata()
            print(json.dumps({"model": {k: list(v.shape) for k, v in model.items()}, "checkpoint": sorted(ckpt), "step": meta["step"],
                              "sum": float(sum(float(v.sum()) for v in model.values()))}))
            """
        let result = try runCommand(Self.which("python3")!, ["-c", script, summary.modelPath, checkpoint.path])
        #expect(result.status == 0, "\(result.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let shapes = try #require(object["model"] as? [String: [Int]])
        #expect(shapes["1.weight"] == [128, 64] && shapes["3.bias"] == [10])
        #expect((object["checkpoint"] as? [String])?.contains("optimizer/1.weight.momentum") == true)
        #expect(object["step"] as? String == "\(summary.steps)")
        let swiftSum = try SafeTensors.read(path: summary.modelPath).tensors.reduce(0.0) { $0 + $1.tensor.scalars.reduce(0.0) { $0 + Double($1) } }
        #expect(abs((object["sum"] as? Double ?? 0) - swiftSum) < 1e-3)
    }
}

/// Test hosts on this machine (`scripts/netns-hosts.sh`): `count` network namespaces PREFIX0.. on a
/// random private subnet, taken down by `down()`.
struct NetnsHosts {
    static let script = "\(DeployTests.root)/scripts/netns-hosts.sh"
    let prefix: String
    let subnet: String
    let count: Int

    init(prefix base: String, count: Int) throws {
        prefix = base + String(UInt16.random(in: 0...0xFFF), radix: 16)
        subnet = "10.\(Int.random(in: 200...250)).\(Int.random(in: 1...254))"
        self.count = count
        let up = try runCommand(Self.script, ["up", prefix, "\(count)", subnet])
        guard up.status == 0 else { throw ControlError.failed("netns-hosts.sh up: \(up.stderr)") }
    }

    func down() { _ = try? runCommand(Self.script, ["down", prefix, "\(count)"]) }

    /// The environment for deploy/ssh/launch.sh to reach the hosts: an "ssh" that runs in the namespace.
    func sshEnvironment(in dir: String) throws -> [String: String] {
        let ssh = dir + "/netns-ssh"
        try "#!/bin/sh\nhost=\"$1\"; shift\nexec ip netns exec \"$host\" sh -c \"$*\"\n".write(toFile: ssh, atomically: true, encoding: .utf8)
        chmod(ssh, 0o755)
        return ProcessInfo.processInfo.environment.merging(["DDP_SSH": ssh]) { $1 }
    }
}
