"""Configuration of the decoder-only transformer with DeepSeek Sparse Attention."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SELECTORS = ("topk", "dense", "local", "sink_local", "random", "oracle")
ATTENTION_PATHS = ("masked", "gathered")
INDEXER_PATHS = ("full", "blockwise")


@dataclass
class ModelConfig:
    """Hyper-parameters of `SparseTransformer`.

    Main model:
        vocab_size: tokenizer vocabulary size.
        d_model: residual stream width.
        n_layers: number of decoder blocks.
        n_heads: attention heads per layer; head_dim = d_model // n_heads.
        n_kv_heads: key/value heads per layer (grouped-query attention; query head h reads
            key/value head h // (n_heads / n_kv_heads)); None = n_heads. DeepSeek runs DSA on MLA
            in its MQA mode (one key-value entry shared by every head): a selected key's row is
            then gathered once for all heads of its group.
        d_ff: hidden width of the SwiGLU MLP.
        max_seq_len: longest sequence the model accepts (RoPE tables are built for it).
        rope_theta: RoPE base.
        tie_embeddings: share the token embedding with the LM head.
        norm_eps: RMSNorm / LayerNorm epsilon.
        short_conv: taps of a causal depthwise convolution added to each block's normed attention
            input, which attention and the indexer both read (`short_conv.py`; a "Canon" layer /
            Zoology's short convolution: each position sees its predecessors directly, so
            associative recall needs no previous-token head). 0 (the default) = none.

    Sparse attention (DeepSeek Sparse Attention, REFERENCE §1):
        selector: how each query chooses its keys. `topk` = top-k of the Lightning Indexer's
            scores (DSA); baselines: `dense` (all causal keys), `local` (the last k),
            `sink_local` (the first `sink_tokens` + the last k - sink_tokens), `random`
            (k random past keys, seeded), `oracle` (top-k of the true dense attention scores
            summed over heads).
        top_k: keys kept per query; rows with t + 1 <= top_k are dense.
        sink_tokens: the s of `sink_local`.
        selector_seed: seed of the `random` selector (same seed, same selection).
        use_indexer: build a `LightningIndexer` in every layer. Required by `topk`; optional
            otherwise (it can be trained alongside to compare with the baselines). The
            `dense` baseline config has none.
        indexer_heads: H_I, the indexer's query heads.
        indexer_dim: d_I, the size of each indexer query and of the one shared indexer key.
        indexer_rope_dim: leading dims of q_I / k_I that get (non-interleaved) RoPE.
        indexer_norm_eps: epsilon of the indexer key's LayerNorm. DeepSeek's reference code
            builds it with its LayerNorm default, 1e-6, not the model's RMSNorm epsilon.
        attention_path: `masked` (dense scores + -inf mask; the readable reference) or
            `gathered` (only the k selected keys/values per query; O(T*k) memory; sparse CSR
            kernels on CPU, gathered copies in query chunks elsewhere).
            Both give the same results (fp32, 1e-5).
        indexer_path: `full` (the indexer scores every (query, key) pair: (B, T, H_I, T)
            logits and a (B, T, T) matrix per layer; the readable reference) or `blockwise`
            (top-k by query blocks, the sparse stage's KL at the selected keys only, the
            warm-up KL by checkpointed query blocks: no T x T tensor; `indexer_blocks.py`).
            Same selections (up to exactly tied scores) and losses (fp32, 1e-5). A forward
            that asks for a trace, and the `oracle` selector, still build the full matrices.
        indexer_block_size: queries per block of the `blockwise` indexer path.
    """

    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    short_conv: int = 0

    selector: str = "topk"
    top_k: int = 32
    sink_tokens: int = 4
    selector_seed: int = 0
    use_indexer: bool = True
    indexer_heads: int = 4
    indexer_dim: int = 32
    indexer_rope_dim: int = 16
    indexer_norm_eps: float = 1e-6
    attention_path: str = "gathered"
    indexer_path: str = "blockwise"
    indexer_block_size: int = 256

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")
        if self.attention_path not in ATTENTION_PATHS:
            raise ValueError(
                f"unknown attention_path {self.attention_path!r}; choose one of {', '.join(ATTENTION_PATHS)}"
            )
        if self.indexer_path not in INDEXER_PATHS:
            raise ValueError(
                f"unknown indexer_path {self.indexer_path!r}; choose one of {', '.join(INDEXER_PATHS)}"
            )
        if self.top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {self.top_k}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must be > 0 and divide n_heads={self.n_heads}")
        if self.selector == "topk" and not self.use_indexer:
            raise ValueError("selector 'topk' needs the Lightning Indexer (use_indexer=True)")
        if self.indexer_rope_dim > self.indexer_dim or self.indexer_rope_dim % 2:
            raise ValueError("indexer_rope_dim must be even and <= indexer_dim")
        if self.selector == "sink_local" and not 0 <= self.sink_tokens < self.top_k:
            raise ValueError("sink_local needs 0 <= sink_tokens < top_k")
        if self.short_conv < 0:
            raise ValueError(f"short_conv must be >= 0 (0 = none), got {self.short_conv}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "indexer_block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer (n_kv_heads, or n_heads when it is None)."""
        return self.n_kv_heads or self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)
