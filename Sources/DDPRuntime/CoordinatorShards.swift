import Autodiff
import DDPWire
import Foundation
import Logging

extension Coordinator.Role {
    /// The shard this process is: 0 for the leader.
    var shardIndex: Int {
        if case .follower(let index, _, _) = self { return index }
        return 0
    }
}

// MARK: Leader side: driving the followers

extension Coordinator {
    /// The workers the next update goes to: the live ones and those that joined since the last step.
    var updateRecipients: [Int32] { members.values.filter { $0.isLive || $0.state == "joining" }.map(\.rank).sorted() }

    /// Whether every follower has reported `rank`'s push of this step and attempt (always, without followers).
    func everyFollowerAnswered(_ rank: Int32) -> Bool {
        followers.keys.allSatisfy { followerReports[$0]?[rank] != nil }
    }

    func sendToFollower(_ index: Int, body: WireMessage.Body, tensors: [WireTensor] = []) {
        guard let follower = followers[index] else { return }
        do {
            try reply(follower.identity, body, step: UInt64(step), tensors: tensors)
        } catch {
            followersLost = true
            fail("coordinator shard \(index) (\(follower.endpoint)) is unreachable: \(error)")
        }
    }

    func sendToFollowers(_ message: ShardMessage) {
        var message = message
        message.attempt = message.kind == .abort ? message.attempt : attempt
        for index in followers.keys.sorted() { sendToFollower(index, body: .shard(message)) }
    }

    /// AVERAGE: the contributions to average, in rank order, with their weights.
    func averageCommand(_ used: [Contribution]) -> ShardMessage {
        var command = ShardMessage(.average)
        command.ranks = used.map(\.rank)
        command.sampleCounts = used.map(\.sampleCount)
        return command
    }

    /// Tells the followers which workers take part (after every change, before a new worker is welcomed).
    func sendRoster() {
        guard !followers.isEmpty else { return }
        var roster = ShardMessage(.roster)
        let current = members.values.filter { $0.isLive || $0.state == "joining" }.sorted { $0.rank < $1.rank }
        roster.ranks = current.map(\.rank)
        roster.workerIDs = current.map(\.workerID)
        sendToFollowers(roster)
    }

    /// Waits for every follower's answer of `kind` to the command just sent (for this step), handling the
    /// followers' other messages and putting workers' messages aside. Nil (and the job failed, naming the
    /// follower) when one does not answer within the step deadline.
    func awaitFollowers(_ kind: ShardMessage.Kind) -> [Int: (message: ShardMessage, tensors: [WireTensor])]? {
        var answers: [Int: (message: ShardMessage, tensors: [WireTensor])] = [:]
        let deadline = Self.now() + max(10, stepTimeout)
        while answers.count < followers.count {
            guard !followersLost, Self.now() < deadline else {
                let missing = followers.keys.sorted().filter { answers[$0] == nil }.map { "\($0) (\(followers[$0]!.endpoint))" }
                if !followersLost { fail("coordinator shard \(missing.joined(separator: ", ")) did not answer \(kind) within \(Int(max(10, stepTimeout))) s") }
                return nil
            }
            let ready = (try? ZMQSocket.poll([workerSocket, monitor.socket], timeoutMilliseconds: 50)) ?? []
            if ready.contains(1) {  // a follower's dropped connection ends the wait; workers' wait for the main loop
                while let event = try? monitor.next() {
                    guard case .disconnected(let connection) = event else { continue }
                    if let index = followers.first(where: { $0.value.connection == connection })?.key {
                        followersLost = true
                        fail("coordinator shard \(index) (\(followers[index]!.endpoint)) lost its connection")
                        return nil
                    }
                    disconnectedWhileWaiting.append(connection)
                }
            }
            guard ready.contains(0), let frames = try? workerSocket.receive(timeoutMilliseconds: 0) else { continue }
            let identity = frames.first?.bytes ?? []
            guard let index = followerOfIdentity[identity] else {
                deferred.append((frames, workerSocket.lastConnection))
                continue
            }
            followers[index]?.lastSeen = Self.now()
            guard let message = try? WireCodec.decode(Array(frames.dropFirst()), expectedJobID: spec.jobID) else {
                reject("a malformed message from coordinator shard \(index)", from: nil)
                continue
            }
            if case .shard(let answer) = message.body, answer.kind == kind, message.step == UInt64(step) {
                answers[index] = (answer, message.tensors)
            } else if case .shard(let other) = message.body {
                try? handleFollowerMessage(other, message: message, identity: identity, connection: workerSocket.lastConnection)
            }
        }
        return answers
    }

