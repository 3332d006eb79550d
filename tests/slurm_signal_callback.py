"""Test helper for tests/test_slurm_multiprocess.py: a callback that sends this process SLURM's
requeue signal (or another one, e.g. SIGTERM) at the start of one training step, as ``#SBATCH
--signal`` does to every task (imported by class path from ``mlo fit`` subprocesses)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGUSR1") -> None:
        self.step, self.signal_name = step, signal_name

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
