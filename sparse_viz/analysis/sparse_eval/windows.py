"""Held-out text for evaluation: windows of T tokens from a corpus's validation documents."""

from __future__ import annotations

from typing import Any

import torch

from sparse_viz.errors import UserInputError


def held_out_windows(tokenizer: Any, corpus: str = "shakespeare", n_windows: int = 4, seq_len: int = 1024,
                     val_fraction: float = 0.1) -> tuple[torch.Tensor, list[str]]:
    """`n_windows` non-overlapping windows of `seq_len` tokens from the corpus's validation split.

    Args:
        tokenizer: the model's tokenizer (the text is cut on its tokens).
        corpus: "shakespeare" (the validation plays, never trained on by this project's models),
            or a folder / file of .txt/.md documents (its last `val_fraction`).
        n_windows, seq_len: how many windows of how many tokens.

    Returns:
        ((n_windows, seq_len) int64 ids, the names of the documents read).

    Raises:
        UserInputError: an unreadable corpus, or one too short for n_windows * seq_len tokens.
    """
    from sparse_viz.data.corpus import load_corpus

    if n_windows < 1 or seq_len < 2:
        raise UserInputError(f"need n_windows >= 1 and seq_len >= 2, got {n_windows} and {seq_len}")
    documents = load_corpus(corpus, val_fraction).val
    ids: list[int] = []
    used = []
    for document in documents:
        ids += tokenizer(document.text)["input_ids"]
        used.append(document.name)
        if len(ids) >= n_windows * seq_len:
            break
    if len(ids) < n_windows * seq_len:
        raise UserInputError(f"the held-out text of {corpus!r} has {len(ids)} tokens; {n_windows} windows of "
                             f"{seq_len} need {n_windows * seq_len}")
    return torch.tensor(ids[: n_windows * seq_len]).view(n_windows, seq_len), used
