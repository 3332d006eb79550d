"""Logging from callbacks that write to the loggers themselves (text, figures, scalars computed
outside Lightning's ``self.log``): on Lightning's x-axis, and visible to other callbacks."""

from __future__ import annotations

import lightning as L
import torch


def lightning_log_step(trainer: L.Trainer) -> int:
    """The step Lightning plots the current weights' metrics at.

    Lightning logs a step's loss, and the validation after it, at the 0-based index of that
    optimizer step, ``global_step - 1`` (0 before any step, and in a standalone validate or
    test). Text and figures of the same moment logged at ``global_step`` sat one step to the
    right of the scalars they belong to.
    """
    return max(trainer.global_step - 1, 0)


def log_scalars(trainer: L.Trainer, scalars: dict[str, float], step: int) -> None:
    """Send ``scalars`` to every logger at ``step`` and put them in ``trainer.callback_metrics``,
    where ``self.log`` puts module metrics: ``metrics.json`` and checkpoint monitors see them."""
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in scalars.items()})
