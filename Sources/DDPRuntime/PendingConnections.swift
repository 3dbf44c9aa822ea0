/// Connections to a coordinator's worker socket that have not joined (or said hello, for a follower
/// shard): a bounded number may wait, so that strangers cannot take every descriptor of the process.
/// The authenticator refuses a new connection's handshake while `admits` is false; refused
/// connections are closed at once. Connections are told apart by the descriptor libzmq reports for
/// them, which is only ever used here to count.
final class PendingConnections {
    /// How many unjoined connections may be open at once.
    let limit: Int
    private var open: Set<Int32> = []
    private var joined: Set<Int32> = []

    init(limit: Int) { self.limit = limit }

    /// Unjoined connections open now.
    var waiting: Int { open.subtracting(joined).count }
    /// Whether one more may connect.
    var admits: Bool { waiting < limit }

    func accepted(_ connection: Int32) { open.insert(connection) }
    func dropped(_ connection: Int32) {
        open.remove(connection)
        joined.remove(connection)
    }
    /// The peer on `connection` joined: it no longer counts as waiting.
    func joined(_ connection: Int32) { if connection >= 0 { joined.insert(connection) } }
}
