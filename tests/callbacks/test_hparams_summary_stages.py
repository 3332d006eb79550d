"""HParamsSummary: every stage writes its row, the datamodule's settings are in it, non-finite
final metrics get no scalar point; flat_settings' leftovers and exclusions."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from callbacks.hparams_summary import HParamsSummary, final_metrics, flat_settings
from tests.callbacks.test_hparams_summary import read_hparams_tab


def test_values_of_other_types_become_text_and_run_plumbing_is_left_out():
    config = {
        "data": {"path": Path("data/corpus")},
        "trainer": {"max_steps": 3, "plugins": ["x"], "default_root_dir": "/tmp/run"},
        "graceful_stop": {"ctrl_c": True},
        "slurm_requeue": {"check_every_n_steps": 1},
        "hparams_summary": {},
    }
    assert flat_settings(config) == {"data.path": "data/corpus", "trainer.max_steps": 3}


def test_an_empty_tensor_is_no_metric():
    assert final_metrics({"empty": torch.ones(0), "x": 2}) == {"hparams/x": 2.0}


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def val_dataloader(self):
        return DataLoader(torch.randn(8, 32), batch_size=self.hparams.batch_size)


class Scores(BoringModel):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", 0.5)
        self.log("val/bad", float("nan"))


def test_a_validate_run_writes_its_row_with_the_datamodule_settings(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu", limit_val_batches=1, callbacks=[HParamsSummary()],
        logger=TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False),
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.validate(Scores(), datamodule=Data(batch_size=2), verbose=False)
    settings, tags, scalars = read_hparams_tab(tmp_path / "tb" / "version_0")
    assert settings == {"data.batch_size": 2}
    assert sorted(tags) == ["hparams/val/bad", "hparams/val/loss"]
    assert scalars["hparams/val/loss"] == [(0, 0.5)]
    assert "hparams/val/bad" not in scalars  # NaN: no point