    /// Copies the followers' current values (and with `withState` their optimizer state) into this
    /// process, for evaluation, checkpoints, the final model and welcoming a worker. False when a follower
    /// failed to answer (the job has failed then).
    func refreshFromFollowers(withState: Bool) -> Bool {
        guard !followers.isEmpty else { return true }
        var request = ShardMessage(.snapshot)
        request.withState = withState
        sendToFollowers(request)
        guard let answers = awaitFollowers(.snapshotReply) else { return false }
        var state: [String: Tensor] = [:]
        for (index, answer) in answers {  // a tensor not of that shard is skipped
            state.merge(load(shardTensors: answer.tensors, of: index).state) { $1 }
        }
        if withState {
            do { try optimizer.restoreState(state) } catch { log.error("optimizer state from the coordinator shards: \(error)") }
        }
        return true
    }

    /// A follower's message on the worker socket.
    func handleFollowerMessage(_ shard: ShardMessage, message: WireMessage, identity: [UInt8], connection: Int32) throws {
        switch shard.kind {
        case .hello:
            let index = Int(shard.shard)
            guard role == .leader, index >= 1 && index < spec.coordinatorShards else {
                reject("hello from coordinator shard \(index), but this job has shards 1...\(spec.coordinatorShards - 1)", from: nil)
                return
            }
            if let known = followers[index] {
                if known.identity == identity { return }  // said again while this leader was busy
                guard phase == .waiting else {
                    fail("coordinator shard \(index) started again during training; the state of its tensors is lost")
                    return
                }
                followerOfIdentity[known.identity] = nil
            }
            followers[index] = Follower(identity: identity, endpoint: shard.endpoint, connection: connection, lastSeen: Self.now())
            followerOfIdentity[identity] = index
            pendingConnections.joined(connection)
            log.info("coordinator shard joined", metadata: ["shard": "\(index)", "endpoint": "\(shard.endpoint)",
                                                            "tensors": "\(plan.indices(of: index).count)"])
            assign(index)
            sendRoster()
        case .received:
            guard let index = followerOfIdentity[identity], message.step == UInt64(step), shard.attempt == attempt,
                  let rank = shard.ranks.first else { return }
            followerReports[index, default: [:]][rank] = shard.refused
        default:
            log.debug("coordinator shard message \(shard.kind) ignored outside its exchange")
        }
    }

    /// ASSIGN: the job, the step, and the values and optimizer state of follower `index`'s tensors.
    func assign(_ index: Int) {
        var command = ShardMessage(.assign)
        command.jobSpecJSON = spec.json()
        command.optimizerSteps = UInt64(optimizer.stepCount)
        sendToFollower(index, body: .shard(command), tensors: shardTensors(plan.indices(of: index), withState: true))
    }
}

// MARK: Tensors between shards

extension Coordinator {
    /// The values of parameters `indices`, their replica with a half-precision wire and, with
    /// `withState`, their optimizer state, as ASSIGN and SNAPSHOT_REPLY carry them: "NAME",
    /// "replica/NAME" and "optimizer/PARAMETER.SLOT".
    func shardTensors(_ indices: [Int], withState: Bool) -> [WireTensor] {
        func tensor(_ name: String, _ t: Tensor) -> WireTensor { WireTensor(name: name, shape: t.shape, payload: Payload(floats: t.scalars)) }
        var tensors: [WireTensor] = []
        for i in indices {
            tensors.append(tensor(parameters[i].name, parameters[i].tensor))
            if let held = replica?[i] { tensors.append(tensor("replica/" + parameters[i].name, held)) }
        }
        guard withState else { return tensors }
        let names = Set(indices.map { parameters[$0].name })
        for slot in optimizer.state where names.contains(where: { slot.name.hasPrefix($0 + ".") }) {
            tensors.append(tensor("optimizer/" + slot.name, slot.tensor))
        }
        return tensors
    }

