import Autodiff
import Foundation

/// A resumable snapshot of a job: parameters, optimizer state, step, epoch, sampler position, the job
/// spec, the samples trained so far and the rank tokens, in safetensors (parameters under their names,
/// optimizer state under `optimizer/NAME`), with a checksum of the data that loading verifies. The
/// per-epoch history is not in it (its size would grow with the job): it is `history.jsonl`, cut back to
/// the checkpoint's step on resume.
public struct Checkpoint {
    public let step: Int
    public let epoch: Int
    public let optimizerSteps: Int
    public let parameters: [String: Tensor]
    public let optimizerState: [String: Tensor]
    public let specJSON: String
    public let path: String
    /// Each rank's secret (Welcome.rank_token), so that a resumed coordinator gives ranks back to their holders.
    let rankTokens: [Int32: [UInt8]]
    /// Training samples processed up to the checkpoint's step.
    let samplesTrained: Int
    /// Positions of the epoch that steps were completed without (backup workers), for the next step.
    let carriedSamples: [Range<Int>]

    /// Writes a checkpoint of the current state into `directory/checkpoints` (atomically) and keeps the
    /// newest `keep`; returns its path.
    static func save(
        step: Int, stepsPerEpoch: Int, parameters: [NamedParameter], optimizer: any Optimizer, spec: JobSpec,
        samplesTrained: Int = 0, rankTokens: [Int32: [UInt8]] = [:], carriedSamples: [Range<Int>] = [], model: ModelDescription? = nil,
        in directory: JobDirectory, keep: Int
    ) throws -> String {
        try FileManager.default.createDirectory(atPath: directory.checkpointsPath, withIntermediateDirectories: true)
        let path = directory.checkpointsPath + String(format: "/step-%08d.safetensors", step)
        var metadata = model?.metadata ?? [:]
        metadata.merge([
            "format": "pt", "step": "\(step)", "epoch": "\(step / max(stepsPerEpoch, 1))",
            "sampler_position": "\(step % max(stepsPerEpoch, 1))", "sampler_seed": "\(spec.seed)",
            "optimizer_steps": "\(optimizer.stepCount)", "job_spec": spec.json(), "samples_trained": "\(samplesTrained)",
            "carried_samples": carriedSamples.map { "\($0.lowerBound):\($0.count)" }.joined(separator: ","),
            "rank_tokens": String(decoding: try JSONEncoder().encode(Dictionary(uniqueKeysWithValues: rankTokens.map {
                ("\($0.key)", $0.value.map { String(format: "%02x", $0) }.joined())
            })), as: UTF8.self),
        ]) { $1 }
        try SafeTensors.write(
            parameters.map { ($0.name, $0.tensor) } + optimizer.state.map { ("optimizer/\($0.name)", $0.tensor) },
            metadata: metadata, to: path)
        let all = list(in: directory)
        for old in all.dropLast(max(keep, 1)) { try? FileManager.default.removeItem(atPath: old) }
        return path
    }

    /// Checkpoint files of a job, oldest first.
    static func list(in directory: JobDirectory) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.checkpointsPath)) ?? []
        return names.filter { $0.hasPrefix("step-") && $0.hasSuffix(".safetensors") }.sorted()
            .map { directory.checkpointsPath + "/" + $0 }
    }

    /// The newest checkpoint of a job that loads and verifies, if any, and the newer ones skipped with
    /// why (truncated, corrupt, not a checkpoint).
    public static func latest(in directory: JobDirectory) -> (checkpoint: Checkpoint?, skipped: [(path: String, reason: String)]) {
        var skipped: [(String, String)] = []
        for path in list(in: directory).reversed() {
            do { return (try load(path: path), skipped) } catch { skipped.append((path, "\(error)")) }
        }
        return (nil, skipped)
    }

    /// Reads a checkpoint file.
    public static func load(path: String) throws -> Checkpoint {
        let contents = try SafeTensors.read(path: path)
        guard let step = contents.metadata["step"].flatMap(Int.init), let epoch = contents.metadata["epoch"].flatMap(Int.init),
            let optimizerSteps = contents.metadata["optimizer_steps"].flatMap(Int.init), let spec = contents.metadata["job_spec"]
        else { throw SafeTensorsError.invalid(path, "not a SwiftDDP checkpoint (metadata incomplete)") }
        var parameters: [String: Tensor] = [:], state: [String: Tensor] = [:]
        for (name, tensor) in contents.tensors {
            if name.hasPrefix("optimizer/") { state[String(name.dropFirst("optimizer/".count))] = tensor } else { parameters[name] = tensor }
        }
        var rankTokens: [Int32: [UInt8]] = [:]
        let savedTokens = contents.metadata["rank_tokens"].flatMap { try? JSONDecoder().decode([String: String].self, from: Data($0.utf8)) } ?? [:]
        for (rank, hex) in savedTokens {
            let bytes = stride(from: 0, to: hex.count - 1, by: 2).compactMap { i -> UInt8? in
                let start = hex.index(hex.startIndex, offsetBy: i)
                return UInt8(hex[start..<hex.index(start, offsetBy: 2)], radix: 16)
            }
            if let rank = Int32(rank), bytes.count == 16 { rankTokens[rank] = bytes }
        }
        return Checkpoint(step: step, epoch: epoch, optimizerSteps: optimizerSteps, parameters: parameters,
                          optimizerState: state, specJSON: spec, path: path, rankTokens: rankTokens,
                          samplesTrained: contents.metadata["samples_trained"].flatMap(Int.init) ?? 0,
                          carriedSamples: try carried(contents.metadata["carried_samples"] ?? "", path: path))
    }

    /// The "START:COUNT,..." of a checkpoint's carried samples as ranges.
    private static func carried(_ text: String, path: String) throws -> [Range<Int>] {
        try text.split(separator: ",").map { item in
            let parts = item.split(separator: ":", omittingEmptySubsequences: false).map { Int($0) }
            guard parts.count == 2, let start = parts[0], let count = parts[1], start >= 0, count > 0, start <= Int.max - count else {
                throw SafeTensorsError.invalid(path, "carried_samples entry '\(item)' is not START:COUNT")
            }
            return start..<start + count
        }
    }
}
