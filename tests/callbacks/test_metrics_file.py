import json
import math

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.direct_logging import lightning_log_step, log_scalars
from callbacks.metrics_file import MetricsFile


class LoggingBoringModel(BoringModel):
    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)["x"]
        self.log("val/loss", loss)

    def test_step(self, batch, batch_idx):
        self.log("test/nan_metric", torch.tensor(float("nan")))
        self.log("test/loss", super().test_step(batch, batch_idx)["y"])


def _expected(trainer, stage):
    """What the file should hold, read off the trainer (NaN as the string JSON allows)."""
    metrics = {}
    for name, value in trainer.callback_metrics.items():
        value = value.item()
        metrics[name] = "nan" if math.isnan(value) else value
    return {
        "stage": stage,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "metrics": metrics,
    }


def test_metrics_json_after_each_stage(tmp_path):
    # 2 batches an epoch, 5 steps: fit ends past epoch 0, so the file's epoch is informative.
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, limit_train_batches=2, limit_val_batches=2,
        limit_test_batches=2, default_root_dir=tmp_path, callbacks=[MetricsFile()],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = LoggingBoringModel()
    trainer.fit(model)
    path = tmp_path / "lightning_logs" / "version_0" / "metrics.json"
    fit = json.loads(path.read_text())
    assert trainer.current_epoch > 0 and trainer.global_step == 5
    assert "val/loss" in trainer.callback_metrics
    assert fit == _expected(trainer, "fit")  # every value exactly (JSON floats round-trip)
    trainer.validate(model, verbose=False)
    assert json.loads(path.read_text()) == _expected(trainer, "validate")
    trainer.test(model, verbose=False)
    tested = json.loads(path.read_text())
    assert tested == _expected(trainer, "test")
    assert tested["metrics"]["test/nan_metric"] == "nan" and "test/loss" in tested["metrics"]


def test_a_checkpoint_evaluation_names_the_checkpoint_and_its_step(tmp_path):
    fit = L.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=1, default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, logger=False,
    )  # fmt: skip
    fit.fit(LoggingBoringModel())
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    trainer = L.Trainer(
        accelerator="cpu", limit_val_batches=1, default_root_dir=tmp_path / "eval",
        callbacks=[MetricsFile()], enable_progress_bar=False, logger=False,
    )  # fmt: skip
    trainer.validate(LoggingBoringModel(), ckpt_path=str(ckpt), verbose=False)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["global_step"] == 0  # validate restores the weights only
    assert written["ckpt_path"] == str(ckpt) and written["ckpt_global_step"] == 3


class _EndOfStageScores(L.Callback):
    """Scores computed after training / validation and sent straight to the loggers, like the
    influence scores of HyperINF and the warmup diagnostics."""

    def on_train_end(self, trainer, pl_module):
        log_scalars(trainer, {"scores/after_fit": 1.5}, lightning_log_step(trainer))

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            log_scalars(trainer, {"scores/after_validate": 2.5}, lightning_log_step(trainer))


def test_scalars_callbacks_log_themselves_reach_the_file_whatever_the_callback_order(tmp_path):
    # MetricsFile first: it used to write in its own end hooks, before these scores existed.
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, default_root_dir=tmp_path,
        callbacks=[MetricsFile(), _EndOfStageScores()], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    model = LoggingBoringModel()
    trainer.fit(model)
    path = tmp_path / "lightning_logs" / "version_0" / "metrics.json"
    assert json.loads(path.read_text())["metrics"]["scores/after_fit"] == 1.5
    trainer.validate(model, verbose=False)
    assert json.loads(path.read_text())["metrics"]["scores/after_validate"] == 2.5
