import Autodiff
import DDPWire
import Foundation
import Logging

/// The phases of a job (or of a follower shard's part in it).
enum Phase: String {
    case waiting, training, stopping, completed, stopped, failed

    var isFinished: Bool {
        switch self {
        case .completed, .stopped, .failed: true
        case .waiting, .training, .stopping: false
        }
    }
}

/// What the leader and a follower shard have in common: they serve workers' pushes for their tensors
/// and send them updates. The parts (membership, the step round, the tensors, the record) are composed
/// here; the two roles differ in who decides (the leader) and who follows.
protocol ShardServer: AnyObject {
    var spec: JobSpec { get }
    var log: Logger { get }
    var transport: any CoordinatorTransport { get }
    var shard: ShardState { get }
    var membership: Membership { get set }
    var round: StepRound { get set }
    var recorder: Recorder { get set }
    var phase: Phase { get set }
    var message: String { get set }
    /// Steps per epoch of the job's data.
    var stepsPerEpoch: Int { get }
    /// The monotonic clock, in seconds (a test may set it).
    var now: () -> Double { get }
    /// Called when a push of `rank` is complete or refused (a follower reports it to the leader).
    func pushAnswered(_ rank: Int32, refused: String)
    /// Called when a worker is lost or left (the leader re-divides the step).
    func memberGone(_ member: Member, as state: WorkerState, reason: String)
}

extension ShardServer {
    func fail(_ reason: String) {
        phase = .failed
        message = reason
        log.error("job failed: \(reason)")
    }

    func reject(_ reason: String, from rank: Int32?) { recorder.reject(reason, rank: rank, now: now()) }

    /// Sends `body` (with its step, rank and tensors) to a worker or follower.
    func send(_ body: WireMessage.Body, to peer: PeerID, step: UInt64 = 0, rank: Int32 = -1, tensors: [WireTensor] = []) throws {
        recorder.metrics.bytesSent += tensors.reduce(0) { $0 + $1.payload.byteCount }
        try transport.send(WireCodec.encode(WireMessage(jobID: spec.jobID, step: step, rank: rank, body: body, tensors: tensors)), to: peer)
    }

    /// Decodes a peer's frames (with the shared-memory segment of the worker it is, if any); a message
    /// that does not decode is rejected, answered, and nil.
    func decode(_ frames: [Payload], from peer: PeerID, isKnownPeer: Bool) -> WireMessage? {
        recorder.metrics.bytesReceived += frames.reduce(0) { $0 + $1.byteCount }
        let rank = membership.rank(of: peer)
        if let rank { membership.heard(from: rank, at: now()) }
        do {
            return try WireCodec.decode(frames, expectedJobID: spec.jobID, sharedMemory: rank.flatMap { membership[$0]?.shared?.segment })
        } catch {
            reject("\(error)", from: rank)
            // A peer that is no longer a member (a worker woken after it was declared lost, or whose pushes
            // outlived a coordinator restart) is told to join again; a stranger's junk gets the same answer.
            let code = isKnownPeer || [.versionMismatch, .wrongJob].contains(error.replyCode) ? error.replyCode : .notJoined
            try? send(.error(ErrorReply(code: code, reason: "\(error)" + (code == .notJoined ? notJoinedReason(rank) : ""))), to: peer)
            return nil
        }
    }

    /// Why a peer is not a member, for a NOT_JOINED reply.
    func notJoinedReason(_ rank: Int32?) -> String {
        guard let rank, let member = membership[rank] else { return ": this peer has not joined; join first" }
        return ": rank \(rank) \(member.state == .left ? "left" : "was declared lost") (\(member.goneReason)); join again"
    }

    /// The element type of `rank`'s pushes: f32 from a worker sharing memory (the coordinator rounds them
    /// to the wire type when averaging, as if they had been sent as it), else the job's wire type.
    func pushType(of rank: Int32) -> DType { membership[rank]?.shared != nil ? .f32 : shard.wireType }

