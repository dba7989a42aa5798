"""Where a pretrained model family keeps each part, by layer index: the architecture adapter.

The adapter is the only place that knows where a family keeps its decoder layers, norms,
attention projections, q/k norms and rotary embedding, so every probe (token masking, head
ablation, component ablation) and every attachment to a pretrained model (indexers, selector-
restricted attention) is written once against it.

Supported families share one decoder-layer layout (pre-norm, `self_attn` with
q/k/v/o projections, `mlp`, `input_layernorm`, `post_attention_layernorm`):
Qwen3 and Qwen3-VL (q_norm/k_norm before RoPE), Qwen2, Llama (SmolLM2) and Mistral.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from sparse_viz.errors import UserInputError

# model_type -> where the text decoder lives, relative to the loaded top-level model.
# Qwen3-VL keeps its text layers one level deeper, beside the vision tower.
DECODER_PATHS: dict[str, str] = {
    "llama": "model",
    "mistral": "model",
    "qwen2": "model",
    "qwen3": "model",
    "qwen3_vl": "model.language_model",
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(DECODER_PATHS)

# Families whose checkpoints load as image-text-to-text models, not causal LMs.
MULTIMODAL_TYPES = frozenset({"qwen3_vl"})

def _get_path(root: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        root = getattr(root, name)
    return root


@dataclass
class ArchitectureAdapter:
    """Where one model family keeps its parts; everything a probe needs, by layer index.

    Attributes:
        model: the top-level Hugging Face model (with `lm_head`).
        model_type: `config.model_type` of the top-level model (one of SUPPORTED_ARCHITECTURES).
        decoder: the text decoder module (has `layers`, `norm`, `rotary_emb`, `embed_tokens`).
        config: the text config (for Qwen3-VL, `config.text_config`).
    """

    model: nn.Module
    model_type: str
    decoder: nn.Module
    config: Any

    @classmethod
    def for_model(cls, model: nn.Module) -> ArchitectureAdapter:
        """Build the adapter for a loaded HF model.

        Raises:
            UserInputError: the architecture is not one of SUPPORTED_ARCHITECTURES.
        """
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DECODER_PATHS:
            raise UserInputError(
                f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        decoder = _get_path(model, DECODER_PATHS[model_type])
        config = getattr(model.config, "text_config", None) or model.config
        return cls(model=model, model_type=model_type, decoder=decoder, config=config)

    # -- model-level parts -------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""
        return self.decoder.layers

    @property
    def rotary_emb(self) -> nn.Module:
        """Model-level rotary embedding: `rotary_emb(x, position_ids) -> (cos, sin)`."""
        return self.decoder.rotary_emb

    @property
    def embed_tokens(self) -> nn.Module:
        return self.decoder.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def selection(self) -> Any:
        """The `KeySelection` installed on the model (`selected_attention.install_selection`), or
        None when the model attends densely as it was trained."""
        return getattr(self.model, "_sparse_viz_selection", None)

    # -- sizes --------------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.config, "head_dim", None)
        return int(head_dim or self.hidden_size // self.n_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def attention_scaling(self) -> float:
        """Softmax scale of the attention scores: the model's own `scaling`, else hd**-0.5."""
        return float(getattr(self.attention(0), "scaling", self.head_dim**-0.5))

    @property
    def max_positions(self) -> int | None:
        """Context length from the config (`max_position_embeddings`), or None if unknown."""
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if value else None

    # -- per-layer parts ---------------------------------------------------------------------

    def attention(self, i: int) -> nn.Module:
        """Layer i's self-attention (has q_proj, k_proj, v_proj, o_proj)."""
        return self.layers[i].self_attn

    def input_norm(self, i: int) -> nn.Module:
        return self.layers[i].input_layernorm

    def post_attention_norm(self, i: int) -> nn.Module:
        return self.layers[i].post_attention_layernorm

    def mlp(self, i: int) -> nn.Module:
        return self.layers[i].mlp

    def q_norm(self, i: int) -> nn.Module | None:
        """Per-head RMSNorm on queries before RoPE (Qwen3, Qwen3-VL), or None."""
        return getattr(self.attention(i), "q_norm", None)

    def k_norm(self, i: int) -> nn.Module | None:
        """Per-head RMSNorm on keys before RoPE (Qwen3, Qwen3-VL), or None."""
        return getattr(self.attention(i), "k_norm", None)

    def sliding_window(self, i: int) -> int | None:
        """Layer i's attention window (keys with q - k < window are visible), or None if full.

        Qwen2/Qwen3 set `attention.sliding_window` only on their sliding layers; Mistral keeps
        one window for all layers in its config.
        """
        attention = self.attention(i)
        if hasattr(attention, "sliding_window"):
            window = attention.sliding_window
        else:
            window = getattr(self.config, "sliding_window", None) if self.model_type == "mistral" else None
        return int(window) if window else None
