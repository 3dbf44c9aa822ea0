import DDPWire
import Foundation
import Logging

/// The leader's control socket: status (with which workers lag) and stop requests.
extension Leader {
    func handleControl(_ peer: PeerID, _ frames: [Payload]) {
        func answer(_ body: WireMessage.Body, tensors: [WireTensor] = []) {
            transport.answerControl(WireCodec.encode(WireMessage(jobID: spec.jobID, step: UInt64(round.step), body: body, tensors: tensors)), to: peer)
        }
        let request: WireMessage
        do {
            request = try WireCodec.decode(frames, expectedJobID: spec.jobID)
        } catch {
            reject("control message: \(error)", from: nil)
            answer(.error(ErrorReply(code: error.replyCode, reason: "\(error)")))
            return
        }
        switch request.body {
        case .statusRequest(let detail):
            answer(.statusReply(status(detail: detail)))
        case .heartbeat(let beat):  // an echo, for round-trip and bandwidth checks (ddpctl doctor)
            answer(.heartbeat(Heartbeat(sentUnixMilliseconds: beat.sentUnixMilliseconds, state: phase.rawValue)),
                   tensors: request.tensors.filter { $0.payload.byteCount <= ZeroMQTransport.largestEcho })
        case .stop(let reason, let graceful):
            log.info("stop requested: \(reason)", metadata: ["graceful": "\(graceful)"])
            stopRequested = true
            if graceful {
                if phase == .training { phase = .stopping }
            } else if !phase.isFinished {  // at once: the step in progress is dropped (a resume computes it again)
                phase = .stopped
                message = "stopped at once by request at step \(round.step) (the step in progress was dropped)"
            }
            answer(.statusReply(status(detail: true)))
        case .join, .welcome, .gradientPush, .parameterUpdate, .leave, .statusReply, .error, .shard, .heldOutScores:
            answer(.error(ErrorReply(code: .malformed, reason: "unexpected \(request.body.kind) on the control socket")))
        }
    }

    /// The job's state as a status reply; without `detail`, without the workers and recent losses.
    func status(detail: Bool = true) -> StatusReply {
        let now = now()
        let live = membership.live
        let workers: [WorkerStatus] = !detail ? [] : membership.byRank.map { m in
            let others = live.filter { $0.rank != m.rank }
            return WorkerStatus(rank: m.rank, host: m.host, pid: m.pid, state: m.state.rawValue, step: m.lastPushedStep,
                         lastSeenMillisecondsAgo: UInt64(max(0, now - m.lastSeen) * 1000), lastStepSeconds: m.lastStepSeconds,
                         lagging: m.isLive && Self.lags(m, behind: others), restarts: m.restarts, gradientNorm: m.gradientNorm,
                         outlierSteps: m.outlierSteps, samplesPerSecond: m.secondsPerSample > 0 ? 1 / m.secondsPerSample : 0,
                         leftOutSteps: m.leftOutSteps, lastLeftOutStep: m.lastLeftOutStep)
        }
        let last = recorder.history.last
        let elapsed = trainingStarted > 0 ? now - trainingStarted : 0
        var reply = StatusReply(
            jobState: phase.rawValue, step: UInt64(round.step), totalSteps: UInt64(totalSteps),
            epoch: UInt64(round.step / stepsPerEpoch), totalEpochs: UInt64(spec.epochs), elapsedSeconds: now - started,
            trainLoss: recorder.recentLosses.last ?? 0, testLoss: last?.testLoss ?? 0, testAccuracy: last?.testAccuracy ?? 0,
            samplesPerSecond: elapsed > 0 ? Double(recorder.samplesTrained) / elapsed : 0, workers: workers,
            rejectedMessages: recorder.rejected, recentLosses: detail ? Array(recorder.recentLosses.suffix(64)) : [], message: messageWithProblems)
        reply.coordinatorShards = followers.keys.sorted().map { followers[$0]!.endpoint }
        return reply
    }

    /// Whether a worker lags behind the other live ones: its measured time per sample is over 1.5x their
    /// median (which names a slow worker also when `balance: speed` has evened out the step times), or,
    /// until all are measured, its last step took over twice theirs (and 5 ms more).
    static func lags(_ member: Member, behind others: [Member]) -> Bool {
        guard !others.isEmpty else { return false }
        if member.secondsPerSample > 0 && others.allSatisfy({ $0.secondsPerSample > 0 }) {
            return member.secondsPerSample > 1.5 * Measure.median(others.map(\.secondsPerSample))
        }
        let typical = Measure.median(others.map(\.lastStepSeconds))
        return member.lastStepSeconds > 2 * typical && member.lastStepSeconds - typical > 0.005
    }
}
