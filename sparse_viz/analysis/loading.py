"""Load a pretrained Hugging Face causal LM and name where its family keeps each part.

`load_model` turns a local directory (or a hub id, when online) into a `LoadedModel`: the model
in eval mode on the requested device and dtype, its tokenizer, and an `ArchitectureAdapter`.
The adapter is the only place that knows where a family keeps its decoder layers, norms,
attention projections, q/k norms and rotary embedding, so every probe (token masking, head
ablation, component ablation) is written once against the adapter.

Supported families share one decoder-layer layout (pre-norm, `self_attn` with
q/k/v/o projections, `mlp`, `input_layernorm`, `post_attention_layernorm`):
Qwen3 and Qwen3-VL (q_norm/k_norm before RoPE), Qwen2, Llama (SmolLM2) and Mistral.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_viz.errors import UserInputError

# model_type -> where the text decoder lives, relative to the loaded top-level model.
# Qwen3-VL keeps its text layers one level deeper, beside the vision tower.
_DECODER_PATHS: dict[str, str] = {
    "llama": "model",
    "mistral": "model",
    "qwen2": "model",
    "qwen3": "model",
    "qwen3_vl": "model.language_model",
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_DECODER_PATHS)

# Families whose checkpoints load as image-text-to-text models, not causal LMs.
_MULTIMODAL_TYPES = frozenset({"qwen3_vl"})

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda")


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
        if model_type not in _DECODER_PATHS:
            raise UserInputError(
                f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        decoder = _get_path(model, _DECODER_PATHS[model_type])
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


@dataclass
class LoadedModel:
    """A model ready for probing: eval mode, on `device`, in `dtype`."""

    model: nn.Module
    tokenizer: Any
    adapter: ArchitectureAdapter
    device: torch.device
    dtype: torch.dtype
    name_or_path: str


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` -> cuda when available else cpu; `cpu`/`cuda[:N]` as given.

    Raises:
        UserInputError: unknown device, or cuda requested where none is available.
    """
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserInputError(f"unknown device {name!r}; use one of: {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`float32`/`bfloat16`/`float16` (or a torch dtype among them) -> torch dtype.

    Raises:
        UserInputError: any other name.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str = "eager",
) -> LoadedModel:
    """Load a causal LM directory (or hub id) with its tokenizer and adapter.

    Args:
        name_or_path: a local model directory, or a hub id (only works when online).
        device: "auto" (cuda if available), "cpu" or "cuda".
        dtype: "float32", "bfloat16" or "float16".
        trust_remote_code: passed to transformers; off by default.
        attn_implementation: "eager" (default; honours additive 4D masks exactly) or "sdpa".

    Returns:
        LoadedModel with the model in eval mode.

    Raises:
        UserInputError: missing directory, unreadable checkpoint, unsupported architecture,
            unknown device or dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"model path {name!r} is not a directory")
        if not (path / "config.json").is_file():
            raise UserInputError(f"model directory {name!r} has no config.json")
        name = str(path)
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserInputError(f"model directory {name!r} does not exist (and is not a hub id)")

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot load a model config from {name!r}: {_first_line(error)}") from error
    if config.model_type not in _DECODER_PATHS:
        raise UserInputError(
            f"unsupported architecture {config.model_type!r} in {name!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    auto_class = AutoModelForImageTextToText if config.model_type in _MULTIMODAL_TYPES else AutoModelForCausalLM
    # transformers' per-tensor "Loading weights" bar is noise around our own progress bar.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = auto_class.from_pretrained(
            name,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot load model {name!r}: {_first_line(error)}") from error
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    model.to(torch_device).eval()
    adapter = ArchitectureAdapter.for_model(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        device=torch_device,
        dtype=torch_dtype,
        name_or_path=name,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
