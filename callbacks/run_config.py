"""The run directory: reserved atomically for each run, and the resolved config saved into it
without overwriting another run's files."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def reserve_next_version(logger: Logger) -> None:
    """Create the logger's next ``version_<n>`` directory atomically and pin the logger to it.

    Lightning picks the next free version by listing the directory. Runs started together (a
    SLURM array job, a sweep) listed it at the same moment and took the same version: all but
    one then stopped (``SaveRunConfig``), and their event files had gone into the other's
    directory. ``mkdir`` fails for all but one process that tries a name, so each run takes the
    first name it could create. Only for a logger whose version is unset (a config's
    ``version`` is kept) with numbered versions on a local path (TensorBoard, CSV), and only in
    the first process of a job: other ranks learn the directory from rank 0 as before
    (``trainer.log_dir`` and ``ModelCheckpoint`` broadcast it).
    """
    first_process = rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"
    # Lightning's loggers keep an unresolved version as ``_version = None``.
    unset = getattr(logger, "_version", "") is None and hasattr(logger, "_get_next_version")
    root = getattr(logger, "root_dir", None)
    if not (first_process and unset and root) or "://" in str(root):
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    version = logger._get_next_version()
    while True:
        try:
            (Path(root) / f"version_{version}").mkdir()
        except FileExistsError:
            version += 1  # another run created it since the listing
            continue
        logger._version = version
        return


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
