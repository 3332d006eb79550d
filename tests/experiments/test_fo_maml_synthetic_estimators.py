"""The synthetic FO-B-MAML experiment's estimators: per-task outputs for every arm."""

import pytest
import torch

from experiments import fo_maml_synthetic as syn
from ops.meta_tasks_closed_form import LinearTasks, sample_linear_tasks


def _small_pool() -> LinearTasks:
    """12 tasks in 5 dimensions: the estimators tabulate d + 1 inner solves per setting."""
    gen = torch.Generator().manual_seed(0)
    data = sample_linear_tasks(12, 5, 10, 10, generator=gen, dtype=torch.float64)
    return LinearTasks.from_data(*data[:4])


@pytest.mark.parametrize("arm", ["exact", "fomaml", "reptile", "forward", "symmetric"])
def test_per_task_estimates_average_to_the_pooled_one(arm):
    """Every arm gives one row per task with per_task=True (the exact arm once gave the pooled
    [d] vector), and the rows average to the pooled estimate."""
    tasks = _small_pool()
    x = torch.linspace(-1, 1, tasks.dim, dtype=torch.float64)
    per_task = syn.estimator(tasks, arm, steps=5, per_task=True)(x)
    pooled = syn.estimator(tasks, arm, steps=5)(x)
    assert per_task.shape == (tasks.Q.shape[0], tasks.dim)
    torch.testing.assert_close(per_task.mean(0), pooled)
