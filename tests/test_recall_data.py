"""Multi-query associative recall data: the sequences say what the task says, checked by
reading every sequence back position by position (not through the generator's own bookkeeping)."""

from __future__ import annotations

import pytest
import torch

from sparse_viz.data import RecallDataModule
from sparse_viz.errors import UserInputError
from sparse_viz.training.batches import masked_cross_entropy, split_batch

SETTINGS = [
    dict(vocab_size=64, num_pairs=8, num_queries=8, seq_len=128, placement="end"),
    dict(vocab_size=40, num_pairs=12, num_queries=5, seq_len=96, placement="random"),
    dict(vocab_size=9, num_pairs=4, num_queries=4, seq_len=15, placement="end"),  # no filler at all
]


def sequences(dm: RecallDataModule, split: str, n: int) -> list[dict]:
    data = dm.dataset(split)
    return [data[i] for i in range(n)]


@pytest.mark.parametrize("settings", SETTINGS)
def test_every_answer_is_the_value_paired_with_its_key_and_the_ground_truth_holds_both(settings):
    dm = RecallDataModule(**settings)
    N, Q = settings["num_pairs"], settings["num_queries"]
    for item in sequences(dm, "train", 20):
        tokens = item["tokens"].tolist()
        assert len(tokens) == settings["seq_len"] + 1
        pairs = {tokens[2 * i]: tokens[2 * i + 1] for i in range(N)}  # the first 2N tokens are the pairs
        assert len(pairs) == N and len(set(pairs.values())) == N  # distinct keys, distinct values
        answers = item["loss_mask"].nonzero().flatten().tolist()
        assert len(answers) == Q
        asked = [tokens[t] for t in answers]
        assert len(set(asked)) == Q  # Q distinct queried keys
        for t in answers:
            key = tokens[t]
            assert key in pairs and t >= 2 * N  # a query repeats an earlier key, after the pairs
            assert tokens[t + 1] == pairs[key]  # the target at t is the key's value
            key_pos, value_pos = item["ground_truth"][t].tolist()
            assert tokens[key_pos] == key and tokens[value_pos] == pairs[key]
            assert value_pos == key_pos + 1 and value_pos < t
        off = [t for t in range(settings["seq_len"]) if t not in answers]
        assert (item["ground_truth"][off] == -1).all()


@pytest.mark.parametrize("settings", SETTINGS)
def test_an_answer_appears_in_the_input_only_at_its_pair_before_it_is_due(settings):
    dm = RecallDataModule(**settings)
    for item in sequences(dm, "val", 20):
        tokens = item["tokens"].tolist()
        for t in item["loss_mask"].nonzero().flatten().tolist():
            answer, (_, value_pos) = tokens[t + 1], item["ground_truth"][t].tolist()
            # The model's input up to t is tokens[0..t]: the answer is only at its pair's value.
            assert [s for s in range(t + 1) if tokens[s] == answer] == [value_pos]


def test_end_placement_puts_every_query_after_the_filler_far_from_its_pair():
    dm = RecallDataModule(vocab_size=64, num_pairs=8, num_queries=8, seq_len=512)
    for item in sequences(dm, "train", 10):
        answers = item["loss_mask"].nonzero().flatten().tolist()
        assert answers == list(range(513 - 16, 513, 2))
        distances = [t - item["ground_truth"][t, 1].item() for t in answers]
        assert min(distances) > 32 * 10  # beyond any local window the baselines get (k <= 32)
        assert (item["tokens"][16 : 513 - 16] == 0).all()  # filler between pairs and queries


def test_same_seed_gives_the_same_data_and_train_differs_from_validation():
    a, b = RecallDataModule(seq_len=64, seed=3), RecallDataModule(seq_len=64, seed=3)
    for split in ("train", "val"):
        for x, y in zip(sequences(a, split, 8), sequences(b, split, 8)):
            assert all(torch.equal(x[name], y[name]) for name in x)
    train = {tuple(s["tokens"].tolist()) for s in sequences(a, "train", 200)}
    val = {tuple(s["tokens"].tolist()) for s in sequences(a, "val", 200)}
    assert not train & val
    other = {tuple(s["tokens"].tolist()) for s in sequences(RecallDataModule(seq_len=64, seed=4), "train", 200)}
    assert other != train
    assert torch.equal(a.probe_batch(), torch.stack([s["tokens"] for s in sequences(a, "val", a.probe_size)]))


