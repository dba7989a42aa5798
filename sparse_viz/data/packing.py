"""Token streams and packed fixed-length sequences.

A split is tokenized into one stream: each document's ids followed by the end-of-text id.
The stream is cut into non-overlapping windows of `seq_len + 1` tokens (the tail that does not
fill a window is dropped), so `window[:-1]` are the inputs and `window[1:]` the targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

UINT16_LIMIT = 2**16


def stream_dtype(vocab_size: int) -> np.dtype:
    """Smallest storage for ids below `vocab_size`: uint16 when it fits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_LIMIT else np.dtype(np.int32)


def tokenize_documents(tokenizer: Tokenizer, texts: Sequence[str], end_of_text_id: int) -> np.ndarray:
    """Encode documents into one stream, each followed by `end_of_text_id`.

    Args:
        tokenizer: the tokenizer.
        texts: the documents of one split, in order.
        end_of_text_id: the separator id appended after every document.

    Returns:
        np.ndarray (N,) of dtype `stream_dtype(vocab)`: all ids in order.
    """
    dtype = stream_dtype(tokenizer.get_vocab_size())
    pieces = []
    for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        pieces.append(np.asarray(encoding.ids, dtype=dtype))
        pieces.append(np.asarray([end_of_text_id], dtype=dtype))
    if not pieces:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(pieces)


def pack_sequences(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a stream into non-overlapping windows of `seq_len + 1` tokens.

    Args:
        stream: (N,) token ids.
        seq_len: model input length; each window has one more token for the shifted target.

    Returns:
        np.ndarray (N // (seq_len + 1), seq_len + 1), a view of `stream` (the ragged tail is
        dropped).
    """
    window = seq_len + 1
    n_sequences = len(stream) // window
    return stream[: n_sequences * window].reshape(n_sequences, window)  # (S, seq_len + 1)


class PackedSequences(Dataset):
    """Rows of a packed array as LongTensors (seq_len + 1,)."""

    def __init__(self, sequences: np.ndarray) -> None:
        self.sequences = sequences  # (S, seq_len + 1), uint16 or int32

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.sequences[index].astype(np.int64))  # (seq_len + 1,)
