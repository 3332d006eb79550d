"""Write ``predict_step`` outputs as JSON lines in the run's log directory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from callbacks.json_values import strict_json
from callbacks.metrics_file import log_dir_of, skipped_in_fast_dev_run


class JsonlPredictionWriter(BasePredictionWriter):
    """Append every prediction record to ``<log_dir>/<filename>`` (one file per rank under DDP).

    Args:
        filename: output file name; ``predictions.jsonl`` becomes ``predictions.rank1.jsonl``
            on rank 1.
        echo: also print each record.
    """

    def __init__(self, filename: str = "predictions.jsonl", echo: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.filename, self.echo = filename, echo
        self._writes = True

    def _path(self, trainer: L.Trainer):
        name = self.filename
        if trainer.global_rank > 0:
            stem, _, suffix = name.rpartition(".")
            name = f"{stem}.rank{trainer.global_rank}.{suffix}"
        return log_dir_of(trainer) / name

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._writes = not skipped_in_fast_dev_run(trainer, self.filename)
        if not self._writes:
            return
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        records = prediction if isinstance(prediction, list) else [prediction]
        lines = [strict_json(record, ensure_ascii=False, default=str) for record in records]
        if self._writes:
            with self._path(trainer).open("a", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
        if self.echo:
            for line in lines:
                rank_zero_info(line)
