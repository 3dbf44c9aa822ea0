import Autodiff
import DDPData
import DDPWire
import Foundation
import Logging

/// The leader's steps: starting training, liveness, completing a step (backup workers, averaging, outliers,
/// divergence), carrying left-out samples over, advancing, epochs, checkpoints, resending and the update.
extension Leader {
    func startTraining() {
        phase = .training
        membership.reservedUntil = 0  // from now on a free rank is free (the holders that came back have it)
        trainingStarted = now()
        log.info("training started", metadata: ["workers": "\(membership.liveCount + membership.joiningCount)", "steps": "\(totalSteps)",
                                                 "steps_per_epoch": "\(stepsPerEpoch)"])
        // The Welcomes carried the values training starts from: the first step's update keeps them, from
        // every shard (each follower sends its part once the workers have joined it).
        var apply = ShardMessage(.apply)
        apply.ranks = membership.takingPart
        apply.keepsParameters = true
        sendToFollowers(apply)
        broadcastUpdate(trainLoss: 0, keepsParameters: true) { send in send([], true) }
    }

    var stepTimeout: Double { recorder.stepTimeout(configured: spec.stepTimeoutSeconds) }

    func checkLiveness(now: Double) {
        let heartbeatTimeout = Double(spec.heartbeatTimeoutMs) / 1000
        for (index, follower) in followers where now - follower.lastSeen > 2 * heartbeatTimeout {
            followersLost = true
            fail("coordinator shard \(index) (\(follower.endpoint)) has been silent for \(Int(now - follower.lastSeen)) s")
            return
        }
        let overdue = membership.overdue(now: now, step: round.step, stepStarted: round.started, stepTimeout: stepTimeout, heartbeatTimeout: heartbeatTimeout) {
            !self.round.hasAnswered($0) || !self.everyFollowerAnswered($0) || self.owesScores($0)
        }
        for (rank, reason) in overdue { markGone(rank, as: .lost, reason: reason) }
        // Below min_workers the job pauses (no step completes) and waits a grace period for workers to
        // rejoin, then fails.
        let present = membership.liveCount + membership.joiningCount
        if membership.liveCount < spec.minWorkers && present >= spec.minWorkers { round.mustRedo = true }  // enough again: resend with them
        if present < spec.minWorkers && phase != .failed {
            if belowMinimumSince == 0 {
                belowMinimumSince = now
                log.warning("\(membership.liveCount) live workers, below min_workers \(spec.minWorkers); waiting \(Int(joinGrace)) s for workers to rejoin")
            } else if now - belowMinimumSince > joinGrace {
                let lost = membership.byRank.filter { $0.state == .lost }.map { "rank \($0.rank) (\($0.host), pid \($0.pid))" }
                fail("\(membership.liveCount) live workers, below min_workers \(spec.minWorkers) for \(Int(joinGrace)) s; lost: \(lost.joined(separator: ", "))")
            }
        } else {
            belowMinimumSince = 0
        }
    }

