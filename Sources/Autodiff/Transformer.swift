#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The sizes of a GPT-2-style language model, as nanoGPT's `GPTConfig` names them.
public struct GPTConfiguration: Codable, Equatable, Sendable {
    /// Tokens in the vocabulary (`vocab_size`).
    public var vocabularySize: Int
    /// The longest context, in tokens (`block_size`).
    public var blockSize: Int
    /// Transformer blocks (`n_layer`).
    public var layers: Int
    /// Attention heads per block (`n_head`); they divide `embedding`.
    public var heads: Int
    /// The width of every token's vector (`n_embd`).
    public var embedding: Int
    /// The probability of dropping an activation in training (`dropout`; 0 turns dropout off).
    public var dropout: Float

    enum CodingKeys: String, CodingKey {
        case vocabularySize = "vocab_size", blockSize = "block_size", layers = "n_layer", heads = "n_head"
        case embedding = "n_embd", dropout
    }

    public init(vocabularySize: Int, blockSize: Int, layers: Int, heads: Int, embedding: Int, dropout: Float = 0) {
        self.vocabularySize = vocabularySize
        self.blockSize = blockSize
        self.layers = layers
        self.heads = heads
        self.embedding = embedding
        self.dropout = dropout
    }

    /// Throws naming the first size that cannot make a model.
    public func validate() throws {
        for (name, value) in [("vocab_size", vocabularySize), ("block_size", blockSize), ("n_layer", layers),
                              ("n_head", heads), ("n_embd", embedding)] where value < 1 {
            throw AutodiffError.invalidArgument("\(name) must be at least 1, got \(value)")
        }
        guard embedding % heads == 0 else {
            throw AutodiffError.invalidArgument("n_embd \(embedding) is not divisible by n_head \(heads)")
        }
        guard dropout >= 0 && dropout < 1 else { throw AutodiffError.invalidArgument("dropout must be in [0, 1), got \(dropout)") }
    }

    /// Multiply-adds of one training step's forward pass per token, times 6 for forward and backward:
    /// the usual `6 N + 12 L T C` estimate of floating-point operations per token (N the parameters
    /// outside the position table, T the context).
    public func flopsPerToken(context: Int) -> Double {
        let c = Double(embedding), l = Double(layers)
        let parameters = l * 12 * c * c + Double(vocabularySize) * c
        return 6 * parameters + 12 * l * Double(context) * c
    }
}

/// nanoGPT's initialisation: weights from N(0, 0.02), biases 0.
private func gptLinear(_ inputs: Int, _ outputs: Int, standardDeviation: Float = 0.02, generator: inout SeededGenerator) -> Linear {
    Linear(weight: .randomNormal([outputs, inputs], standardDeviation: standardDeviation, generator: &generator, requiresGrad: true),
           bias: .zeros([outputs], requiresGrad: true))
}

/// Multi-head causal self-attention over `[batch, time, embedding]`: one projection to queries, keys and
/// values (`c_attn`), scaled dot products masked to earlier positions, and an output projection (`c_proj`).
public final class CausalSelfAttention: Module, Layer {
    public let inputProjection: Linear
    public let outputProjection: Linear
    public let heads: Int
    let attentionDropout: Dropout, residualDropout: Dropout

    public init(_ configuration: GPTConfiguration, generator: inout SeededGenerator) {
        let c = configuration.embedding
        heads = configuration.heads
        inputProjection = gptLinear(c, 3 * c, generator: &generator)
        outputProjection = gptLinear(c, c, standardDeviation: 0.02 / Float(2 * configuration.layers).squareRoot(), generator: &generator)
        attentionDropout = Dropout(probability: configuration.dropout, seed: generator.next())
        residualDropout = Dropout(probability: configuration.dropout, seed: generator.next())
    }

    public override var reflectedProperties: [(name: String, value: Any)] {
        [("c_attn", inputProjection), ("c_proj", outputProjection)]
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        precondition(x.rank == 3, "attention: needs [batch, time, embedding], got \(x.shape)")
        let qkv = inputProjection(x)
        let y = isTraining && attentionDropout.probability > 0 ? composedAttention(qkv) : qkv.causalSelfAttention(heads: heads)
        return residualDropout(outputProjection(y))
    }

