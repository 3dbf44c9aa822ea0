import Dispatch

/// Splits the elements of a tensor pass into contiguous blocks of whole chunks, one per thread, for the
/// coordinator's memory-bound passes (averaging, stepping, encoding) at the moments the workers wait
/// for it. Each thread gets its own slot number (for its scratch memory); blocks never overlap, so the
/// results are the same as one thread's, bit for bit.
enum ParallelChunks {
    /// The threads to use: the CPUs this process may run on, at most four.
    static let threads = min(TrainingSetup.availableCPUs(), 4)

    /// Calls `body(range, slot)` for every chunk of `0..<count`; with fewer than four chunks per thread,
    /// on the calling thread alone (slot 0).
    static func forEach(count: Int, chunk: Int, threads: Int = Self.threads, _ body: (Range<Int>, Int) -> Void) {
        let chunks = (count + chunk - 1) / chunk
        let used = max(1, min(threads, chunks / 4))
        guard used > 1 else {
            for c in 0..<chunks { body(c * chunk..<min((c + 1) * chunk, count), 0) }
            return
        }
        withoutActuallyEscaping(body) { body in
            nonisolated(unsafe) let run = body
            DispatchQueue.concurrentPerform(iterations: used) { slot in
                let first = slot * chunks / used, end = (slot + 1) * chunks / used
                for c in first..<end { run(c * chunk..<min((c + 1) * chunk, count), slot) }
            }
        }
    }
}