    /// Loads tensors named as `shardTensors` names them into the parameters (and replica) of `shard`;
    /// returns the optimizer state they carry, and the first tensor that is not one of that shard's (with
    /// its shape), which is left alone.
    func load(shardTensors tensors: [WireTensor], of shard: Int) -> (state: [String: Tensor], foreign: WireTensor?) {
        var state: [String: Tensor] = [:], foreign: WireTensor?
        for tensor in tensors {
            let values = Tensor(shape: tensor.shape, values: TensorEncoding.floats(tensor.payload))
            if tensor.name.hasPrefix("optimizer/") {
                state[String(tensor.name.dropFirst("optimizer/".count))] = values
                continue
            }
            let isReplica = tensor.name.hasPrefix("replica/")
            guard let i = indexOfParameter[isReplica ? String(tensor.name.dropFirst("replica/".count)) : tensor.name],
                  plan.owner[i] == shard, parameters[i].tensor.shape == tensor.shape else {
                foreign = foreign ?? tensor
                continue
            }
            (isReplica ? replica?[i] : parameters[i].tensor)?.assign(values)
        }
        return (state, foreign)
    }
}

// MARK: Follower side

extension Coordinator {
    /// A follower's loop: serve the workers' pushes for its tensors and the leader's commands until the
    /// leader stops it, or fails when the leader stays silent.
    func runFollower() throws -> JobSummary {
        guard let leaderSocket, case .follower(let index, let leaderEndpoint, let advertise) = role else { preconditionFailure("runFollower: not a follower") }
        let interval = Double(spec.heartbeatIntervalMs) / 1000, timeout = Double(spec.heartbeatTimeoutMs) / 1000
        try sayHello(index: index, advertise: advertise)
        var lastBeat = Self.now()
        leaderLastHeard = Self.now()
        while !isFinished {
            let ready = try ZMQSocket.poll([workerSocket, leaderSocket, monitor.socket, authenticator.socket], timeoutMilliseconds: 50)
            if ready.contains(0) { try drain(workerSocket) { try handleFollowerWorkerFrames($0, connection: workerSocket.lastConnection) } }
            if ready.contains(1) { try drain(leaderSocket) { try handleLeaderFrames($0) } }
            if ready.contains(2) {
                while let event = try monitor.next() {
                    switch event {
                    case .accepted(let connection): pendingConnections.accepted(connection)
                    case .disconnected(let connection): pendingConnections.dropped(connection)
                    case .authenticationFailed, .other: break
                    }
                }
            }
            if ready.contains(3) { try authenticate() }
            if let pending = pendingApply { try apply(pending.message, step: pending.step, deadline: pending.deadline) }
            let now = Self.now()
            rejectionLog.tick(now: now, to: log)
            if now - lastBeat > interval {
                try? leaderSocket.send(WireCodec.encode(WireMessage(
                    jobID: spec.jobID, body: .heartbeat(Heartbeat(sentUnixMilliseconds: Self.unixMilliseconds(), state: phase.rawValue)))))
                lastBeat = now
            }
            let silent = now - leaderLastHeard
            if silent > max(30, 6 * timeout) {
                fail("the leader coordinator at \(leaderEndpoint) has been silent for \(Int(silent)) s")
            } else if silent > timeout && now - lastHello > timeout {
                try sayHello(index: index, advertise: advertise)  // a restarted leader assigns this shard again
            }
        }
        rejectionLog.flush(to: log)
        workerSocket.close()
        leaderSocket.close()
        log.info("follower shard \(phase.rawValue)", metadata: ["shard": "\(index)", "message": "\(message)"])
        return JobSummary(
            state: phase.rawValue, jobID: spec.jobID, workers: spec.workers, epochs: step / stepsPerEpoch, steps: step, trainLoss: 0,
            testLoss: 0, testAccuracy: 0, wallSeconds: Self.now() - started, samplesPerSecond: 0, modelPath: "", message: message,
            rejectedMessages: rejected, lostWorkers: [], task: spec.task)
    }

