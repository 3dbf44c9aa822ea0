import Logging

/// Logs rejected messages without letting hostile traffic fill the disk: the first `burst` rejections
/// of each `window` seconds are logged one line each, the rest are counted and summed up in one line
/// (with the latest reason) when the window ends. Every rejection is still counted in status and the
/// metrics by the caller.
struct RejectionLog {
    let burst: Int
    let window: Double
    private var windowStart = -Double.infinity
    private var loggedInWindow = 0
    private var suppressed = 0
    private var lastSuppressed = ""

    init(burst: Int = 20, window: Double = 10) {
        self.burst = burst
        self.window = window
    }

    /// Records one rejection at time `now`, logging it if the window's budget allows.
    mutating func record(_ reason: String, metadata: Logger.Metadata, now: Double, to log: Logger) {
        if now - windowStart >= window {
            flush(to: log)
            windowStart = now
            loggedInWindow = 0
        }
        if loggedInWindow < burst {
            loggedInWindow += 1
            log.warning("rejected message: \(reason)", metadata: metadata)
        } else {
            suppressed += 1
            lastSuppressed = reason
        }
    }

    /// Sums up the window's suppressed rejections once it has ended (call it now and then).
    mutating func tick(now: Double, to log: Logger) {
        if suppressed > 0 && now - windowStart >= window { flush(to: log) }
    }

    /// Logs the count of the rejections not logged one by one, if any.
    mutating func flush(to log: Logger) {
        guard suppressed > 0 else { return }
        log.warning("rejected \(suppressed) more messages in \(Int(window)) s without a line each (a flood?); the latest: \(lastSuppressed)",
                    metadata: ["suppressed": "\(suppressed)"])
        suppressed = 0
    }
}
