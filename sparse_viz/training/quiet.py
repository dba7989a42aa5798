"""Silence third-party notices that every training run would print and that say nothing about
the run: Lightning's promotional tips (litlogger, litmodels) and the deprecation warning that
Lightning's own pytree helper triggers in recent torch (Lightning's code, not ours to fix).

Only these exact messages are dropped; every other log line and warning passes unchanged.
"""

from __future__ import annotations

import logging
import warnings

# Lightning logs its tips through rank_zero_info on this logger.
LIGHTNING_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
TIP_PREFIX = "💡 Tip:"
PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing ..." records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(TIP_PREFIX)


def silence_third_party_notices() -> None:
    """Install the log filter and the warning filter (idempotent: a second call adds nothing)."""
    logger = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION)
