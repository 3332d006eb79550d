"""callbacks.checkpoint.ModelCheckpoint stops a diverged run at its next save and keeps the
checkpoints written before; Lightning's behaviour (``stop_on_non_finite=False``) left none."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch import nn

from callbacks.checkpoint import DivergedRunError, ModelCheckpoint

# SGD on sum(w^2) multiplies w by (1 - 2 lr) per step: -2e6 at lr 1e6, so the float32 weights
# are finite for 6 steps ((2e6)^6 = 6.4e37) and infinite after the 7th ((2e6)^7 = 1.3e44).
LAST_FINITE_STEP = 6


class Quadratic(L.LightningModule):
    def __init__(self, lr: float = 1e6, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.lr, self.fail_at_step = lr, fail_at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at_step:
            raise ValueError("a data error after the divergence")
        return (self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)


def _fit(tmp_path, module: Quadratic, checkpoint: ModelCheckpoint, max_steps: int = 9) -> None:
    L.Trainer(
        max_steps=max_steps, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    ).fit(module)  # fmt: skip


def _every_step(tmp_path, **kwargs) -> ModelCheckpoint:
    # no monitor, top 1: the latest checkpoint, as the shipped configs and mlo's default save
    return ModelCheckpoint(
        dirpath=tmp_path, filename="step{step}", auto_insert_metric_name=False,
        every_n_train_steps=1, save_top_k=1, save_last=True, save_on_exception=True, **kwargs,
    )  # fmt: skip


def _finite_at(path) -> tuple[int, bool]:
    checkpoint = torch.load(path, weights_only=False)
    return checkpoint["global_step"], bool(torch.isfinite(checkpoint["state_dict"]["w"]).all())


def test_a_diverged_run_stops_and_keeps_its_last_finite_checkpoints(tmp_path):
    checkpoint = _every_step(tmp_path)
    with pytest.raises(DivergedRunError) as stopped:
        _fit(tmp_path, Quadratic(), checkpoint)
    message = str(stopped.value)
    assert (
        f"not finite at step {LAST_FINITE_STEP + 1} (1 tensors, e.g. w with 2 entries)" in message
    )
    assert f"(step {LAST_FINITE_STEP}), still holds finite weights" in message
    assert "stop_on_non_finite=false" in message
    files = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert files == ["last.ckpt", f"step{LAST_FINITE_STEP}.ckpt"]
    for name in files:
        assert _finite_at(tmp_path / name) == (LAST_FINITE_STEP, True)


def test_stop_on_non_finite_false_saves_the_broken_weights_as_lightning_does(tmp_path):
    _fit(tmp_path, Quadratic(), _every_step(tmp_path, stop_on_non_finite=False))
    steps_and_finite = {p.name: _finite_at(p) for p in tmp_path.glob("*.ckpt")}
    assert len(steps_and_finite) == 2
    assert all(step == 9 and not finite for step, finite in steps_and_finite.values())


def test_an_exception_after_the_divergence_is_raised_without_an_on_exception_save(tmp_path, caplog):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_on_exception=True,
                                 save_last=True)  # fmt: skip
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="data error"):
        # steps 3 and 6 save (finite); the divergence at step 7 meets the error at step 8
        _fit(tmp_path, Quadratic(fail_at_step=8), checkpoint)
    assert "ValueError: no on-exception checkpoint: the trainable weights are not finite at " \
        "step 8" in caplog.text  # fmt: skip
    # only the regular saves' files: an on-exception save at step 8 would be epoch=0-step=8.ckpt
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=6.ckpt", "last.ckpt"]
    assert _finite_at(tmp_path / "last.ckpt") == (LAST_FINITE_STEP, True)
