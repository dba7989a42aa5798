"""Byte-level BPE tokenizer: trained with `tokenizers` on the train split, or loaded from a file.

Byte-level means every string is representable (256 base symbols, no unknown token), so the
smallest useful vocabulary is 256 + the special tokens. Documents are joined with
`END_OF_TEXT` when packed, so a sequence can span two documents and the model sees where one
ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparse_viz.data.cache import write_atomic
from sparse_viz.errors import UserInputError

END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT,)
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`.

    Args:
        texts: the training documents (the train split only: never validation text).
        vocab_size: the largest vocabulary wanted, >= `MIN_VOCAB_SIZE`. A small corpus may
            stop with fewer merges; the real size is `tokenizer.get_vocab_size()`.

    Returns:
        The trained tokenizer, with `END_OF_TEXT` as id 0.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserInputError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{BYTE_ALPHABET_SIZE} bytes + {len(SPECIAL_TOKENS)} special token(s) = {MIN_VOCAB_SIZE}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json`; it must know `END_OF_TEXT` (the document separator)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(f"tokenizer file does not exist: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises plain Exception for any bad JSON
        raise UserInputError(f"tokenizer file {path} is not a valid tokenizer.json: {error}") from None
    if tokenizer.token_to_id(END_OF_TEXT) is None:
        raise UserInputError(f"tokenizer file {path} has no {END_OF_TEXT} token (the document separator)")
    return tokenizer


def save_tokenizer_atomic(tokenizer: Tokenizer, path: Path) -> Path:
    """Write `tokenizer` as JSON at `path` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(tokenizer.to_str(), encoding="utf-8"))


def token_strings(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The display text of each id: its bytes decoded as UTF-8 (a partial character shows as �).

    Special tokens keep their name (`<|endoftext|>`); an id outside the vocabulary raises
    `UserInputError`.
    """
    size = tokenizer.get_vocab_size()
    strings = []
    for token_id in ids:
        token_id = int(token_id)
        if not 0 <= token_id < size:
            raise UserInputError(f"token id {token_id} is outside the vocabulary [0, {size})")
        strings.append(tokenizer.decode([token_id], skip_special_tokens=False))
    return strings
