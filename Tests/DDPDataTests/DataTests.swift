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
        #expect(throws: DataError.malformed("bad.csv", "line 3: 1 features, expected 2")) {
            try DataReader.csv(text: "label,x,y\n1,2,3\n0,1\n", name: "bad.csv")
        }
        #expect(throws: DataError.malformed("bad.csv", "line 2, column 3: 'abc' is not a number")) {
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

    @Test func syntheticIsSeeded() throws {
        let a = try BundledData.synthetic(samples: 50, features: 4, classes: 3, seed: 1)
        let b = try BundledData.synthetic(samples: 50, features: 4, classes: 3, seed: 1)
        #expect(a.features == b.features && a.labels == b.labels)
        #expect(Set(a.labels).count > 1)
    }
}

struct RegressionDataTests {
    @Test func csvRegressionTargetsAndBadTargets() throws {
        let data = try DataReader.csv(text: "y,a\n1.5,2\n-0.25,3\n", name: "r", regression: true)
        #expect(data.isRegression && data.targets == [1.5, -0.25] && data.targetTensor([1, 0]).scalars == [-0.25, 1.5])
        #expect(throws: DataError.malformed("r", "line 2: target 'x' is not a finite number")) {
            try DataReader.csv(text: "y,a\nx,2\n", name: "r", regression: true)
        }
        let split = try BundledData.syntheticRegression(samples: 100, features: 3, seed: 1).split(testFraction: 0.2, seed: 2)
        #expect(split.train.targets?.count == 80 && split.test.targets?.count == 20)
    }
}
