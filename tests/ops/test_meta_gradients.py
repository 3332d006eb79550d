"""Spec §7 unit tests for the meta-gradient estimators (float64, seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jvp

from ops.meta_gradients import (
    fob_maml_grad,
    fomaml_grad,
    imaml_grad,
    inner_solve,
    local_smoothness,
    maml_grad,
    param_norm,
    reptile_grad,
    task_objectives,
    unrolled_gd,
)
from ops.meta_gradients_batched import batched_reptile_grads
from ops.meta_tasks_closed_form import (
    LinearTasks,
    exact_meta_grad,
    exact_meta_grads,
    linear_fob_maml_grads,
    linear_inner_solve,
    meta_hessian,
    meta_objective,
    prox_solution,
    sample_linear_tasks,
)

ALPHA = 0.5


def half_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).mean()


class Linear(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class TinyMLP(nn.Module):
    """A smooth non-quadratic model (tanh) so agreement tests are not trivially linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


@pytest.fixture(scope="module")
def pool():
    gen = torch.Generator().manual_seed(0)
    sx, sy, qx, qy, _ = sample_linear_tasks(8, 6, 10, 10, generator=gen)
    return (sx, sy, qx, qy), LinearTasks.from_data(sx, sy, qx, qy)


def objectives(data, i, net):
    sx, sy, qx, qy = data
    return task_objectives(net, half_mse, (sx[i], sy[i]), (qx[i], qy[i]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_exact_meta_grad_matches_autograd(pool):
    _, tasks = pool
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    auto = torch.func.grad(lambda z: meta_objective(z, tasks, ALPHA))(x)
    assert torch.allclose(exact_meta_grad(x, tasks, ALPHA), auto, atol=1e-10, rtol=0)
    hess = torch.func.hessian(lambda z: meta_objective(z, tasks, ALPHA))(x)
    assert torch.allclose(meta_hessian(tasks, ALPHA), hess, atol=1e-10, rtol=0)


def test_implicit_derivative_in_nu(pool):
    """d y^nu / d nu at 0 equals -alpha (I + alpha hess g)^{-1} grad f (spec §3.2)."""
    _, tasks = pool
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    nu0 = torch.zeros((), dtype=torch.float64)
    _, dy = jvp(lambda nu: prox_solution(x, tasks, ALPHA, nu), (nu0,), (torch.ones_like(nu0),))
    assert torch.allclose(dy, -ALPHA * exact_meta_grads(x, tasks, ALPHA), atol=1e-8, rtol=0)


def _exact_solve_lr(tasks: LinearTasks, nu: float) -> float:
    lg, lf = tasks.curvatures()
    return 1.0 / (lg + abs(nu) * lf + 1.0 / ALPHA)


@pytest.mark.parametrize(("estimator", "tol"), [("symmetric", 1e-3), ("forward", 2e-2)])
def test_estimators_with_exact_inner_solves(pool, estimator, tol):
    data, tasks = pool
    net = Linear(6)
    nu = 1e-2
    x = {"weight": torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))}
    lr = _exact_solve_lr(tasks, nu)
    est = [
        fob_maml_grad(
            *objectives(data, i, net), x, nu=nu, alpha=ALPHA, steps=200, lr=lr, estimator=estimator
        ).grad["weight"]
        for i in range(8)
    ]
    truth = exact_meta_grads(x["weight"], tasks, ALPHA)
    for i in range(8):
        assert rel(est[i], truth[i]) <= tol, (estimator, i, rel(est[i], truth[i]))


def test_symmetric_estimator_is_even_in_nu(pool):
    data, tasks = pool
    net = Linear(6)
    x = {"weight": torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))}
    kw = {"alpha": ALPHA, "steps": 50, "lr": _exact_solve_lr(tasks, 0.1)}
    g, f = objectives(data, 0, net)
    plus = fob_maml_grad(g, f, x, nu=0.1, **kw).grad["weight"]
    minus = fob_maml_grad(g, f, x, nu=-0.1, **kw).grad["weight"]
    assert torch.allclose(plus, minus, atol=1e-14, rtol=0)


