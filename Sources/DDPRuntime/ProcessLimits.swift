import Foundation

/// Limits of this process that a server raises for itself.
public enum ProcessLimits {
    /// Raises the soft limit of open descriptors to the hard limit (the common soft limit of 1024 is
    /// soon reached by a coordinator of many workers, or one that strangers connect to). Returns the
    /// limits before and after, or nil when they cannot be read.
    @discardableResult
    public static func raiseOpenFiles() -> (before: UInt64, after: UInt64)? {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        let before = UInt64(limit.rlim_cur)
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        return (before, UInt64(limit.rlim_cur))
    }
}
