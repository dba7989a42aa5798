"""Lightning Indexers retrofitted onto a pretrained Hugging Face model, and the model they belong to.

One `LightningIndexer` per decoder layer (the class the small model uses), reading that layer's
normed attention input. A checkpoint of a retrofit run holds these tensors only, plus the
identity of the frozen model (its path and a fingerprint of its config and weight files): the
frozen weights are never copied, and indexers loaded against another model are refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_viz.errors import UserInputError
from sparse_viz.model.config import ModelConfig
from sparse_viz.model.indexer import LightningIndexer
from sparse_viz.pretrained.adapter import ArchitectureAdapter

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(path: str | Path) -> str:
    """sha256 over a model directory's config.json and weight files (name, size and content).

    Reads every weight file once (about a second for a 135M-parameter model): cheap beside a
    forward, and it tells two checkpoints of the same architecture apart.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserInputError(f"model directory {str(path)!r} does not exist")
    digest = hashlib.sha256()
    files = [root / "config.json"] + sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    for file in files:
        if not file.is_file():
            continue
        digest.update(f"{file.name}:{file.stat().st_size}\n".encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_rope_theta(config: Any) -> float:
    """The RoPE base of a transformers config (5.x keeps it in `rope_parameters`)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


class RetrofitIndexers(nn.Module):
    """One Lightning Indexer per layer of a pretrained model.

    Args:
        hidden_size: the model's hidden size (the indexers' input width).
        n_layers: decoder layers of the model.
        heads: indexer heads H_I.
        dim: indexer head dim d_I.
        rope_dim: leading dims of q_I / k_I that get RoPE (even, <= dim).
        rope_theta: RoPE base of those dims (the model's own by default, see `for_model`).
        norm_eps: epsilon of the indexer key's LayerNorm.
    """

    def __init__(self, hidden_size: int, n_layers: int, heads: int = 4, dim: int = 64, rope_dim: int = 32,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if heads < 1 or dim < 2 or n_layers < 1:
            raise UserInputError(f"indexer heads and dim must be >= 1 and >= 2, got {heads} and {dim}")
        if rope_dim % 2 or not 0 <= rope_dim <= dim:
            raise UserInputError(f"indexer rope_dim must be even and in [0, dim={dim}], got {rope_dim}")
        self.settings = dict(hidden_size=int(hidden_size), n_layers=int(n_layers), heads=int(heads), dim=int(dim),
                             rope_dim=int(rope_dim), rope_theta=float(rope_theta), norm_eps=float(norm_eps))
        config = ModelConfig(d_model=hidden_size, n_heads=1, indexer_heads=heads, indexer_dim=dim,
                             indexer_rope_dim=rope_dim, indexer_norm_eps=norm_eps, top_k=1)
        self.layers = nn.ModuleList(LightningIndexer(config) for _ in range(n_layers))

    @classmethod
    def for_model(cls, adapter: ArchitectureAdapter, heads: int = 4, dim: int = 64, rope_dim: int = 32,
                  rope_theta: float | None = None, norm_eps: float = 1e-6) -> RetrofitIndexers:
        """Indexers sized for `adapter`'s model; RoPE base from the model's config unless given."""
        theta = model_rope_theta(adapter.config) if rope_theta is None else float(rope_theta)
        return cls(adapter.hidden_size, adapter.n_layers, heads, dim, rope_dim, theta, norm_eps)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LightningIndexer:
        return self.layers[layer]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def indexer_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The indexers' tensors of a retrofit module's state dict, keys relative to `RetrofitIndexers`."""
    return {key.split("indexers.", 1)[1]: value for key, value in state_dict.items() if "indexers." in key}


def check_same_model(checkpoint: dict[str, Any], source: str, model_path: str, fingerprint: str) -> dict[str, Any]:
    """The checkpoint's `retrofit` identity, if its indexers belong to the model with `fingerprint`.

    Raises:
        UserInputError: no retrofit identity, or one of another model.
    """
    identity = checkpoint.get("retrofit")
    if not identity:
        raise UserInputError(f"{source} is not a retrofit run's checkpoint (no indexers for a pretrained model)")
    if identity["model_fingerprint"] != fingerprint:
        raise UserInputError(f"the indexers in {source} were trained for the model at {identity['model_path']!r} "
                             f"(fingerprint {identity['model_fingerprint'][:12]}), not {model_path!r} "
                             f"(fingerprint {fingerprint[:12]})")
    return identity


def load_retrofit_indexers(checkpoint_path: str | Path, model_path: str | Path,
                           adapter: ArchitectureAdapter) -> RetrofitIndexers:
    """The trained indexers of a retrofit run's checkpoint, for the model at `model_path`.

    Raises:
        UserInputError: a missing or unreadable file, a checkpoint that is not a retrofit run's,
            or indexers trained for another model (fingerprint or shape mismatch).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise UserInputError(f"indexer checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserInputError(f"cannot read indexer checkpoint {path}: {' '.join(str(error).split())[:200]}") from None
    identity = check_same_model(checkpoint if isinstance(checkpoint, dict) else {}, str(path), str(model_path),
                                model_fingerprint(model_path))
    settings = identity["indexer_settings"]
    if settings["n_layers"] != adapter.n_layers or settings["hidden_size"] != adapter.hidden_size:
        raise UserInputError(f"the indexers in {path} are for {settings['n_layers']} layers of width "
                             f"{settings['hidden_size']}, the model has {adapter.n_layers} of {adapter.hidden_size}")
    indexers = RetrofitIndexers(**settings)
    indexers.load_state_dict(indexer_state(checkpoint["state_dict"]))
    return indexers