    /// Completes the step once every live worker's push is in, or with `backup_workers` all but k (and
    /// every follower reported them): averages (again without non-finite contributions where needed),
    /// records, carries the left-out samples over, and advances.
    func completeStepIfReady() throws {
        let live = membership.live.map(\.rank)
        let answered = live.filter { round.hasAnswered($0) && everyFollowerAnswered($0) && !owesScores($0) }
        guard live.count >= max(spec.minWorkers, 1), answered.count >= pushesNeeded(live: live.count) else { return }
        let leftOut = live.filter { !answered.contains($0) }
        refuseWhatFollowersRefused(answered)
        let contributions = round.contributions(of: answered) + round.latePushes
        if let loss = Self.divergedLoss(contributions) {
            recorder.recordDivergedLoss(loss)  // the summary, status and metrics show the loss that ended it
            return diverged("the training loss of step \(round.step) is \(loss)")
        }
        guard let (used, followerSquares) = averageContributions(contributions) else { return }  // a follower failed
        let samples = used.reduce(0) { $0 + Int($1.sampleCount) }
        var loss: Float = 0, correct = 0, clip: Float?
        if samples > 0 {
            recordGradientNorms(used)
            // With local SGD the job's clipping and schedule are the workers' inner steps'; the outer step size is constant.
            if !spec.isLocalSGD {
                // The global norm: this shard's sum of squares, then each follower's in shard order.
                if spec.clipNorm > 0,
                   let scale = clipScale(norm: Float(([shard.sumOfSquares()] + followerSquares).reduce(0, +).squareRoot()), maxNorm: spec.clipNorm) {
                    shard.scaleGradients(by: scale)
                    clip = scale
                }
                shard.optimizer.learningRate = schedule.rate(base: spec.learningRate, at: round.step)
            }
            for c in used { loss += c.loss * Float(c.sampleCount) / Float(samples); correct += Int(c.correct) }
        } else {
            log.warning("step \(round.step) had no usable gradient; parameters unchanged")
        }
        let seconds = now() - round.started
        recorder.recordStep(round.step, seconds: seconds, loss: loss, learningRate: shard.optimizer.learningRate, samples: samples, correct: correct,
                            workerSeconds: used.isEmpty ? [] : membership.live.map { ($0.rank, $0.lastStepSeconds) },
                            workerSamples: round.assignment.keys.sorted().map { ($0, Int(round.assignedCount(of: $0) ?? 0)) },
                            leftOut: leftOut, late: used.compactMap { c in c.lateStep.map { (c.rank, $0, Int(c.sampleCount)) } },
                            liveWorkers: membership.liveCount, jobID: spec.jobID, now: now())
        carryOver(leftOut)
        advance(trainLoss: loss, applyOptimizer: samples > 0, clipScale: clip)
    }

    /// Moves on to the next step once the current one is averaged: the followers and this shard step
    /// (when `applyOptimizer`; the followers scale their gradients by `clipScale` first, when clipped) and
    /// send the update, then the epoch's end, a checkpoint, or the job's end.
    func advance(trainLoss loss: Float, applyOptimizer: Bool, clipScale: Float?) {
        followerReports.removeAll(keepingCapacity: true)
        if let pending = heldOut {  // cannot be: the step waited for every score
            log.warning("epoch \(pending.record.epoch)'s held-out scores did not all come; recorded without them")
            publishHeldOut(test: nil)
        }
        round.begin(step: round.step + 1, attempt: 0)
        let step = round.step
        let more = step < totalSteps && !stopRequested
        let checkpointDue = spec.checkpointEvery > 0 ? step % spec.checkpointEvery == 0 : step % stepsPerEpoch == 0
        // With follower shards the workers score the held-out split on the update that leaves now, unless a
        // checkpoint's snapshot brings the parameters here anyway.
        let workersScore = workersScore(epochEndingAt: step, more: more, checkpointDue: checkpointDue)
        if workersScore { shareOutEvaluation() }
        var apply = ShardMessage(.apply)
        apply.learningRate = shard.optimizer.learningRate
        apply.applyOptimizer = applyOptimizer
        apply.clip = clipScale != nil
        apply.clipScale = clipScale ?? 1
        apply.ranks = more ? membership.takingPart : []
        sendToFollowers(apply)
        // The update leaves bucket by bucket as it is computed; evaluation and checkpoints come after it.
        if more {
            broadcastUpdate(trainLoss: loss) { send in shard.stepAndEncode(applyOptimizer: applyOptimizer, bucketKB: spec.bucketKB, emit: send) }
        } else {
            shard.stepAndEncode(applyOptimizer: applyOptimizer, bucketKB: spec.bucketKB) { _, _ in }
        }
        if step % stepsPerEpoch == 0 && !workersScore {
            // With follower shards, one snapshot (with optimizer state) serves the evaluation and the checkpoint
            // (the job's last one too, written when it ends).
            if (checkpointDue || !more) && directory != nil { _ = refreshFromFollowers(withState: true) }
            endEpoch()
        }
        if checkpointDue && more { writeCheckpoint() }
        if step >= totalSteps {
            phase = .completed
            message = "trained \(spec.epochs) epochs"
        } else if stopRequested {
            phase = .stopped
            message = "stopped by request after step \(step)"
        }
    }

