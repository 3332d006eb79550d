"""Weighted means for validation/test metrics that are exact over any number of processes."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric


def weighted_mean() -> MeanMetric:
    """A ``MeanMetric`` whose weighted sums are all-reduced at epoch end.

    NaN ``nan_strategy``: a diverged (NaN) value must reach checkpoint monitors, not be dropped
    with a warning (torchmetrics' default). Its states are not saved in checkpoints.
    """
    return MeanMetric(nan_strategy=float("nan"))


def update_weighted(metric: MeanMetric, value: torch.Tensor, weight: torch.Tensor | int) -> None:
    """Add ``value`` with ``weight`` (0 adds nothing), accumulating in the dtype Lightning's own
    epoch mean would use: the default dtype, promoted by the value's (float64 under 64-true)."""
    dtype = torch.promote_types(torch.get_default_dtype(), value.dtype)
    if metric.dtype != dtype:
        metric.set_dtype(dtype)
    metric.update(value.detach(), weight=weight)
