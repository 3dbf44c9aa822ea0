import Autodiff
import DDPData
@testable import DDPWire
import Foundation
import Logging
import Testing
@testable import DDPRuntime

/// The coordinator's logic in-process, against an in-memory transport: no sockets, no processes, a
/// clock the test moves.
@Suite struct CoordinatorLogicTests {
    final class Clock: @unchecked Sendable { var now = 1000.0 }

    /// A leader for a small digits job, and the test in the workers' (and followers') place.
    final class Harness {
        let transport = InMemoryTransport()
        let clock = Clock()
        let leader: Leader
        let lines = LogLines()

        /// With `program`, the job's workers bring the model (the leader starts without one).
        init(_ overrides: [String: Any] = [:], program: Bool = false) throws {
            let spec = try JobSpec.load(path: nil, overrides: ["job_id": "logic", "workers": 2, "batch_size": 64, "epochs": 2]
                .merging(program ? ["program": "/bin/true"] : [:]) { $1 }.merging(overrides) { $1 })
            let clock = clock, lines = lines
            leader = try Leader(spec: spec, model: program ? nil : ServedModel(setup: try TrainingSetup(spec: spec)), transport: transport, directory: nil, resume: nil,
                                logger: Logger(label: "leader") { _ in lines }, clock: { clock.now })
        }

        var parameters: [NamedParameter] { leader.shard.parameters }

        /// Delivers what the peers sent and lets the leader act on it.
        func run() throws {
            try leader.process(try transport.poll(timeoutMilliseconds: 0))
            try leader.tick()
        }

        func send(_ body: WireMessage.Body, from peer: PeerID, step: UInt64 = 0, rank: Int32 = -1, tensors: [WireTensor] = []) {
            transport.deliver(WireMessage(jobID: "logic", step: step, rank: rank, body: body, tensors: tensors), from: peer)
        }

        func join(_ peer: PeerID, rank: Int32 = -1, token: [UInt8] = []) throws -> Welcome? {
            var join = Join(workerID: "w\(peer)", host: "h", pid: 1, modelFingerprint: "", requestedRank: rank)
            join.rankToken = token
            send(.join(join), from: peer)
            try run()
            let welcome = transport.sent.filter { $0.peer == peer }.reversed().lazy.compactMap { if case .welcome(let w) = $0.message.body { w } else { nil } }.first
            if let welcome { try ready(peer, rank: welcome.rank) }
            return welcome
        }

        /// What a worker sends once it holds its Welcome's values: training starts once the workers are ready.
        func ready(_ peer: PeerID, rank: Int32) throws {
            send(.heartbeat(Heartbeat(sentUnixMilliseconds: 0, state: Heartbeat.ready)), from: peer, rank: rank)
            try run()
        }

        /// The last update part `peer` got, with its step.
        func lastUpdate(_ peer: PeerID, in messages: [WireMessage]) -> (step: UInt64, update: ParameterUpdate)? {
            messages.reversed().lazy.compactMap { m -> (UInt64, ParameterUpdate)? in if case .parameterUpdate(let u) = m.body { (m.step, u) } else { nil } }.first
        }

        /// A push of `value` everywhere for `samples` samples, in `parts` parts (tensor order split evenly).
        func push(from peer: PeerID, rank: Int32, step: UInt64, attempt: UInt32 = 0, samples: UInt64, value: Float, parts: Int = 1,
                  computeSeconds: Double = 0) {
            // The leader's part of the model (all of it without coordinator shards).
            let tensors = leader.shard.shardTensors(leader.shard.owned, withState: false, sliced: true).map {
                WireTensor(name: $0.name, shape: $0.shape, payload: Payload(floats: [Float](repeating: value, count: $0.elements.count)), slice: $0.slice)
            }
            let size = (tensors.count + parts - 1) / parts
            for part in 0..<parts {
                let mine = Array(tensors[min(part * size, tensors.count)..<min((part + 1) * size, tensors.count)])
                send(.gradientPush(GradientPush(sampleCount: samples, localLoss: 0.5, computeSeconds: computeSeconds, attempt: attempt,
                                                part: UInt32(part), moreParts: part < parts - 1)),
                     from: peer, step: step, rank: rank, tensors: mine)
            }
        }

        func samples(_ update: ParameterUpdate) -> UInt64 { update.samples.reduce(0) { $0 + $1.count } }

        /// The update each of `peers` (ranks 0, 1, ... in order) got last, which must be for `step`.
        func updates(step: UInt64, peers: [PeerID]) throws -> [Int32: ParameterUpdate] {
            var updates: [Int32: ParameterUpdate] = [:]
            for (rank, peer) in peers.enumerated() {
                let (s, update) = try #require(lastUpdate(peer, in: transport.take(for: peer)), "no update for rank \(rank) at step \(step)")
                #expect(s == step)
                updates[Int32(rank)] = update
            }
            return updates
        }
    }

    let a: PeerID = [1], b: PeerID = [2], c: PeerID = [3]

