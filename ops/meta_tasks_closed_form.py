"""Closed forms for linear-regression task families (ground truth for FO-B-MAML, spec §3.1, §6).

Task i has support data (A_i, b_i) and query data (C_i, d_i) with half-mean-squared losses

    g_i(y) = ||A_i y - b_i||^2 / (2 n_s),     f_i(y) = ||C_i y - d_i||^2 / (2 n_q),

so grad g_i(y) = S_i y - s_i with S_i = A_i^T A_i / n_s, s_i = A_i^T b_i / n_s (same for Q_i, q_i).
The proximal inner problem y_i*(x) = argmin g_i(y) + ||y - x||^2/(2 alpha) is then linear in x:

    y_i*(x) = (I + alpha S_i)^{-1} (x + alpha s_i)                                  (prox_solution)
    grad F(x) = mean_i (I + alpha S_i)^{-1} (Q_i y_i* - q_i)                        (exact_meta_grad)
    hess F    = mean_i M_i Q_i M_i,  M_i = (I + alpha S_i)^{-1}  (F is quadratic)   (meta_hessian)

All functions are batched over tasks (leading dim N) and work in any float dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LinearTasks(NamedTuple):
    """Sufficient statistics of N linear-regression tasks in dimension d.

    Attributes:
        S: support curvatures A^T A / n_s, shape [N, d, d].
        s: support moments A^T b / n_s, shape [N, d].
        Q: query curvatures C^T C / n_q, shape [N, d, d].
        q: query moments C^T d / n_q, shape [N, d].
        const_q: query constants ||d||^2 / (2 n_q), shape [N] (only for objective values).
    """

    S: Tensor
    s: Tensor
    Q: Tensor
    q: Tensor
    const_q: Tensor

    @classmethod
    def from_data(cls, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> LinearTasks:
        """Build from support inputs [N, n_s, d], targets [N, n_s] and query [N, n_q, d], [N, n_q]."""
        ns, nq = sx.shape[1], qx.shape[1]
        return cls(
            S=sx.transpose(1, 2) @ sx / ns,
            s=(sx.transpose(1, 2) @ sy.unsqueeze(-1)).squeeze(-1) / ns,
            Q=qx.transpose(1, 2) @ qx / nq,
            q=(qx.transpose(1, 2) @ qy.unsqueeze(-1)).squeeze(-1) / nq,
            const_q=(qy**2).sum(1) / (2 * nq),
        )

    @property
    def dim(self) -> int:
        return self.S.shape[-1]

    def curvatures(self) -> tuple[float, float]:
        """Largest support and query curvatures over the pool (L_g, L_f)."""
        return (
            float(torch.linalg.eigvalsh(self.S)[:, -1].max()),
            float(torch.linalg.eigvalsh(self.Q)[:, -1].max()),
        )


def sample_linear_tasks(
    num_tasks: int,
    dim: int,
    n_support: int,
    n_query: int,
    *,
    task_std: float = 0.5,
    label_noise: float = 0.1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Spec §6 A task family: w_bar ~ N(0, I), w_i = w_bar + task_std N(0, I), Gaussian design.

    Returns:
        ``(support_x [N,n_s,d], support_y [N,n_s], query_x [N,n_q,d], query_y [N,n_q], w [N,d])``.
    """
    kw = {"generator": generator, "dtype": dtype}
    w_bar = torch.randn(dim, **kw)
    w = w_bar + task_std * torch.randn(num_tasks, dim, **kw)
    sx = torch.randn(num_tasks, n_support, dim, **kw)
    qx = torch.randn(num_tasks, n_query, dim, **kw)
    sy = (sx @ w.unsqueeze(-1)).squeeze(-1) + label_noise * torch.randn(num_tasks, n_support, **kw)
    qy = (qx @ w.unsqueeze(-1)).squeeze(-1) + label_noise * torch.randn(num_tasks, n_query, **kw)
    return sx, sy, qx, qy, w


def _eye(tasks: LinearTasks) -> Tensor:
    return torch.eye(tasks.dim, dtype=tasks.S.dtype, device=tasks.S.device)


def prox_solution(x: Tensor, tasks: LinearTasks, alpha: float, nu: float = 0.0) -> Tensor:
    """Exact y_i^nu(x) = argmin g_i + nu f_i + ||y - x||^2/(2 alpha); x is [d] or [N, d] -> [N, d].

    Optimality: (S_i + nu Q_i + I/alpha) y = s_i + nu q_i + x/alpha.
    """
    lhs = tasks.S + nu * tasks.Q + _eye(tasks) / alpha
    rhs = tasks.s + nu * tasks.q + x.expand_as(tasks.s) / alpha
    return torch.linalg.solve(lhs, rhs)


