"""metrics.json: the step of a sharded checkpoint directory, of a step-0 checkpoint and of a file
torch cannot read; metrics in name order."""

from __future__ import annotations

import json

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.metrics_file import MetricsFile, checkpoint_step


def test_the_step_of_a_sharded_checkpoint_comes_from_its_meta_file(tmp_path):
    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    torch.save({"global_step": 7}, sharded / "meta.pt")
    assert checkpoint_step(sharded) == 7


def test_step_zero_is_a_step_and_an_unreadable_file_has_none(tmp_path):
    torch.save({"global_step": 0}, tmp_path / "zero.ckpt")
    assert checkpoint_step(tmp_path / "zero.ckpt") == 0
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    assert checkpoint_step(tmp_path / "text.ckpt") is None


class LogsOutOfOrder(BoringModel):
    def validation_step(self, batch, batch_idx):
        self.log("z/last", 1.0)
        self.log("a/first", 2.0)
        self.log("m/middle", 3.0)


def test_metrics_are_written_in_name_order(tmp_path):
    trainer = L.Trainer(accelerator="cpu", limit_val_batches=1, logger=False,
                        default_root_dir=tmp_path, callbacks=[MetricsFile()],
                        enable_progress_bar=False)  # fmt: skip
    trainer.validate(LogsOutOfOrder(), verbose=False)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert list(written["metrics"]) == ["a/first", "m/middle", "z/last"]