    /// Attention from its parts, with dropout on the attention weights (the fused op has none).
    func composedAttention(_ qkv: Tensor) -> Tensor {
        let (batch, time, width) = (qkv.shape[0], qkv.shape[1], qkv.shape[2] / 3)
        let headWidth = width / heads
        func split(_ part: Int) -> Tensor {  // [batch, heads, time, head width]
            qkv.slice(axis: 2, part * width..<(part + 1) * width).reshaped([batch, time, heads, headWidth]).permuted([0, 2, 1, 3])
        }
        let (q, k, v) = (split(0), split(1), split(2))
        let scores = q.matmul(k, transposeOther: true).scaled(by: 1 / Float(headWidth).squareRoot())
        let weights = attentionDropout(scores.causallyMasked().softmax())
        return weights.matmul(v).permuted([0, 2, 1, 3]).reshaped([batch, time, width])
    }
}

/// The feed-forward part of a block: widen four times (`c_fc`), GELU, project back (`c_proj`).
public final class TransformerMLP: Module, Layer {
    public let expand: Linear
    public let project: Linear
    let dropout: Dropout

    public init(_ configuration: GPTConfiguration, generator: inout SeededGenerator) {
        let c = configuration.embedding
        expand = gptLinear(c, 4 * c, generator: &generator)
        project = gptLinear(4 * c, c, standardDeviation: 0.02 / Float(2 * configuration.layers).squareRoot(), generator: &generator)
        dropout = Dropout(probability: configuration.dropout, seed: generator.next())
    }

    public override var reflectedProperties: [(name: String, value: Any)] { [("c_fc", expand), ("c_proj", project)] }

    public func callAsFunction(_ x: Tensor) -> Tensor { dropout(project(expand(x).gelu())) }
}

/// A pre-LN transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
public final class TransformerBlock: Module, Layer {
    public let attentionNorm: LayerNorm
    public let attention: CausalSelfAttention
    public let mlpNorm: LayerNorm
    public let mlp: TransformerMLP

    public init(_ configuration: GPTConfiguration, generator: inout SeededGenerator) {
        attentionNorm = LayerNorm(width: configuration.embedding)
        attention = CausalSelfAttention(configuration, generator: &generator)
        mlpNorm = LayerNorm(width: configuration.embedding)
        mlp = TransformerMLP(configuration, generator: &generator)
    }

    public override var reflectedProperties: [(name: String, value: Any)] {
        [("ln_1", attentionNorm), ("attn", attention), ("ln_2", mlpNorm), ("mlp", mlp)]
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        let h = x + attention(attentionNorm(x))
        return h + mlp(mlpNorm(h))
    }
}

/// A GPT-2-style language model (nanoGPT's `GPT`): token and learned position embeddings, transformer
/// blocks, a final layer norm, and an output layer tied to the token embedding. Its parameters are named
/// as nanoGPT's `state_dict` (`transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, ...; the tied
/// `lm_head.weight` is `transformer.wte.weight`), with PyTorch's `[out, in]` layout.
public final class GPT: Module {
    /// The embeddings, blocks and final norm: nanoGPT's `transformer` dictionary.
    public final class Body: Module {
        public let tokenEmbedding: Embedding
        public let positionEmbedding: Embedding
        public let blocks: [TransformerBlock]
        public let finalNorm: LayerNorm
        let dropout: Dropout

        init(_ configuration: GPTConfiguration, generator: inout SeededGenerator) {
            let c = configuration.embedding
            tokenEmbedding = Embedding(weight: .randomNormal([configuration.vocabularySize, c], standardDeviation: 0.02, generator: &generator))
            positionEmbedding = Embedding(weight: .randomNormal([configuration.blockSize, c], standardDeviation: 0.02, generator: &generator))
            blocks = (0..<configuration.layers).map { _ in TransformerBlock(configuration, generator: &generator) }
            finalNorm = LayerNorm(width: c)
            dropout = Dropout(probability: configuration.dropout, seed: generator.next())
        }