def test_batches_are_dicts_with_a_mask_and_the_loss_counts_only_the_answers():
    dm = RecallDataModule(vocab_size=32, num_pairs=4, num_queries=3, seq_len=32, batch_size=5)
    batch = next(iter(dm.train_dataloader()))
    inputs, targets, mask = split_batch(batch)
    assert inputs.shape == targets.shape == mask.shape == (5, 32)
    assert batch["ground_truth"].shape == (5, 32, 2)
    logits = torch.randn(5, 32, 32)
    loss, count = masked_cross_entropy(logits, targets, mask)
    expected = [torch.nn.functional.cross_entropy(logits[b, t], targets[b, t])
                for b in range(5) for t in range(32) if mask[b, t]]
    assert count == 15 and loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    # A text batch (a plain tensor) still counts every position.
    text = torch.randint(0, 32, (2, 9))
    loss, count = masked_cross_entropy(logits[:2, :8], *split_batch(text)[1:])
    assert count == 16
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[:2, :8].flatten(0, 1), text[:, 1:].flatten()).item(), rel=1e-5)


@pytest.mark.parametrize("settings, fragment", [
    (dict(vocab_size=16, num_pairs=8), "num_pairs=8"),  # 7 key ids
    (dict(num_pairs=8, num_queries=8, seq_len=30), "too short"),
    (dict(num_pairs=4, num_queries=5), "num_queries"),
    (dict(placement="middle"), "placement"),
])
def test_impossible_tasks_are_user_errors(settings, fragment):
    with pytest.raises(UserInputError, match=fragment):
        RecallDataModule(**settings)


def test_a_curriculum_draws_the_first_batches_at_its_lengths_then_the_full_one():
    """[[16, 3], [24, 2]] with 20 sequences of batch 4 (5 batches an epoch): batches 0-2 at T = 16,
    3-4 at T = 24, every later one (the second epoch on) at 40; validation always at 40."""
    dm = RecallDataModule(vocab_size=32, num_pairs=4, num_queries=2, seq_len=40, batch_size=4, train_size=20,
                          val_size=8, curriculum=[[16, 3], [24, 2]])
    loader = dm.train_dataloader()
    lengths = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        lengths += [batch["tokens"].shape[1] - 1 for batch in loader]
    assert lengths == [16, 16, 16, 24, 24] + [40] * 5
    assert {batch["tokens"].shape[1] - 1 for batch in dm.val_dataloader()} == {40}
    assert dm.probe_batch().shape[1] == 41


def test_a_short_curriculum_sequence_is_a_whole_task_of_its_length():
    """The pairs, queries and ground truth of a T = 16 item obey the task at T = 16 (queries in
    its last tokens, answers their pairs' values), not a cut of a T = 40 sequence."""
    dm = RecallDataModule(vocab_size=32, num_pairs=4, num_queries=2, seq_len=40, curriculum=[[16, 1]])
    item = dm.dataset("train")[(5, 0)]
    tokens = item["tokens"]
    assert tokens.shape == (17,) and item["loss_mask"].shape == (16,)
    answers = item["loss_mask"].nonzero().flatten().tolist()
    assert answers == [13, 15]
    for t in answers:
        key, value = item["ground_truth"][t].tolist()
        assert tokens[key] == tokens[t] and tokens[value] == tokens[t + 1] and value == key + 1
    assert torch.equal(dm.dataset("train")[(5, 7)]["tokens"], dm.dataset("train")[5]["tokens"])  # after it: full length


@pytest.mark.parametrize("curriculum, fragment", [
    ([[16]], r"\[seq_len, batches\]"),
    ([[16, 0]], "batches must be > 0"),
    ([[80, 5]], "seq_len must be in"),
    ([[8, 5]], "too short"),
])
def test_a_curriculum_that_cannot_be_followed_is_a_user_error(curriculum, fragment):
    with pytest.raises(UserInputError, match=fragment):
        RecallDataModule(vocab_size=32, num_pairs=4, num_queries=2, seq_len=40, curriculum=curriculum)
