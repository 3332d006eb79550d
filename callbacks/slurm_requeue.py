"""SLURM preemption: checkpoint at the next step boundary, then requeue the job.

Lightning's own auto-requeue saves ``hpc_ckpt_<n>.ckpt`` from inside the SIGUSR1 handler, that
is wherever the signal lands. An automatic-optimization step caught between ``optimizer.step()``
and the loop's counters is saved with the new weights and the old step count, and the resumed
run applies that batch twice. A step that changes the weights in place and restores them is
saved half-done (the federated module guards its full fine-tuning rounds itself, see
``FederatedLoRAModule.on_save_checkpoint``; a user's module may not).

This callback takes the signal first (Lightning installs no handler of its own on a signal that
already has one), only records it, and writes the same file at the end of the next training
batch that stepped an optimizer, or of the next validation, where Lightning's loops also save
their resumable checkpoints (``ModelCheckpoint``). The requeued job resumes from it as before:
with ``ckpt_path`` unset, Lightning looks for ``hpc_ckpt_*`` in ``default_root_dir``.

``mlo`` adds it to every run (``slurm_requeue.*`` arguments); outside SLURM, or with
``SLURMEnvironment(auto_requeue=False)``, it does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array jobs."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue_slurm_job(job_id: str) -> bool:
    """Run ``scontrol requeue job_id``; ``True`` on success, a warning naming the cause otherwise."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    except FileNotFoundError:
        rank_zero_warn(f"SLURM job {job_id} not requeued: no `scontrol` on PATH")
        return False
    if result.returncode != 0:
        rank_zero_warn(
            f"SLURM job {job_id} not requeued: `scontrol requeue` exited {result.returncode}: "
            f"{result.stderr.strip()}"
        )
        return False
    rank_zero_info(f"SLURM job {job_id} requeued")
    return True


class SlurmRequeue(L.Callback):
    """Save ``hpc_ckpt_<n>.ckpt`` at a step boundary after SLURM's requeue signal, then requeue.

    Args:
        check_every_n_steps: ranks agree on whether the signal arrived (one all-reduce of a
            flag) only at steps divisible by this, to spare that sync when steps are very
            short. N steps must take well under the warning time of ``#SBATCH --signal``
            (90 s in ``configs/slurm``).
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(
                f"slurm_requeue.check_every_n_steps must be >= 1, got {check_every_n_steps}"
            )
        self.check_every_n_steps = check_every_n_steps
        self.signal_received = False
        self._signum: int | None = None
        self._previous_handler: Any = None
        self._step_at_batch_start = 0

    def requeue_signal(self, trainer: L.Trainer) -> int | None:
        """The signal to answer: SLURM's requeue signal when Lightning would auto-requeue."""
        # Lightning reads the environment from here too (its _SignalConnector).
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            return environment.requeue_signal
        return None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._signum = self.requeue_signal(trainer)
        if self._signum is not None:
            self.signal_received = False
            self._previous_handler = signal.signal(self._signum, self._record_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signum is not None:
            signal.signal(self._signum, self._previous_handler)
            self._signum = None

    def _record_signal(self, signum: int, frame: FrameType | None) -> None:
        # Anything more here would run in the middle of whatever the process was doing.
        self.signal_received = True

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        stepped = trainer.global_step != self._step_at_batch_start
        if stepped and trainer.global_step % self.check_every_n_steps == 0:
            self._save_and_requeue_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save_and_requeue_if_signalled(trainer)

    def _save_and_requeue_if_signalled(self, trainer: L.Trainer) -> None:
        if self._signum is None:
            return
        # Ranks receive the signal at different moments: act only when every rank agrees to.
        if not trainer.strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        self.signal_received = False
        for logger in trainer.loggers:
            logger.save()
        # The file name Lightning's resume looks for (``hpc_ckpt_<max + 1>.ckpt``).
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        rank_zero_info(f"SLURM requeue signal: saved {path} at step {trainer.global_step}")
        if trainer.is_global_zero:
            requeue_slurm_job(slurm_job_id())
