"""``ResumableSampler`` bookkeeping in isolation: the epoch offset, the skip set from
Lightning's loop state, the permutation a checkpoint continues, and the loader's sharding.
Expected orders are ``torch.randperm(n, seed + epoch)``, PyTorch's ``DistributedSampler`` rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from datamodules.resumable_sampler import (
    LoopResumedDataLoader,
    ResumableSampler,
    continue_saved_permutation,
    resumable_train_loader,
    skip_consumed_batches,
)

N, SEED = 12, 5


def _data(n: int = N) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.arange(n))


def _perm(epoch: int, n: int = N) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()


def _trainer(processed: int, is_last_batch: bool, epoch: int, world: int = 1, restarting=True):
    progress = SimpleNamespace(
        current=SimpleNamespace(processed=processed), is_last_batch=is_last_batch
    )
    fit_loop = SimpleNamespace(
        epoch_loop=SimpleNamespace(batch_progress=progress), restarting=restarting
    )
    return SimpleNamespace(fit_loop=fit_loop, current_epoch=epoch, world_size=world, global_rank=0)


def test_set_epoch_adds_the_epoch_offset():
    """After a resume from a train-end checkpoint, Lightning's epoch runs one ahead of the
    permutation: epoch 3 with offset -1 draws permutation 2."""
    sampler = ResumableSampler(_data(), seed=SEED)
    sampler.epoch_offset = -1
    sampler.set_epoch(3)
    assert sampler.epoch == 2
    assert list(sampler) == _perm(2)


def test_negative_skip_is_refused():
    with pytest.raises(ValueError, match="num_batches must be >= 0, got -1"):
        ResumableSampler(_data(), seed=SEED).skip_batches(-1, 4)


def test_mid_epoch_resume_skips_the_processed_batches_of_lightnings_epoch():
    """3 batches of 2 processed in epoch 2: that epoch's permutation from position 6 on."""
    sampler = ResumableSampler(_data(), seed=SEED)
    skip_consumed_batches(sampler, _trainer(processed=3, is_last_batch=False, epoch=2), 2)
    assert sampler.epoch == 2
    assert list(sampler) == _perm(2)[6:]


def test_a_checkpoint_of_the_last_batch_skips_nothing():
    """The epoch was finished: the resumed run starts the next epoch from its first sample."""
    sampler = ResumableSampler(_data(), seed=SEED)
    skip_consumed_batches(sampler, _trainer(processed=6, is_last_batch=True, epoch=1), 2)
    assert len(list(sampler)) == N


def test_mid_epoch_checkpoint_continues_its_own_permutation():
    """Lightning says epoch 2 but the checkpoint was consuming permutation 1: continue that
    one and keep the offset 1 - 2 = -1 for the following epochs."""
    sampler = ResumableSampler(_data(), seed=SEED)
    skip_consumed_batches(sampler, _trainer(processed=2, is_last_batch=False, epoch=2), 2)
    continue_saved_permutation(sampler, {"sampler_epoch": 1, "epoch_offset": 0})
    assert sampler.epoch == 1 and sampler.epoch_offset == -1
    assert list(sampler) == _perm(1)[4:]
    sampler.set_epoch(3)
    assert list(sampler) == _perm(2)


def test_epoch_start_checkpoint_keeps_the_saved_offset():
    """Nothing to skip (a new epoch): the saved offset carries over unchanged."""
    sampler = ResumableSampler(_data(), seed=SEED)
    continue_saved_permutation(sampler, {"sampler_epoch": 3, "epoch_offset": -1})
    assert sampler.epoch_offset == -1
    sampler.set_epoch(5)
    assert sampler.epoch == 4


def test_loader_state_records_the_permutation_and_its_offset():
    sampler = ResumableSampler(_data(), seed=SEED)
    sampler.epoch_offset = -2
    sampler.set_epoch(7)
    state = LoopResumedDataLoader(_data(), sampler=sampler, batch_size=3).state_dict()
    assert state == {"seed": SEED, "world_size": 1, "batch_size": 3, "sampler_epoch": 5,
                     "epoch_offset": -2}  # fmt: skip


def test_train_loader_shuffles_by_seed_and_epoch():
    """One process: epoch 0 reads ``randperm(n, seed)``, in batches."""
    loader = resumable_train_loader(SimpleNamespace(trainer=None), _data(), 4, SEED, False)
    got = [int(i) for (batch,) in loader for i in batch]
    assert got == _perm(0)


@pytest.mark.parametrize(("drop_last", "per_rank"), [(False, 5), (True, 4)])
def test_train_loader_shards_with_the_requested_drop_last(drop_last, per_rank):
    """9 samples on 2 ranks: drop_last keeps 4 per rank, otherwise 5 (one padded by repeat)."""
    dm = SimpleNamespace(trainer=_trainer(0, False, 0, world=2, restarting=False))
    loader = resumable_train_loader(dm, _data(9), 1, SEED, drop_last)
    assert len(list(loader.sampler)) == per_rank
    perm = _perm(0, n=9)
    assert list(loader.sampler) == (perm + perm)[0 : 2 * per_rank : 2]
