"""SLURM preemption: checkpoint at the next step boundary, then requeue the job.

Lightning's own auto-requeue saves ``hpc_ckpt_<n>.ckpt`` from inside the SIGUSR1 handler, that
is wherever the signal lands: an automatic-optimization step caught between ``optimizer.step()``
and the loop's counters is saved with the new weights and the old step count, and the resumed
run applies that batch twice; a step that changes the weights in place and restores them is
saved half-done (the federated module guards its full fine-tuning rounds itself, see
``FederatedLoRAModule.on_save_checkpoint``; a user's module may not).

This callback replaces that handler while training runs and writes the same file at the next
step boundary (``callbacks/step_boundary_signal.py``). The requeued job resumes from it as
before: with ``ckpt_path`` unset, Lightning looks for ``hpc_ckpt_*`` in ``default_root_dir``.

``mlo`` adds it to every run (``slurm_requeue.*`` arguments); outside SLURM, or with
``SLURMEnvironment(auto_requeue=False)``, it does nothing.
"""

from __future__ import annotations

import os
import subprocess

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.export import non_finite_on_any_rank
from callbacks.step_boundary_signal import StepBoundarySignal


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


class SlurmRequeue(StepBoundarySignal):
    """Save ``hpc_ckpt_<n>.ckpt`` at a step boundary after SLURM's requeue signal, then requeue.

    Args:
        check_every_n_steps: ranks agree on whether the signal arrived (one all-reduce of a
            flag) only at steps divisible by this, to spare that sync when steps are very
            short. N steps must take well under the warning time of ``#SBATCH --signal``
            (90 s in ``configs/slurm``).
    """

    config_name = "slurm_requeue"

    def __init__(self, check_every_n_steps: int = 1) -> None:
        super().__init__(check_every_n_steps)

    def signals_to_answer(self, trainer: L.Trainer) -> tuple[int, ...]:
        """SLURM's requeue signal when Lightning would auto-requeue."""
        # Lightning reads the environment from here too (its _SignalConnector).
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            return (environment.requeue_signal,)
        return ()

    def act(self, trainer: L.Trainer, signals: list[int]) -> None:
        for logger in trainer.loggers:
            logger.save()
        # The file name Lightning's resume looks for (``hpc_ckpt_<max + 1>.ckpt``).
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        if non_finite_on_any_rank(trainer, trainer.lightning_module):
            # The requeued job would resume the NaN weights, and be preempted again, forever.
            rank_zero_warn(
                f"SLURM requeue signal at step {trainer.global_step}: the trainable weights are "
                "not finite (the run diverged): no hpc checkpoint written and the job is not "
                "requeued; its earlier checkpoints stand"
            )
            return
        trainer.save_checkpoint(path)
        rank_zero_info(f"SLURM requeue signal: saved {path} at step {trainer.global_step}")
        if trainer.is_global_zero:
            requeue_slurm_job(slurm_job_id())
