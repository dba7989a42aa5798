"""This project's own DSA training checkpoints as Hugging Face models, so every probe runs on them.

The small DSA transformer (`sparse_viz.model.SparseTransformer`: pre-norm, RMSNorm, half-split
RoPE, SwiGLU, optionally tied embeddings, no biases) is a Llama in Hugging Face's terms. Its
weights are copied into a `LlamaForCausalLM`, its Lightning Indexers are kept as modules, and
its selector runs through `selected_attention.install_selection`: the probes then see an
ordinary Llama whose attention attends to the keys the DSA model would choose.

    results/<run>/checkpoints/last.ckpt   Lightning checkpoint (state_dict + hyper_parameters)
    results/<run>/tokenizer.json          the run's tokenizer (written at the start of training)
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from sparse_viz.errors import UserInputError
from sparse_viz.model.config import ModelConfig
from sparse_viz.model.indexer import LightningIndexer
from sparse_viz.pretrained.selected_attention import KeySelection, install_selection

ATTENTION_CHOICES = ("own", "dense")
_PREFIX = "model."


def read_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and the `SparseTransformer` state dict of a training checkpoint.

    Raises:
        UserInputError: missing, truncated or foreign file (not a sparse_viz training checkpoint).
    """
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise UserInputError(f"checkpoint {str(path)!r} cannot be read (truncated or not a torch file): "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(hparams, dict) or f"{_PREFIX}embed.weight" not in state:
        raise UserInputError(f"checkpoint {str(path)!r} is not a sparse_viz DSA training checkpoint")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        config = ModelConfig(**{k: v for k, v in hparams.items() if k in fields})
    except (TypeError, ValueError) as error:
        raise UserInputError(f"checkpoint {str(path)!r} has an invalid model config: {error}") from None
    return config, {k.removeprefix(_PREFIX): v for k, v in state.items() if k.startswith(_PREFIX)}


def llama_from_dsa(config: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A `LlamaForCausalLM` (eager attention) computing what the DSA model computes densely."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.short_conv:
        raise UserInputError(f"this checkpoint's model has a short convolution (short_conv={config.short_conv}), which a "
                             "Llama does not: the probes cannot run on it")
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
        attn_implementation="eager", bos_token_id=None, eos_token_id=None, pad_token_id=None,
    ))
    kv_width = config.kv_heads * config.head_dim
    mapped = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["final_norm.weight"],
              "lm_head.weight": state.get("lm_head.weight", state["embed.weight"])}
    for i in range(config.n_layers):
        block, layer = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[block + "attn.qkv.weight"].split((config.d_model, kv_width, kv_width), dim=0)
        mapped.update({
            layer + "input_layernorm.weight": state[block + "attn_norm.weight"],
            layer + "self_attn.q_proj.weight": q, layer + "self_attn.k_proj.weight": k,
            layer + "self_attn.v_proj.weight": v, layer + "self_attn.o_proj.weight": state[block + "attn.o_proj.weight"],
            layer + "post_attention_layernorm.weight": state[block + "mlp_norm.weight"],
            layer + "mlp.gate_proj.weight": state[block + "mlp.gate.weight"],
            layer + "mlp.up_proj.weight": state[block + "mlp.up.weight"],
            layer + "mlp.down_proj.weight": state[block + "mlp.down.weight"],
        })
    missing, unexpected = llama.load_state_dict(mapped, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise UserInputError(f"the checkpoint does not map onto a Llama: missing {missing}, unexpected {unexpected}")
    return llama.eval()


def indexers_from_dsa(config: ModelConfig, state: dict[str, torch.Tensor]) -> nn.ModuleList | None:
    """The checkpoint's Lightning Indexers, one per layer, or None when it has none."""
    if not config.use_indexer:
        return None
    indexers = nn.ModuleList(LightningIndexer(config) for _ in range(config.n_layers))
    for i, indexer in enumerate(indexers):
        prefix = f"blocks.{i}.indexer."
        indexer.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return indexers.eval()


def dsa_selection(config: ModelConfig, indexers: nn.ModuleList | None, attention: str = "own") -> KeySelection:
    """The DSA model's own key selection (its selector, k, sinks, seed, indexers), or dense."""
    if attention not in ATTENTION_CHOICES:
        raise UserInputError(f"unknown attention {attention!r}; use one of: {', '.join(ATTENTION_CHOICES)}")
    selector = "dense" if attention == "dense" else config.selector
    return KeySelection(selector=selector, top_k=config.top_k, sink_tokens=config.sink_tokens,
                        seed=config.selector_seed, indexers=indexers, indexer_rope_dim=config.indexer_rope_dim,
                        indexer_rope_theta=config.rope_theta)


def find_tokenizer(checkpoint: Path) -> Path:
    """The run's tokenizer.json: beside `checkpoints/`, or next to the checkpoint file.

    Raises:
        UserInputError: none found.
    """
    for candidate in (checkpoint.parent.parent / "tokenizer.json", checkpoint.parent / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise UserInputError(f"no tokenizer.json for checkpoint {str(checkpoint)!r} (looked in its run directory)")


def load_dsa_checkpoint(path: str | os.PathLike, device: torch.device, dtype: torch.dtype, attention: str = "own"):
    """A DSA training checkpoint as a `LoadedModel` whose attention uses the model's own selection.

    Args:
        path: `results/<run>/checkpoints/<name>.ckpt`.
        device, dtype: where and how to run it.
        attention: "own" (the checkpoint's selector) or "dense" (every causal key).

    Returns:
        LoadedModel; `adapter.selection` says which selector runs.

    Raises:
        UserInputError: unreadable or foreign checkpoint, or no tokenizer in its run directory.
    """
    from transformers import PreTrainedTokenizerFast

    from sparse_viz.data.tokenizer import END_OF_TEXT, load_tokenizer
    from sparse_viz.pretrained.adapter import ArchitectureAdapter
    from sparse_viz.pretrained.loaded_model import LoadedModel

    file = Path(path).expanduser()
    config, state = read_checkpoint(file)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(find_tokenizer(file)), eos_token=END_OF_TEXT)
    model = llama_from_dsa(config, state)
    indexers = indexers_from_dsa(config, state)
    selection = dsa_selection(config, indexers, attention)
    model.to(device=device, dtype=dtype)
    if indexers is not None:
        indexers.to(device=device, dtype=dtype)
    install_selection(model, selection)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=ArchitectureAdapter.for_model(model), device=device,
                       dtype=dtype, name_or_path=str(file))
