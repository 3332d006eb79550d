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


def accumulation_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """The dtype metric sums accumulate in: at least float32, float64 under ``64-true``.

    Under ``bf16-true``/``16-true`` Lightning casts the module, metric states included, to the
    half type and makes it the default dtype inside each step: the sums then kept 8 bits of
    mantissa (val/loss in steps of 1/16 near 8) or, in fp16, overflowed to inf past 65504
    (``mlo validate --trainer.precision=16-true`` reported val/loss=inf, exit 0).
    """
    return torch.promote_types(
        torch.promote_types(torch.get_default_dtype(), value_dtype), torch.float32
    )


def update_weighted(metric: MeanMetric, value: torch.Tensor, weight: torch.Tensor | int) -> None:
    """Add ``value`` with ``weight`` (0 adds nothing), accumulating in the dtype Lightning's own
    epoch mean would use: the default dtype, promoted by the value's (float64 under 64-true),
    and never below float32 (``accumulation_dtype``)."""
    dtype = accumulation_dtype(value.dtype)
    # the states' own dtype too: ``metric.dtype`` is that of the default dtype at the module's
    # last ``.to(device)``, not necessarily the one Lightning cast the states to
    if metric.dtype != dtype or metric.mean_value.dtype != dtype:
        metric.set_dtype(dtype)
    metric.update(value.detach(), weight=weight)
