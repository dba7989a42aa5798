"""A training run prints what matters: Lightning's promotional tips and the deprecation warning
its pytree helper triggers are silenced, and nothing else is."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import torch
from lightning.pytorch.utilities._pytree import _tree_flatten

from sparse_viz.training.quiet import silence_third_party_notices


def _trainer_log(caplog) -> list[str]:
    """What Lightning logs while building a Trainer (it logs its tips there)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return [record.getMessage() for record in caplog.records]


def test_lightning_tips_are_dropped_and_its_other_messages_kept(caplog):
    silence_third_party_notices()
    silence_third_party_notices()  # idempotent
    messages = _trainer_log(caplog)
    assert not [m for m in messages if "Tip" in m or "litlogger" in m or "litmodels" in m], messages
    assert any("GPU available" in m for m in messages)  # Lightning's own hardware line still shows
    assert len([f for f in logging.getLogger("lightning.pytorch.utilities.rank_zero").filters]) == 1


def test_the_pytree_deprecation_is_silenced_and_other_warnings_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_third_party_notices()
        _tree_flatten({"a": torch.ones(1), "b": [1, 2]})  # Lightning's helper: triggers it in torch >= 2.10
        warnings.warn("an unrelated FutureWarning", FutureWarning)
    messages = [str(w.message) for w in caught]
    assert messages == ["an unrelated FutureWarning"]
