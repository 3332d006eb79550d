"""The run's settings and final metrics in TensorBoard's HPARAMS tab.

Lightning fills that tab only when the logger has metrics for it (``default_hp_metric``, whose
placeholder is an ``hp_metric = -1`` scalar; the project's configs turn it off), and then only
with the ``save_hyperparameters`` of the module and datamodule, which leave out the
optimizer and the trainer. This callback writes the tab once the stage has its final metrics,
from the whole resolved config when the run came from ``mlo`` (LightningCLI's
``SaveConfigCallback`` holds it), so runs of a sweep compare by learning rate, batch size,
``max_steps`` or seed side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.direct_logging import lightning_log_step

#: Config entries that are not hyperparameters of the run (where it logs, the project's
#: always-on callbacks) or do not fit one table cell (the callback list).
NOT_HYPERPARAMETERS = frozenset(
    {
        "trainer.callbacks",
        "trainer.logger",
        "trainer.plugins",
        "trainer.default_root_dir",
        "metrics_file",
        "graceful_stop",
        "slurm_requeue",
        "hparams_summary",
    }
)

#: Prefix of the metric scalars the tab reads (TensorBoard takes a metric's last value).
METRIC_PREFIX = "hparams/"

Cell = bool | int | float | str


def flat_settings(config: Mapping[str, Any], prefix: str = "") -> dict[str, Cell]:
    """One table cell per setting: dotted keys, ``init_args`` levels dropped.

    A ``{class_path, init_args}`` node becomes its class path under its own key and its
    arguments under ``key.<arg>``, so ``model.init_args.optimizer.init_args.lr`` reads
    ``model.optimizer.lr``. Unset (``None``) settings are left out, so a cell is blank where a
    run did not set it (e.g. ``model.lora.r`` of a run without LoRA); lists become
    comma-separated text and other values their text.
    """
    cells: dict[str, Cell] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name in NOT_HYPERPARAMETERS or value is None:
            continue
        if isinstance(value, Mapping):
            if "class_path" in value:
                cells[name] = str(value["class_path"])
                cells.update(flat_settings(value.get("init_args") or {}, f"{name}."))
            else:
                cells.update(flat_settings(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            cells[name] = value
        elif isinstance(value, list | tuple):
            cells[name] = ", ".join(str(item) for item in value)
        else:
            cells[name] = str(value)
    return cells


def final_metrics(callback_metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics of ``trainer.callback_metrics`` as floats, under ``METRIC_PREFIX``."""
    metrics = {}
    for name, value in sorted(callback_metrics.items()):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[f"{METRIC_PREFIX}{name}"] = float(value)
    return metrics


def run_settings(trainer: L.Trainer) -> dict[str, Cell]:
    """The resolved ``mlo`` config when there is one, else the module's and datamodule's
    ``save_hyperparameters`` (what Lightning itself would log)."""
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            return flat_settings(callback.config.as_dict())
    settings: dict[str, Any] = {}
    if trainer.lightning_module is not None:
        settings["model"] = dict(trainer.lightning_module.hparams)
    datamodule = trainer.datamodule
    if datamodule is not None:
        settings["data"] = dict(getattr(datamodule, "hparams", {}))
    return flat_settings(settings)


class HParamsSummary(L.Callback):
    """At the end of fit / validate / test, fill TensorBoard's HPARAMS tab with the run's
    settings (``flat_settings`` of the resolved config) and its final metrics.

    The metrics are ``trainer.callback_metrics``, the values ``metrics.json`` holds, logged
    once more as ``hparams/<name>`` scalars at the last step; the tab shows their last value.
    Only TensorBoard loggers are written to: other loggers get Lightning's own hyperparameters.
    Each stage writes its own row; ``mlo`` runs one stage per log directory.
    """

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        from torch.utils.tensorboard.summary import hparams

        metrics = final_metrics(trainer.callback_metrics)
        experiment, start, end = hparams(run_settings(trainer), metrics)
        step = lightning_log_step(trainer)
        for logger in loggers:
            writer = logger.experiment
            file_writer = writer._get_file_writer()  # as Lightning's own log_hyperparams
            for summary in (experiment, start, end):
                file_writer.add_summary(summary)
            for name, value in metrics.items():
                if math.isfinite(value):
                    writer.add_scalar(name, value, step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After every callback's end-of-stage hooks (like MetricsFile): the metrics that other
        # callbacks log there are final. Lightning finalizes the loggers after teardown.
        if stage in ("fit", "validate", "test"):
            self._write(trainer)
