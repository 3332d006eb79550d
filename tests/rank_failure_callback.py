"""Test helper for tests/test_checkpoint_ddp.py: a callback that raises on one rank only, at the
start of one training step, as a data error or an out-of-memory on one GPU would (imported by
class path from ``mlo fit`` subprocesses)."""

from __future__ import annotations

import lightning as L


class RaiseOnRank(L.Callback):
    def __init__(self, rank: int = 1, step: int = 2) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"failure on rank {self.rank} only")
