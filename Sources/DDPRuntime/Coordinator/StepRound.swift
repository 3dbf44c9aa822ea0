import DDPWire

/// A worker's contribution to the current step.
struct Contribution {
    let rank: Int32
    let sampleCount: UInt64
    let loss: Float
    let correct: UInt32
    /// In parameter order, the tensors of this coordinator shard set; empty when the push was refused.
    let gradients: [Payload?]
    var dtype: DType = .f32
    /// For a late push applied within the staleness: the earlier step it was computed for.
    var lateStep: Int?

    /// A push that was refused: it counts as answered, with no samples.
    static func refused(rank: Int32) -> Contribution { Contribution(rank: rank, sampleCount: 0, loss: 0, correct: 0, gradients: []) }
    var wasRefused: Bool { gradients.isEmpty }
}

/// A push of which some parts (buckets of tensors) have arrived.
struct PartialPush {
    let sampleCount: UInt64
    var gradients: [Payload?]
    var nextPart: UInt32 = 0
}

/// Which tensors were averaged while the pushes still arrived, over which ranks and sample counts, and
/// whether every averaged element was finite. The step reuses them when it completes with the same
/// contributions.
struct EarlyAverage {
    var ranks: [Int32] = []
    var sampleCounts: [UInt64] = []
    var averaged: [Bool] = []
    var finite = true

    /// Whether this early average covers exactly `used` and every tensor of `owned`.
    func covers(_ used: [Contribution], owned: [Int]) -> Bool {
        ranks == used.map(\.rank) && sampleCounts == used.map(\.sampleCount)
            && !averaged.isEmpty && owned.allSatisfy { averaged[$0] }
    }
}

/// What became of a push (or a part of one).
enum PushOutcome {
    /// Stored; `arrived` are the parameter indices this part brought, `complete` when it was the last.
    case stored(arrived: [Int], complete: Bool)
    /// Not for this round (stale, future, duplicate, or from a worker that does not take part): dropped.
    case dropped(String)
    /// For an earlier step, from a worker the step before was completed without: dropped as expected
    /// (`complete` on its last part, whose compute time still measures the worker).
    case late(complete: Bool)
    /// A late push within the staleness, stored for this round to apply (`complete` on its last part).
    case storedLate(complete: Bool)
    /// A late push that cannot be applied (older than the staleness, or wrong): the worker is told why;
    /// the step in progress is not affected.
    case lateRefused(String)
    /// Breaks a rule of the round: this worker's share counts as empty; it is told why.
    case refused(String)
}

/// One step round: the step and its attempt, the samples each worker was assigned, the pushes as they
/// arrive (in parts), the contributions complete so far and what was averaged early. The rules for
/// accepting a push live here (see docs/PROTOCOL.md, "What the coordinator accepts").
struct StepRound {
    var step = 0
    var attempt: UInt32 = 0
    /// The job's `staleness`: how many steps late a left-out worker's push may still be applied.
    var staleness = 0
    /// The samples each worker was assigned: ranges of positions in the epoch's permutation (the
    /// leader's; a follower leaves the counts to it).
    var assignment: [Int32: [SampleRange]] = [:]
    /// The ranks the step before was completed without (`backup_workers`): their pushes for earlier steps
    /// are late.
    var leftOut: Set<Int32> = []
    /// With `staleness`: the earlier steps each left-out rank's push may still be applied for, and the
    /// samples it was assigned; late pushes complete for this round to apply, and those still in parts;
    /// the samples of late pushes refused for being wrong (to be trained again).
    var awaiting: [Int32: [Int: [SampleRange]]] = [:]
    private(set) var latePushes: [Contribution] = []
    private var latePartials: [LatePush: PartialPush] = [:]
    var returned: [SampleRange] = []
    private struct LatePush: Hashable { let rank: Int32; let step: Int }
    private(set) var contributions: [Int32: Contribution] = [:]
    private(set) var partials: [Int32: PartialPush] = [:]
    var early = EarlyAverage()
    /// When the round's update went out.
    var started = 0.0
    /// A worker was lost before the round completed: it must be sent again, re-divided.
    var mustRedo = false