        public override var reflectedProperties: [(name: String, value: Any)] {
            [("wte", tokenEmbedding), ("wpe", positionEmbedding), ("h", blocks), ("ln_f", finalNorm)]
        }
    }

    public let configuration: GPTConfiguration
    public let transformer: Body

    /// A model of `configuration` with nanoGPT's initialisation from `generator`. Throws when the sizes
    /// cannot make a model (see `GPTConfiguration.validate`).
    public init(_ configuration: GPTConfiguration, generator: inout SeededGenerator) throws {
        try configuration.validate()
        self.configuration = configuration
        transformer = Body(configuration, generator: &generator)
    }

    public override var reflectedProperties: [(name: String, value: Any)] { [("transformer", transformer)] }

    /// Next-token logits `[batch, time, vocab_size]` for `tokens` (row-major `[batch, time]`, each id in
    /// the vocabulary, `time` at most `block_size`).
    public func callAsFunction(_ tokens: [Int32], batch: Int, time: Int) -> Tensor {
        precondition(time >= 1 && time <= configuration.blockSize,
                     "GPT: a context of \(time) tokens is longer than block_size \(configuration.blockSize)")
        precondition(tokens.count == batch * time, "GPT: \(tokens.count) tokens do not make \(batch) x \(time)")
        let body = transformer
        let positions = (0..<batch * time).map { Int32($0 % time) }
        var x = body.dropout(body.tokenEmbedding.lookup(tokens, shape: [batch, time]) + body.positionEmbedding.lookup(positions, shape: [batch, time]))
        for block in body.blocks { x = block(x) }
        return body.finalNorm(x).matmul(body.tokenEmbedding.weight, transposeOther: true)
    }

    /// The mean cross-entropy of predicting `targets` (the next token of every position of `tokens`;
    /// -1 ignores a position), as nanoGPT's `F.cross_entropy(..., ignore_index=-1)`.
    public func loss(_ tokens: [Int32], targets: [Int32], batch: Int, time: Int) -> Tensor {
        Loss.softmaxCrossEntropy(self(tokens, batch: batch, time: time), labels: targets, ignoreIndex: -1)
    }

    /// `prompt` followed by `count` sampled tokens: each from the softmax of the last position's logits
    /// divided by `temperature` (0: always the likeliest), among the `topK` likeliest when given; the
    /// context is the last `block_size` tokens. In evaluation mode, without the tape.
    public func generate(_ prompt: [Int32], count: Int, temperature: Float = 1, topK: Int? = nil,
                         generator: inout SeededGenerator) -> [Int32] {
        precondition(!prompt.isEmpty, "generate: the prompt is empty")
        let wasTraining = isTraining
        setTraining(false)
        defer { setTraining(wasTraining) }
        var tokens = prompt
        GradMode.withoutGradients {
            for _ in 0..<count {
                let context = Array(tokens.suffix(configuration.blockSize))
                let logits: [Float] = callAsFunction(context, batch: 1, time: context.count).scalars
                let last = [Float](logits[((context.count - 1) * configuration.vocabularySize)...])
                tokens.append(Self.sample(last, temperature: temperature, topK: topK, generator: &generator))
            }
        }
        return tokens
    }

    /// A token drawn from `logits` as `generate` describes.
    static func sample(_ logits: [Float], temperature: Float, topK: Int?, generator: inout SeededGenerator) -> Int32 {
        let ranked = logits.indices.sorted { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
        guard temperature > 0 else { return Int32(ranked[0]) }
        let kept = ranked.prefix(Swift.max(1, Swift.min(topK ?? logits.count, logits.count)))
        let top = logits[ranked[0]]
        let weights = kept.map { Double(expf((logits[$0] - top) / temperature)) }
        var draw = Double(generator.nextUnit()) * weights.reduce(0, +)
        for (index, weight) in zip(kept, weights) {
            draw -= weight
            if draw < 0 { return Int32(index) }
        }
        return Int32(kept.last!)
    }
}
