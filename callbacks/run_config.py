"""Save the resolved config into the run directory, refusing to overwrite another run's files."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins.environments import SLURMEnvironment


class SaveRunConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback``, overwriting ``config.yaml`` only when a fit resumes.

    A run started with a fixed logger version (``version: demo``, or a run's own saved
    ``config.yaml``, which names its version) went into the earlier run's directory and replaced
    its ``config.yaml``, ``metrics.json`` and export while its ``last.ckpt`` stayed: the directory
    then described two runs. A fit that continues that run (``--ckpt_path``, or a requeued SLURM
    job) may write there; anything else is refused before any work, with the ways out.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn ("fit", ...)
        if not self.already_saved and self.save_to_log_dir:
            run_dir = Path(trainer.log_dir)  # broadcasts: every rank calls setup
            config_path = run_dir / self.config_filename
            exists = config_path.is_file() if trainer.is_global_zero else False
            if trainer.strategy.broadcast(exists) and not (
                stage == "fit" and self._resumes(trainer)
            ):
                raise RuntimeError(
                    f"{config_path} exists: this {stage} run would write into the directory of an "
                    "earlier run and replace its config.yaml, metrics.json and exports. Give it "
                    "its own directory (--trainer.logger.init_args.version=<name>, or =null for "
                    "the next free version_<n>) or delete the old one; to continue that run, "
                    f"pass its checkpoint: --ckpt_path {run_dir / 'checkpoints' / 'last.ckpt'}"
                )
        self.overwrite = True  # decided above
        super().setup(trainer, pl_module, stage)

    def _resumes(self, trainer: L.Trainer) -> bool:
        """Whether the fit continues that run: ``--ckpt_path`` (in the subcommand's config this
        callback holds), the ``hpc_ckpt_*`` Lightning resumes from in a requeued SLURM job (its
        own rule, ``_CheckpointConnector._parse_ckpt_path``), or a requeued job that has none
        (a node failure before any save: it starts over in its own directory, as before)."""
        if self.config.get("ckpt_path") is not None:
            return True
        if not SLURMEnvironment.detect():
            return False
        requeued = os.environ.get("SLURM_RESTART_COUNT", "0") != "0"
        return requeued or trainer._checkpoint_connector._hpc_resume_path is not None
