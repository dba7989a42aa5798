"""Token types of selected keys: surface classes of the token text and corpus frequency classes.

Pure Python + numpy (no torch): the report reuses the names and definitions.

Types (not exclusive; a token may be several or none):
  punctuation  the text, stripped of whitespace, is non-empty and has no letter or digit
  whitespace   the text is non-empty and all whitespace (spaces, newlines, tabs)
  digits       the text contains a decimal digit
  capitalised  the text, stripped of whitespace, starts with an upper-case letter
  frequent     the token id is among the most common ids that together make up
               `frequent_mass` (default 50%) of the training tokens
  rare         the token id is among the least common ids that together make up at most
               `rare_mass` (default 10%) of the training tokens (ids never seen included)
"""

from __future__ import annotations

import numpy as np

TOKEN_TYPES = ("punctuation", "whitespace", "digits", "capitalised", "frequent", "rare")


def surface_types(text: str) -> tuple[bool, bool, bool, bool]:
    """(punctuation, whitespace, digits, capitalised) of one token's text."""
    stripped = text.strip()
    punctuation = bool(stripped) and not any(ch.isalnum() for ch in stripped)
    whitespace = bool(text) and not stripped
    digits = any(ch.isdigit() for ch in text)
    capitalised = bool(stripped) and stripped[0].isalpha() and stripped[0].isupper()
    return punctuation, whitespace, digits, capitalised


def frequency_classes(token_counts: np.ndarray, frequent_mass: float = 0.5,
                      rare_mass: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Frequent / rare flags per token id from training-split counts.

    Args:
        token_counts: (V,) occurrences of each id in the training split.
        frequent_mass: the most common ids covering this share of all tokens are `frequent`.
        rare_mass: the least common ids whose total share is <= this are `rare`.

    Returns:
        (frequent (V,) bool, rare (V,) bool).
    """
    counts = np.asarray(token_counts, dtype=np.float64).ravel()
    total = counts.sum()
    frequent = np.zeros(counts.shape, dtype=bool)
    rare = np.zeros(counts.shape, dtype=bool)
    if total <= 0:
        return frequent, rare
    order = np.argsort(-counts, kind="stable")  # most common first
    cumulative = np.cumsum(counts[order]) / total
    # An id is frequent if the ids before it cover less than frequent_mass.
    before = np.concatenate([[0.0], cumulative[:-1]])
    frequent[order[before < frequent_mass]] = True
    reverse = order[::-1]  # least common first
    cumulative_rare = np.cumsum(counts[reverse]) / total
    rare[reverse[cumulative_rare <= rare_mass]] = True
    rare &= ~frequent
    return frequent, rare


def token_type_matrix(strings: list[str], ids: np.ndarray, frequent: np.ndarray | None,
                      rare: np.ndarray | None) -> np.ndarray:
    """(N, len(TOKEN_TYPES)) bool: the types of N tokens given their texts and ids.

    `frequent` / `rare` are the per-id flags of `frequency_classes`; None leaves both columns
    False (no corpus counts available).
    """
    ids = np.asarray(ids).ravel()
    if len(strings) != len(ids):
        raise ValueError(f"{len(strings)} token strings for {len(ids)} ids")
    out = np.zeros((len(ids), len(TOKEN_TYPES)), dtype=bool)
    for i, text in enumerate(strings):
        out[i, :4] = surface_types(str(text))
    if frequent is not None and rare is not None:
        inside = (ids >= 0) & (ids < len(frequent))
        out[inside, 4] = frequent[ids[inside]]
        out[inside, 5] = rare[ids[inside]]
        out[~inside, 5] = True  # an id the counts don't cover was never seen in training
    return out