    /// Begins attempt `attempt` of `step`: every push so far is dropped (late pushes for earlier steps
    /// are kept for the step's next attempt, and forgotten with a new step, which applied them).
    mutating func begin(step: Int, attempt: UInt32) {
        if step != self.step { latePushes.removeAll() }
        self.step = step
        self.attempt = attempt
        contributions.removeAll(keepingCapacity: true)
        partials.removeAll(keepingCapacity: true)
        early = EarlyAverage()
    }

    /// The sample count `rank` declared (complete or in parts), once its push has begun.
    func declaredSamples(of rank: Int32) -> UInt64? { contributions[rank]?.sampleCount ?? partials[rank]?.sampleCount }

    /// What `rank` sent for parameter `index` so far.
    func sent(by rank: Int32, _ index: Int) -> Payload? {
        (contributions[rank].map { $0.gradients.isEmpty ? nil : $0.gradients[index] } ?? partials[rank]?.gradients[index]) ?? nil
    }

    func hasAnswered(_ rank: Int32) -> Bool { contributions[rank] != nil }

    /// How many samples `rank` was assigned this round, if it was assigned any ranges.
    func assignedCount(of rank: Int32) -> UInt64? { assignment[rank].map { $0.reduce(0) { $0 + $1.count } } }

    /// Takes one part of `rank`'s push for (`step`, `push.attempt`): `validate` checks its tensors
    /// against those already received (nil when they are fine), `parameterCount` and `owned` say what a
    /// complete push holds, `dtype` its element type.
    mutating func receive(
        _ push: GradientPush, step: UInt64, rank: Int32, tensors: [WireTensor], indexOf: (String) -> Int?, nameOf: (Int) -> String,
        parameterCount: Int, owned: [Int], dtype: DType, validate: ([WireTensor], [Payload?]) -> String?
    ) -> PushOutcome {
        guard step == UInt64(self.step) else {
            if step < UInt64(self.step), let ranges = awaiting[rank]?[Int(step)] {
                return receiveLate(push, step: Int(step), rank: rank, ranges: ranges, tensors: tensors, indexOf: indexOf, nameOf: nameOf,
                                   parameterCount: parameterCount, owned: owned, dtype: dtype, validate: validate)
            }
            if step < UInt64(self.step) && leftOut.contains(rank) {
                return staleness > 0 ? .lateRefused("push for step \(step) came at step \(self.step), more than staleness \(staleness) steps late; its samples went to a later step")
                    : .late(complete: !push.moreParts)
            }
            return .dropped("push for step \(step) while at step \(self.step)")
        }
        guard push.attempt == attempt else { return .dropped("push for attempt \(push.attempt) of step \(self.step), now at attempt \(attempt)") }
        guard contributions[rank] == nil else { return .dropped("duplicate push for step \(self.step)") }
        var partial = partials[rank] ?? PartialPush(sampleCount: push.sampleCount, gradients: Array(repeating: nil, count: parameterCount))
        let assigned = assignedCount(of: rank)
        let problem = assigned.map { $0 != push.sampleCount } == true
            ? "it declares \(push.sampleCount) samples, but \(assigned!) were assigned to rank \(rank) for step \(self.step)"
            : push.part != partial.nextPart ? "part \(push.part) of the push arrived where part \(partial.nextPart) was due"
            : push.sampleCount != partial.sampleCount ? "its parts disagree on the sample count (\(partial.sampleCount), then \(push.sampleCount))"
            : validate(tensors, partial.gradients)
        if let problem {
            refuse(rank)
            return .refused(problem)
        }
        let arrived = tensors.map { indexOf($0.name)! }
        for (index, tensor) in zip(arrived, tensors) { partial.gradients[index] = tensor.payload }
        if push.moreParts {
            partial.nextPart += 1
            partials[rank] = partial
            return .stored(arrived: arrived, complete: false)
        }
        partials[rank] = nil
        if let missing = owned.first(where: { partial.gradients[$0] == nil }) {
            refuse(rank)
            return .refused("\(owned.filter { partial.gradients[$0] == nil }.count) of \(owned.count) tensors missing, '\(nameOf(missing))' first")
        }
        contributions[rank] = Contribution(rank: rank, sampleCount: push.sampleCount, loss: push.localLoss, correct: push.localCorrect,
                                           gradients: partial.gradients, dtype: dtype)
        return .stored(arrived: arrived, complete: true)
    }

