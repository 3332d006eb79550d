import json

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.metrics_file import MetricsFile


class LoggingBoringModel(BoringModel):
    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)["x"]
        self.log("val/loss", loss)

    def test_step(self, batch, batch_idx):
        self.log("test/nan_metric", torch.tensor(float("nan")))
        self.log("test/loss", super().test_step(batch, batch_idx)["y"])


def test_metrics_json_after_each_stage(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, val_check_interval=3, limit_val_batches=2, limit_test_batches=2,
        default_root_dir=tmp_path, callbacks=[MetricsFile()], enable_progress_bar=False,
    )  # fmt: skip
    model = LoggingBoringModel()
    trainer.fit(model)
    path = tmp_path / "lightning_logs" / "version_0" / "metrics.json"
    fit = json.loads(path.read_text())
    assert fit["stage"] == "fit" and fit["global_step"] == 3
    assert isinstance(fit["metrics"]["val/loss"], float)
    trainer.validate(model, verbose=False)
    assert json.loads(path.read_text())["stage"] == "validate"
    trainer.test(model, verbose=False)
    tested = json.loads(path.read_text())
    assert tested["stage"] == "test" and tested["metrics"]["test/nan_metric"] == "nan"