def test_fob_maml_agrees_with_converged_imaml():
    torch.manual_seed(5)
    net = TinyMLP()
    sx, qx = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    sy, qy = torch.sin(sx.sum(-1)), torch.sin(qx.sum(-1))
    g, f = task_objectives(net, half_mse, (sx, sy), (qx, qy))
    x = {k: v.detach() for k, v in net.named_parameters()}
    kw = {"alpha": ALPHA, "steps": 500, "lr": 0.2}
    fob = fob_maml_grad(g, f, x, nu=1e-3, **kw).grad
    ref = imaml_grad(g, f, x, cg_steps=200, cg_tol=1e-14, **kw).grad
    flat = lambda d: torch.cat([v.flatten() for v in d.values()])  # noqa: E731
    assert rel(flat(fob), flat(ref)) <= 1e-4


def test_small_alpha_reductions(pool):
    """As alpha -> 0 all estimators reduce to mean_i grad f_i(x) (spec §7 Reductions)."""
    data, tasks = pool
    net = Linear(6)
    alpha = 1e-4
    xw = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = {"weight": xw}
    target = ((tasks.Q @ xw.unsqueeze(-1)).squeeze(-1) - tasks.q).mean(0)
    lg, lf = tasks.curvatures()
    lr = 1.0 / (lg + 1e-2 * lf + 1.0 / alpha)
    fo, fob = [], []
    for i in range(8):
        g, f = objectives(data, i, net)
        fo.append(fomaml_grad(g, f, x, steps=20, lr=lr, alpha=alpha).grad["weight"])
        fob.append(fob_maml_grad(g, f, x, nu=1e-2, alpha=alpha, steps=20, lr=lr).grad["weight"])
    assert rel(exact_meta_grad(xw, tasks, alpha), target) <= 1e-3
    assert rel(torch.stack(fo).mean(0), target) <= 1e-3
    assert rel(torch.stack(fob).mean(0), target) <= 1e-3


def test_second_order_maml_matches_finite_difference():
    torch.manual_seed(7)
    net = TinyMLP()
    sx, qx = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    g, f = task_objectives(net, half_mse, (sx, torch.cos(sx[:, 0])), (qx, torch.cos(qx[:, 0])))
    x = {k: v.detach() for k, v in net.named_parameters()}
    steps, lr = 3, 0.3
    grad = maml_grad(g, f, x, steps=steps, lr=lr).grad

    def k_step_objective(params):
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            return float(f(unrolled_gd(g, leaves, steps=steps, lr=lr), 0).detach())

    h = 1e-5
    for name, value in x.items():
        for j in range(value.numel()):
            e = torch.zeros_like(value).flatten()
            e[j] = h
            up = {**x, name: value + e.view_as(value)}
            dn = {**x, name: value - e.view_as(value)}
            fd = (k_step_objective(up) - k_step_objective(dn)) / (2 * h)
            assert abs(fd - float(grad[name].flatten()[j])) <= 1e-6


def test_linear_batched_solver_matches_generic(pool):
    data, tasks = pool
    net = Linear(6)
    xw = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    kw = {"alpha": ALPHA, "steps": 30, "lr": 0.3}
    batched = linear_inner_solve(xw, tasks, nu=0.05, **kw)
    for i in range(8):
        g, f = objectives(data, i, net)
        y = inner_solve(g, f, {"weight": xw}, nu=0.05, **kw)["weight"]
        assert torch.allclose(y, batched[i], atol=1e-12, rtol=0)
    gen_fob = fob_maml_grad(*objectives(data, 3, net), {"weight": xw}, nu=0.01, **kw).grad
    bat_fob = linear_fob_maml_grads(xw, tasks, nu=0.01, **kw)[3]
    assert torch.allclose(gen_fob["weight"], bat_fob, atol=1e-10, rtol=0)


