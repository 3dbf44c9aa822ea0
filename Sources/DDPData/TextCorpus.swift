import Foundation

/// The tokens of a language model: every character of a text (`char`, its distinct Unicode scalars in
/// order of their code points, as nanoGPT's `shakespeare_char` makes them) or every byte (`byte`, 256
/// ids, any UTF-8 text). Stored in the model file, so that generation encodes and decodes alike.
public struct TextVocabulary: Codable, Equatable, Sendable {
    public enum Kind: String, Codable, CaseIterable, Sendable { case char, byte }
    public var kind: Kind
    /// For `char`: the characters, id `i` is `symbols[i]`. Empty for `byte`.
    public var symbols: [String]

    /// The vocabulary of `kind` for `text`.
    public init(kind: Kind, text: String) {
        self.kind = kind
        symbols = kind == .char ? Set(text.unicodeScalars).sorted { $0.value < $1.value }.map { String($0) } : []
    }

    public var count: Int { kind == .char ? symbols.count : 256 }

    /// The ids of `text`; a character outside the vocabulary is an error naming it and its position.
    public func encode(_ text: String) throws -> [Int32] {
        switch kind {
        case .byte: return text.utf8.map { Int32($0) }
        case .char:
            let ids = Dictionary(uniqueKeysWithValues: symbols.enumerated().map { ($1, Int32($0)) })
            var tokens: [Int32] = []
            tokens.reserveCapacity(text.unicodeScalars.count)
            for (position, scalar) in text.unicodeScalars.enumerated() {
                guard let id = ids[String(scalar)] else {
                    throw DataError.invalidOption(
                        "character '\(scalar.escaped(asASCII: false))' (U+\(String(scalar.value, radix: 16, uppercase: true))) at position \(position + 1) "
                            + "is not in the model's vocabulary of \(symbols.count) characters")
                }
                tokens.append(id)
            }
            return tokens
        }
    }

    /// The text of `ids` (bytes that do not make UTF-8 become U+FFFD).
    public func decode(_ ids: [Int32]) -> String {
        switch kind {
        case .byte: String(decoding: ids.map { UInt8(clamping: $0) }, as: UTF8.self)
        case .char: ids.map { symbols.indices.contains(Int($0)) ? symbols[Int($0)] : "\u{FFFD}" }.joined()
        }
    }
}

/// A UTF-8 text as the training samples of a language model: windows of `blockSize + 1` tokens, window
/// `i` starting at token `i * blockSize` (the inputs are its first `blockSize` tokens, the targets the
/// next token of each). The last `validationFraction` of the windows (the end of the text, as nanoGPT
/// splits) are held out.
public struct TextCorpus: Sendable {
    public let name: String
    public let vocabulary: TextVocabulary
    public let tokens: [Int32]
    public let blockSize: Int
    /// Windows used for training: `0..<trainingWindows`; the held-out ones follow.
    public let trainingWindows: Int
    public let validationWindows: Int

    /// Reads `path` (empty: the bundled corpus, Genesis in the King James Version). Errors name the file:
    /// missing, not UTF-8 (with the byte offset of the first bad byte), or too short for the windows.
    public init(path: String, vocabulary kind: TextVocabulary.Kind, blockSize: Int, validationFraction: Double) throws {
        let file: String
        if path.isEmpty {
            guard let url = Bundle.module.url(forResource: "genesis", withExtension: "txt") else {
                throw DataError.fileNotFound("genesis.txt in the DDPData resource bundle")
            }
            file = url.path
        } else {
            file = path
        }
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: file, isDirectory: &isDirectory), !isDirectory.boolValue else {
            throw DataError.fileNotFound(file)
        }
        guard let data = FileManager.default.contents(atPath: file) else { throw DataError.malformed(file, "cannot be read (permissions?)") }
        let bytes = [UInt8](data)
        if let offset = Self.firstInvalidUTF8(bytes) {
            throw DataError.malformed(file, "not UTF-8 text: byte 0x\(String(format: "%02X", bytes[offset])) at offset \(offset) does not fit")
        }
        try self.init(name: file, text: String(decoding: bytes, as: UTF8.self), vocabulary: kind, blockSize: blockSize,
                      validationFraction: validationFraction)
    }

    /// The corpus of `text`.
    public init(name: String, text: String, vocabulary kind: TextVocabulary.Kind, blockSize: Int, validationFraction: Double) throws {
        guard blockSize > 0 else { throw DataError.invalidOption("block_size must be positive, got \(blockSize)") }
        guard validationFraction > 0 && validationFraction < 1 else {
            throw DataError.invalidOption("the held-out fraction \(validationFraction) must be between 0 and 1")
        }
        let vocabulary = TextVocabulary(kind: kind, text: text)
        let tokens = try vocabulary.encode(text)
        let windows = tokens.isEmpty ? 0 : (tokens.count - 1) / blockSize
        guard windows >= 2 else {
            throw DataError.malformed(
                name, "\(tokens.count) tokens are too few: a training and a held-out window of block_size \(blockSize) need at least \(2 * blockSize + 1)")
        }
        let held = min(windows - 1, max(1, Int((Double(windows) * validationFraction).rounded())))
        self.name = name
        self.vocabulary = vocabulary
        self.tokens = tokens
        self.blockSize = blockSize
        trainingWindows = windows - held
        validationWindows = held
    }

    /// Inputs and next-token targets of `windows` (indices over all windows, training then held-out),
    /// each `[windows.count * blockSize]`, row-major `[batch, time]`.
    public func batch(_ windows: some Collection<Int>) -> (inputs: [Int32], targets: [Int32]) {
        var inputs: [Int32] = [], targets: [Int32] = []
        inputs.reserveCapacity(windows.count * blockSize)
        targets.reserveCapacity(windows.count * blockSize)
        for w in windows {
            precondition(w >= 0 && w < trainingWindows + validationWindows, "text batch: window \(w) does not exist")
            let start = w * blockSize
            inputs += tokens[start..<start + blockSize]
            targets += tokens[start + 1...start + blockSize]
        }
        return (inputs, targets)
    }

    /// The offset of the first byte that breaks UTF-8 (a bad lead or continuation byte, an overlong or
    /// surrogate form, a truncated sequence), or nil when all of `bytes` is UTF-8.
    static func firstInvalidUTF8(_ bytes: [UInt8]) -> Int? {
        var i = 0
        while i < bytes.count {
            let lead = bytes[i]
            let length: Int, low: UInt8, high: UInt8  // the allowed range of the second byte
            switch lead {
            case 0x00...0x7F: i += 1; continue
            case 0xC2...0xDF: (length, low, high) = (2, 0x80, 0xBF)
            case 0xE0: (length, low, high) = (3, 0xA0, 0xBF)
            case 0xED: (length, low, high) = (3, 0x80, 0x9F)
            case 0xE1...0xEC, 0xEE...0xEF: (length, low, high) = (3, 0x80, 0xBF)
            case 0xF0: (length, low, high) = (4, 0x90, 0xBF)
            case 0xF1...0xF3: (length, low, high) = (4, 0x80, 0xBF)
            case 0xF4: (length, low, high) = (4, 0x80, 0x8F)
            default: return i
            }
            for k in 1..<length {
                guard i + k < bytes.count else { return i }  // the text ends inside the sequence
                let byte = bytes[i + k]
                let ok = k == 1 ? (low...high).contains(byte) : (0x80...0xBF).contains(byte)
                if !ok { return i + k }
            }
            i += length
        }
        return nil
    }
}
