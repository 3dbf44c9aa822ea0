import Foundation

/// Writes that never trap: `FileHandle.write(_: Data)` ends the process on an error (a full disk, a
/// closed pipe), so everything a SwiftDDP process prints or appends goes through here, and a failure is
/// returned (with the reason) for the caller to report.
public enum SafeOutput {
    /// Writes all of `bytes` to descriptor `fd`, retrying short writes and EINTR; the error's text when it
    /// fails.
    @discardableResult
    public static func write(_ buffer: UnsafeRawBufferPointer, to fd: Int32) -> String? {
        var offset = 0
        while offset < buffer.count {
            let written = Foundation.write(fd, buffer.baseAddress! + offset, buffer.count - offset)
            if written < 0 {
                if errno == EINTR { continue }
                return String(cString: strerror(errno))
            }
            offset += written
        }
        return nil
    }

    /// `write` of a byte collection.
    @discardableResult
    public static func write(_ bytes: some Collection<UInt8>, to fd: Int32) -> String? {
        Array(bytes).withUnsafeBytes { write($0, to: fd) }
    }

    /// Writes `text` to standard output (1) or standard error (2).
    @discardableResult
    public static func print(_ text: String, to fd: Int32 = 1) -> String? { write(Array(text.utf8), to: fd) }

    /// Appends `text` to the file at `path` (created 0644 if missing); the error's text when it fails.
    @discardableResult
    public static func append(_ text: String, to path: String) -> String? {
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return String(cString: strerror(errno)) }
        defer { close(fd) }
        return write(Array(text.utf8), to: fd)
    }
}
