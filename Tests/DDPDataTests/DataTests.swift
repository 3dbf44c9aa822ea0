import Foundation
import Testing
@testable import Autodiff
@testable import DDPData

struct DataTests {
    func temporaryFile(_ name: String, _ bytes: [UInt8]) throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ddpdata-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let url = dir.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url.path
    }

    @Test func bundledDigitsLoad() throws {
        let digits = try BundledData.digits()
        #expect(digits.count == 1797)
        #expect(digits.featureShape == [64])
        #expect(digits.classCount == 10)
        #expect(digits.features.allSatisfy { $0 >= 0 && $0 <= 1 })
    }

    @Test func csvWithAndWithoutHeader() throws {
        let a = try DataReader.csv(text: "label,x,y\n1,0.5,2\n0,1,3\n", name: "a")
        let b = try DataReader.csv(text: "1,0.5,2\n0,1,3", name: "b")
        #expect(a.features == b.features && a.labels == [1, 0] && a.featureShape == [2])
    }

    @Test func malformedCsvNamesTheLine() {
        #expect(throws: DataError.malformed("bad.csv", "line 3: 2 fields, expected 3 fields (a label and 2 features)")) {
            try DataReader.csv(text: "label,x,y\n1,2,3\n0,1\n", name: "bad.csv")
        }
        #expect(throws: DataError.malformed("bad.csv", "line 2, column 3: 'abc' is not a finite number")) {
            try DataReader.csv(text: "label,x,y\n1,2,abc\n", name: "bad.csv")
        }
        #expect(throws: DataError.fileNotFound("/nonexistent/data.csv")) { try DataReader.csv(path: "/nonexistent/data.csv") }
    }

    @Test func idxImagesAndLabels() throws {
        let images = try temporaryFile("img", [0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8])
        let labels = try temporaryFile("lbl", [0, 0, 8, 1, 0, 0, 0, 2, 7, 3])
        let data = try DataReader.idx(images: images, labels: labels)
        #expect(data.featureShape == [1, 2, 2] && data.labels == [7, 3] && data.features == [1, 2, 3, 4, 5, 6, 7, 8])
        let truncated = try temporaryFile("short", [0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1])
        #expect(throws: DataError.self) { try DataReader.idx(images: truncated, labels: labels) }
    }

    @Test func npyFeaturesAndLabels() throws {
        func npy(_ descr: String, _ shape: String, _ body: [UInt8]) -> [UInt8] {
            var header = Array("{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shape), }".utf8)
            while (10 + header.count + 1) % 64 != 0 { header.append(0x20) }
            header.append(0x0a)
            return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(header.count & 0xff), UInt8(header.count >> 8)] + header + body
        }
        let floats: [Float] = [1, 2, 3, 4, 5, 6]
        let featureBytes = floats.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) }
        let labelBytes = [Int64(1), 0].flatMap { withUnsafeBytes(of: $0.littleEndian, Array.init) }
        let f = try temporaryFile("x.npy", npy("<f4", "(2, 3)", featureBytes))
        let l = try temporaryFile("y.npy", npy("<i8", "(2,)", labelBytes))
        let data = try DataReader.npy(features: f, labels: l)
        #expect(data.features == floats && data.labels == [1, 0] && data.featureShape == [3])
        let wrong = try temporaryFile("z.npy", npy("<i8", "(3,)", labelBytes + labelBytes.prefix(8)))
        #expect(throws: DataError.self) { try DataReader.npy(features: f, labels: wrong) }
    }

    @Test func samplerShardsCoverEachGlobalBatchExactlyOnce() throws {
        let sampler = try EpochSampler(sampleCount: 103, globalBatchSize: 10, seed: 7)
        #expect(sampler.stepsPerEpoch == 11)
        let permutation = sampler.permutation(epoch: 0)
        #expect(Set(permutation).count == 103)
        #expect(permutation != sampler.permutation(epoch: 1))
        for worldSize in 1...4 {
            var seen: [Int] = []
            for step in 0..<sampler.stepsPerEpoch {
                let batch = sampler.globalBatch(step: step, of: permutation)
                let shards = (0..<worldSize).map { EpochSampler.shard(batch, rank: $0, worldSize: worldSize) }
                #expect(shards.flatMap { $0 } == Array(batch))
                #expect(shards.map(\.count).max()! - shards.map(\.count).min()! <= 1)
                seen += shards.flatMap { $0 }
            }
            #expect(seen == permutation)
        }
    }

    /// The permutations and the split follow SAMPLES in proto/ddp.proto to the letter: an implementation
    /// written from that text alone (Python, below) computes the same orders.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"), "needs /usr/bin/python3"))
    func permutationsFollowTheProtocolText() throws {
        let script = """
            import sys
            M = (1 << 64) - 1
            class SplitMix64:
                def __init__(self, seed): self.state = seed & M
                def next(self):
                    self.state = (self.state + 0x9E3779B97F4A7C15) & M
                    z = self.state
                    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
                    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
                    return z ^ (z >> 31)
                def uniform(self, n):
                    while True:
                        x = self.next(); r = x % n
                        if x - r <= (1 << 64) - n: return r
            def permutation(count, seed):
                g = SplitMix64(seed); order = list(range(count))
                for i in range(count - 1, 0, -1):
                    j = g.uniform(i + 1); order[i], order[j] = order[j], order[i]
                return order
            count, seed, epoch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
            print(" ".join(map(str, permutation(count, seed))))
            print(" ".join(map(str, permutation(count, (seed + 0x5DEECE66 * (epoch + 1)) & M))))
            """
        for (count, seed, epoch) in [(10, 0, 0), (1797, 9, 3), (257, UInt64.max - 3, 41)] {
            let result = try runPython(script, ["\(count)", "\(seed)", "\(epoch)"])
            let lines = result.split(separator: "\n").map { $0.split(separator: " ").map { Int($0)! } }
            #expect(lines.first == Permutation.of(count: count, seed: seed))
            let sampler = try EpochSampler(sampleCount: count, globalBatchSize: 7, seed: seed)
            #expect(lines.last == sampler.permutation(epoch: epoch))
        }
        // The split: held-out rows first in the order, then training sample i is row order[t + i].
        let rows = try Dataset(name: "rows", featureShape: [1], features: (0..<20).map(Float.init), labels: Array(repeating: 0, count: 20), classCount: 1)
        let (train, test) = try rows.split(testFraction: 0.25, seed: 5)
        let order = Permutation.of(count: 20, seed: 5)
        #expect(test.features == order.prefix(5).map(Float.init) && train.features == order.dropFirst(5).map(Float.init))
    }

    func runPython(_ script: String, _ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["-c", script] + arguments
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("perm-\(UUID().uuidString)")
        FileManager.default.createFile(atPath: output.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: output) }
        process.standardOutput = try FileHandle(forWritingTo: output)
        try process.run()
        let deadline = Date().addingTimeInterval(30)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { process.terminate() }
        return try String(contentsOf: output, encoding: .utf8)
    }

    @Test func syntheticIsSeeded() throws {
        let a = try BundledData.synthetic(samples: 50, features: 4, classes: 3, seed: 1)
        let b = try BundledData.synthetic(samples: 50, features: 4, classes: 3, seed: 1)
        #expect(a.features == b.features && a.labels == b.labels)
        #expect(Set(a.labels).count > 1)
    }
}

struct RegressionDataTests {
    @Test func csvRegressionTargetsAndBadTargets() throws {
        let data = try DataReader.csv(text: "y,a\n1.5,2\n-0.25,3\n", name: "r", options: CSVOptions(regression: true))
        #expect(data.isRegression && data.targets == [1.5, -0.25] && data.targetTensor([1, 0]).scalars == [-0.25, 1.5])
        #expect(throws: DataError.malformed("r", "line 2: target 'x' is not a finite number")) {
            try DataReader.csv(text: "y,a\nx,2\n", name: "r", options: CSVOptions(regression: true))
        }
        let split = try BundledData.syntheticRegression(samples: 100, features: 3, seed: 1).split(testFraction: 0.2, seed: 2)
        #expect(split.train.targets?.count == 80 && split.test.targets?.count == 20)
    }
}
