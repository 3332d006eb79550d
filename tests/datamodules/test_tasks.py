"""Episodic task datamodules: determinism, resumable stream, offline MNIST-1D, task structure."""

from __future__ import annotations

import itertools
import random
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.even_eval_sampler import EvenEvalSampler
from datamodules.tasks import (
    LinearRegressionTasks,
    MNIST1DFewShot,
    SinusoidTasks,
    mnist1d_arrays,
)


def _stream(dm, n):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_fixed_seed_gives_identical_task_stream():
    a = _stream(SinusoidTasks(meta_batch_size=4, seed=3), 5)
    b = _stream(SinusoidTasks(meta_batch_size=4, seed=3), 5)
    c = _stream(SinusoidTasks(meta_batch_size=4, seed=4), 5)
    assert all(_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not _equal(a[0], c[0])
    assert [int(x["episode"]) for x in a] == [0, 1, 2, 3, 4]
    assert a[0]["support_x"].shape == (4, 10)


def test_state_dict_resumes_the_same_stream():
    full = _stream(LinearRegressionTasks(meta_batch_size=4, episodes_per_epoch=10), 7)
    dm = LinearRegressionTasks(meta_batch_size=4, episodes_per_epoch=10)
    dm.load_state_dict({"next_episode": 3, "seed": 0})
    resumed = _stream(dm, 4)
    assert all(_equal(x, y) for x, y in zip(full[3:], resumed, strict=True))
    # The stream continues from the resumed episode, without end (Lightning ends the resumed
    # epoch after its remaining batches); its length stays a whole epoch (Lightning keeps the
    # first length it reads for the later epochs).
    stream = dm.train_dataloader().dataset
    assert len(stream) == 10
    episodes = [int(batch["episode"]) for batch in itertools.islice(stream, 12)]
    assert episodes == list(range(3, 15))
    with pytest.raises(ValueError, match="seed"):
        dm.load_state_dict({"next_episode": 3, "seed": 1})


def test_linear_full_batch_is_the_pool():
    dm = LinearRegressionTasks(dim=5, num_tasks=12, full_batch=True, dtype="float64")
    batch = _stream(dm, 1)[0]
    assert torch.equal(batch["support_x"], dm.pool["support_x"])
    assert batch["support_x"].dtype == torch.float64
    assert len(dm.eval_tasks("test")) == 12
    with pytest.raises(ValueError, match="dtype"):
        LinearRegressionTasks(dtype="float16")


@pytest.fixture
def no_network(monkeypatch):
    """Socket guard: any non-loopback connection fails the test."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1") and not str(host).startswith("/"):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def test_mnist1d_offline_and_global_rng_untouched(no_network):
    mnist1d_arrays.cache_clear()
    random.seed(123)
    np.random.seed(456)
    py_state, np_state = random.getstate(), np.random.get_state()
    dm = MNIST1DFewShot(n_way=5, k_shot=5, k_query=15)
    dm.setup("fit")
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]
    x, y, x_test, _ = mnist1d_arrays(42)
    assert set(y.tolist()) == set(range(10))
    assert x.shape == (4000, 40) and x_test.shape == (1000, 40)


def test_mnist1d_task_structure():
    dm = MNIST1DFewShot(n_way=5, k_shot=5, k_query=15, meta_batch_size=3, num_val_tasks=4)
    batch = _stream(dm, 1)[0]
    assert batch["support_x"].shape == (3, 25, 40)
    assert batch["query_x"].shape == (3, 75, 40)
    for t in range(3):
        assert torch.equal(torch.bincount(batch["support_y"][t]), torch.full((5,), 5))
        assert torch.equal(torch.bincount(batch["query_y"][t]), torch.full((5,), 15))
        # Support and query examples are disjoint.
        s, q = batch["support_x"][t], batch["query_x"][t]
        assert torch.cdist(s, q).min() > 0
    val = next(iter(dm.val_dataloader()))
    assert val["support_x"].shape == (4, 25, 40)
    with pytest.raises(ValueError, match="n_way"):
        MNIST1DFewShot(n_way=11)
    # zero support examples or zero tasks used to run silently (no adaptation, no metrics)
    for key, bad, low in [("k_shot", 0, 1), ("k_query", 0, 1), ("num_test_tasks", -3, 0)]:
        with pytest.raises(ValueError, match=f"MNIST1DFewShot: {key} must be >= {low}, got {bad}"):
            MNIST1DFewShot(**{key: bad})


def test_eval_loaders_score_every_task_once_on_every_world_size():
    """One process: no sampler, the tasks in order, all scored. Three ranks: ``EvenEvalSampler``
    shards (rank r reads r, r + 3, ...), every rank runs the same number of batches, and the
    scored rows cover each task exactly once; the two padding rows are flagged unscored."""
    dm = LinearRegressionTasks(dim=4, num_tasks=7, episodes_per_epoch=1)
    dm.eval_batch_size = 2
    pool = dm.pool["support_x"]
    single = list(dm.val_dataloader())
    assert [len(b["scored"]) for b in single] == [2, 2, 2, 1]
    assert all(bool(b["scored"].all()) for b in single)
    assert torch.equal(torch.cat([b["support_x"] for b in single]), pool)
    scored, padding = [], 0
    for rank in range(3):
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        for loader in (dm.val_dataloader(), dm.test_dataloader()):
            assert isinstance(loader.sampler, EvenEvalSampler)
            batches = list(loader)
            assert len(batches) == 2  # ceil(ceil(7 / 3) / 2) on every rank
            rows = torch.cat([b["support_x"] for b in batches])
            mask = torch.cat([b["scored"] for b in batches])
            assert mask.dtype == torch.bool
            padding += int((~mask).sum())
            scored += [int((pool == row).flatten(1).all(1).nonzero()) for row in rows[mask]]
    assert sorted(scored) == sorted(list(range(7)) * 2)  # val and test: each task once
    assert padding == 2 * 2


def test_empty_eval_set_gives_an_empty_loader():
    dm = SinusoidTasks(num_val_tasks=0, num_test_tasks=0)
    assert len(dm.val_dataloader()) == 0
    assert list(dm.test_dataloader()) == []