    /// How many of the live workers' pushes complete a step: all of them, or with `backup_workers: k` the
    /// first all-but-k; the last step of an epoch waits for every one, so that the epoch trains all its
    /// samples.
    func pushesNeeded(live: Int) -> Int {
        let lastOfEpoch = (round.step + 1) % stepsPerEpoch == 0 || round.step + 1 >= totalSteps
        let scoring = heldOut?.step == round.step  // every worker scores its held-out batches
        return spec.backupWorkers == 0 || lastOfEpoch || scoring ? live : max(1, live - spec.backupWorkers)
    }

    /// Records that the step completes without `ranks` (late, with backup workers) and carries their
    /// samples into the next step's batch (with none left out, nothing is carried); their pushes for it are
    /// late from now on. With `staleness` their samples wait for those pushes instead, and only the samples
    /// of pushes that can no longer come in time (or, before an epoch's last step, all) are carried.
    func carryOver(_ ranks: [Int32]) {
        let next = round.step + 1
        var again: [SampleRange]
        if spec.staleness > 0 {  // their pushes may still come: their samples wait, up to the staleness or the epoch's end
            for rank in ranks { round.awaiting[rank, default: [:]][round.step] = round.assignment[rank] ?? [] }
            let nextIsLastOfEpoch = (next + 1) % stepsPerEpoch == 0 || next + 1 >= totalSteps
            again = round.expireAwaiting(before: nextIsLastOfEpoch ? next : next - spec.staleness)
        } else {
            again = ranks.flatMap { round.assignment[$0] ?? [] }
        }
        carried = again.map { Int($0.start)..<Int($0.start + $0.count) }
        round.leftOut = Set(ranks)
        for rank in ranks {
            membership.update(rank) {
                $0.leftOutSteps += 1
                $0.lastLeftOutStep = UInt64(round.step)
            }
            let count = membership[rank]?.leftOutSteps ?? 0
            guard count <= 3 || count.isMultiple(of: 100) else { continue }
            log.warning("step \(round.step) completed without rank \(rank): its push was not in when the others' were (backup_workers \(spec.backupWorkers))",
                        metadata: ["samples_carried": "\(round.assignedCount(of: rank) ?? 0)", "left_out_steps": "\(count)"])
        }
    }

    /// The step's loss over every contribution that reported samples, when it is NaN or infinite: the
    /// model has diverged (as Keras' TerminateOnNaN decides), since all workers hold the same parameters.
    static func divergedLoss(_ contributions: [Contribution]) -> Float? {
        let counted = contributions.filter { $0.sampleCount > 0 }
        let samples = counted.reduce(0) { $0 + Float($1.sampleCount) }
        guard samples > 0 else { return nil }
        let loss = counted.reduce(Float(0)) { $0 + $1.loss * Float($1.sampleCount) / samples }
        return loss.isFinite ? nil : loss
    }

    /// Ends the job as failed because training diverged; the newest checkpoint (all finite) stays, and
    /// the final model is not written over with non-finite values.
    func diverged(_ what: String) {
        let checkpoint = directory.flatMap { Checkpoint.list(in: $0).last }
        divergedAt = round.step
        fail("training diverged: \(what) (learning rate \(shard.optimizer.learningRate)); lower learning_rate or set clip_norm"
             + (checkpoint.map { "; the last finite checkpoint is \($0)" } ?? "; no checkpoint was written before it"))
    }

