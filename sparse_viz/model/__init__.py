"""The network only: decoder-only transformer with DeepSeek Sparse Attention (no Lightning, no files)."""

from .config import ModelConfig
from .indexer import LightningIndexer
from .selectors import select_keys
from .trace import AttentionTrace
from .transformer import SparseTransformer, TransformerOutput

__all__ = [
    "AttentionTrace",
    "LightningIndexer",
    "ModelConfig",
    "SparseTransformer",
    "TransformerOutput",
    "select_keys",
]
