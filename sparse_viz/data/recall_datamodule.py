"""`RecallDataModule`: multi-query associative recall generated on the fly, with ground truth.

    python -m sparse_viz.train --config configs/train/recall.yaml
    python -m sparse_viz.train --data sparse_viz.data.RecallDataModule --data.num_pairs=16 ...

Sequence i of a split is drawn from `numpy.random.default_rng([seed, split, i])`: the same seed
gives the same data in any order and on any worker, and the train (split 0) and validation
(split 1) streams are independent draws (a shared sequence has probability ~ 0 for any useful
task size, and the tests check that the streams differ).

Batches are dicts (`sparse_viz.training.batches` reads both these and plain text tensors):
    tokens        (B, seq_len + 1) long   inputs tokens[:, :-1], targets tokens[:, 1:]
    loss_mask     (B, seq_len) bool       the answer positions: the loss counts only there
    ground_truth  (B, seq_len, 2) long    [key position, value position] of the answer's pair,
                                          -1 at the other positions
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sparse_viz.data.recall import FILLER_ID, RecallSpec, generate_example
from sparse_viz.data.resumable import train_loader, val_loader
from sparse_viz.errors import UserInputError

SPLITS = {"train": 0, "val": 1}


class RecallSequences(Dataset):
    """`size` MQAR sequences of one split, each generated from (seed, split, index) on access.

    With a length curriculum (`[(seq_len, batches), ...]`), items are asked for as
    `(index, batch_number)` (`train_loader(numbered=True)`): the first batches of training are
    drawn at the curriculum's shorter lengths, in order, and every later one at `spec.seq_len`.
    """

    def __init__(self, spec: RecallSpec, seed: int, split: str, size: int,
                 curriculum: Sequence[tuple[int, int]] = ()) -> None:
        self.spec, self.seed, self.split_id, self.size = spec, int(seed), SPLITS[split], int(size)
        self.curriculum = tuple((int(length), int(batches)) for length, batches in curriculum)

    def __len__(self) -> int:
        return self.size

    def seq_len_at(self, batch_number: int) -> int:
        """The sequence length of training batch `batch_number` (0-based)."""
        end = 0
        for length, batches in self.curriculum:
            end += batches
            if batch_number < end:
                return length
        return self.spec.seq_len

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, spec = item, self.spec
        if isinstance(item, tuple):
            index, batch_number = item
            spec = dataclasses.replace(spec, seq_len=self.seq_len_at(batch_number))
        if not 0 <= index < self.size:
            raise IndexError(index)
        example = generate_example(spec, np.random.default_rng([self.seed, self.split_id, int(index)]))
        return {
            "tokens": torch.from_numpy(example.tokens),
            "loss_mask": torch.from_numpy(example.loss_mask),
            "ground_truth": torch.from_numpy(example.ground_truth),
        }


class RecallDataModule(L.LightningDataModule):
    """MQAR sequences (see `sparse_viz.data.recall`) as a LightningDataModule.

    Args:
        vocab_size: ids of the task (filler, keys, values); the model is built with it.
        num_pairs: key-value pairs at the start of each sequence.
        num_queries: queries per sequence, each a distinct earlier key (<= num_pairs). Keep it
            below num_pairs: the answers of earlier queries are in the input, so with one query
            per pair the last ones can be answered by elimination, without finding the pair.
        seq_len: tokens the model sees per sequence.
        placement: `end` (queries in the last tokens, far from their pairs) or `random`.
        curriculum: `[[seq_len, batches], ...]`: train the first batches on shorter sequences
            (same pairs, queries and placement), in the order given, then on `seq_len`. A short
            batch costs a fraction of a long one, and recall learnt at a short length is regained
            at the full one in a few dozen steps (measured: experiments/recall). Validation and
            the probe always use `seq_len`.
            None or [] = none.
        batch_size: sequences per batch.
        train_size: sequences in the training stream (an epoch; generated, never stored).
        val_size: sequences in the validation stream.
        seed: seed of both streams.
        probe_size: sequences in `probe_batch()`, the first ones of validation.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        num_pairs: int = 8,
        num_queries: int = 4,
        seq_len: int = 512,
        placement: str = "end",
        curriculum: list[list[int]] | None = None,
        batch_size: int = 32,
        train_size: int = 1_000_000,
        val_size: int = 256,
        seed: int = 0,
        probe_size: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.spec = RecallSpec(vocab_size=int(vocab_size), num_pairs=int(num_pairs),
                               num_queries=int(num_queries), seq_len=int(seq_len), placement=placement)
        try:
            self.spec.validate()
        except ValueError as error:
            raise UserInputError(str(error)) from None
        self.curriculum = self._checked_curriculum(curriculum)
        for name, value in (("batch_size", batch_size), ("train_size", train_size), ("val_size", val_size),
                            ("probe_size", probe_size)):
            if int(value) <= 0:
                raise UserInputError(f"{name} must be > 0, got {value}")
        if probe_size > val_size:
            raise UserInputError(f"probe_size={probe_size} is larger than val_size={val_size}")
        if num_workers < 0:
            raise UserInputError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.seq_len = self.spec.seq_len
        self.batch_size = int(batch_size)
        self.train_size, self.val_size = int(train_size), int(val_size)
        self.seed = int(seed)
        self.probe_size = int(probe_size)
        self.num_workers = int(num_workers)

    def _checked_curriculum(self, curriculum) -> tuple[tuple[int, int], ...]:
        phases = []
        for phase in curriculum or ():
            if not isinstance(phase, (list, tuple)) or len(phase) != 2:
                raise UserInputError(f"curriculum entries are [seq_len, batches], got {phase!r}")
            length, batches = int(phase[0]), int(phase[1])
            if batches <= 0:
                raise UserInputError(f"curriculum entry {list(phase)}: batches must be > 0")
            if not 0 < length <= self.spec.seq_len:
                raise UserInputError(f"curriculum entry {list(phase)}: seq_len must be in [1, seq_len={self.spec.seq_len}]")
            try:
                dataclasses.replace(self.spec, seq_len=length).validate()
            except ValueError as error:
                raise UserInputError(f"curriculum entry {list(phase)}: {error}") from None
            phases.append((length, batches))
        return tuple(phases)

    # -- Lightning hooks (nothing to prepare: every sequence is generated on access) -------------
    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        pass

    def dataset(self, split: str) -> RecallSequences:
        if split == "train":
            return RecallSequences(self.spec, self.seed, split, self.train_size, self.curriculum)
        return RecallSequences(self.spec, self.seed, split, self.val_size)

    def train_dataloader(self) -> DataLoader:
        """Training sequences shuffled by `seed` + epoch, resumable mid-epoch and split across
        processes (`sparse_viz.data.resumable`); dict batches."""
        return train_loader(self.dataset("train"), batch_size=self.batch_size, seed=self.seed,
                            num_workers=self.num_workers, trainer=self.trainer, numbered=bool(self.curriculum))

    def val_dataloader(self) -> DataLoader:
        """Validation sequences in order, each on one process; dict batches."""
        return val_loader(self.dataset("val"), batch_size=self.batch_size, num_workers=self.num_workers,
                          trainer=self.trainer)

    # -- what the model and the callbacks read --------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing uniformly among the sequence's N values (the best a model that
        cannot find the pair does, once it knows the values present)."""
        return 1.0 / self.spec.num_pairs

    def _probe(self) -> dict[str, torch.Tensor]:
        items = [self.dataset("val")[i] for i in range(self.probe_size)]
        return {name: torch.stack([item[name] for item in items]) for name in items[0]}

    def probe_batch(self) -> torch.Tensor:
        """The first `probe_size` validation sequences: LongTensor (probe_size, seq_len + 1)."""
        return self._probe()["tokens"]

    def probe_ground_truth(self) -> dict[str, torch.Tensor]:
        """Of the same probe rows: `loss_mask` (P, seq_len) bool and `ground_truth`
        (P, seq_len, 2) long, [key position, value position] at the answer positions."""
        probe = self._probe()
        return {"loss_mask": probe["loss_mask"], "ground_truth": probe["ground_truth"]}

    def token_strings(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> list[str]:
        """Display text: `·` filler, `k<i>` keys, `v<j>` values."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = np.asarray(ids).reshape(-1).tolist()
        out = []
        for token in ids:
            token = int(token)
            if token == FILLER_ID:
                out.append("·")
            elif token < self.spec.first_value_id:
                out.append(f"k{token}")
            else:
                out.append(f"v{token - self.spec.first_value_id + 1}")
        return out

    def describe(self) -> dict:
        return {"task": "mqar", **{name: getattr(self.spec, name) for name in
                                   ("vocab_size", "num_pairs", "num_queries", "seq_len", "placement")},
                "curriculum": [list(phase) for phase in self.curriculum],
                "seed": self.seed, "train_size": self.train_size, "val_size": self.val_size}
