"""Tiny random checkpoints (Qwen3, Llama) with a byte-level tokenizer, for fast offline tests.

Each builder returns `(model, tokenizer)`: fp32, eager attention, GQA (4 query / 2 KV heads),
seeded. `save_tiny(model, tokenizer, dir)` writes a directory that `load_model(dir)` and the
CLI accept. Weights use a large init range so attention is peaked and masking a key changes
the output by much more than float32 noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte (any text encodes), BOS prepended."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_text_config(tokenizer: PreTrainedTokenizerFast, n_layers: int, max_positions: int) -> dict:
    """The text decoder every tiny model shares (the VL one's text tower too): hidden 32,
    SwiGLU 64, 4 query / 2 KV heads of 8, the tokenizer's vocabulary and special ids."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _common_config(tokenizer: PreTrainedTokenizerFast, n_layers: int) -> dict:
    return dict(
        tiny_text_config(tokenizer, n_layers, max_positions=64),
        initializer_range=0.3,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def redraw_parameters(model: torch.nn.Module, seed: int, scales: dict[str, float] | None = None) -> None:
    """Re-draw every parameter, seeded, in name order: norm weights 1 + 0.2 N(0, 1) (so norms are
    not all-ones), the rest 0.3 N(0, 1), or `scales[prefix]` N(0, 1) under a name prefix."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))
            else:
                scale = next((s for prefix, s in (scales or {}).items() if name.startswith(prefix)), 0.3)
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    redraw_parameters(model, seed)
    return model.float().eval()


def tiny_qwen3(n_layers: int = 3, seed: int = 0) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """Tiny Qwen3 (q_norm/k_norm before RoPE), GQA 4/2 heads, hidden 32, fp32, eager."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3Config(**_common_config(tokenizer, n_layers), rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return _finish(Qwen3ForCausalLM(config), seed), tokenizer


def tiny_llama(
    n_layers: int = 2, seed: int = 0, attention_bias: bool = True
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Tiny Llama (SmolLM2's family), GQA 4/2 heads, with q/k/v/o biases by default."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        **_common_config(tokenizer, n_layers),
        attention_bias=attention_bias,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _finish(LlamaForCausalLM(config), seed), tokenizer


def save_tiny(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    """Save model + tokenizer so that `load_model(directory)` works; returns `directory`."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
