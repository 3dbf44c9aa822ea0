import Foundation

/// Errors as one plain sentence: Foundation's file errors (`NSCocoaErrorDomain Code=512 "(null)"`) become
/// "cannot write PATH: Permission denied"; everything else keeps its own description.
public enum Readable {
    /// The sentence for `error`.
    public static func message(_ error: any Error) -> String {
        let ns = error as NSError
        guard ns.domain == NSCocoaErrorDomain || ns.domain == NSPOSIXErrorDomain else { return "\(error)" }
        let path = (ns.userInfo[NSFilePathErrorKey] as? String) ?? (ns.userInfo[NSURLErrorKey] as? URL)?.path
            ?? (ns.userInfo["NSURL"] as? URL)?.path
        let underlying = (ns.userInfo[NSUnderlyingErrorKey] as? any Error).map { $0 as NSError }
        let posix = ns.domain == NSPOSIXErrorDomain ? ns.code : underlying?.domain == NSPOSIXErrorDomain ? underlying!.code : nil
        let reason = posix.map { String(cString: strerror(Int32($0))) } ?? cocoaReason(ns.code)
        let action = (ns.code >= 512 && ns.code < 1024) ? "cannot write" : (ns.code >= 256 && ns.code < 512) ? "cannot read" : "cannot use"
        return path.map { "\(action) \($0): \(reason)" } ?? "\(action) a file: \(reason)"
    }

    /// `error` as an error whose description is `message(error)`.
    public static func error(_ error: any Error) -> any Error {
        let ns = error as NSError
        return ns.domain == NSCocoaErrorDomain || ns.domain == NSPOSIXErrorDomain ? Sentence(text: message(error)) : error
    }

    struct Sentence: Error, CustomStringConvertible {
        let text: String
        var description: String { text }
    }

    private static func cocoaReason(_ code: Int) -> String {
        switch code {
        case NSFileNoSuchFileError, NSFileReadNoSuchFileError: "no such file or directory"
        case NSFileReadNoPermissionError, NSFileWriteNoPermissionError: "permission denied"
        case NSFileWriteOutOfSpaceError: "no space left on the device"
        case NSFileWriteVolumeReadOnlyError: "the file system is read-only"
        case NSFileWriteFileExistsError: "the file exists already"
        case NSFileReadCorruptFileError: "the file is corrupt"
        case NSFileReadInapplicableStringEncodingError: "the file is not text in the expected encoding"
        default: "error \(code)"
        }
    }
}
