"""`sparse_viz.data.resumable`: the training order, its resumption part-way through an epoch, and
the validation split across processes. References: torch's own shuffling `DataLoader` (the order
of each epoch), `DistributedSampler`'s rule for splitting it (pad by repeating the start, every
world-th index), plain `range`s."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sparse_viz.data.resumable import train_loader, val_loader

N, BATCH, SEED = 37, 4, 5  # 37 sequences: the last batch of an epoch is partial, and 2 processes need padding


def dataset() -> TensorDataset:
    return TensorDataset(torch.arange(N))


def reference_order(epoch: int, world: int = 1, rank: int = 0) -> list[int]:
    """A fresh shuffling DataLoader seeded `SEED + epoch` (for epoch 0: the loader the data
    modules used before), split across `world` processes as DistributedSampler splits."""
    loader = DataLoader(dataset(), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED + epoch))
    order = flat(loader)
    padded = order + order[: -len(order) % world or 0]
    return padded[rank::world]


def flat(batches) -> list[int]:
    return [int(i) for (batch,) in batches for i in batch]


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 0), (2, 1)])
def test_every_epoch_is_a_fresh_loaders_order_for_seed_plus_epoch_split_across_processes(world, rank):
    class FakeTrainer:
        world_size, global_rank = world, rank

    loader = train_loader(dataset(), batch_size=BATCH, seed=SEED, num_workers=0, trainer=FakeTrainer())
    orders = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        orders.append(flat(loader))
        assert orders[-1] == reference_order(epoch, world, rank), epoch
    assert orders[0] != orders[1]  # a new order each epoch
    if world == 1:
        assert sorted(orders[0]) == list(range(N))


@pytest.mark.parametrize("stop_after", [1, 5, 9, 10])  # 10 batches an epoch: 10 = the epoch's last batch
def test_a_loader_restored_from_state_dict_continues_with_the_next_batch(stop_after):
    first = train_loader(dataset(), batch_size=BATCH, seed=SEED, num_workers=0)
    first.sampler.set_epoch(2)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(stop_after)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": stop_after, "world_size": 1}

    resumed = train_loader(dataset(), batch_size=BATCH, seed=SEED, num_workers=0)
    resumed.load_state_dict(state)
    assert resumed.sampler.epoch == 2
    rest = list(resumed)
    assert flat(seen) + flat(rest) == reference_order(2)  # nothing repeated, nothing skipped
    assert resumed.state_dict()["batches"] == len(first) == 10
    # the next epoch starts from its beginning
    resumed.sampler.set_epoch(3)
    assert flat(resumed) == reference_order(3)


def test_a_saved_position_of_another_epoch_is_not_applied():
    loader = train_loader(dataset(), batch_size=BATCH, seed=SEED, num_workers=0)
    loader.load_state_dict({"epoch": 1, "batches": 10, "world_size": 1})  # the last batch of epoch 1
    loader.sampler.set_epoch(2)  # what Lightning does when it resumes into the next epoch
    assert flat(loader) == reference_order(2)


def test_resuming_with_a_worker_process_gives_the_same_batches():
    loader = train_loader(dataset(), batch_size=BATCH, seed=SEED, num_workers=1)
    loader.load_state_dict({"epoch": 0, "batches": 3, "world_size": 1})
    assert flat(loader) == reference_order(0)[3 * BATCH:]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_visits_every_sequence_once_across_processes(world):
    class FakeTrainer:
        world_size = world

    seen = []
    for rank in range(world):
        FakeTrainer.global_rank = rank
        seen += flat(val_loader(dataset(), batch_size=BATCH, num_workers=0, trainer=FakeTrainer()))
    assert sorted(seen) == list(range(N))
    assert flat(val_loader(dataset(), batch_size=BATCH, num_workers=0)) == list(range(N))  # in order


class Numbered(torch.utils.data.Dataset):
    """Hands back what it is asked for, to see the (index, batch_number) items themselves."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, item):
        index, batch_number = item
        return torch.tensor([index, batch_number])


def numbered_pairs(batches) -> list[tuple[int, int]]:
    return [tuple(row.tolist()) for batch in batches for row in batch]


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
def test_numbered_items_carry_the_count_of_training_batches_since_the_run_began(world, rank):
    """Items are (index of the reference order, this process's batch number counted across
    epochs): 10 batches an epoch for one process (37 / 4), 5 for each of two (19 / 4)."""
    class FakeTrainer:
        world_size, global_rank = world, rank

    loader = train_loader(Numbered(), batch_size=BATCH, seed=SEED, num_workers=0, trainer=FakeTrainer(), numbered=True)
    per_epoch = len(loader)
    assert per_epoch == {1: 10, 2: 5}[world]
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        pairs = numbered_pairs(loader)
        order = reference_order(epoch, world, rank)
        assert [index for index, _ in pairs] == order
        assert [number for _, number in pairs] == [epoch * per_epoch + position // BATCH for position in range(len(order))]


def test_a_resumed_numbered_loader_continues_the_count():
    first = train_loader(Numbered(), batch_size=BATCH, seed=SEED, num_workers=0, numbered=True)
    first.sampler.set_epoch(1)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(3)]
    resumed = train_loader(Numbered(), batch_size=BATCH, seed=SEED, num_workers=0, numbered=True)
    resumed.load_state_dict(first.state_dict())
    pairs = numbered_pairs(seen) + numbered_pairs(resumed)
    assert [number for _, number in pairs] == [10 + position // BATCH for position in range(N)]
    assert [index for index, _ in pairs] == reference_order(1)
