"""Write the final ``trainer.callback_metrics`` as ``metrics.json`` in the run's log directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from callbacks.json_values import strict_json
from strategies.fsdp import sharded_checkpoint_meta


def log_dir_of(trainer: L.Trainer) -> Path:
    """The run's log directory (the logger's version folder, else ``default_root_dir``).

    Same answer as ``trainer.log_dir`` without its broadcast, so rank-zero-only code may call it.
    """
    logger = trainer.logger
    if logger is not None:
        directory = getattr(logger, "log_dir", None) or logger.save_dir
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


def skipped_in_fast_dev_run(trainer: L.Trainer, what: str) -> bool:
    """True (said once) under ``trainer.fast_dev_run``: like Lightning's logs and checkpoints,
    the run's files are not written. Without a logger they landed in ``default_root_dir`` (the
    working directory by default), over the previous dev run's."""
    if not trainer.fast_dev_run:
        return False
    rank_zero_info(f"fast_dev_run: {what} not written")
    return True


def checkpoint_step(path: str | Path) -> int | None:
    """``global_step`` saved in a local checkpoint file or sharded checkpoint directory
    (memory-mapped: no tensor is read)."""
    path = sharded_checkpoint_meta(path) or path
    if not Path(path).is_file():
        return None  # a remote URL
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) format or custom objects: a missing step, not a crash
        return None
    step = checkpoint.get("global_step")
    return int(step) if step is not None else None


class MetricsFile(L.Callback):
    """At the end of fit / validate / test, write ``metrics.json`` with every logged metric
    (``self.log`` in modules, ``callbacks.direct_logging.log_scalars`` in callbacks).

    The file is rewritten after each stage, so it always holds the latest values together
    with the stage that produced them and the global step; after ``--ckpt_path`` also the
    checkpoint it loaded and that checkpoint's step.

    Args:
        filename: name of the file inside the log directory.
    """

    def __init__(self, filename: str = "metrics.json") -> None:
        self.filename = filename

    @rank_zero_only
    def _write(self, trainer: L.Trainer, stage: str) -> None:
        path = log_dir_of(trainer) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        metrics = dict(sorted(trainer.callback_metrics.items()))
        record: dict[str, Any] = {
            "stage": stage,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
        }
        if trainer.ckpt_path:
            # validate/test restore the weights only (global_step stays 0): name what was scored
            record["ckpt_path"] = str(trainer.ckpt_path)
            record["ckpt_global_step"] = checkpoint_step(trainer.ckpt_path)
        path.write_text(strict_json({**record, "metrics": metrics}, indent=2) + "\n")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After every callback's end-of-stage hooks, whatever their order: scalars that other
        # callbacks compute there (influence scores, warmup diagnostics) are in the file too.
        # Not after a failed run: Lightning calls no teardown hook then.
        if stage in ("fit", "validate", "test") and not skipped_in_fast_dev_run(
            trainer, self.filename
        ):
            self._write(trainer, stage)
