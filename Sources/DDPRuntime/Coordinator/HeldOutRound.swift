import DDPWire

/// An epoch's held-out evaluation shared out to the workers. With coordinator shards the leader holds its
/// shard's parameters only, and a snapshot of the others' would cross the network every epoch; the workers
/// hold all of them. So after an epoch's last step (when no checkpoint takes a snapshot anyway) the next
/// step's update names each live worker's held-out batches (`ParameterUpdate.evaluate`); they score them on
/// that update's parameters and answer before their push; the step completes only once every batch is
/// scored, and the epoch is recorded with the batches summed in order, as the leader would score them.
struct HeldOutRound {
    /// The step whose update carries the parameters scored.
    let step: Int
    /// The epoch's record, its held-out side to come.
    let record: EpochRecord
    private(set) var scores: [HeldOutScore?]
    /// Each worker's batches in the step's current attempt, until it answers.
    private(set) var owed: [Int32: [SampleRange]] = [:]

    init(step: Int, record: EpochRecord, batches: Int) {
        self.step = step
        self.record = record
        scores = Array(repeating: nil, count: batches)
    }

    /// Every batch's score, once all are in.
    var complete: [HeldOutScore]? { scores.contains(nil) ? nil : scores.map { $0! } }

    func owes(_ rank: Int32) -> Bool { owed[rank] != nil }

    /// Shares the batches not scored yet among `ranks`, in rank order, as evenly as can be (the first take
    /// one more), each as runs of consecutive batches; what was owed before is forgotten (a step sent again).
    mutating func assign(to ranks: [Int32]) -> [Int32: [SampleRange]] {
        owed = [:]
        let open = scores.indices.filter { scores[$0] == nil }
        guard !ranks.isEmpty else { return [:] }
        var next = open.startIndex
        for (index, rank) in ranks.enumerated() {
            let count = open.count / ranks.count + (index < open.count % ranks.count ? 1 : 0)
            let mine = open[next..<next + count]
            next += count
            var runs: [SampleRange] = []
            for batch in mine {
                if let last = runs.last, last.start + last.count == UInt64(batch) { runs[runs.count - 1].count += 1 } else { runs.append(SampleRange(start: UInt64(batch), count: 1)) }
            }
            if !runs.isEmpty { owed[rank] = runs }
        }
        return owed
    }

    /// Takes `rank`'s scores of the batches it owes; nil when they are taken, else why not.
    mutating func take(_ answer: HeldOutScores, from rank: Int32) -> String? {
        guard let ranges = owed[rank] else { return "rank \(rank) owes no held-out scores" }
        guard answer.batches == ranges else { return "it scored batches \(Self.describe(answer.batches)) where \(Self.describe(ranges)) were asked" }
        let batches = ranges.flatMap { Int($0.start)..<Int($0.start + $0.count) }
        guard answer.lossSums.count == batches.count && answer.correct.count == batches.count else {
            return "\(answer.lossSums.count) losses and \(answer.correct.count) hit counts for \(batches.count) batches"
        }
        for (i, batch) in batches.enumerated() { scores[batch] = HeldOutScore(lossSum: answer.lossSums[i], correct: Int(clamping: answer.correct[i])) }
        owed[rank] = nil
        return nil
    }

    private static func describe(_ ranges: [SampleRange]) -> String {
        ranges.map { "\($0.start)..<\($0.start + $0.count)" }.joined(separator: ", ")
    }
}

extension Leader {
    /// Whether the epoch that ends before step `step` is scored by the workers: with coordinator shards and a
    /// built-in model, synchronous, when training goes on and no checkpoint takes a snapshot at `step`.
    func workersScore(epochEndingAt step: Int, more: Bool, checkpointDue: Bool) -> Bool {
        guard step % stepsPerEpoch == 0, more, !followers.isEmpty, !spec.isLocalSGD, !(checkpointDue && directory != nil),
              let batches = model?.setup?.heldOutBatches else { return false }
        return batches > 0
    }

    /// Closes the epoch that ended with the last step, to be scored by the workers with step `round.step`.
    func shareOutEvaluation() {
        let record = recorder.closeEpoch(round.step / stepsPerEpoch, step: round.step, elapsed: now() - trainingStarted, liveWorkers: membership.liveCount)
        heldOut = HeldOutRound(step: round.step, record: record, batches: model!.setup!.heldOutBatches)
    }

    /// The held-out batches each of `ranks` scores with the update for the current step (none but after an epoch).
    func evaluationShares(for ranks: [Int32]) -> [Int32: [SampleRange]] {
        guard var pending = heldOut, pending.step == round.step else { return [:] }
        defer { heldOut = pending }
        return pending.assign(to: ranks)
    }

    /// Whether `rank` still owes held-out scores for the current step (which does not complete without them).
    func owesScores(_ rank: Int32) -> Bool { heldOut.map { $0.step == round.step && $0.owes(rank) } ?? false }

    func heldOutScoresArrived(_ answer: HeldOutScores, step: UInt64, rank: Int32?) {
        guard let rank, membership.isMember(rank) else {
            reject("held-out scores from a peer that is not a member refused", from: nil)
            return
        }
        guard var pending = heldOut, UInt64(pending.step) == step, round.step == pending.step else {
            reject("held-out scores of rank \(rank) for step \(step) refused: none are owed for that step", from: rank)
            return
        }
        if let problem = pending.take(answer, from: rank) {
            reject("held-out scores of rank \(rank) for step \(step) refused: \(problem)", from: rank)
            return
        }
        heldOut = pending
        if let scores = pending.complete { publishHeldOut(test: model!.setup!.heldOutMetrics(scores)) }
    }

    /// Records the epoch whose scores were shared out, with `test` (nil: without held-out metrics).
    func publishHeldOut(test: (loss: Float, accuracy: Float)?) {
        guard let pending = heldOut else { return }
        heldOut = nil
        recorder.publishEpoch(pending.record, test: test, totalEpochs: spec.epochs, jobID: spec.jobID, now: now())
    }
}
