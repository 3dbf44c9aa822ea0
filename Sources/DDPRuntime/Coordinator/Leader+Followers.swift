import Autodiff
import DDPWire
import Foundation

// MARK: Driving the follower shards

extension Leader {
    /// Whether every follower has reported `rank`'s push of this step and attempt (always, without followers).
    func everyFollowerAnswered(_ rank: Int32) -> Bool {
        followers.keys.allSatisfy { followerReports[$0]?[rank] != nil }
    }

    func sendToFollower(_ index: Int, body: WireMessage.Body, tensors: [WireTensor] = []) {
        guard let follower = followers[index] else { return }
        do {
            try send(body, to: follower.peer, step: UInt64(round.step), tensors: tensors)
        } catch {
            followersLost = true
            fail("coordinator shard \(index) (\(follower.endpoint)) is unreachable: \(error)")
        }
    }

    func sendToFollowers(_ message: ShardMessage) {
        var message = message
        message.attempt = message.kind == .abort ? message.attempt : round.attempt
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
        let current = membership.byRank.filter(\.takesPart)
        roster.ranks = current.map(\.rank)
        roster.workerIDs = current.map(\.workerID)
        sendToFollowers(roster)
    }

    /// Waits for every follower's answer of `kind` to the command just sent (for this step), handling the
    /// followers' other messages and putting every other event aside for the main loop. Nil (and the job
    /// failed, naming the follower) when one does not answer within the step deadline or its connection drops.
    func awaitFollowers(_ kind: ShardMessage.Kind) -> [Int: (message: ShardMessage, tensors: [WireTensor])]? {
        var answers: [Int: (message: ShardMessage, tensors: [WireTensor])] = [:]
        let deadline = now() + max(10, stepTimeout)
        while answers.count < followers.count {
            guard !followersLost, now() < deadline else {
                let missing = followers.keys.sorted().filter { answers[$0] == nil }.map { "\($0) (\(followers[$0]!.endpoint))" }
                if !followersLost { fail("coordinator shard \(missing.joined(separator: ", ")) did not answer \(kind) within \(Int(max(10, stepTimeout))) s") }
                return nil
            }
            for event in (try? transport.poll(timeoutMilliseconds: 50)) ?? [] {
                switch event {
                case .fromPeer(let peer, let frames):
                    guard let index = followerOfPeer[peer] else {
                        deferred.append(event)
                        continue
                    }
                    followers[index]?.lastSeen = now()
                    guard let message = try? WireCodec.decode(frames, expectedJobID: spec.jobID) else {
                        reject("a malformed message from coordinator shard \(index)", from: nil)
                        continue
                    }
                    if case .shard(let answer) = message.body, answer.kind == kind, message.step == UInt64(round.step) {
                        answers[index] = (answer, message.tensors)
                    } else if case .shard(let other) = message.body {
                        try? handleFollowerMessage(other, message: message, peer: peer)
                    }
                case .disconnected(let peers):
                    if let index = peers.lazy.compactMap({ self.followerOfPeer[$0] }).first {
                        followersLost = true
                        fail("coordinator shard \(index) (\(followers[index]!.endpoint)) lost its connection")
                        return nil
                    }
                    deferred.append(event)
                case .control, .refused, .fromLeader:
                    deferred.append(event)
                }
            }
        }
        return answers
    }

    /// Copies the followers' current values (and with `withState` their optimizer state) into this
    /// process, for evaluation, checkpoints, the final model and welcoming a worker (once per step: the copy
    /// serves the step's later needs). False when a follower is lost or failed to answer (the job has
    /// failed then).
    func refreshFromFollowers(withState: Bool) -> Bool {
        guard !followers.isEmpty else { return true }
        if !followersLost, let copied = followersCopied, copied.step == round.step, copied.withState || !withState { return true }
        var request = ShardMessage(.snapshot)
        request.withState = withState
        sendToFollowers(request)
        guard let answers = awaitFollowers(.snapshotReply) else { return false }
        var state: [String: Tensor] = [:]
        for (index, answer) in answers.sorted(by: { $0.key < $1.key }) {
            if let foreign = shard.load(shardTensors: answer.tensors, of: index, sliced: true, state: &state) {
                log.warning("coordinator shard \(index) sent '\(foreign.name)' \(foreign.shape) (elements \(foreign.elements)), which is not its part; skipped")
            }
        }
        if withState {
            do { try shard.optimizer.restoreState(state) } catch { log.error("optimizer state from the coordinator shards: \(error)") }
        }
        followersCopied = (round.step, withState)
        return true
    }

    /// A follower's message on the worker socket.
    func handleFollowerMessage(_ command: ShardMessage, message: WireMessage, peer: PeerID) throws {
        switch command.kind {
        case .hello:
            let index = Int(command.shard)
            guard index >= 1 && index < spec.coordinatorShards else {
                reject("hello from coordinator shard \(index), but this job has shards 1...\(spec.coordinatorShards - 1)", from: nil)
                return
            }
            if let known = followers[index] {
                if known.peer == peer { return }  // said again while this leader was busy
                guard phase == .waiting else {
                    fail("coordinator shard \(index) started again during training; the state of its tensors is lost")
                    return
                }
                followerOfPeer[known.peer] = nil
            }
            followers[index] = Follower(peer: peer, endpoint: command.endpoint, lastSeen: now())
            followerOfPeer[peer] = index
            transport.joined(peer)
            log.info("coordinator shard joined", metadata: ["shard": "\(index)", "endpoint": "\(command.endpoint)",
                                                            "tensors": "\(model == nil ? "when the first worker brings the model" : "\(shard.plan.indices(of: index).count)")"])
            if model != nil {  // a program's model: assigned once the first worker has brought it
                assign(index)
                sendRoster()
            }
        case .received:
            guard let index = followerOfPeer[peer], message.step == UInt64(round.step), command.attempt == round.attempt,
                  let rank = command.ranks.first else { return }
            followerReports[index, default: [:]][rank] = command.refused
        case .averaged, .snapshotReply:
            log.debug("coordinator shard answer \(command.kind) outside its exchange ignored")
        case .assign, .roster, .average, .apply, .abort, .snapshot:
            reject("a leader's command \(command.kind) sent to the leader", from: nil)
        }
    }

    /// ASSIGN: the job, the step, and the values and optimizer state of follower `index`'s tensors.
    func assign(_ index: Int) {
        var command = ShardMessage(.assign)
        command.jobSpecJSON = spec.json()
        command.optimizerSteps = UInt64(shard.optimizer.stepCount)
        command.modelJSON = model?.program?.json() ?? ""
        sendToFollower(index, body: .shard(command), tensors: shard.shardTensors(shard.plan.indices(of: index), withState: true, sliced: false))
    }
}
