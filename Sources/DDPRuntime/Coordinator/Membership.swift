import DDPWire
import Foundation

/// Where a worker stands in a job.
enum WorkerState: String, Sendable {
    /// Welcomed; takes part from the next update.
    case joining
    /// Takes part in the steps.
    case training
    /// Declared lost (its connection dropped, or it went silent past a deadline).
    case lost
    /// Left the job on its own (a Leave).
    case left

    /// Whether the rank is free for another worker.
    var isGone: Bool { self == .lost || self == .left }
}

/// A worker as the coordinator knows it.
struct Member {
    let rank: Int32
    var peer: PeerID
    var workerID: String
    var host: String
    var pid: UInt32
    var state: WorkerState
    /// When anything was last heard from it.
    var lastSeen: Double
    var lastPushedStep: UInt64 = 0
    var lastStepSeconds: Double = 0
    /// Its compute seconds per sample, a moving average over its pushes (0 until it has pushed).
    var secondsPerSample: Double = 0
    var restarts: UInt32 = 0
    /// Why it was declared lost or left (empty while it takes part).
    var goneReason = ""
    /// The estimated norm of its last accepted gradient, and the steps at which it stood far above the
    /// others' (a broken or hostile worker shows here).
    var gradientNorm = 0.0
    var outlierSteps: UInt32 = 0
    /// The shared-memory segment it offered and this coordinator mapped (a worker on this host).
    var shared: SharedArea?

    /// It said it is ready to compute (a Heartbeat "ready" after its Welcome): training starts once the
    /// workers are.
    var ready = false
    /// Steps completed without it (`backup_workers`: it was late), and the last of them.
    var leftOutSteps: UInt32 = 0
    var lastLeftOutStep: UInt64 = 0

    /// Takes the compute time of its complete push: the last step's, and the moving average per sample.
    mutating func measure(_ push: GradientPush) {
        lastStepSeconds = push.computeSeconds
        guard push.sampleCount > 0 && push.computeSeconds > 0 else { return }
        let perSample = push.computeSeconds / Double(push.sampleCount)
        secondsPerSample = secondsPerSample == 0 ? perSample : 0.7 * secondsPerSample + 0.3 * perSample
    }

    var isLive: Bool { state == .training }
    /// Joining or training.
    var takesPart: Bool { state == .training || state == .joining }
}

/// A worker's shared-memory segment: its pushes are read from it, its updates written into it.
struct SharedArea {
    let segment: SharedSegment
    /// Where each parameter's update goes (room for f32 values).
    let updates: SharedLayout

    /// The region for the f32 values `elements` of parameter `index`'s update.
    func update(_ index: Int, elements: Range<Int>) -> Payload {
        segment.region(offset: updates.offsets[index] + elements.lowerBound * 4, count: elements.count * 4)!
    }
}

/// The workers of a job by rank, by peer, and the rules of who may take which rank: a free rank (or
/// one held by a lost or departed worker), and after a resume, for a while, only the worker that proves
/// with its rank token that it held the rank.
struct Membership {
    let workers: Int
    private(set) var members: [Int32: Member] = [:]
    private var rankOfPeer: [PeerID: Int32] = [:]
    /// Each rank's secret (Welcome.rank_token), kept in checkpoints.
    var rankTokens: [Int32: [UInt8]] = [:]
    /// After a resume, until then a rank nobody has rejoined yet goes only to a Join with its token.
    var reservedUntil = 0.0
    /// Ranks declared lost, in order (a rank lost twice appears twice).
    private(set) var lostRanks: [Int32] = []

    init(workers: Int) { self.workers = workers }

    subscript(rank: Int32) -> Member? { members[rank] }

    /// The rank of the worker on `peer`, if any (also when it has been declared lost).
    func rank(of peer: PeerID) -> Int32? { rankOfPeer[peer] }

    /// The members in rank order.
    var byRank: [Member] { members.values.sorted { $0.rank < $1.rank } }
    /// The training members in rank order.
    var live: [Member] { byRank.filter(\.isLive) }
    var liveCount: Int { members.values.filter(\.isLive).count }
    var joiningCount: Int { members.values.filter { $0.state == .joining }.count }
    /// Workers joining or training that said they are ready.
    var readyCount: Int { members.values.filter { $0.takesPart && $0.ready }.count }
    /// The ranks the next update goes to: training and joining, in order.
    var takingPart: [Int32] { byRank.filter(\.takesPart).map(\.rank) }

    /// Whether `rank` takes part (joining or training).
    func isMember(_ rank: Int32?) -> Bool { rank.flatMap { members[$0] }?.takesPart ?? false }