    /// A push a follower refused is refused as a whole, as one coordinator would.
    func refuseWhatFollowersRefused(_ ranks: [Int32]) {
        for rank in ranks {
            guard let (index, why) = followerReports.sorted(by: { $0.key < $1.key }).lazy
                .compactMap({ index, reports in reports[rank].flatMap { $0.isEmpty ? nil : (index, $0) } }).first else { continue }
            reject("gradient of rank \(rank) at step \(round.step) skipped by coordinator shard \(index): \(why)", from: rank)
            round.refuse(rank)
        }
    }

    /// Every shard averages its tensors (reusing the early average where it covers the contributions);
    /// contributions with a value that is not finite anywhere are dropped everywhere and the rest averaged
    /// again. Returns the contributions used with the followers' sums of squares of their averages (in
    /// shard order, with clipping), or nil when a follower did not answer (the job failed).
    func averageContributions(_ contributions: [Contribution]) -> (used: [Contribution], followerSquares: [Double])? {
        var used = contributions
        let samples = used.reduce(0) { $0 + Int($1.sampleCount) }
        guard samples > 0 else { return (used, []) }
        let early = round.early
        round.early = EarlyAverage()
        sendToFollowers(averageCommand(used))
        let finite = early.covers(used, owned: shard.owned) ? early.finite : shard.average(used, samples: samples)
        guard let answers = awaitFollowers(.averaged) else { return nil }
        func squares(_ answers: [Int: (message: ShardMessage, tensors: [WireTensor])]) -> [Double] {
            answers.sorted { $0.key < $1.key }.map(\.value.message.sumOfSquares)
        }
        guard !finite || answers.values.contains(where: { !$0.message.finite }) else { return (used, squares(answers)) }
        var skipped = Set<Int32>()
        for (rank, bad) in shard.nonFinite(used).sorted(by: { $0.key < $1.key }) {
            reject("gradient of rank \(rank) at step \(round.step) skipped: tensor '\(bad.tensor)' element \(bad.element) is NaN or infinite", from: rank)
            skipped.insert(rank)
        }
        for (index, answer) in answers.sorted(by: { $0.key < $1.key }) {
            for rank in answer.message.ranks where skipped.insert(rank).inserted {
                reject("gradient of rank \(rank) at step \(round.step) skipped: a tensor of coordinator shard \(index) is NaN or infinite", from: rank)
            }
        }
        used = used.filter { !skipped.contains($0.rank) }
        let remaining = used.reduce(0) { $0 + Int($1.sampleCount) }
        guard remaining > 0 else { return (used, []) }
        sendToFollowers(averageCommand(used))
        _ = shard.average(used, samples: remaining)
        guard let again = awaitFollowers(.averaged) else { return nil }
        return (used, squares(again))
    }

    /// Estimates each used contribution's gradient norm over this shard's tensors and counts a step at
    /// which one stands over 10x the median of the others' as an outlier of that worker (logged, in status).
    /// It takes at least two others to say which one is off.
    func recordGradientNorms(_ used: [Contribution]) {
        let norms = shard.gradientNorms(used)
        for (c, norm) in zip(used, norms) where !c.wasRefused {
            membership.update(c.rank) { $0.gradientNorm = norm }
            let others = zip(used, norms).filter { $0.0.rank != c.rank && !$0.0.wasRefused }.map(\.1).sorted()
            guard others.count >= 2 else { continue }
            let median = others[others.count / 2]
            guard norm > 10 * median && norm - median > 1e-12 else { continue }
            membership.update(c.rank) { $0.outlierSteps += 1 }
            let count = membership[c.rank]?.outlierSteps ?? 0
            if count <= 3 || count.isMultiple(of: 100) {
                log.warning("gradient of rank \(c.rank) at step \(round.step) is an outlier", metadata: [
                    "norm": "\(norm)", "median_of_others": "\(median)", "outlier_steps": "\(count)"])
            }
        }
    }

    func endEpoch() {
        guard refreshFromFollowers(withState: false) else { return }
        recorder.endEpoch(round.step / stepsPerEpoch, step: round.step, test: model!.evaluate(), elapsed: now() - trainingStarted,
                          liveWorkers: membership.liveCount, totalEpochs: spec.epochs, jobID: spec.jobID, now: now())
    }

