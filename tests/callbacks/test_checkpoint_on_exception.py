"""callbacks.checkpoint.ModelCheckpoint: the on-exception save of one process, and which
exceptions of a multi-process run reach Lightning's save."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpoint import ModelCheckpoint


class FailsAtStep2(BoringModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise ValueError("data error")
        return super().training_step(batch, batch_idx)


def test_one_process_saves_on_any_exception(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_exception=True, every_n_epochs=0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, logger=False, callbacks=[saver],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="data error"):
        trainer.fit(FailsAtStep2())
    (saved,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert torch.load(saved, weights_only=False)["global_step"] == 2


@pytest.mark.parametrize(
    ("exception", "saves"),
    [(ValueError("x"), False), (KeyboardInterrupt(), True), (SIGTERMException(), True)],
)
def test_two_processes_save_only_on_interruptions_every_rank_gets(monkeypatch, exception, saves):
    calls = []
    monkeypatch.setattr(
        LightningModelCheckpoint, "on_exception", lambda self, *args: calls.append(args[-1])
    )
    # every rank of the interrupted run agrees that its (finite) weights can be saved
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)
    trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=strategy)
    ModelCheckpoint(save_on_exception=True).on_exception(trainer, BoringModel(), exception)
    assert calls == ([exception] if saves else [])


def test_the_skipped_save_is_named_only_when_one_was_asked_for(monkeypatch, caplog):
    monkeypatch.setattr(LightningModelCheckpoint, "on_exception", lambda *args: None)
    trainer = SimpleNamespace(world_size=2, global_rank=1)
    with caplog.at_level(logging.WARNING, logger="callbacks.checkpoint"):
        ModelCheckpoint(save_on_exception=False).on_exception(trainer, None, ValueError("x"))
    assert "no on-exception checkpoint" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="callbacks.checkpoint"):
        ModelCheckpoint(save_on_exception=True).on_exception(trainer, None, ValueError("x"))
    assert "rank 1: ValueError: no on-exception checkpoint in a 2-process run" in caplog.text
