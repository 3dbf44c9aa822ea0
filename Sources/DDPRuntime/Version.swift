import DDPWire

/// This build's version, as `ddpctl --version` and `ddpd --version` print it.
public enum SwiftDDPVersion {
    /// The release number (semantic versioning; raised with each release).
    public static let number = "0.5.0"
    /// "SwiftDDP 0.5.0 (wire protocol 1)".
    public static var text: String { "SwiftDDP \(number) (wire protocol \(wireProtocolVersion))" }
}
