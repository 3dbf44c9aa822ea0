import Synchronization

/// Recycles float buffers by exact element count, so the steady state of a training step allocates no
/// tensor memory: a tensor's storage returns here when the tensor dies and the next tensor of that size
/// takes it back.
final class BufferPool: Sendable {
    /// The pool used by every tensor.
    static let shared = BufferPool(capacityBytes: 1 << 30)

    private struct Address: @unchecked Sendable { let pointer: UnsafeMutablePointer<Float> }
    private struct State {
        var free: [Int: [Address]] = [:]
        var pooledBytes = 0
    }

    private let capacityBytes: Int
    private let state = Mutex(State())

    init(capacityBytes: Int) { self.capacityBytes = capacityBytes }

    /// A buffer of `count` floats with unspecified contents (NaNs in a debug build).
    func take(_ count: Int) -> UnsafeMutablePointer<Float> {
        let reused: Address? = state.withLock { state in
            guard var list = state.free[count], let last = list.popLast() else { return nil }
            state.free[count] = list
            state.pooledBytes -= count * MemoryLayout<Float>.stride
            return last
        }
        let pointer = reused?.pointer ?? UnsafeMutablePointer<Float>.allocate(capacity: max(count, 1))
        #if DEBUG
        // Debug builds (the tests) hand out NaNs: an op that reads memory it did not write, or a buffer
        // after its tensor died, then fails every time instead of depending on what the pool held.
        pointer.initialize(repeating: .nan, count: count)
        #endif
        return pointer
    }

    /// Gives a buffer back; it is freed instead when the pool is full.
    func give(_ pointer: UnsafeMutablePointer<Float>, count: Int) {
        let bytes = count * MemoryLayout<Float>.stride
        let kept = state.withLock { state -> Bool in
            guard state.pooledBytes + bytes <= capacityBytes else { return false }
            state.free[count, default: []].append(Address(pointer: pointer))
            state.pooledBytes += bytes
            return true
        }
        if !kept { pointer.deallocate() }
    }
}

/// The float memory behind one or more tensors (a reshape shares it).
final class TensorStorage {
    let pointer: UnsafeMutablePointer<Float>
    let count: Int
    /// What keeps memory that is not the pool's alive (nil for pooled memory).
    private let owner: AnyObject?

    init(count: Int) {
        self.count = count
        pointer = BufferPool.shared.take(count)
        owner = nil
    }

    /// Memory that `owner` keeps alive (for example a shared-memory mapping).
    init(external pointer: UnsafeMutablePointer<Float>, count: Int, owner: AnyObject) {
        self.pointer = pointer
        self.count = count
        self.owner = owner
    }

    deinit { if owner == nil { BufferPool.shared.give(pointer, count: count) } }
}
