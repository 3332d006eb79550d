import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from callbacks.hparams_summary import HParamsSummary, final_metrics, flat_settings


def read_hparams_tab(log_dir):
    """(settings, metric tags, {scalar tag: [(step, value)]}) as TensorBoard reads the run."""
    (events,) = log_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    settings = {}
    for key, value in start.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        settings[key] = getattr(value, kind)
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    tags = [info.name.tag for info in experiment.metric_infos]
    scalars = {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
    return settings, tags, scalars


def test_flat_settings_reads_like_the_yaml_without_init_args():
    config = {
        "seed_everything": 7,
        "model": {
            "class_path": "modules.causal_lm.CausalLMModule",
            "init_args": {
                "model": "tiny-llama",
                "lora": None,
                "optimizer": {
                    "class_path": "torch.optim.AdamW",
                    "init_args": {"lr": 3e-3, "betas": [0.9, 0.95], "amsgrad": False},
                },
            },
        },
        "trainer": {
            "max_steps": 450,
            "callbacks": [{"class_path": "x.Y"}],
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"},
            "devices": "auto",
        },
        "metrics_file": {"filename": "metrics.json"},
        "ckpt_path": None,
    }
    assert flat_settings(config) == {
        "seed_everything": 7,
        "model": "modules.causal_lm.CausalLMModule",
        "model.model": "tiny-llama",
        "model.optimizer": "torch.optim.AdamW",
        "model.optimizer.lr": 3e-3,
        "model.optimizer.betas": "0.9, 0.95",
        "model.optimizer.amsgrad": False,
        "trainer.max_steps": 450,
        "trainer.devices": "auto",
    }


def test_final_metrics_keeps_the_scalars():
    metrics = {"val/loss": torch.tensor(2.5), "acc": 1, "hist": torch.ones(3), "flag": True}
    assert final_metrics(metrics) == {"hparams/acc": 1.0, "hparams/val/loss": 2.5}


class LoggingModel(BoringModel):
    def __init__(self, width: int = 32, note: str = "plain") -> None:
        super().__init__()
        self.save_hyperparameters()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", super().validation_step(batch, batch_idx)["x"])


def test_the_tab_holds_the_hyperparameters_and_the_final_metrics(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, limit_val_batches=2, val_check_interval=2,
        logger=[TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False),
                CSVLogger(tmp_path, name="csv")],
        callbacks=[HParamsSummary()], enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(LoggingModel(width=8, note="wide"))
    settings, tags, scalars = read_hparams_tab(tmp_path / "tb" / "version_0")
    # Outside mlo: the module's save_hyperparameters, as Lightning would log them.
    assert settings == {"model.width": 8, "model.note": "wide"}
    assert tags == ["hparams/val/loss"]
    final = trainer.callback_metrics["val/loss"].item()
    # One point at the last validation's step (Lightning's x-axis: global_step - 1 = 3).
    assert scalars["hparams/val/loss"] == [(3, final)]
    assert scalars["val/loss"][-1] == (3, final)
