"""Prompt text in, checked token ids out: file/default resolution, chat template, limits, padding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparse_viz.errors import UserInputError

if TYPE_CHECKING:  # torch is imported only by the callers that tokenise
    import torch

DEFAULT_PROMPT_FILE = Path("prompt.txt")
DEFAULT_PROMPT = "The capital of France is Paris. The capital of Italy is"


def read_prompt(prompt: str | None = None, prompt_file: str | Path | None = None) -> str:
    """The prompt text: `prompt` if given, else `prompt_file`, else ./prompt.txt, else a default.

    Raises:
        UserInputError: the prompt file cannot be read, or the prompt is empty.
    """
    if prompt is None:
        path = Path(prompt_file) if prompt_file is not None else None
        if path is None and DEFAULT_PROMPT_FILE.is_file():
            path = DEFAULT_PROMPT_FILE
        if path is None:
            prompt = DEFAULT_PROMPT
        else:
            try:
                # The whole file is the prompt, special tokens and trailing newlines included.
                prompt = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise UserInputError(f"cannot read prompt file {str(path)!r}: {error.__class__.__name__}") from error
    if not prompt.strip():
        raise UserInputError("the prompt is empty")
    return prompt


def apply_chat_template(tokenizer: Any, prompt: str) -> str:
    """Wrap `prompt` as one user turn with the tokenizer's chat template (generation prompt on).

    Raises:
        UserInputError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError("--chat given but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def encode_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    chat: bool = False,
    max_positions: int | None = None,
    min_tokens: int = 1,
    reserve: int = 0,
) -> "torch.Tensor":
    """Token ids of `prompt`, checked against the model's context.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: prompt text (already resolved by `read_prompt`).
        chat: apply the chat template first.
        max_positions: the model's context length, or None for no check.
        min_tokens: fewest tokens the caller can work with.
        reserve: positions that will be appended later (generated tokens) and must also fit.

    Returns:
        input_ids: (1, T) int64 on CPU.

    Raises:
        UserInputError: empty after tokenisation, fewer than `min_tokens`, or longer than the
            context (including `reserve`).
    """
    text = apply_chat_template(tokenizer, prompt) if chat else prompt
    # The chat template already writes the special tokens; don't add a second BOS.
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]  # (1, T)
    n_tokens = ids.shape[1]
    if n_tokens == 0:
        raise UserInputError("the prompt is empty after tokenisation")
    if n_tokens < min_tokens:
        raise UserInputError(f"the prompt has {n_tokens} token(s); at least {min_tokens} are needed")
    if max_positions is not None and n_tokens + reserve > max_positions:
        raise UserInputError(
            f"the prompt has {n_tokens} tokens (+{reserve} to generate), longer than the model's "
            f"context of {max_positions}"
        )
    return ids.long()


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    device: "torch.device | str" = "cpu",
    *,
    chat: bool = False,
    max_positions: int | None = None,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Several prompts as one right-padded batch (the ablations run prompts side by side).

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompts: N non-empty prompt texts.
        device: where the tensors go.
        chat, max_positions: as in `encode_prompt`, for every prompt.

    Returns:
        input_ids: (N, T) int64, padded with the pad (else end-of-sequence, else 0) token.
        attention_mask: (N, T) int64, 1 = token, 0 = padding.

    Raises:
        UserInputError: no prompt, an empty prompt, or one longer than the context.
    """
    import torch

    if not prompts or any(not p for p in prompts):
        raise UserInputError("empty prompt: give at least one non-empty prompt")
    encoded = [encode_prompt(tokenizer, p, chat=chat, max_positions=max_positions)[0] for p in prompts]
    T = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(encoded), T), pad, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)  # (N, T)
    for n, e in enumerate(encoded):
        ids[n, : len(e)], mask[n, : len(e)] = e, 1
    return ids.to(device), mask.to(device)
