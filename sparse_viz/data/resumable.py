"""Data loaders whose position is part of a checkpoint, and that shard themselves across processes.

Training order: epoch `e` visits the training set in the order a fresh
`DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed + e))` visits it (which
draws its workers' base seed from the generator, then a `randperm`). Epoch 0 is therefore the
order this project trained in before runs could resume, and every later epoch is a new
permutation that depends only on (seed, epoch). Across processes it is split as
`torch.utils.data.DistributedSampler` splits: padded to a multiple of the process count by
repeating its start, process `r` takes every `world_size`-th index from `r`.

A data set whose items depend on how far training has got (a length curriculum) asks for
numbered items: the sampler then yields `(index, batch_number)`, where batch_number counts this
process's training batches from the start of the run (epoch e, batch b of it:
e * batches_per_epoch + b), which a resumed run reproduces like the order itself.

The loader counts the batches it has handed out in the current epoch; Lightning saves that count
in every checkpoint (`state_dict`) and gives it back on resume (`load_state_dict`), and the
resumed epoch then starts at the next batch of the same permutation. So a run resumed at any
step sees exactly the batches an uninterrupted run sees.

Validation order: every sequence once, in order; process `r` of `world_size` takes indices
`r, r + world_size, ...` with no padding, so a sum over processes counts each sequence once.

Both samplers are `DistributedSampler`s, which tells Lightning not to replace them with its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The training order of epoch `epoch` (see the module docstring).

    Args:
        size: sequences in the training set.
        seed: the data module's seed.
        epoch: the epoch (0-based).

    Returns:
        A permutation of range(size).
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's worker base seed
    return torch.randperm(size, generator=generator).tolist()


class EpochShuffleSampler(DistributedSampler):
    """This process's share of `epoch_permutation(len(dataset), seed, epoch)`, able to start an
    epoch part-way.

    Args:
        dataset: the training set (only its length is used).
        seed: seed of every epoch's permutation.
        num_replicas: processes sharing the data (1 on a single device).
        rank: this process's index in [0, num_replicas).
        number_batches_of: None, or the batch size: then yield `(index, batch_number)` pairs
            (see the module docstring).
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0,
                 number_batches_of: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0  # indices of this process to leave out at the start of the next iteration
        self.number_batches_of = number_batches_of

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = epoch_permutation(len(self.dataset), self.seed, self.epoch)
        indices += indices[: self.total_size - len(indices)]  # DistributedSampler's padding
        indices = indices[self.rank : self.total_size : self.num_replicas]  # (num_samples,)
        skip, self.skip = self.skip, 0
        if self.number_batches_of is None:
            return iter(indices[skip:])
        size = self.number_batches_of
        first_batch = self.epoch * -(-self.num_samples // size)  # batches of the epochs before this one
        return ((index, first_batch + position // size) for position, index in enumerate(indices[skip:], start=skip))

    # __len__ stays the full epoch's share: Lightning sizes the epoch from it, and a resumed epoch
    # is the same epoch, only started later.


class ShardSampler(DistributedSampler):
    """Every index once, in order; process `rank` takes `rank, rank + num_replicas, ...`, unpadded.

    Args:
        dataset: the validation set (only its length is used).
        num_replicas: processes sharing the data.
        rank: this process's index.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self._indices = range(rank, len(dataset), num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


class ResumableDataLoader(DataLoader):
    """A training `DataLoader` over an `EpochShuffleSampler` that knows where it is in its epoch.

    `state_dict()` is `{"epoch", "batches", "world_size"}`: the epoch being iterated and how many
    batches of it this process has handed out. Lightning's data fetcher does not read ahead of
    the training step for a loader with a length, so that count is the number of batches trained
    on when a checkpoint is written at the end of a training batch. `load_state_dict` makes the
    next iteration of that epoch start at the following batch (an iteration of another epoch,
    e.g. when the checkpoint was the last batch of its epoch, starts at the beginning).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, sampler: EpochShuffleSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._position = {"epoch": sampler.epoch, "batches": 0}
        self._resume_at: dict[str, int] | None = None

    def __iter__(self):
        # A generator: nothing runs until the first batch is asked for, which Lightning does
        # after it has called the sampler's set_epoch for the epoch it is about to train.
        sampler = self.sampler
        start = 0
        if self._resume_at is not None and self._resume_at["epoch"] == sampler.epoch:
            start = self._resume_at["batches"]
        self._resume_at = None
        sampler.skip = start * self.batch_size
        self._position = {"epoch": sampler.epoch, "batches": start}
        for batch in super().__iter__():
            self._position["batches"] += 1  # counted before the consumer has it: a checkpoint
            yield batch  # written while it trains on this batch counts it as consumed

    def state_dict(self) -> dict[str, int]:
        """Where this process is: `{"epoch", "batches", "world_size"}`."""
        return {**self._position, "world_size": self.sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the saved epoch after its saved batch count (see the class docstring)."""
        batches = int(state["batches"])
        saved_world = int(state.get("world_size", 1))
        world = self.sampler.num_replicas
        if saved_world != world:
            # Same permutation, so continue at the same share of it; the split differs, so the
            # batches are not those an uninterrupted run with either process count would see.
            warnings.warn(f"resuming with {world} process(es) a run checkpointed with {saved_world}: the data "
                          "order continues at the same point of the epoch, but not batch for batch", stacklevel=2)
            batches = batches * saved_world // world
        self._resume_at = {"epoch": int(state["epoch"]), "batches": batches}
        self.sampler.set_epoch(int(state["epoch"]))


def _process_group(trainer: Any) -> tuple[int, int]:
    """(world_size, global_rank) of the trainer the data module is attached to, (1, 0) without one."""
    if trainer is None:
        return 1, 0
    return int(trainer.world_size), int(trainer.global_rank)


def train_loader(dataset: Dataset, *, batch_size: int, seed: int, num_workers: int, trainer: Any = None,
                 numbered: bool = False) -> ResumableDataLoader:
    """The training loader of a data module: shuffled by `seed` + epoch, sharded, resumable.

    Args:
        dataset: the training set.
        batch_size: sequences per batch and process.
        seed: seed of the order.
        num_workers: DataLoader worker processes.
        trainer: the Lightning trainer the data module is attached to (None outside a trainer).
        numbered: ask the data set for `dataset[(index, batch_number)]` (module docstring).

    Returns:
        A `ResumableDataLoader` over an `EpochShuffleSampler` for this process.
    """
    world, rank = _process_group(trainer)
    sampler = EpochShuffleSampler(dataset, seed=seed, num_replicas=world, rank=rank,
                                  number_batches_of=batch_size if numbered else None)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                               persistent_workers=num_workers > 0)


def val_loader(dataset: Dataset, *, batch_size: int, num_workers: int, trainer: Any = None) -> DataLoader:
    """The validation loader of a data module: in order, each sequence on exactly one process.

    Args:
        dataset: the validation set.
        batch_size: sequences per batch.
        num_workers: DataLoader worker processes.
        trainer: the Lightning trainer the data module is attached to (None outside a trainer).

    Returns:
        A `DataLoader` over a `ShardSampler` for this process.
    """
    world, rank = _process_group(trainer)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(dataset, num_replicas=world, rank=rank),
                      num_workers=num_workers, persistent_workers=num_workers > 0)
