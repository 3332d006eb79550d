"""The vmapped estimators equal the per-task ones (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ops.meta_gradients import (
    fob_maml_grad,
    fomaml_grad,
    inner_solve,
    maml_grad,
    reptile_grad,
    task_objectives,
)
from ops.meta_gradients_batched import (
    batched_fob_maml_grads,
    batched_fomaml_grads,
    batched_inner_solve,
    batched_maml_grads,
    batched_reptile_grads,
)

T = 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    sx, qx = torch.randn(T, 6, 4, dtype=torch.float64), torch.randn(T, 9, 4, dtype=torch.float64)
    sy, qy = torch.randint(0, 3, (T, 6)), torch.randint(0, 3, (T, 9))
    x = {k: v.detach() for k, v in net.named_parameters()}
    return net, x, (sx, sy), (qx, qy)


def _per_task(net, support, query, i):
    return task_objectives(
        net, F.cross_entropy, (support[0][i], support[1][i]), (query[0][i], query[1][i])
    )


def _close(batched, per_task, atol=1e-10):
    for i, ref in enumerate(per_task):
        for n in ref:
            torch.testing.assert_close(batched[n][i], ref[n], atol=atol, rtol=0)


@pytest.mark.parametrize("warm_start", [False, True])
@pytest.mark.parametrize("estimator", ["forward", "symmetric"])
def test_fob_maml(setup, estimator, warm_start):
    net, x, support, query = setup
    kw = {"nu": 1e-2, "alpha": 0.7, "steps": 4, "lr": 0.2, "estimator": estimator}
    kw["warm_start"] = warm_start
    grads, adapted, gaps = batched_fob_maml_grads(net, F.cross_entropy, x, support, query, **kw)
    ref = [fob_maml_grad(*_per_task(net, support, query, i), x, **kw) for i in range(T)]
    _close(grads, [r.grad for r in ref])
    _close(adapted, [r.adapted for r in ref])
    torch.testing.assert_close(gaps, torch.tensor([r.solve_gap for r in ref], dtype=gaps.dtype))


def test_baselines(setup):
    net, x, support, query = setup
    kw = {"steps": 3, "lr": 0.3}
    objs = [_per_task(net, support, query, i) for i in range(T)]
    _close(
        batched_maml_grads(net, F.cross_entropy, x, support, query, **kw)[0],
        [maml_grad(g, f, x, **kw).grad for g, f in objs],
    )
    _close(
        batched_fomaml_grads(net, F.cross_entropy, x, support, query, alpha=0.5, **kw)[0],
        [fomaml_grad(g, f, x, alpha=0.5, **kw).grad for g, f in objs],
    )
    _close(
        batched_reptile_grads(net, F.cross_entropy, x, support, **kw)[0],
        [reptile_grad(g, x, **kw).grad for g, _ in objs],
    )
    _close(
        batched_inner_solve(net, F.cross_entropy, x, support, None, nu=0.0, alpha=None, **kw),
        [inner_solve(g, None, x, nu=0.0, alpha=None, **kw) for g, _ in objs],
    )