    /// Takes a part of a late push for `step` whose samples (`ranges`) still wait for it: stored whole for
    /// this round to apply, or refused (its samples returned for training again) when it breaks a rule.
    private mutating func receiveLate(
        _ push: GradientPush, step: Int, rank: Int32, ranges: [SampleRange], tensors: [WireTensor], indexOf: (String) -> Int?,
        nameOf: (Int) -> String, parameterCount: Int, owned: [Int], dtype: DType, validate: ([WireTensor], [Payload?]) -> String?
    ) -> PushOutcome {
        let key = LatePush(rank: rank, step: step)
        var partial = latePartials[key] ?? PartialPush(sampleCount: push.sampleCount, gradients: Array(repeating: nil, count: parameterCount))
        let expected = ranges.reduce(0) { $0 + $1.count }
        var problem = push.sampleCount != expected ? "it declares \(push.sampleCount) samples, but \(expected) were assigned to rank \(rank) for step \(step)"
            : push.part != partial.nextPart ? "part \(push.part) of the late push arrived where part \(partial.nextPart) was due"
            : validate(tensors, partial.gradients)
        if problem == nil {
            for tensor in tensors { partial.gradients[indexOf(tensor.name)!] = tensor.payload }
            if push.moreParts {
                partial.nextPart += 1
                latePartials[key] = partial
                return .storedLate(complete: false)
            }
            if let missing = owned.first(where: { partial.gradients[$0] == nil }) { problem = "'\(nameOf(missing))' and others missing" }
        }
        latePartials[key] = nil
        awaiting[rank]?[step] = nil
        if let problem {
            returned += ranges
            return .lateRefused("late push for step \(step) refused: \(problem); its samples go to a later step")
        }
        var late = Contribution(rank: rank, sampleCount: push.sampleCount, loss: push.localLoss, correct: push.localCorrect,
                                gradients: partial.gradients, dtype: dtype)
        late.lateStep = step
        latePushes.append(late)
        return .storedLate(complete: true)
    }

    /// Ends the wait for late pushes of steps before `step` (older than the staleness allows, or all of
    /// them at an epoch's end): returns their samples, with those of refused late pushes, to be trained again.
    mutating func expireAwaiting(before step: Int) -> [SampleRange] {
        var expired = returned
        returned = []
        for rank in awaiting.keys.sorted() {
            for (late, ranges) in awaiting[rank]!.sorted(by: { $0.key < $1.key }) where late < step {
                expired += ranges
                awaiting[rank]![late] = nil
                latePartials[LatePush(rank: rank, step: late)] = nil
            }
        }
        return expired
    }

    /// The samples still waiting for a late push, in rank and step order (a checkpoint carries them).
    var awaitedSamples: [SampleRange] {
        awaiting.keys.sorted().flatMap { rank in awaiting[rank]!.sorted { $0.key < $1.key }.flatMap(\.value) }
    }

    /// `rank`'s push this round counts as answered with no samples.
    mutating func refuse(_ rank: Int32) {
        partials[rank] = nil
        contributions[rank] = .refused(rank: rank)
    }

    /// Forgets `rank`'s push (it was lost before the round completed).
    mutating func forget(_ rank: Int32) {
        partials[rank] = nil
        contributions[rank] = nil
    }

    /// The contributions of `ranks` (those still taking part), in rank order.
    func contributions(of ranks: [Int32]) -> [Contribution] { ranks.compactMap { contributions[$0] } }

    /// The early-average rule, the one place it is written: once every one of `ranks` (the live workers,
    /// in rank order) has begun its push, each tensor is averaged as soon as all of them sent it, over
    /// their declared counts. Returns the ranks and counts to average tensor by tensor, or nil while some
    /// worker has not begun. Resets the record when the ranks or counts changed since.
    mutating func earlyAverageBasis(ranks: [Int32], parameterCount: Int) -> (ranks: [Int32], counts: [UInt64])? {
        var counts: [UInt64] = []
        for rank in ranks {
            guard let count = declaredSamples(of: rank) else { return nil }
            counts.append(count)
        }
        if early.ranks != ranks || early.sampleCounts != counts {
            early = EarlyAverage(ranks: ranks, sampleCounts: counts, averaged: Array(repeating: false, count: parameterCount))
        }
        return (ranks, counts)
    }
}