    /// The requested rank if it is free (or held by a lost or departed worker), else the lowest free one;
    /// shortly after a resume, a rank nobody has rejoined yet is free only for the `token` it was given.
    func freeRank(requested: Int32, token: [UInt8], now: Double) -> Int32? {
        let reserving = now < reservedUntil
        func free(_ r: Int32) -> Bool {
            guard let member = members[r] else { return !reserving || rankTokens[r] == nil || rankTokens[r] == token }
            return member.state.isGone
        }
        if requested >= 0 && requested < workers { return free(requested) ? requested : nil }
        return (0..<Int32(workers)).first(where: free)
    }

    /// Admits `join` from `peer` at `rank` (from `freeRank`): a joining member, its rank token kept when
    /// it proved it, a new one otherwise. Returns the member.
    mutating func admit(_ join: Join, from peer: PeerID, rank: Int32, shared: SharedArea?, now: Double) -> Member {
        let restarts = members[rank].map { $0.restarts + 1 } ?? 0
        if let old = members[rank] { rankOfPeer[old.peer] = nil }
        if join.rankToken.isEmpty || rankTokens[rank] != join.rankToken {
            rankTokens[rank] = (0..<16).map { _ in UInt8.random(in: 0...255) }
        }
        let member = Member(rank: rank, peer: peer, workerID: join.workerID, host: join.host, pid: join.pid, state: .joining,
                            lastSeen: now, restarts: restarts, shared: shared)
        members[rank] = member
        rankOfPeer[peer] = rank
        return member
    }

    /// Places a member as another coordinator's roster says (a follower shard).
    mutating func place(_ member: Member) {
        if let old = members[member.rank] { rankOfPeer[old.peer] = nil }
        members[member.rank] = member
        rankOfPeer[member.peer] = member.rank
    }

    /// Removes `rank` (a follower shard: the leader's roster no longer names it).
    mutating func remove(_ rank: Int32) {
        guard let member = members.removeValue(forKey: rank) else { return }
        rankOfPeer[member.peer] = nil
    }

    /// Marks `rank` lost or left with the reason; returns the member as it was, or nil when nothing
    /// changed (no such member, or already in that state).
    mutating func markGone(_ rank: Int32, as state: WorkerState, reason: String) -> Member? {
        guard var member = members[rank], member.state != state else { return nil }
        let before = member
        member.state = state
        member.goneReason = reason
        members[rank] = member
        if state == .lost { lostRanks.append(rank) }
        return before
    }

    /// `rank`, declared lost when its connection dropped, turns out to have left (its Leave came after
    /// the drop was seen): it is recorded as left, not lost. Returns whether it was so.
    mutating func lostThenLeft(_ rank: Int32, peer: PeerID, reason: String) -> Bool {
        guard var member = members[rank], member.state == .lost, member.peer == peer else { return false }
        member.state = .left
        member.goneReason = reason
        members[rank] = member
        if let last = lostRanks.lastIndex(of: rank) { lostRanks.remove(at: last) }
        return true
    }

    /// Joining members begin training (the update that goes out now includes them).
    mutating func startJoiners() {
        for (rank, member) in members where member.state == .joining { members[rank]!.state = .training }
    }

    /// Something was heard from `rank` at `now`.
    mutating func heard(from rank: Int32, at now: Double) { members[rank]?.lastSeen = now }

    /// Updates one member's record (the fields that are not membership itself).
    mutating func update(_ rank: Int32, _ change: (inout Member) -> Void) {
        guard var member = members[rank] else { return }
        change(&member)
        members[rank] = member
    }

    /// The members to declare lost at `now`: a training one silent past the step deadline or past the
    /// heartbeat timeout (`awaited` says whether the current step still waits for it), a joining one
    /// silent for twice the heartbeat timeout.
    func overdue(now: Double, step: Int, stepStarted: Double, stepTimeout: Double, heartbeatTimeout: Double,
                 awaited: (Int32) -> Bool) -> [(rank: Int32, reason: String)] {
        var overdue: [(Int32, String)] = []
        for member in byRank {
            let silent = now - member.lastSeen
            switch member.state {
            case .training where awaited(member.rank):
                if now - stepStarted > stepTimeout {
                    overdue.append((member.rank, "no gradient for step \(step) within \(String(format: "%.1f", stepTimeout)) s"))
                } else if silent > max(heartbeatTimeout, stepTimeout) {
                    overdue.append((member.rank, "silent for \(String(format: "%.1f", silent)) s"))
                }
            case .joining where silent > heartbeatTimeout * 2:
                overdue.append((member.rank, "silent since joining"))
            case .training, .joining, .lost, .left:
                break
            }
        }
        return overdue
    }
}
