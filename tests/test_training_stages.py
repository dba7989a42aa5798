"""The stage schedule: which stage a step is in, and its learning rates (hand-computed)."""

import math

import pytest

from sparse_viz.training.stages import Schedule, Stage


def make_schedule():
    return Schedule([
        Stage("dense", steps=10, lr=1.0, indexer_lr=0.5, warmup_steps=2, min_lr_ratio=0.0),
        Stage("warmup", steps=5, lr=9.0, indexer_lr=0.2, min_lr_ratio=0.0),
        Stage("sparse", steps=4, lr=2.0, indexer_lr=0.1, min_lr_ratio=0.5),
    ])


def test_steps_map_to_stages_and_the_last_stage_holds_past_the_end():
    schedule = make_schedule()
    assert schedule.total_steps == 19
    names = [schedule.locate(step)[1].name for step in range(22)]
    assert names == ["dense"] * 10 + ["warmup"] * 5 + ["sparse"] * 7
    assert schedule.locate(12) == (1, schedule.stages[1], 2)


def test_learning_rates_ramp_then_follow_a_cosine():
    schedule = make_schedule()
    assert schedule.learning_rates(0) == (0.5, 0.25)  # ramp: (0 + 1) / 2 of the peaks
    assert schedule.learning_rates(1) == (1.0, 0.5)
    # step 6 of dense: progress (6 - 2) / 8 = 0.5 -> cosine factor 0.5
    main, indexer = schedule.learning_rates(6)
    assert main == pytest.approx(0.5) and indexer == pytest.approx(0.25)


def test_warmup_freezes_the_main_model():
    schedule = make_schedule()
    main, indexer = schedule.learning_rates(10)
    assert main == 0.0 and indexer == pytest.approx(0.2)


def test_cosine_floor_is_min_lr_ratio():
    schedule = make_schedule()
    main, _ = schedule.learning_rates(18)  # last sparse step, progress 3/4
    expected = 2.0 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert main == pytest.approx(expected)


def test_stage_modes_follow_the_deepseek_recipe():
    dense, warmup, sparse = make_schedule().stages
    assert (dense.attention, dense.indexer_loss, dense.trains_main) == ("dense", "all", True)
    assert (warmup.attention, warmup.indexer_loss, warmup.trains_main) == ("dense", "all", False)
    assert (sparse.attention, sparse.indexer_loss, sparse.trains_main) == ("sparse", "selected", True)
    assert Stage("dense", steps=3, train_indexer=False).indexer_loss is None


@pytest.mark.parametrize(
    "stage, message",
    [
        (Stage("sprase", steps=3), "unknown stage"),
        (Stage("dense", steps=0), "steps must be > 0"),
        (Stage("dense", steps=3, warmup_steps=4), "warmup_steps"),
    ],
)
def test_bad_stages_are_rejected(stage, message):
    with pytest.raises(ValueError, match=message):
        Schedule([stage])
