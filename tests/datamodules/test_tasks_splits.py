"""Episodic tasks: splits draw different tasks, the test list has its own size, sinusoids follow
their ranges and formula, MNIST-1D evaluation tasks come from the test split, and the size limits."""

from __future__ import annotations

import pytest
import torch

from datamodules.tasks import MNIST1DFewShot, SinusoidTasks, mnist1d_arrays


def test_validation_and_test_tasks_differ_and_the_test_list_has_its_size():
    dm = SinusoidTasks(num_val_tasks=3, num_test_tasks=5)
    val, test = dm.eval_tasks("val"), dm.eval_tasks("test")
    assert len(val) == 3 and len(test) == 5
    assert not torch.equal(val[0]["support_x"], test[0]["support_x"])


def test_sinusoids_follow_their_ranges_and_formula():
    dm = SinusoidTasks(amp_range=(2.0, 2.0), phase_range=(0.5, 0.5), x_range=(10.0, 11.0),
                       num_val_tasks=4)  # fmt: skip
    for task in dm.eval_tasks("val"):
        for x, y in ((task["support_x"], task["support_y"]), (task["query_x"], task["query_y"])):
            assert bool(((x >= 10.0) & (x <= 11.0)).all())
            torch.testing.assert_close(y, 2.0 * torch.sin(x - 0.5))


def test_one_way_tasks_are_refused():
    with pytest.raises(ValueError, match=r"n_way must be in \[2, 10\], got 1"):
        MNIST1DFewShot(n_way=1)


def test_evaluation_tasks_come_from_the_test_split():
    dm = MNIST1DFewShot(n_way=2, k_shot=1, k_query=1, num_val_tasks=3)
    x_train, _, x_test, _ = (torch.as_tensor(a, dtype=torch.float32) for a in mnist1d_arrays(42))
    for task in dm.eval_tasks("val"):
        for row in torch.cat([task["support_x"], task["query_x"]]):
            assert (x_test == row).all(dim=1).any()
            assert not (x_train == row).all(dim=1).any()


def test_a_split_too_small_for_k_shot_plus_k_query_is_refused():
    _, y, _, y_test = mnist1d_arrays(42)
    smallest = min(int((torch.as_tensor(labels) == c).sum()) for labels in (y, y_test)
                   for c in range(10))  # fmt: skip
    MNIST1DFewShot(k_shot=1, k_query=smallest - 1).setup()  # exactly enough
    with pytest.raises(ValueError, match=f"k_shot \\+ k_query = {smallest + 1} exceeds"):
        MNIST1DFewShot(k_shot=1, k_query=smallest).setup()
