"""Training loaders that resume mid-epoch from Lightning's loop state, and say so to Lightning."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.resumable_sampler import (
    LoopResumedDataLoader,
    ResumableSampler,
    resumable_train_loader,
)

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


def _resumed_rank_indices(dataset_size, world, batch_size, batches_done, saved_world, saved_bs):
    """Each rank's indices after a resume: the skip ``skip_consumed_batches`` sets from the loop
    state, then the loader state of the checkpoint's run, as Lightning applies them."""
    data = torch.utils.data.TensorDataset(torch.arange(dataset_size))
    ranks = []
    for rank in range(world):
        sampler = ResumableSampler(data, world, rank, shuffle=True, seed=3, drop_last=True)
        sampler.skip_batches(batches_done, batch_size)
        loader = LoopResumedDataLoader(data, sampler=sampler, batch_size=batch_size)
        loader.load_state_dict({"seed": 3, "world_size": saved_world, "batch_size": saved_bs})
        ranks.append(list(sampler))
    return ranks


PERMUTATION = torch.randperm(96, generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize(
    ("saved_world", "saved_bs", "batches_done", "world", "batch_size"),
    [
        (2, 4, 3, 1, 4),  # 2 processes -> 1: 24 samples consumed, not 12
        (1, 4, 3, 2, 4),  # 1 -> 2: 12 consumed, each rank skips 6 (not 12)
        (1, 4, 4, 1, 8),  # batch size 4 -> 8: 16 consumed (the old count x the new size was 32)
        (2, 4, 3, 3, 2),  # 2 -> 3 processes and batch 4 -> 2: 24 consumed, 8 per rank
    ],
)
def test_resume_on_another_layout_skips_exactly_what_was_consumed(
    saved_world, saved_bs, batches_done, world, batch_size
):
    # skip_consumed_batches counts the batches in this run's units; the interrupted run
    # consumed batches_done of its own batches on each of its ranks.
    consumed = batches_done * saved_bs * saved_world
    ranks = _resumed_rank_indices(96, world, batch_size, batches_done, saved_world, saved_bs)
    resumed = sorted(i for rank in ranks for i in rank)
    assert resumed == sorted(PERMUTATION[consumed:])
    assert all(rank[0] == PERMUTATION[consumed + r] for r, rank in enumerate(ranks))


def test_an_uneven_split_is_named():
    # 1 x 3 x 1 batch = 3 consumed, 2 ranks now: each skips 1, so position 2 is trained again.
    with pytest.warns(UserWarning, match="3 samples it consumed this epoch; 1 of them are trained"):
        ranks = _resumed_rank_indices(96, 2, 3, 1, saved_world=1, saved_bs=3)
    assert sorted(i for rank in ranks for i in rank) == sorted(PERMUTATION[2:])
