"""Local early stopping of one federated client (``local_early_stopping``; official scripts).

The official scripts train each client with Hugging Face's ``Trainer``: evaluation every 50
steps, ``EarlyStoppingCallback(patience=3, threshold=1e-3)`` and ``load_best_model_at_end``.
``PatienceRule`` is that callback's decision on plain numbers; ``BestWeights`` keeps the
trainable tensors of the best evaluation so the client can end on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class PatienceRule:
    """Stop after ``patience`` evaluations that do not beat the best loss by more than
    ``min_delta`` (``EarlyStoppingCallback``, lower is better).

    The best loss itself moves on any improvement (``Trainer`` keeps the best metric that way),
    so several small gains below ``min_delta`` still count against the patience.
    """

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.count = 0

    def observe(self, loss: float) -> tuple[bool, bool]:
        """``(is the new best, stop now)`` after an evaluation with ``loss``."""
        significant = self.best is None or (loss < self.best and self.best - loss > self.min_delta)
        self.count = 0 if significant else self.count + 1
        is_best = self.best is None or loss < self.best
        if is_best:
            self.best = loss
        return is_best, self.count >= self.patience


class BestWeights:
    """A copy of ``tensors`` at the best evaluation, written back by ``restore``."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)
        self.copy: list[Tensor] | None = None

    @torch.no_grad()
    def save(self) -> None:
        if self.copy is None:
            self.copy = [t.detach().clone() for t in self.tensors]
        else:
            for saved, t in zip(self.copy, self.tensors, strict=True):
                saved.copy_(t)

    @torch.no_grad()
    def restore(self) -> None:
        if self.copy is not None:
            for t, saved in zip(self.tensors, self.copy, strict=True):
                t.copy_(saved)
