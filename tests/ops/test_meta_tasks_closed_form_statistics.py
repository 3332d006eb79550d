"""Closed-form linear tasks (``ops.meta_tasks_closed_form``) against independent numpy/loop
computations: statistics with n_s != n_q, curvatures, the minimizer, warm starts, the forward
estimator, the solve noise scale and the sampled task family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ops.meta_tasks_closed_form import (
    LinearTasks,
    exact_meta_grad,
    exact_meta_grads,
    linear_fob_maml_grads,
    linear_inner_solve,
    meta_minimizer,
    meta_objective,
    sample_linear_tasks,
)

ALPHA = 0.5


def _data(num_tasks: int = 3, dim: int = 4, ns: int = 3, nq: int = 7, seed: int = 0):
    """Support and query sets of different sizes (every other test uses n_s == n_q)."""
    gen = torch.Generator().manual_seed(seed)
    sx = torch.randn(num_tasks, ns, dim, generator=gen, dtype=torch.float64)
    sy = torch.randn(num_tasks, ns, generator=gen, dtype=torch.float64)
    qx = 2.0 * torch.randn(num_tasks, nq, dim, generator=gen, dtype=torch.float64)
    qy = torch.randn(num_tasks, nq, generator=gen, dtype=torch.float64)
    return sx, sy, qx, qy


def test_meta_objective_is_the_mean_query_half_mse_at_the_prox_solution():
    """F(x) = mean_i ||C_i y_i - d_i||^2 / (2 n_q), y_i = argmin ||A_i y - b_i||^2/(2 n_s)
    + ||y - x||^2/(2 alpha), computed here from the raw data with numpy."""
    sx, sy, qx, qy = _data()
    tasks = LinearTasks.from_data(sx, sy, qx, qy)
    x = np.array([0.3, -1.0, 0.5, 2.0])
    losses = []
    for a, b, c, d in zip(sx.numpy(), sy.numpy(), qx.numpy(), qy.numpy(), strict=True):
        ns, nq = len(b), len(d)
        y = np.linalg.solve(a.T @ a / ns + np.eye(4) / ALPHA, a.T @ b / ns + x / ALPHA)
        losses.append(np.sum((c @ y - d) ** 2) / (2 * nq))
    got = float(meta_objective(torch.tensor(x), tasks, ALPHA))
    assert got == pytest.approx(float(np.mean(losses)), rel=1e-12)


def test_curvatures_are_the_largest_support_and_query_eigenvalues():
    """(L_g, L_f) = max_i lambda_max(A_i^T A_i / n_s), max_i lambda_max(C_i^T C_i / n_q)."""
    sx, sy, qx, qy = _data()
    lg, lf = LinearTasks.from_data(sx, sy, qx, qy).curvatures()
    ref_g = max(np.linalg.eigvalsh(a.T @ a / a.shape[0])[-1] for a in sx.numpy())
    ref_f = max(np.linalg.eigvalsh(c.T @ c / c.shape[0])[-1] for c in qx.numpy())
    assert ref_g != pytest.approx(ref_f, rel=0.1)  # the two really differ here
    assert lg == pytest.approx(ref_g, rel=1e-12)
    assert lf == pytest.approx(ref_f, rel=1e-12)


def test_meta_minimizer_is_a_stationary_minimum():
    """grad F(x*) = 0, and F grows in every direction from x* (F is a convex quadratic)."""
    sx, sy, qx, qy = _data()
    tasks = LinearTasks.from_data(sx, sy, qx, qy)
    x_star = meta_minimizer(tasks, ALPHA)
    assert float(exact_meta_grad(x_star, tasks, ALPHA).abs().max()) < 1e-10
    f_star = float(meta_objective(x_star, tasks, ALPHA))
    for k in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[k] = 0.1
        assert float(meta_objective(x_star + e, tasks, ALPHA)) > f_star
        assert float(meta_objective(x_star - e, tasks, ALPHA)) > f_star


def test_inner_solve_warm_start_at_the_solution_stays_there():
    """Started at the exact minimizer of g_i + nu f_i + ||y - x||^2/(2 alpha), gradient steps do
    not move; ``steps=0`` returns the start itself."""
    sx, sy, qx, qy = _data()
    tasks = LinearTasks.from_data(sx, sy, qx, qy)
    x, nu = torch.tensor([0.3, -1.0, 0.5, 2.0], dtype=torch.float64), 0.2
    exact = []
    for a, b, c, d in zip(sx.numpy(), sy.numpy(), qx.numpy(), qy.numpy(), strict=True):
        lhs = a.T @ a / len(b) + nu * c.T @ c / len(d) + np.eye(4) / ALPHA
        rhs = a.T @ b / len(b) + nu * c.T @ d / len(d) + x.numpy() / ALPHA
        exact.append(np.linalg.solve(lhs, rhs))
    start = torch.tensor(np.stack(exact))
    y = linear_inner_solve(x, tasks, nu=nu, alpha=ALPHA, steps=5, lr=0.01, start=start)
    torch.testing.assert_close(y, start, rtol=0, atol=1e-12)
    y0 = linear_inner_solve(x, tasks, nu=nu, alpha=ALPHA, steps=0, lr=0.01, start=start)
    assert torch.equal(y0, start)


def test_forward_estimator_with_converged_solves_is_the_meta_gradient():
    """(y^0 - y^nu) / (alpha nu) -> (I + alpha S_i)^{-1} grad f_i(y_i*) as nu -> 0 (O(nu))."""
    sx, sy, qx, qy = _data()
    tasks = LinearTasks.from_data(sx, sy, qx, qy)
    x = torch.tensor([0.3, -1.0, 0.5, 2.0], dtype=torch.float64)
    lg, lf = tasks.curvatures()
    nu = 1e-4
    lr = 1.0 / (lg + nu * lf + 1.0 / ALPHA)
    est = linear_fob_maml_grads(
        x, tasks, nu=nu, alpha=ALPHA, steps=2000, lr=lr, estimator="forward"
    )
    truth = exact_meta_grads(x, tasks, ALPHA)
    err = torch.linalg.vector_norm(est - truth) / torch.linalg.vector_norm(truth)
    assert float(err) < 1e-2


def test_unknown_estimator_is_refused():
    """Only 'forward' and 'symmetric' exist; anything else must not silently return a number."""
    tasks = LinearTasks.from_data(*_data())
    with pytest.raises(ValueError, match="estimator"):
        linear_fob_maml_grads(
            torch.zeros(4, dtype=torch.float64), tasks, nu=0.1, alpha=ALPHA, steps=1, lr=0.1,
            estimator="central",
        )  # fmt: skip


def test_solve_noise_has_total_variance_noise_std_squared():
    """Each solve gets N(0, (delta^2/d) I): its squared norm has mean delta^2. With no inner
    steps both solves return x, so the symmetric estimate is the noise difference over
    2 alpha nu = 1, whose squared norm has mean 2 delta^2 (chi-square, N d = 16000 dof)."""
    num_tasks, dim, delta = 4000, 4, 0.3
    tasks = LinearTasks.from_data(*_data(num_tasks=num_tasks, dim=dim, ns=2, nq=2))
    x = torch.zeros(dim, dtype=torch.float64)
    est = linear_fob_maml_grads(
        x, tasks, nu=1.0, alpha=0.5, steps=0, lr=0.1, noise_std=delta,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    mean_sq = float(est.pow(2).sum(-1).mean())
    assert mean_sq == pytest.approx(2 * delta**2, rel=0.05)  # rel. std of the mean ~ 1.1%
    quiet = linear_fob_maml_grads(x, tasks, nu=1.0, alpha=0.5, steps=0, lr=0.1, noise_std=0.0)
    assert torch.equal(quiet, torch.zeros_like(quiet))


def test_sampled_tasks_have_the_requested_spread_and_label_noise():
    """w_i = w_bar + task_std N(0, I) and y = X w_i + label_noise N(0, 1), checked on the
    returned w and data (sample std over many draws, ~1% statistical error)."""
    gen = torch.Generator().manual_seed(0)
    sx, sy, qx, qy, w = sample_linear_tasks(
        2000, 5, 6, 4, task_std=0.5, label_noise=0.1, generator=gen
    )
    assert sx.shape == (2000, 6, 5) and qy.shape == (2000, 4) and w.shape == (2000, 5)
    spread = (w - w.mean(0)).std()
    assert float(spread) == pytest.approx(0.5, rel=0.05)
    support_residual = sy - (sx @ w.unsqueeze(-1)).squeeze(-1)
    query_residual = qy - (qx @ w.unsqueeze(-1)).squeeze(-1)
    assert float(support_residual.std()) == pytest.approx(0.1, rel=0.05)
    assert float(query_residual.std()) == pytest.approx(0.1, rel=0.05)
