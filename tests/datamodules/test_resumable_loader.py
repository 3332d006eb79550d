"""Training loaders that resume mid-epoch from Lightning's loop state, and say so to Lightning."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.resumable_sampler import resumable_train_loader

NOT_RESUMABLE = "dataloader is not resumable"


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(L.LightningDataModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1))
        return resumable_train_loader(self, data, batch_size=4, seed=self.seed, drop_last=True)


def _fit(root, steps: int, data: _Data, ckpt_path=None, callbacks=()) -> torch.Tensor:
    module = _Regression()
    L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
    ).fit(module, data, ckpt_path=ckpt_path)  # fmt: skip
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _mid_epoch_checkpoint(tmp_path) -> str:
    every_3 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _fit(tmp_path, 3, _Data(), callbacks=[every_3])  # 8 batches per epoch: step 3 is mid-epoch
    (path,) = (tmp_path / "ckpt").glob("*step=3.ckpt")
    return str(path)


def test_mid_epoch_resume_is_exact_and_lightning_does_not_warn(tmp_path):
    uninterrupted = _fit(tmp_path / "straight", 12, _Data())
    path = _mid_epoch_checkpoint(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(tmp_path / "resumed", 12, _Data(), ckpt_path=path)
    assert torch.equal(resumed, uninterrupted)
    assert not [w for w in caught if NOT_RESUMABLE in str(w.message)]


def test_resuming_with_another_data_seed_is_named(tmp_path):
    path = _mid_epoch_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="resumed with data seed 7, the checkpoint's run used 0"):
        _fit(tmp_path / "resumed", 4, _Data(seed=7), ckpt_path=path)