def query_loss(y: Tensor, tasks: LinearTasks) -> Tensor:
    """Per-task query losses f_i(y_i) for y of shape [N, d]."""
    quad = 0.5 * (y.unsqueeze(1) @ tasks.Q @ y.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return quad - (tasks.q * y).sum(-1) + tasks.const_q


def meta_objective(x: Tensor, tasks: LinearTasks, alpha: float) -> Tensor:
    """F(x) = mean_i f_i(y_i*(x)) (spec §3.1)."""
    return query_loss(prox_solution(x, tasks, alpha), tasks).mean()


def exact_meta_grads(x: Tensor, tasks: LinearTasks, alpha: float) -> Tensor:
    """Per-task exact meta-gradients (I + alpha S_i)^{-1} grad f_i(y_i*), shape [N, d]."""
    y = prox_solution(x, tasks, alpha)
    grad_f = (tasks.Q @ y.unsqueeze(-1)).squeeze(-1) - tasks.q
    return torch.linalg.solve(_eye(tasks) + alpha * tasks.S, grad_f)


def exact_meta_grad(x: Tensor, tasks: LinearTasks, alpha: float) -> Tensor:
    """grad F(x) = mean_i (I + alpha S_i)^{-1} grad f_i(y_i*(x)) (spec §3.1), shape [d]."""
    return exact_meta_grads(x, tasks, alpha).mean(0)


def meta_hessian(tasks: LinearTasks, alpha: float) -> Tensor:
    """hess F = mean_i M_i Q_i M_i with M_i = (I + alpha S_i)^{-1} (symmetric), shape [d, d]."""
    m = torch.linalg.inv(_eye(tasks) + alpha * tasks.S)
    return (m @ tasks.Q @ m).mean(0)


def meta_minimizer(tasks: LinearTasks, alpha: float) -> Tensor:
    """x* = argmin F: solves hess F x = -grad F(0) (F is quadratic)."""
    zero = torch.zeros(tasks.dim, dtype=tasks.S.dtype, device=tasks.S.device)
    return torch.linalg.solve(meta_hessian(tasks, alpha), -exact_meta_grad(zero, tasks, alpha))


def linear_inner_solve(
    x: Tensor,
    tasks: LinearTasks,
    *,
    nu: float,
    alpha: float,
    steps: int,
    lr: float,
    start: Tensor | None = None,
) -> Tensor:
    """The first-order ``inner_solve`` of spec §3.3 for all N linear tasks at once.

    Same iteration as ``ops.meta_gradients.inner_solve`` with the gradients written in closed form
    (``grad g = S y - s``), batched over tasks; used by the synthetic experiment where a
    per-task autograd loop would be needlessly slow. Returns [N, d].
    """
    # y <- y - lr (H y - l + (y - x)/alpha)  ==  y <- A y + b  with  A = I - lr (H + I/alpha),
    # b = lr (l + x/alpha): one batched matmul-add per step.
    eye = _eye(tasks)
    step_matrix = eye - lr * (tasks.S + nu * tasks.Q + eye / alpha)
    offset = (lr * (tasks.s + nu * tasks.q + x.expand_as(tasks.s) / alpha)).unsqueeze(-1)
    y = (start if start is not None else x).expand_as(tasks.s).unsqueeze(-1).clone()
    for _ in range(steps):
        y = torch.baddbmm(offset, step_matrix, y)
    return y.squeeze(-1)


def linear_fob_maml_grads(
    x: Tensor,
    tasks: LinearTasks,
    *,
    nu: float,
    alpha: float,
    steps: int,
    lr: float,
    estimator: str = "symmetric",
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-task FO-B-MAML estimates [N, d] for linear tasks (spec §3.4).

    ``noise_std`` adds independent N(0, (noise_std^2/d) I) to each solve's output, per task and
    per solve, to emulate inexact solves with accuracy delta = noise_std (spec §6 C).
    """

    def noisy(y: Tensor) -> Tensor:
        if noise_std == 0:
            return y
        z = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        return y + noise_std / tasks.dim**0.5 * z

    kw = {"alpha": alpha, "steps": steps, "lr": lr}
    y_plus = noisy(linear_inner_solve(x, tasks, nu=nu, **kw))
    if estimator == "forward":
        y0 = noisy(linear_inner_solve(x, tasks, nu=0.0, **kw))
        return (y0 - y_plus) / (alpha * nu)
    if estimator == "symmetric":
        y_minus = noisy(linear_inner_solve(x, tasks, nu=-nu, **kw))
        return (y_minus - y_plus) / (2 * alpha * nu)
    raise ValueError(f"estimator must be 'forward' or 'symmetric', got {estimator!r}")
