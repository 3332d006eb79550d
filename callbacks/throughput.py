"""Training throughput in tokens per second, logged to TensorBoard and kept for benchmarks."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class TokenThroughput(L.Callback):
    """Log ``perf/tokens_per_s`` (this process) every ``log_every_n_steps`` training batches.

    Each batch is timed from the end of the previous batch to the end of this one, so data
    loading, forward/backward, the optimizer, logging and callbacks all count. Validation runs
    in between are excluded.

    Args:
        log_every_n_steps: batches per logged measurement.
    """

    def __init__(self, log_every_n_steps: int = 10) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.batch_seconds: list[float] = []
        self.batch_tokens: list[int] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()  # restart the clock after a validation interruption

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        if self._last is not None and isinstance(ids, torch.Tensor):
            self.batch_seconds.append(now - self._last)
            self.batch_tokens.append(int(ids.numel()))
            n = self.log_every_n_steps
            if len(self.batch_seconds) % n == 0:
                rate = sum(self.batch_tokens[-n:]) / sum(self.batch_seconds[-n:])
                pl_module.log("perf/tokens_per_s", rate, on_step=True, on_epoch=False)
        self._last = now

    def tokens_per_second(self, skip_first: int = 0) -> float:
        """Mean throughput over the recorded batches after the first ``skip_first``."""
        seconds = sum(self.batch_seconds[skip_first:])
        return sum(self.batch_tokens[skip_first:]) / seconds if seconds else float("nan")