    /// Takes (a part of) a push of the worker at `rank`: stored, averaged early where it can be, or
    /// dropped or refused with the reason (a refusal is told to the worker).
    func intake(_ push: GradientPush, message: WireMessage, rank: Int32?) {
        guard let rank, let member = membership[rank], member.isLive else {
            reject("gradient push from a worker that is not training", from: rank)
            return
        }
        guard message.rank == rank else { reject("push names rank \(message.rank) but comes from rank \(rank)", from: rank); return }
        let shard = self.shard
        let outcome = round.receive(
            push, step: message.step, rank: rank, tensors: message.tensors, indexOf: { shard.indexOfParameter[$0] },
            nameOf: { shard.parameters[$0].name }, parameterCount: shard.parameters.count, owned: shard.owned, dtype: pushType(of: rank),
            validate: { shard.validate($0, alreadyReceived: $1, dtype: self.pushType(of: rank)) })
        switch outcome {
        case .dropped(let why):
            reject(why, from: rank)
        case .late(let complete), .storedLate(let complete):
            if complete { membership.update(rank) { $0.measure(push) } }
        case .lateRefused(let reason):
            log.info("rank \(rank): \(reason)")
            try? send(.error(ErrorReply(code: .pushRefused, reason: reason)), to: member.peer, step: message.step, rank: rank)
        case .refused(let problem):
            reject("gradient of rank \(rank) at step \(round.step) skipped: \(problem)", from: rank)
            try? send(.error(ErrorReply(code: .pushRefused, reason: "push for step \(round.step) refused: \(problem)")), to: member.peer,
                      step: UInt64(round.step), rank: rank)
            pushAnswered(rank, refused: problem)
        case .stored(let arrived, let complete):
            membership.update(rank) {
                $0.lastPushedStep = message.step
                if complete { $0.measure(push) }
            }
            if complete { pushAnswered(rank, refused: "") }
            let live = membership.live.map(\.rank)
            if let basis = round.earlyAverageBasis(ranks: live, parameterCount: shard.parameters.count) {
                shard.averageEarly(arrived, round: &round, basis: basis, dtype: pushType)
            }
        }
    }

    /// Marks `rank` lost or left, forgets its push this round, and tells the role.
    func markGone(_ rank: Int32, as state: WorkerState, reason: String) {
        guard let before = membership.markGone(rank, as: state, reason: reason) else { return }
        round.forget(rank)
        if state == .lost { recorder.metrics.workersLost += 1 }
        log.warning("worker \(state.rawValue)", metadata: ["rank": "\(rank)", "host": "\(before.host)", "pid": "\(before.pid)", "reason": "\(reason)"])
        memberGone(before, as: state, reason: reason)
    }

    /// Sends the update for the round's step to `recipients` (in rank order), in the parts `produce`
    /// hands to its argument as they are ready (the parameter indices, `last` true for the final one; a
    /// resend is one part without tensors): through shared memory to the workers that share it, in frames
    /// to the others. With `assignments` (the leader), each gets its samples; with `local`, they are a round
    /// of local SGD's inner steps. `keepsParameters`: one part without tensors, the workers keep the values
    /// their Welcomes carried (the first step of training). `evaluations`: held-out batches to score.
    func broadcast(
        to recipients: [Member], trainLoss: Float, learningRate: Float, assignments: [Int32: [SampleRange]], local: LocalRound? = nil,
        keepsParameters: Bool = false, evaluations: [Int32: [SampleRange]] = [:], produce: (_ send: (_ indices: [Int], _ last: Bool) -> Void) -> Void
    ) {
        shard.updateTargets = (recipients.contains { $0.shared == nil }, recipients.compactMap(\.shared))
        defer { shard.updateTargets = (true, []) }
        round.started = now()
        var part: UInt32 = 0
        produce { indices, last in
            for member in recipients where membership[member.rank]?.isLive == true {
                var update = ParameterUpdate(
                    learningRate: learningRate, fullCopy: shard.replica == nil || member.shared != nil, epoch: UInt64(round.step / self.stepsPerEpoch),
                    worldSize: UInt32(recipients.count), trainLoss: trainLoss, attempt: round.attempt,
                    part: part, moreParts: !last, samples: assignments[member.rank] ?? [], innerSteps: local?.innerSteps ?? 0,
                    firstInnerStep: local?.firstInnerStep ?? 0, keepsParameters: keepsParameters)
                update.evaluate = evaluations[member.rank] ?? []
                let tensors = indices.map { index in
                    guard let area = member.shared else { return shard.updateFrame(index) }
                    let p = shard.parameters[index]
                    return WireTensor(name: p.name, shape: p.tensor.shape, dtype: .f32, payload: area.update(index, elements: shard.ownedRange[index]),
                                      slice: shard.slice(index))
                }
                do {
                    try send(.parameterUpdate(update), to: member.peer, step: UInt64(round.step), rank: member.rank, tensors: tensors)
                } catch {
                    markGone(member.rank, as: .lost, reason: "unreachable: \(error)")
                }
            }
            part += 1
        }
    }
}