    /// HELLO to the leader: this shard's index and the endpoint workers reach it at.
    func sayHello(index: Int, advertise: String?) throws {
        var hello = ShardMessage(.hello)
        hello.shard = UInt32(index)
        hello.endpoint = advertise ?? Self.reachable(workerEndpoint)
        try leaderSocket?.send(WireCodec.encode(WireMessage(jobID: spec.jobID, step: 0, body: .shard(hello))))
        lastHello = Self.now()
    }

    /// `endpoint` with a wildcard host (bound to every address) replaced by this host's name.
    static func reachable(_ endpoint: String) -> String {
        for wildcard in ["tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"] where endpoint.hasPrefix(wildcard) {
            return "tcp://\(ProcessInfo.processInfo.hostName):" + endpoint.dropFirst(wildcard.count)
        }
        return endpoint
    }

    /// Tells the leader that `rank`'s push of this step and attempt is complete or was refused (and why).
    func reportToLeader(_ rank: Int32, refused: String) {
        guard let leaderSocket else { return }
        var report = ShardMessage(.received)
        report.ranks = [rank]
        report.attempt = attempt
        report.refused = refused
        try? leaderSocket.send(WireCodec.encode(WireMessage(jobID: spec.jobID, step: UInt64(step), body: .shard(report))))
    }

    /// Drops the pushes of this step: attempt `next` of it begins.
    func abortAttempt(_ next: UInt32) {
        attempt = next
        contributions.removeAll(keepingCapacity: true)
        partialPushes.removeAll(keepingCapacity: true)
        earlyAverage = EarlyAverage()
    }

    func handleFollowerWorkerFrames(_ frames: [Payload], connection: Int32) throws {
        guard frames.count >= 2 else { reject("a message without an envelope", from: nil); return }
        let identity = frames[0].bytes
        let rank = rankOfIdentity[identity]
        if let rank { members[rank]?.lastSeen = Self.now(); members[rank]?.connection = connection }
        let message: WireMessage
        do {
            message = try WireCodec.decode(Array(frames.dropFirst()), expectedJobID: spec.jobID, sharedMemory: rank.flatMap { members[$0]?.shared?.segment })
        } catch {
            reject("\(error)", from: rank)
            try? reply(identity, .error(ErrorReply(code: error.replyCode, reason: "\(error)")))
            return
        }
        switch message.body {
        case .join(let join):
            guard phase == .training, roster[join.requestedRank] == join.workerID else {
                try? reply(identity, .error(ErrorReply(code: .notReady, reason: "rank \(join.requestedRank) is not (yet) in the leader's roster; retry")))
                return
            }
            if let old = members[join.requestedRank] { rankOfIdentity[old.identity] = nil }
            members[join.requestedRank] = Member(
                rank: join.requestedRank, identity: identity, workerID: join.workerID, host: join.host, pid: join.pid, state: "training",
                lastSeen: Self.now(), connection: connection, shared: join.sharedMemory.flatMap(mapSharedMemory))
            pendingConnections.joined(connection)
            rankOfIdentity[identity] = join.requestedRank
            try reply(identity, .welcome(Welcome(rank: join.requestedRank, worldSize: 0, jobSpecJSON: "", startStep: UInt64(step), epoch: 0,
                                                 sharedMemory: members[join.requestedRank]?.shared != nil)), rank: join.requestedRank)
        case .gradientPush(let push):
            handlePush(push, message: message, rank: rank)
        case .heartbeat, .leave:
            break
        default:
            reject("unexpected \(message.body.kind) on a coordinator shard's worker socket", from: rank)
        }
    }

    func handleLeaderFrames(_ frames: [Payload]) throws {
        leaderLastHeard = Self.now()
        let message: WireMessage
        do {
            message = try WireCodec.decode(frames)
        } catch {
            log.warning("dropped a malformed message from the leader: \(error)")
            return
        }
        switch message.body {
        case .shard(let command): try follow(command, message: message)
        case .stop(let reason, _):
            phase = .completed
            self.message = reason
        case .error(let error) where error.code == .notJoined:  // a restarted leader that has not assigned this shard yet
            if case .follower(let index, _, let advertise) = role, Self.now() - lastHello > 0.25 { try sayHello(index: index, advertise: advertise) }
        case .error(let error):
            fail("the leader refused this coordinator shard: \(error.reason)")
        default:
            break
        }
    }