def test_reptile_and_fomaml_are_biased_but_fob_is_not(pool):
    """Exact solves: FO-MAML / Reptile keep an O(1) relative error, FO-B-MAML does not."""
    data, tasks = pool
    net = Linear(6)
    xw = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x = {"weight": xw}
    lr = _exact_solve_lr(tasks, 1e-2)
    truth = exact_meta_grad(xw, tasks, ALPHA)
    fo, rep, fob = [], [], []
    for i in range(8):
        g, f = objectives(data, i, net)
        fo.append(fomaml_grad(g, f, x, steps=200, lr=lr, alpha=ALPHA).grad["weight"])
        rep.append(reptile_grad(g, x, steps=200, lr=lr, alpha=ALPHA).grad["weight"])
        fob.append(fob_maml_grad(g, f, x, nu=1e-2, alpha=ALPHA, steps=200, lr=lr).grad["weight"])
    assert rel(torch.stack(fo).mean(0), truth) > 0.05
    assert rel(torch.stack(rep).mean(0), truth) > 0.05
    assert rel(torch.stack(fob).mean(0), truth) < 1e-3


def test_common_random_numbers_recording_hook():
    """Both solves of one estimate see identical support mini-batches in the same order."""
    torch.manual_seed(10)
    net = TinyMLP()
    sx, qx = torch.randn(16, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    log: list[tuple[str, int, tuple | None]] = []

    def hook(kind, step, idx):
        log.append((kind, step, None if idx is None else tuple(idx.tolist())))

    g, f = task_objectives(
        net, half_mse, (sx, sx[:, 0]), (qx, qx[:, 1]), inner_batch_size=4, seed=3, data_hook=hook
    )
    x = {k: v.detach() for k, v in net.named_parameters()}
    fob_maml_grad(g, f, x, nu=0.1, alpha=ALPHA, steps=6, lr=0.1, estimator="symmetric")
    support = [e for e in log if e[0] == "support"]
    assert len(support) == 12
    first, second = support[:6], support[6:]
    assert first == second
    assert len({e[2] for e in first}) > 1  # really mini-batched, different batch per step


def test_local_smoothness_of_quadratic():
    a = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    h = torch.tensor([0.0, 1e-4], dtype=torch.float64)
    assert local_smoothness(lambda z: a @ z, x, h) == pytest.approx(3.0, rel=1e-10)


def test_bad_arguments_raise():
    g = lambda p, k: (p["w"] ** 2).sum()  # noqa: E731
    x = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="estimator"):
        fob_maml_grad(g, g, x, nu=0.1, alpha=1.0, steps=1, lr=0.1, estimator="central")
    with pytest.raises(ValueError, match="nu != 0"):
        fob_maml_grad(g, g, x, nu=0.0, alpha=1.0, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="query objective"):
        inner_solve(g, None, x, nu=0.1, alpha=1.0, steps=1, lr=0.1)


def test_proximal_reptile_is_x_minus_the_prox_solution_over_alpha():
    # Spec 3.8, baseline inner loops: with the proximal term the Reptile direction is
    # (x - y_i)/alpha, y_i = argmin g_i(y) + |y - x|^2/(2 alpha) (prox_solution, closed form).
    gen = torch.Generator().manual_seed(0)
    sx, sy, qx, qy, _ = sample_linear_tasks(4, 6, 10, 10, generator=gen)
    tasks = LinearTasks.from_data(sx, sy, qx, qy)
    x = torch.randn(6, dtype=torch.float64, generator=gen)
    lg, _ = tasks.curvatures()
    lr = 1.0 / (lg + 1.0 / ALPHA)
    expected = (x - prox_solution(x, tasks, ALPHA)) / ALPHA
    net = Linear(6)
    for i in range(4):
        g, _ = task_objectives(net, half_mse, (sx[i], sy[i]), (qx[i], qy[i]))
        got = reptile_grad(g, {"weight": x}, steps=300, lr=lr, alpha=ALPHA).grad["weight"]
        assert torch.allclose(got, expected[i], atol=1e-10, rtol=0)
    batched, _ = batched_reptile_grads(
        net, half_mse, {"weight": x}, (sx, sy), steps=300, lr=lr, alpha=ALPHA
    )
    assert torch.allclose(batched["weight"], expected, atol=1e-10, rtol=0)


def test_param_norm_refuses_an_empty_dict():
    with pytest.raises(ValueError, match="empty"):
        param_norm({})