    @Test func aProgramsModelComesFromTheFirstJoinAndItsBuffersTakeTheWorkersMean() throws {
        let h = try Harness(["batch_size": 10, "epochs": 1, "optimizer": "sgd", "learning_rate": 0.5, "momentum": 0], program: true)
        func programJoin(_ peer: PeerID, weight: [Float]) throws -> [WireMessage] {
            let w = Tensor(shape: [weight.count], values: weight), m = Tensor(shape: [2], values: [0, 0])
            let tensors = [NamedParameter(name: "w", tensor: w), NamedParameter(name: "m", tensor: m)]
            let model = ProgramModel(program: "p", configuration: ["width": "2"], tensors: tensors, buffers: ["m"], sampleCount: 30)
            var join = Join(workerID: "w\(peer)", host: "h", pid: 1, modelFingerprint: model.fingerprint)
            join.sampleCount = 30
            join.modelJSON = model.json()
            h.send(.join(join), from: peer, tensors: tensors.map { WireTensor(name: $0.name, shape: $0.tensor.shape, payload: Payload(floats: $0.tensor.scalars)) })
            try h.run()
            let messages = h.transport.take(for: peer)
            for m in messages { if case .welcome(let w) = m.body { try h.ready(peer, rank: w.rank) } }
            return messages
        }
        // A Join without a model cannot start a program's job.
        #expect(try h.join(c) == nil)
        #expect(h.transport.take(for: c).contains { if case .error(let e) = $0.body { e.code == .modelMismatch && e.reason.contains("does not describe a model") } else { false } })
        // The first model-bearing Join starts the job with its values; another model is refused, naming the tensor.
        #expect(try programJoin(a, weight: [1, 2]).contains { if case .welcome = $0.body { true } else { false } })
        let refused = try programJoin(b, weight: [1, 2, 3])
        #expect(refused.contains { if case .error(let e) = $0.body { e.reason.contains("parameter 'w' has shape [3], the job's [2]") } else { false } },
                "\(refused.map(\.body))")
        let welcomed = try programJoin(b, weight: [9, 9])  // values of a later joiner are not used
        #expect(welcomed.contains { if case .welcome = $0.body { true } else { false } } && h.leader.phase == .training)
        #expect(h.parameters.map(\.tensor.scalars) == [[1, 2], [0, 0]] && h.leader.totalSteps == 3)
        // Step 0: 5 samples each; the buffer becomes the sample-weighted mean, the parameter takes the SGD step.
        for (peer, rank, gradient, buffer) in [(a, Int32(0), Float(1), [Float(2), 4]), (b, Int32(1), Float(3), [Float(4), 8])] {
            h.send(.gradientPush(GradientPush(sampleCount: 5, localLoss: 0.5)), from: peer, step: 0, rank: rank, tensors: [
                WireTensor(name: "w", shape: [2], payload: Payload(floats: [gradient, gradient])),
                WireTensor(name: "m", shape: [2], payload: Payload(floats: buffer)),
            ])
        }
        try h.run()
        #expect(h.leader.round.step == 1)
        #expect(h.parameters[0].tensor.scalars == [0, 1] && h.parameters[1].tensor.scalars == [3, 6], "\(h.parameters.map(\.tensor.scalars))")
    }

    /// The model crosses the wire once at the start: the Welcome carries every parameter, the first step's
    /// update none (it keeps them); the next step's update carries the new values.
    @Test func theFirstStepKeepsTheWelcomesValues() throws {
        let h = try Harness()
        for peer in [a, b] { #expect(try h.join(peer) != nil) }
        #expect(h.leader.phase == .training)
        for peer in [a, b] {
            let messages = h.transport.take(for: peer)
            let welcome = try #require(messages.first { if case .welcome = $0.body { true } else { false } })
            #expect(welcome.tensors.count == h.parameters.count)
            let first = try #require(messages.first { if case .parameterUpdate = $0.body { true } else { false } })
            guard case .parameterUpdate(let update) = first.body else { continue }
            #expect(first.step == 0 && update.keepsParameters && !update.moreParts && first.tensors.isEmpty)
        }
        h.push(from: a, rank: 0, step: 0, samples: 32, value: 0.1)
        h.push(from: b, rank: 1, step: 0, samples: 32, value: 0.1)
        try h.run()
        let next = h.transport.take(for: a).filter { if case .parameterUpdate = $0.body { true } else { false } }
        #expect(next.allSatisfy { $0.step == 1 } && next.reduce(0) { $0 + $1.tensors.count } == h.parameters.count)
        #expect(next.allSatisfy { if case .parameterUpdate(let u) = $0.body { !u.keepsParameters } else { false } })
    }

    @Test func joinedWorkersGetDisjointSamplesThatCoverTheBatch() throws {
        let h = try Harness(["workers": 3])
        for peer in [a, b, c] { #expect(try h.join(peer) != nil) }
        #expect(h.leader.phase == .training)
        var covered: [UInt64] = []
        for peer in [a, b, c] {
            let (step, update) = try #require(h.lastUpdate(peer, in: h.transport.take(for: peer)))
            #expect(step == 0 && update.epoch == 0 && update.worldSize == 3)
            for range in update.samples { covered += Array(range.start..<range.start + range.count) }
        }
        #expect(covered == Array(0..<64), "the three shards are the batch's positions 0..<64, in rank order")
    }

    /// `balance: speed`: once both workers have pushed, each step's shares follow their measured samples per
    /// second (a worker twice as slow gets a third), the shares still cover each batch exactly, and over an
    /// epoch every training sample is assigned once.
    @Test func sharesSizedBySpeedStillAssignEverySampleOncePerEpoch() throws {
        let h = try Harness(["balance": "speed", "epochs": 1])
        for peer in [a, b] { #expect(try h.join(peer) != nil) }
        let stepsPerEpoch = h.leader.model!.sampler.stepsPerEpoch, trainingSamples = h.leader.model!.sampler.sampleCount
        var assigned: [UInt64] = [], shares: [[UInt64]] = []
        for step in 0..<stepsPerEpoch {
            var counts: [UInt64] = []
            for (peer, rank, secondsPerSample) in [(a, Int32(0), 0.001), (b, Int32(1), 0.002)] {
                let (s, update) = try #require(h.lastUpdate(peer, in: h.transport.take(for: peer)), "no update at step \(step)")
                #expect(s == UInt64(step))
                for range in update.samples { assigned += Array(range.start..<range.start + range.count) }
                counts.append(h.samples(update))
                h.push(from: peer, rank: rank, step: UInt64(step), samples: h.samples(update), value: 0.01,
                       computeSeconds: secondsPerSample * Double(h.samples(update)))
            }
            shares.append(counts)
            try h.run()
        }
        #expect(shares[0] == [32, 32], "equal until both are measured")
        #expect(shares[1] == [43, 21], "2:1 by speed, got \(shares[1])")
        #expect(assigned.sorted() == (0..<UInt64(trainingSamples)).map { $0 }, "every position of the epoch once")
        #expect(h.leader.round.step == stepsPerEpoch)
    }

    /// Backup workers: with one of three always late, each step completes with the other two; the late
    /// one's samples are trained in the next step, its late pushes are expected (not counted as rejected),
    /// the last step of the epoch waits for it, and over the epoch every position is trained exactly once.
    @Test func backupWorkersCarryTheLateSamplesIntoTheNextStep() throws {
        let h = try Harness(["workers": 3, "backup_workers": 1, "epochs": 1])
        for peer in [a, b, c] { #expect(try h.join(peer) != nil) }
        let sampler = h.leader.model!.sampler
        var trained: [UInt64] = [], batchSizes: [UInt64] = [], lateShare: (step: UInt64, samples: UInt64)?
        for step in 0..<UInt64(sampler.stepsPerEpoch) {
            let shares = try h.updates(step: step, peers: [a, b, c])
            batchSizes.append(shares.values.reduce(0) { $0 + h.samples($1) })
            for rank in [Int32(0), 1] {
                h.push(from: rank == 0 ? a : b, rank: rank, step: step, samples: h.samples(shares[rank]!), value: 0.01)
                for range in shares[rank]!.samples { trained += Array(range.start..<range.start + range.count) }
            }
            if let late = lateShare { h.push(from: c, rank: 2, step: late.step, samples: late.samples, value: 0.01) }  // the step before's
            try h.run()
            if step + 1 < UInt64(sampler.stepsPerEpoch) {
                #expect(h.leader.round.step == Int(step) + 1, "step \(step) completes without rank 2")
                lateShare = (step, h.samples(shares[2]!))
            } else {
                #expect(h.leader.round.step == Int(step), "the epoch's last step waits for every worker")
                h.push(from: c, rank: 2, step: step, samples: h.samples(shares[2]!), value: 0.01)
                for range in shares[2]!.samples { trained += Array(range.start..<range.start + range.count) }
                try h.run()
                #expect(h.leader.round.step == Int(step) + 1)
            }
        }
        #expect(trained.sorted() == (0..<UInt64(sampler.sampleCount)).map { $0 }, "every position of the epoch once")
        #expect(batchSizes[0] == 64 && batchSizes[1] == 64 + 21, "step 1 trains its batch and step 0's late share: \(batchSizes.prefix(3))")
        let late = h.leader.status().workers[2]
        #expect(late.leftOutSteps == UInt32(sampler.stepsPerEpoch - 1) && late.lastLeftOutStep == UInt64(sampler.stepsPerEpoch - 2))
        #expect(h.leader.status().rejectedMessages == 0, "late pushes are expected, not rejected")
        #expect(h.lines.messages.contains { $0.contains("step 0 completed without rank 2") })
    }

    /// Bounded staleness (`staleness: 1` with a backup worker): the late worker's push for the step before
    /// is applied in the current step (its samples are not carried); a push two steps late is refused with
    /// the reason; before the epoch's last step the samples still waiting are carried into it; every position
    /// of the epoch is trained exactly once.
    @Test func latePushesWithinTheStalenessAreAppliedAndOlderOnesRefused() throws {
        let h = try Harness(["workers": 3, "backup_workers": 1, "staleness": 1, "epochs": 1])
        for peer in [a, b, c] { #expect(try h.join(peer) != nil) }
        let sampler = h.leader.model!.sampler
        var trained: [UInt64] = [], batchSizes: [UInt64] = [], shareOfC: [UInt64: ParameterUpdate] = [:]
        func train(_ update: ParameterUpdate) { for r in update.samples { trained += Array(r.start..<r.start + r.count) } }
        let last = UInt64(sampler.stepsPerEpoch - 1)
        for step in 0...last {
            let shares = try h.updates(step: step, peers: [a, b, c])
            batchSizes.append(shares.values.reduce(0) { $0 + h.samples($1) })
            shareOfC[step] = shares[2]!
            for (peer, rank) in [(a, Int32(0)), (b, Int32(1))] {
                h.push(from: peer, rank: rank, step: step, samples: h.samples(shares[rank]!), value: 0.01)
                train(shares[rank]!)
            }
            if step >= 1 && step + 2 <= last {  // c's push for the step before, one step late: applied in this step
                h.push(from: c, rank: 2, step: step - 1, samples: h.samples(shareOfC[step - 1]!), value: 0.01)
                train(shareOfC[step - 1]!)
            }
            if step == last {  // c's push for step last-2 comes two steps late: refused, its samples were carried
                h.push(from: c, rank: 2, step: last - 2, samples: h.samples(shareOfC[last - 2]!), value: 0.01)
            }
            try h.run()
            if step == last {
                #expect(h.transport.take(for: c).contains { if case .error(let e) = $0.body { e.code == .pushRefused && e.reason.contains("more than staleness 1") } else { false } })
                #expect(h.leader.round.step == Int(step), "the epoch's last step waits for every worker")
                h.push(from: c, rank: 2, step: step, samples: h.samples(shares[2]!), value: 0.01)
                train(shares[2]!)
                try h.run()
            }
            #expect(h.leader.round.step == Int(step) + 1)
        }
        #expect(trained.sorted() == (0..<UInt64(sampler.sampleCount)).map { $0 }, "every position of the epoch once")
        #expect(batchSizes[1] == 64 && batchSizes[2] == 64, "a late push's samples are not carried while it may come")
        #expect(batchSizes[Int(last)] == UInt64(sampler.sampleCount) - 64 * last + 2 * 21,
                "before the last step the samples still waiting (c's shares of the two steps before) are carried into it")
        #expect(h.leader.status().rejectedMessages == 0)
    }

    /// `sync_every: 4`: a step is a round; each worker gets its share of each of the round's data steps,
    /// one run per inner step, with the first inner step's index; the epoch's last round is shorter; every
    /// position of the epoch is assigned once; the outer optimizer steps by the averaged change.
    @Test func aRoundOfLocalStepsAssignsEachWorkersShareOfEachDataStep() throws {
        let h = try Harness(["sync_every": 4, "epochs": 1, "outer_optimizer": "sgd", "outer_lr": 0.5, "outer_momentum": 0])
        for peer in [a, b] { #expect(try h.join(peer) != nil) }
        let sampler = h.leader.model!.sampler
        #expect(sampler.stepsPerEpoch == 23 && h.leader.stepsPerEpoch == 6 && h.leader.totalSteps == 6)
        var assigned: [UInt64] = [], innerSteps: [UInt32] = [], firsts: [UInt64] = []
        let before = h.parameters[0].tensor.scalars
        for round in 0..<6 {
            for (peer, rank) in [(a, Int32(0)), (b, Int32(1))] {
                let (s, update) = try #require(h.lastUpdate(peer, in: h.transport.take(for: peer)), "no update in round \(round)")
                #expect(s == UInt64(round) && update.samples.count == Int(update.innerSteps))
                if rank == 0 { innerSteps.append(update.innerSteps); firsts.append(update.firstInnerStep) }
                for range in update.samples { assigned += Array(range.start..<range.start + range.count) }
                h.push(from: peer, rank: rank, step: UInt64(round), samples: h.samples(update), value: rank == 0 ? 0.2 : 0.4)
            }
            try h.run()
            if round == 0 {  // outer SGD at rate 0.5 on the mean change (0.3, weighted by equal shares)
                for (x, y) in zip(before, h.parameters[0].tensor.scalars) { #expect(abs((x - 0.5 * 0.3) - y) < 1e-6) }
            }
        }
        #expect(innerSteps == [4, 4, 4, 4, 4, 3] && firsts == [0, 4, 8, 12, 16, 20])
        #expect(assigned.sorted() == (0..<UInt64(sampler.sampleCount)).map { $0 }, "every position of the epoch once")
        #expect(h.leader.phase == .completed)
    }

    @Test func proportionalSharesCoverTheBatch() {
        #expect(EpochSampler.shards(0..<64, weights: [2, 1]) == [0..<43, 43..<64])
        #expect(EpochSampler.shards(10..<20, weights: [1, 1, 1]) == [10..<14, 14..<17, 17..<20])
        #expect(EpochSampler.shards(0..<3, weights: [100, 1, 1]) == [0..<1, 1..<2, 2..<3], "one each while the batch allows")
        #expect(EpochSampler.shards(0..<2, weights: [1, 5, 1]) == [0..<0, 0..<2, 2..<2], "fewer samples than shares")
        let shares = EpochSampler.shards(0..<1000, weights: [0.3, 1.7, 1, 2.2])
        #expect(shares.map(\.count).reduce(0, +) == 1000 && zip(shares, shares.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound })
    }

    /// A worker lost mid-step: the step is sent again (attempt 1) with the whole batch to the other;
    /// a push of the old attempt is dropped; the step completes on the new one.
    @Test func aLossMidStepReDividesTheStep() throws {
        let h = try Harness()
        _ = try h.join(a)
        _ = try h.join(b)
        _ = h.transport.take(for: a)
        _ = h.transport.take(for: b)
        h.push(from: a, rank: 0, step: 0, samples: 32, value: 1)
        try h.run()
        h.transport.inbox.append(.disconnected([b]))
        try h.run()
        #expect(h.leader.membership[1]?.state == .lost)
        let (step, resent) = try #require(h.lastUpdate(a, in: h.transport.take(for: a)))
        #expect(step == 0 && resent.attempt == 1 && h.samples(resent) == 64 && resent.worldSize == 1)
        h.push(from: a, rank: 0, step: 0, attempt: 0, samples: 32, value: 1)  // stale attempt
        try h.run()
        #expect(h.leader.round.step == 0)
        h.push(from: a, rank: 0, step: 0, attempt: 1, samples: 64, value: 1)
        try h.run()
        #expect(h.leader.round.step == 1 && h.leader.membership.lostRanks == [1])
    }

    /// Stale, future and duplicate pushes are dropped and counted; a push that declares other samples
    /// than assigned is refused and told why; the step waits for a good one.
    @Test func stalePushesAreDroppedAndWrongOnesRefused() throws {
        let h = try Harness()
        _ = try h.join(a)
        _ = try h.join(b)
        _ = h.transport.take(for: a)
        _ = h.transport.take(for: b)
        h.push(from: a, rank: 0, step: 5, samples: 32, value: 1)  // future
        h.push(from: a, rank: 1, step: 0, samples: 32, value: 1)  // names another rank
        h.push(from: b, rank: 1, step: 0, samples: 33, value: 1)  // not the assigned count
        try h.run()
        let refusal = h.transport.take(for: b).compactMap { if case .error(let e) = $0.body { e } else { nil } }
        #expect(refusal.map(\.code) == [.pushRefused] && refusal.first?.reason.contains("declares 33 samples, but 32 were assigned") == true)
        h.push(from: a, rank: 0, step: 0, samples: 32, value: 1)
        h.push(from: a, rank: 0, step: 0, samples: 32, value: 1)  // duplicate
        try h.run()
        #expect(h.leader.round.step == 1, "b's refused push counts as answered")
        #expect(h.leader.recorder.rejected == 4)
        h.push(from: a, rank: 0, step: 0, samples: 32, value: 1)  // now stale
        try h.run()
        #expect(h.leader.recorder.rejected == 5 && h.leader.round.step == 1)
    }

    /// Pushes in parts are averaged tensor by tensor as soon as both workers sent them, and the step's
    /// result is bitwise that of whole pushes.
    @Test func earlyAveragingWithPartsGivesTheSameStep() throws {
        func parameters(afterPushingIn parts: Int) throws -> [[Float]] {
            let h = try Harness()
            _ = try h.join(a)
            _ = try h.join(b)
            h.push(from: a, rank: 0, step: 0, samples: 32, value: 0.25, parts: parts)
            h.push(from: b, rank: 1, step: 0, samples: 32, value: -0.75, parts: parts)
            try h.leader.process(try h.transport.poll(timeoutMilliseconds: 0))
            if parts > 1 { #expect(h.leader.round.early.averaged.filter { $0 }.count == h.parameters.count) }
            try h.leader.tick()
            #expect(h.leader.round.step == 1)
            return h.parameters.map(\.tensor.scalars)
        }
        #expect(try parameters(afterPushingIn: 2) == parameters(afterPushingIn: 1))
    }

    /// A worker that was lost and comes back with its rank token gets its rank again and takes part from
    /// the next update; its stale heartbeat before that is answered NOT_JOINED.
    @Test func aLostWorkerRejoinsWithItsRank() throws {
        let h = try Harness(["step_timeout_seconds": 1.0])
        let token = try #require(try h.join(a)?.rankToken)
        _ = try h.join(b)
        _ = h.transport.take(for: a)
        h.push(from: b, rank: 1, step: 0, samples: 32, value: 1)
        h.clock.now += 11  // a is silent past the step deadline
        try h.run()
        #expect(h.leader.membership[0]?.state == .lost)
        h.send(.heartbeat(Heartbeat(sentUnixMilliseconds: 0, state: "waiting")), from: a)
        try h.run()
        let told = h.transport.take(for: a).compactMap { if case .error(let e) = $0.body { e } else { nil } }
        #expect(told.first?.code == .notJoined && told.first?.reason.contains("rank 0 was declared lost") == true)
        let rejoin: PeerID = [9]  // a new connection of the same worker
        let welcome = try #require(try h.join(rejoin, rank: 0, token: token))
        #expect(welcome.rank == 0 && welcome.rankToken == token)
        #expect(h.leader.membership[0]?.restarts == 1 && h.leader.membership[0]?.state == .joining)
        _ = h.transport.take(for: b)
        h.push(from: b, rank: 1, step: 0, attempt: 1, samples: 64, value: 1)
        try h.run()
        let (step, update) = try #require(h.lastUpdate(rejoin, in: h.transport.take(for: rejoin)))
        #expect(step == 1 && h.samples(update) == 32)
    }

    /// With a follower shard: it says hello and is assigned its tensors; when its connection drops the
    /// job fails at once, naming it.
    @Test func aLostFollowerShardFailsTheJob() throws {
        let h = try Harness(["coordinator_shards": 2])
        let follower: PeerID = [77]
        var hello = ShardMessage(.hello)
        hello.shard = 1
        hello.endpoint = "inmemory://shard-1"
        h.send(.shard(hello), from: follower)
        try h.run()
        let assigned = h.transport.take(for: follower).compactMap { if case .shard(let s) = $0.body { s.kind } else { nil } }
        #expect(assigned.first == .assign)
        #expect(try h.join(a)?.shardEndpoints == ["inmemory://shard-1"])
        h.transport.inbox.append(.disconnected([follower]))
        try h.run()
        #expect(h.leader.phase == .failed && h.leader.message.contains("coordinator shard 1 (inmemory://shard-1) lost its connection"))
    }

    /// With coordinator shards the leader holds only its part of the model, so the workers score the held-out
    /// split after an epoch: the update after its last step names each worker's batches, the step waits for
    /// their scores, wrong scores are refused and named, a worker lost owing them has its batches re-divided
    /// among the others, and the epoch is recorded with every batch's score, summed in batch order.
    @Test func workersScoreTheHeldOutSplitAndALostWorkersShareGoesToTheOthers() throws {
        let h = try Harness(["coordinator_shards": 2, "min_workers": 1, "test_fraction": 0.7, "checkpoint_every": 1000])
        let follower: PeerID = [77]
        // Shard 1: hello, then every average is finite; each push's arrival is reported below.
        h.transport.onSend = { [weak h] peer, message in
            guard let h, peer == follower, case .shard(let command) = message.body, command.kind == .average else { return }
            var answer = ShardMessage(.averaged)
            answer.attempt = command.attempt
            answer.finite = true
            h.send(.shard(answer), from: follower, step: message.step)
        }
        var hello = ShardMessage(.hello)
        hello.shard = 1
        hello.endpoint = "inmemory://shard-1"
        h.send(.shard(hello), from: follower)
        try h.run()
        for peer in [a, b] { #expect(try h.join(peer) != nil) }
        func push(_ peer: PeerID, rank: Int32, step: UInt64, _ update: ParameterUpdate) {
            h.push(from: peer, rank: rank, step: step, attempt: update.attempt, samples: h.samples(update), value: 0.01)
            var received = ShardMessage(.received)
            received.ranks = [rank]
            received.attempt = update.attempt
            h.send(.shard(received), from: follower, step: step)
        }
        let batches = try #require(h.leader.model?.setup?.heldOutBatches)
        let epoch = UInt64(h.leader.stepsPerEpoch)
        #expect(batches == 2)
        for step in 0..<epoch {
            let updates = try h.updates(step: step, peers: [a, b])
            #expect(updates.values.allSatisfy { $0.evaluate.isEmpty }, "step \(step) asks for scores")
            for (rank, peer) in [a, b].enumerated() { push(peer, rank: Int32(rank), step: step, updates[Int32(rank)]!) }
            try h.run()
        }
        // The epoch's first step: rank 0 scores batch 0, rank 1 batch 1; nothing is recorded before the scores.
        let updates = try h.updates(step: epoch, peers: [a, b])
        #expect(updates[0]?.evaluate == [SampleRange(start: 0, count: 1)] && updates[1]?.evaluate == [SampleRange(start: 1, count: 1)])
        #expect(h.leader.recorder.history.isEmpty)
        let score = { (batch: UInt64) in HeldOutScores(batches: [SampleRange(start: batch, count: 1)], lossSums: [100 + Double(batch)], correct: [400 + batch]) }
        h.send(.heldOutScores(score(0)), from: b, step: epoch, rank: 1)  // not its batch
        var wrongCount = score(1)
        wrongCount.correct = []
        h.send(.heldOutScores(wrongCount), from: b, step: epoch, rank: 1)
        h.send(.heldOutScores(score(1)), from: b, step: epoch, rank: 1)
        push(b, rank: 1, step: epoch, updates[1]!)
        push(a, rank: 0, step: epoch, updates[0]!)  // pushed, but owes batch 0's score
        try h.run()
        #expect(h.lines.messages.contains { $0.contains("it scored batches 0..<1 where 1..<2 were asked") }, "\(h.lines.messages)")
        #expect(h.lines.messages.contains { $0.contains("1 losses and 0 hit counts for 1 batches") })
        #expect(h.leader.round.step == Int(epoch), "the step completed without rank 0's scores")
        h.transport.inbox.append(.disconnected([a]))
        try h.run()
        #expect(h.leader.membership[0]?.state == .lost)
        let (step, resent) = try #require(h.lastUpdate(b, in: h.transport.take(for: b)))
        #expect(step == epoch && resent.attempt == 1 && resent.evaluate == [SampleRange(start: 0, count: 1)], "\(resent)")
        h.send(.heldOutScores(score(0)), from: b, step: epoch, rank: 1)
        push(b, rank: 1, step: epoch, resent)
        try h.run()
        #expect(h.leader.round.step == Int(epoch) + 1)
        let record = try #require(h.leader.recorder.history.first)
        let heldOut = try TrainingSetup(spec: h.leader.spec).test.count
        #expect(record.epoch == 1 && record.step == Int(epoch) && h.leader.recorder.history.count == 1)
        #expect(record.testLoss == Float((100.0 + 101.0) / Double(heldOut)) && record.testAccuracy == Float(400 + 401) / Float(heldOut))
        // Scores nobody asked for are refused.
        h.send(.heldOutScores(score(0)), from: b, step: epoch + 1, rank: 1)
        try h.run()
        #expect(h.lines.messages.contains { $0.contains("none are owed for that step") })
    }

    /// A contribution whose gradient norm stands far above the others' is counted against its worker and
    /// shown in status.
    @Test func anOutlyingGradientIsNamedInStatus() throws {
        let h = try Harness(["workers": 3])
        for peer in [a, b, c] { _ = try h.join(peer) }
        for step in UInt64(0)..<3 {
            h.push(from: a, rank: 0, step: step, samples: 22, value: 0.01)
            h.push(from: b, rank: 1, step: step, samples: 21, value: 0.012)
            h.push(from: c, rank: 2, step: step, samples: 21, value: 5)
            try h.run()
        }
        let workers = h.leader.status().workers
        #expect(workers.map(\.outlierSteps) == [0, 0, 3])
        let exact = h.parameters.reduce(0.0) { $0 + Double($1.tensor.count) * 0.01 * 0.01 }.squareRoot()
        #expect(abs(workers[0].gradientNorm - exact) / exact < 0.01, "\(workers[0].gradientNorm) vs \(exact)")
        #expect(workers[2].gradientNorm > 100 * workers[0].gradientNorm)
        #expect(h.lines.messages.contains { $0.contains("gradient of rank 2 at step 0 is an outlier") })
    }

    /// Below min_workers no step completes (training pauses); when a worker comes back the step is sent
    /// again with it; if none does within the grace period, the job fails naming the lost.
    @Test func belowMinWorkersTrainingPauses() throws {
        let h = try Harness(["workers": 3, "min_workers": 2])
        for peer in [a, b, c] { _ = try h.join(peer) }
        h.transport.inbox.append(.disconnected([b, c]))
        try h.run()
        _ = h.transport.take(for: a)
        h.push(from: a, rank: 0, step: 0, attempt: 1, samples: 64, value: 1)
        try h.run()
        #expect(h.leader.round.step == 0, "no step completes with 1 of min_workers 2")
        _ = try h.join([8], rank: 1)  // rank 1 comes back
        try h.run()
        let (_, resent) = try #require(h.lastUpdate(a, in: h.transport.take(for: a)))
        #expect(resent.attempt == 2 && resent.worldSize == 2 && h.samples(resent) == 32)
        h.push(from: a, rank: 0, step: 0, attempt: 2, samples: 32, value: 1)
        h.push(from: [8], rank: 1, step: 0, attempt: 2, samples: 32, value: 1)
        try h.run()
        #expect(h.leader.round.step == 1)
        h.transport.inbox.append(.disconnected([[8]]))
        try h.run()
        h.clock.now += 11  // past the grace period (twice the heartbeat timeout)
        try h.run()
        #expect(h.leader.phase == .failed && h.leader.message.contains("below min_workers 2"), "\(h.leader.message)")
    }

    /// A resume takes the newest checkpoint that verifies (with the samples it carries for the next step):
    /// a corrupt one (flipped tensor bytes) and a truncated one are skipped, each named with the reason.
    @Test func resumeSkipsCheckpointsThatDoNotVerify() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let job = JobDirectory(path: dir)
        try job.create()
        let spec = try JobSpec.load(path: nil, overrides: ["job_id": "logic", "workers": 2])
        let setup = try TrainingSetup(spec: spec)
        let optimizer = try setup.makeOptimizer()
        for step in [10, 20, 30] {
            _ = try Checkpoint.save(step: step, stepsPerEpoch: 12, parameters: setup.model.parameters, optimizer: optimizer, spec: spec,
                                    samplesTrained: step * 128, carriedSamples: step == 10 ? [1240..<1261, 1300..<1302] : [], in: job, keep: 3)
        }
        let paths = Checkpoint.list(in: job)
        var bytes = try Data(contentsOf: URL(fileURLWithPath: paths[2]))
        for i in (bytes.count - 4096)..<bytes.count { bytes[i] ^= 0x5A }  // 4 KB of tensor data flipped
        try bytes.write(to: URL(fileURLWithPath: paths[2]))
        let (latest, skipped) = Checkpoint.latest(in: job)
        #expect(latest?.step == 20 && skipped.count == 1 && skipped[0].reason.contains("does not match its checksum"))
        let truncated = try Data(contentsOf: URL(fileURLWithPath: paths[1]))
        try truncated.prefix(truncated.count / 2).write(to: URL(fileURLWithPath: paths[1]))
        let stale = job.checkpointsPath + "/step-00000040.safetensors.tmp-999999"  // a killed writer's leftover
        FileManager.default.createFile(atPath: stale, contents: Data(count: 1000))
        let lines = LogLines()
        let leader = try Leader(spec: spec, model: ServedModel(setup: setup), transport: InMemoryTransport(), directory: job, resume: .afterRestart,
                                logger: Logger(label: "leader") { _ in lines })
        #expect(leader.round.step == 10 && leader.recorder.metrics.samples == 1280)
        #expect(leader.carried == [1240..<1261, 1300..<1302], "the samples left out before the checkpoint are trained after the resume")
        #expect(lines.messages.filter { $0.hasPrefix("skipped checkpoint") }.count == 2, "\(lines.messages)")
        #expect(!FileManager.default.fileExists(atPath: stale))
        // A coordinator killed after its final checkpoint is resumed at the end and finishes without workers.
        _ = try Checkpoint.save(step: setup.totalSteps, stepsPerEpoch: setup.sampler.stepsPerEpoch, parameters: setup.model.parameters,
                                optimizer: optimizer, spec: spec, in: job, keep: 3)
        let finished = try Leader(spec: spec, model: ServedModel(setup: setup), transport: InMemoryTransport(), directory: job, resume: .afterRestart,
                                  logger: Logger(label: "leader") { _ in lines })
        #expect(finished.phase == .completed && finished.message.contains("finished after a coordinator restart"))
    }

    /// A worker on this host joins through shared memory: its Welcome's parameters are written into its
    /// segment before the Welcome leaves (described there, not sent in frames), so a late-reading joiner
    /// never copies them over the newer update the coordinator writes in the same place.
    @Test func aWelcomeThroughSharedMemoryIsWrittenInPlace() throws {
        let h = try Harness(["workers": 1])
        let counts = h.parameters.map { $0.tensor.count * 4 }
        let pushes = SharedLayout(start: SharedSegment.headerBytes, byteCounts: counts)
        let updates = SharedLayout(start: pushes.end, byteCounts: counts)
        let segment = try SharedSegment(creating: updates.end)
        var join = Join(workerID: "local", host: "h", pid: 1, modelFingerprint: "")
        join.sharedMemory = SharedMemoryOffer(path: segment.path, nonce: segment.nonce, byteCount: segment.byteCount, updateOffset: pushes.end)
        h.transport.segments[a] = segment
        h.send(.join(join), from: a)
        try h.run()
        let frames = h.transport.sent.filter { $0.peer == a }.map(\.message)
        guard case .welcome(let welcome) = try #require(frames.first).body else { Issue.record("no welcome"); return }
        #expect(welcome.sharedMemory)
        try h.ready(a, rank: welcome.rank)
        for (index, p) in h.parameters.enumerated() {
            let region = try #require(segment.region(offset: updates.offsets[index], count: counts[index]))
            #expect(TensorEncoding.floats(region) == p.tensor.scalars, "\(p.name) is in the segment before the Welcome is read")
        }
        #expect(h.leader.phase == .training)
    }

    /// Stop: graceful finishes the step in progress; at once drops it.
    @Test func stopAtOnceDropsTheStepInProgress() throws {
        let h = try Harness()
        _ = try h.join(a)
        _ = try h.join(b)
        h.transport.control(WireMessage(jobID: "logic", body: .stop(reason: "now", graceful: false)), from: [50])
        try h.run()
        #expect(h.leader.phase == .stopped && h.leader.round.step == 0 && h.leader.message.contains("stopped at once"))
        // At the end every worker is told, one declared lost too (paused, it reads it when it wakes).
        h.transport.inbox.append(.disconnected([b]))
        try h.run()
        _ = h.transport.take(for: b)
        _ = try h.leader.finish()
        #expect(h.transport.take(for: b).contains { if case .stop = $0.body { true } else { false } })
        let brief = try Harness()
        brief.transport.control(WireMessage(jobID: "logic", body: .statusRequest(detail: false)), from: [51])
        _ = try brief.join(a)
        let replies = brief.transport.take(for: [51]).compactMap { if case .statusReply(let s) = $0.body { s } else { nil } }
        #expect(replies.count == 1 && replies[0].workers.isEmpty)
    }
}