    /// Carries out one of the leader's commands.
    func follow(_ command: ShardMessage, message: WireMessage) throws {
        let atStep = message.step == UInt64(step) && command.attempt == attempt
        switch command.kind {
        case .assign:
            let (state, foreign) = load(shardTensors: message.tensors, of: role.shardIndex)
            if let foreign {
                fail("the leader assigned '\(foreign.name)' \(foreign.shape), which is not a tensor of this shard")
                return
            }
            try optimizer.restoreState(state)
            optimizer.stepCount = Int(command.optimizerSteps)
            spec.jobID = message.jobID
            step = Int(message.step)
            abortAttempt(0)
            pendingApply = nil
            phase = .training
            log.info("assigned by the leader", metadata: ["step": "\(step)", "tensors": "\(owned.count)"])
        case .roster:
            roster = Dictionary(uniqueKeysWithValues: zip(command.ranks, command.workerIDs))
            for (rank, member) in members where roster[rank] != member.workerID {
                members[rank] = nil
                rankOfIdentity[member.identity] = nil
                contributions[rank] = nil
                partialPushes[rank] = nil
            }
        case .abort where message.step == UInt64(step):
            if command.attempt > attempt { abortAttempt(command.attempt) }
        case .average where atStep:
            let used = zip(command.ranks, command.sampleCounts).map { rank, count in
                contributions[rank].flatMap { $0.sampleCount == count ? $0 : nil } ?? .rejected(rank: rank)
            }
            let samples = used.reduce(0) { $0 + Int($1.sampleCount) }
            let early = earlyAverage
            let averagedEarly = early.ranks == used.map(\.rank) && early.sampleCounts == used.map(\.sampleCount)
                && early.averaged.count == parameters.count && owned.allSatisfy { early.averaged[$0] }
            var answer = ShardMessage(.averaged)
            answer.attempt = attempt
            answer.finite = samples == 0 || (averagedEarly ? early.finite : average(used, samples: samples))
            earlyAverage = EarlyAverage()
            if !answer.finite {
                let kept = Set(withoutNonFinite(used).map(\.rank))
                answer.ranks = used.map(\.rank).filter { !kept.contains($0) }
            }
            try leaderSocket?.send(WireCodec.encode(WireMessage(jobID: spec.jobID, step: UInt64(step), body: .shard(answer))))
        case .apply where message.step >= UInt64(step):
            try apply(command, step: Int(message.step), deadline: Self.now() + Double(spec.heartbeatTimeoutMs) / 1000)
        case .snapshot where pendingApply != nil:
            pendingSnapshot = (command, message)  // answered once the update it must include is done
        case .snapshot:
            var answer = ShardMessage(.snapshotReply)
            answer.optimizerSteps = UInt64(optimizer.stepCount)
            try leaderSocket?.send(WireCodec.encode(WireMessage(
                jobID: spec.jobID, step: message.step, body: .shard(answer), tensors: shardTensors(owned, withState: command.withState))))
        default:
            log.debug("leader command \(command.kind) for step \(message.step) ignored at step \(step)")
        }
    }

    /// APPLY: steps this shard's tensors (when asked) and sends their update for `newStep` to the
    /// recipients. Waits (until `deadline`) for recipients that have not joined this shard yet.
    func apply(_ command: ShardMessage, step newStep: Int, deadline: Double) throws {
        let missing = command.ranks.filter { members[$0] == nil }
        if !missing.isEmpty && Self.now() < deadline {
            pendingApply = (command, newStep, deadline)
            return
        }
        pendingApply = nil
        if !missing.isEmpty { log.warning("ranks \(missing) did not join this coordinator shard in time; their update leaves without them") }
        optimizer.learningRate = command.learningRate
        contributions.removeAll(keepingCapacity: true)
        partialPushes.removeAll(keepingCapacity: true)
        earlyAverage = EarlyAverage()
        step = newStep
        let recipients = command.ranks.filter { members[$0] != nil }
        broadcastUpdate(trainLoss: 0, recipients: recipients) { send in stepAndEncode(applyOptimizer: command.applyOptimizer, emit: send) }
        if let (snapshot, message) = pendingSnapshot {
            pendingSnapshot = nil
            try follow(snapshot, message: message)
        }
    }
}
