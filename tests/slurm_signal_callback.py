"""Test helper for the ``mlo fit`` subprocess tests: a callback that sends this process a signal
(SLURM's requeue signal by default, as ``#SBATCH --signal`` does to every task; SIGTERM; SIGINT
as a Ctrl-C) in training step ``step``, from the hook named by ``hook``, on one rank or on all
(imported by class path from ``mlo fit`` subprocesses)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    def __init__(
        self,
        step: int,
        signal_name: str = "SIGUSR1",
        hook: str = "on_train_batch_start",
        rank: int | None = None,
    ) -> None:
        self.step, self.signal_name, self.rank = step, signal_name, rank
        setattr(self, hook, self._signal)

    def _signal(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal_name))
