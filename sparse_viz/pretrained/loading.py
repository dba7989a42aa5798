"""Load a pretrained Hugging Face causal LM: the model, its tokenizer and its adapter.

`load_model` turns a local directory (or a hub id, when online) into a `LoadedModel`: the model
in eval mode on the requested device and dtype, its tokenizer, and an `ArchitectureAdapter`
(`adapter.py`: where the family keeps each part).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from sparse_viz.errors import UserInputError
from sparse_viz.model.cpu_features import bfloat16_emulation_warning
from sparse_viz.pretrained.adapter import (
    DECODER_PATHS,
    MULTIMODAL_TYPES,
    SUPPORTED_ARCHITECTURES,
    ArchitectureAdapter,
)
from sparse_viz.pretrained.loaded_model import LoadedModel

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda")

__all__ = ["ArchitectureAdapter", "LoadedModel", "SUPPORTED_ARCHITECTURES", "load_model", "peek_model_type",
           "resolve_device", "resolve_dtype"]


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
    attention: str = "own",
) -> LoadedModel:
    """Load a causal LM directory (or hub id), or this project's DSA training checkpoint
    (`results/<run>/checkpoints/*.ckpt`, see `dsa_checkpoint.py`), with its tokenizer and adapter.

    Args:
        name_or_path: a local model directory, or a hub id (only works when online).
        device: "auto" (cuda if available), "cpu" or "cuda".
        dtype: "float32", "bfloat16" or "float16".
        trust_remote_code: passed to transformers; off by default.
        attn_implementation: "eager" (default; honours additive 4D masks exactly) or "sdpa".
        attention: for a DSA checkpoint, "own" (its selector) or "dense"; a Hugging Face model
            always attends as it was trained ("own").

    Returns:
        LoadedModel with the model in eval mode.

    Raises:
        UserInputError: missing directory, unreadable checkpoint, unsupported architecture,
            unknown device or dtype.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if torch_device.type == "cpu" and torch_dtype == torch.bfloat16:
        warning = bfloat16_emulation_warning()
        if warning is not None:  # an analysis in bfloat16 is then slower than in float32, not faster
            print(f"{warning}; --dtype float32 is likely faster on this machine", file=sys.stderr)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".ckpt":
        from sparse_viz.pretrained.dsa_checkpoint import load_dsa_checkpoint

        return load_dsa_checkpoint(path, torch_device, torch_dtype, attention)
    if attention not in ("own", "dense"):
        raise UserInputError(f"unknown attention {attention!r}; use own or dense")
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
    if config.model_type not in DECODER_PATHS:
        raise UserInputError(
            f"unsupported architecture {config.model_type!r} in {name!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    auto_class = AutoModelForImageTextToText if config.model_type in MULTIMODAL_TYPES else AutoModelForCausalLM
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


def peek_model_type(name: str) -> str | None:
    """model_type from a local directory's config.json (or a hub id's config when online),
    without loading weights; None when it cannot be read (`load_model` then reports why)."""
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        if Path(name).expanduser().exists() or name.count("/") != 1:
            return None
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(name).model_type
        except Exception:  # offline, unknown id: load_model gives the one-line error
            return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None  # load_model reports it properly