    /// Writes a checkpoint; after `checkpoint_failure_limit` failures in a row the job fails (the newest
    /// checkpoint written stays for a resume).
    func writeCheckpoint() {
        guard directory != nil, refreshFromFollowers(withState: true) else { return }
        if let bad = shard.parameters.first(where: { !$0.tensor.isFinite }) {
            return diverged("parameter '\(bad.name)' holds a value that is NaN or infinite after step \(round.step)")
        }
        recorder.writeCheckpoint(step: round.step, stepsPerEpoch: stepsPerEpoch, shard: shard, spec: spec,
                                 model: model!.description(step: round.step, spec: spec), rankTokens: membership.rankTokens,
                                 carried: carried + round.awaitedSamples.map { Int($0.start)..<Int($0.start + $0.count) })
        if spec.checkpointFailureLimit > 0 && recorder.failedCheckpointsInARow >= spec.checkpointFailureLimit && !phase.isFinished {
            fail("\(recorder.failedCheckpointsInARow) checkpoints in a row could not be written (last: \(recorder.lastCheckpointFailure)); "
                 + "free space and resume (checkpoint_failure_limit \(spec.checkpointFailureLimit))")
        }
    }

    /// The job's message with what went wrong with its files, if anything did.
    var messageWithProblems: String {
        let problems = recorder.problems
        return problems.isEmpty ? message : message.isEmpty ? problems : message + "; " + problems
    }

    /// Sends the current step again, with the next attempt, to the live workers: its whole global batch
    /// re-divided among them, parameters unchanged (no tensors), earlier pushes dropped.
    func resendStep() {
        round.mustRedo = false
        round.begin(step: round.step, attempt: round.attempt + 1)
        followerReports.removeAll(keepingCapacity: true)
        var abort = ShardMessage(.abort)
        abort.attempt = round.attempt
        sendToFollowers(abort)
        log.warning("step \(round.step) sent again to \(membership.liveCount) live workers", metadata: ["attempt": "\(round.attempt)"])
        broadcastUpdate(trainLoss: recorder.recentLosses.last ?? 0) { send in send([], true) }
    }

    /// Sends the update for the round's step to every live worker (joiners begin training with it) with
    /// the samples it computes: the step's global batch (after any samples carried from left-out workers)
    /// cut into contiguous shares, one per live worker in rank order: equal (the first `batch mod workers`
    /// take one more), or with `balance: speed` and every live worker measured, in proportion to their
    /// samples per second. With `sync_every` > 1 the step is a round of local SGD: each worker gets its share
    /// of each of the round's data steps, one run per inner step.
    func broadcastUpdate(trainLoss: Float, keepsParameters: Bool = false, produce: (_ send: (_ indices: [Int], _ last: Bool) -> Void) -> Void) {
        membership.startJoiners()
        let live = membership.live
        let speeds = live.map { $0.secondsPerSample > 0 ? 1 / $0.secondsPerSample : 0 }
        let measured = spec.balance == "speed" && !live.isEmpty && speeds.allSatisfy { $0 > 0 }
        let weights = measured ? speeds : nil
        let sampler = model!.sampler
        var local: LocalRound?, shares: [[SampleRange]]
        if spec.isLocalSGD {
            (shares, local) = model!.rounds.shares(ofRound: round.step, sampler: sampler, workers: live.count, weights: weights)
        } else {
            shares = StepBatch(carried: carried, batch: sampler.batchRange(step: round.step % stepsPerEpoch)).shares(workers: live.count, weights: weights)
        }
        round.assignment = Dictionary(uniqueKeysWithValues: zip(live.map(\.rank), shares))
        broadcast(to: live, trainLoss: trainLoss, learningRate: shard.optimizer.learningRate, assignments: round.assignment, local: local,
                  keepsParameters: keepsParameters, evaluations: evaluationShares(for: live.map(\.rank)), produce: produce)
    }
}
