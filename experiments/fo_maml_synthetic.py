"""Synthetic parts A-D of the FO-B-MAML validation (spec §6), float64, closed-form ground truth.

The linear-task solves use ``ops.meta_tasks_closed_form.linear_inner_solve`` (the first-order
inner iteration of spec §3.3 batched over the pool; the unit tests pin it to the generic
``ops.meta_gradients.inner_solve`` to 1e-12).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ops.meta_tasks_closed_form import (
    LinearTasks,
    exact_meta_grad,
    exact_meta_grads,
    linear_inner_solve,
    meta_hessian,
    meta_minimizer,
    meta_objective,
    sample_linear_tasks,
)
from optim.sngdm import SNGDM

D64 = torch.float64
ALPHA = 0.5


def linear_pool(seed: int = 0) -> LinearTasks:
    """Spec §6 A: d=20, N=200, w_i = w_bar + 0.5 N(0,I), n_s=n_q=10, label noise 0.1."""
    gen = torch.Generator().manual_seed(seed)
    sx, sy, qx, qy, _ = sample_linear_tasks(200, 20, 10, 10, generator=gen, dtype=D64)
    return LinearTasks.from_data(sx, sy, qx, qy)


def inner_lr(tasks: LinearTasks, nu: float) -> float:
    """gamma = 1/(L_g + |nu| L_f + 1/alpha) (spec §3.3)."""
    lg, lf = tasks.curvatures()
    return 1.0 / (lg + abs(nu) * lf + 1.0 / ALPHA)


def estimator(
    tasks: LinearTasks, arm: str, steps: int = 100, nu: float = 1e-2, per_task: bool = False
):
    """Pool-averaged (or per-task, [N, d]) meta-gradient estimate x -> g_hat(x) for part A/B."""
    if per_task:
        pooled = estimator(tasks, arm, steps, nu)
        return lambda x: pooled(x, reduce=False)
    lr0, lr_nu = inner_lr(tasks, 0.0), inner_lr(tasks, nu)
    maps: dict = {}

    def y(x: torch.Tensor, v: float, lr: float) -> torch.Tensor:
        # The K-step solve is affine in x for quadratic tasks: y(x) = P x + r. Tabulate P, r once
        # by running the very same iteration from the basis vectors, then reuse it every step.
        if (v, lr) not in maps:
            r = linear_inner_solve(
                torch.zeros(tasks.dim, dtype=D64), tasks, nu=v, alpha=ALPHA, steps=steps, lr=lr
            )
            cols = [
                linear_inner_solve(e, tasks, nu=v, alpha=ALPHA, steps=steps, lr=lr) - r
                for e in torch.eye(tasks.dim, dtype=D64)
            ]
            maps[(v, lr)] = (torch.stack(cols, dim=-1), r)
        p, r = maps[(v, lr)]
        return (p @ x.unsqueeze(-1)).squeeze(-1) + r

    def mean(per: torch.Tensor, reduce: bool) -> torch.Tensor:
        return per.mean(0) if reduce else per

    if arm == "exact":
        return lambda x, reduce=True: mean(exact_meta_grads(x, tasks, ALPHA), reduce)
    if arm == "fomaml":  # grad f_i at the proximal solve y_i^0
        return lambda x, reduce=True: mean(
            (tasks.Q @ y(x, 0, lr0).unsqueeze(-1)).squeeze(-1) - tasks.q, reduce
        )
    if arm == "reptile":  # (x - y_i^0)/alpha on the support loss only
        return lambda x, reduce=True: mean((x - y(x, 0, lr0)) / ALPHA, reduce)
    if arm == "forward":
        return lambda x, reduce=True: mean(
            (y(x, 0, lr_nu) - y(x, nu, lr_nu)) / (ALPHA * nu), reduce
        )
    if arm == "symmetric":
        return lambda x, reduce=True: mean(
            (y(x, -nu, lr_nu) - y(x, nu, lr_nu)) / (2 * ALPHA * nu), reduce
        )
    raise ValueError(arm)


def outer_gd(
    tasks: LinearTasks, grad_fn, steps: int, lr: float
) -> tuple[list[float], torch.Tensor]:
    """Outer GD from x = 0; returns the true ||grad F|| after every step and the final x."""
    # F is quadratic: grad F(x) = hess F x + grad F(0) exactly, cheaper than a solve per step.
    hess, grad0 = (
        meta_hessian(tasks, ALPHA),
        exact_meta_grad(torch.zeros(tasks.dim, dtype=D64), tasks, ALPHA),
    )
    x = torch.zeros(tasks.dim, dtype=D64)
    norms = []
    for _ in range(steps):
        x = x - lr * grad_fn(x)
        norms.append(float((hess @ x + grad0).norm()))
    return norms, x


def part_a(outer_steps: int = 1000) -> dict:
    """Floors of every arm under deterministic outer GD with step 0.5/L_F (spec §6 A)."""
    tasks = linear_pool()
    lf_meta = float(torch.linalg.eigvalsh(meta_hessian(tasks, ALPHA))[-1])
    f_star = float(meta_objective(meta_minimizer(tasks, ALPHA), tasks, ALPHA))
    lr = 0.5 / lf_meta
    arms = {
        "exact": ("exact", 100),
        "fomaml": ("fomaml", 100),
        "reptile": ("reptile", 100),
        "forward_K100": ("forward", 100),
        "symmetric_K100": ("symmetric", 100),
        "symmetric_K20": ("symmetric", 20),
        "symmetric_K5": ("symmetric", 5),
    }
    out: dict = {"outer_lr": lr, "L_F": lf_meta, "F_star": f_star, "arms": {}}
    for name, (arm, k) in arms.items():
        steps = outer_steps * (3 if arm in ("fomaml", "reptile") else 1)
        norms, x = outer_gd(tasks, estimator(tasks, arm, steps=k), steps, lr)
        gap = float(meta_objective(x, tasks, ALPHA)) - f_star
        out["arms"][name] = {
            "final_grad_norm": norms[outer_steps - 1],
            "final_grad_norm_3x": norms[-1] if steps > outer_steps else None,
            "F_gap": gap,
            "trace": norms[: outer_steps : max(1, outer_steps // 200)],
        }
        print(f"A  {name:16s} ||grad F|| = {norms[outer_steps - 1]:.3e}  F-F* = {gap:.2e}")
    arm = out["arms"]

    def stable(name: str) -> bool:
        a, b = arm[name]["final_grad_norm"], arm[name]["final_grad_norm_3x"]
        return abs(b - a) <= 0.1 * a

    out["accept"] = {
        "symmetric_K100<=1e-3": arm["symmetric_K100"]["final_grad_norm"] <= 1e-3,
        "forward_K100<=5e-3": arm["forward_K100"]["final_grad_norm"] <= 5e-3,
        "fomaml>=0.02_and_stable_3x": arm["fomaml"]["final_grad_norm"] >= 0.02 and stable("fomaml"),
        "reptile>=0.1_and_stable_3x": arm["reptile"]["final_grad_norm"] >= 0.1
        and stable("reptile"),
        "symmetric_floor_decreases_K5_K20_K100": arm["symmetric_K5"]["final_grad_norm"]
        > arm["symmetric_K20"]["final_grad_norm"]
        > arm["symmetric_K100"]["final_grad_norm"],
    }
    out["stochastic"] = part_a_stochastic(tasks, f_star, steps=max(outer_steps // 2, 50))
    return out


def part_a_stochastic(tasks: LinearTasks, f_star: float, steps: int, seeds=(0, 1, 2)) -> dict:
    """Reported only: meta-batch 16 from the pool, SNGDM (beta 0.9, lr 0.05), 3 seeds."""
    out: dict = {}
    for arm in ("symmetric", "fomaml", "reptile"):
        finals = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            x = torch.zeros(tasks.dim, dtype=D64, requires_grad=True)
            opt = SNGDM([x], lr=0.05, momentum=0.9)
            tail = []
            full = estimator(tasks, arm, per_task=True)
            for t in range(steps):
                idx = torch.randint(200, (16,), generator=gen)
                x.grad = full(x.detach())[idx].mean(0)
                opt.step()
                if t >= steps - 50:
                    tail.append(float(exact_meta_grad(x.detach(), tasks, ALPHA).norm()))
            finals.append(sum(tail) / len(tail))
        out[arm] = {"final_grad_norm_last50": finals, "mean": sum(finals) / len(finals)}
        print(f"A* {arm:10s} SNGDM meta-batch 16: mean ||grad F|| (last 50) {out[arm]['mean']:.3e}")
    return out


def _slope(xs, ys) -> float:
    return float(np.polyfit(np.log10(xs), np.log10(ys), 1)[0])


def part_b(seed: int = 1) -> dict:
    """Relative error of the pool-averaged estimate vs nu with exact solves (K=200), spec §6 B."""
    tasks = linear_pool()
    x = torch.randn(tasks.dim, dtype=D64, generator=torch.Generator().manual_seed(seed))
    truth = exact_meta_grad(x, tasks, ALPHA)
    nus = [1e-1, 1e-2, 1e-3]
    out: dict = {"nu": nus}
    for arm in ("forward", "symmetric"):
        errs = [
            float((estimator(tasks, arm, 200, nu)(x) - truth).norm() / truth.norm()) for nu in nus
        ]
        out[arm] = {"rel_error": errs, "slope": _slope(nus, errs)}
        print(
            f"B  {arm:10s} rel errors {[f'{e:.2e}' for e in errs]}  slope {out[arm]['slope']:.2f}"
        )
    for arm in ("fomaml", "reptile"):
        out[arm] = float((estimator(tasks, arm, 200)(x) - truth).norm() / truth.norm())
    out["accept"] = {
        "forward_slope_in_[0.85,1.15]": 0.85 <= out["forward"]["slope"] <= 1.15,
        "symmetric_slope_in_[1.8,2.2]": 1.8 <= out["symmetric"]["slope"] <= 2.2,
    }
    return out


def part_c(num_nu: int = 26, draws: int = 3, seed: int = 1) -> dict:
    """Inexact solves: noise N(0, delta^2/d I) on every solve; best error over nu vs delta (§6 C)."""
    tasks = linear_pool()
    x = torch.randn(tasks.dim, dtype=D64, generator=torch.Generator().manual_seed(seed))
    truth = exact_meta_grad(x, tasks, ALPHA)
    nus = np.logspace(-5, 0, num_nu).tolist()
    deltas = [1e-3, 1e-5, 1e-7]
    gen = torch.Generator().manual_seed(seed + 100)
    solves = {}
    for nu in nus:
        lr = inner_lr(tasks, nu)
        for v in (-nu, 0.0, nu):
            solves[(nu, v)] = linear_inner_solve(x, tasks, nu=v, alpha=ALPHA, steps=300, lr=lr)

    def noisy(y: torch.Tensor, delta: float) -> torch.Tensor:
        return y + delta / math.sqrt(tasks.dim) * torch.randn(y.shape, generator=gen, dtype=D64)

    out: dict = {"nu": nus, "delta": deltas}
    for arm in ("forward", "symmetric"):
        curves, best = {}, []
        for delta in deltas:
            errs = []
            for nu in nus:
                e = []
                for _ in range(draws):
                    plus = noisy(solves[(nu, nu)], delta)
                    if arm == "forward":
                        g = (noisy(solves[(nu, 0.0)], delta) - plus) / (ALPHA * nu)
                    else:
                        g = (noisy(solves[(nu, -nu)], delta) - plus) / (2 * ALPHA * nu)
                    e.append(float((g.mean(0) - truth).norm()))
                errs.append(sum(e) / len(e))
            curves[str(delta)] = errs
            best.append(min(errs))
        out[arm] = {"curves": curves, "best": best, "slope": _slope(deltas, best)}
        print(
            f"C  {arm:10s} best errors {[f'{b:.2e}' for b in best]}  slope {out[arm]['slope']:.2f}"
        )
    out["accept"] = {
        "forward_slope_in_[0.4,0.6]": 0.4 <= out["forward"]["slope"] <= 0.6,
        "symmetric_slope_in_[0.57,0.77]": 0.57 <= out["symmetric"]["slope"] <= 0.77,
        "symmetric_better_at_every_delta": all(
            s < f for s, f in zip(out["symmetric"]["best"], out["forward"]["best"], strict=True)
        ),
    }
    return out


def sine_toy(seed: int, quadratic: bool = False, d: int = 5, tasks: int = 20, alpha: float = 0.25):
    """One-step MAML toy of spec §6 D: F(x) = mean_i f_i(x - alpha grad g_i(x)).

    g_i(x) = (1/8) sum_j sin(a_j^T x + phi_j) (or, as control, a quadratic with the same
    curvature scale), f_i(x) = 0.5 ||x - w_i||^2. Returns (grad F, F, alpha * max_i sup ||hess g_i||
    upper bound).
    """
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(tasks, 8, d, generator=gen, dtype=D64)
    phi = 2 * math.pi * torch.rand(tasks, 8, generator=gen, dtype=D64)
    w = torch.randn(tasks, d, generator=gen, dtype=D64)
    # -M <= hess g_i(x) <= M with M = (1/8) sum_j a_j a_j^T, so sup_x ||hess g_i|| <= ||M||.
    outer = torch.einsum("tjd,tje->tde", a, a) / 8
    curv = torch.linalg.matrix_norm(outer, ord=2)
    if quadratic:  # control: g_i(x) = x^T M x / 2, PSD with the same curvature scale
        grad_g = lambda x: torch.einsum("tde,e->td", outer, x)  # noqa: E731
    else:
        grad_g = lambda x: (torch.cos(a @ x + phi).unsqueeze(-1) * a).sum(1) / 8  # noqa: E731

    def meta_objective(x: torch.Tensor) -> torch.Tensor:
        y = x - alpha * grad_g(x)
        return 0.5 * ((y - w) ** 2).sum(-1).mean()

    return torch.func.grad(meta_objective), meta_objective, alpha * float(curv.max())


def smoothness_ratio(seed: int, quadratic: bool, points_per_scale: int) -> dict:
    grad_f, _, bound = sine_toy(seed, quadratic)
    gen = torch.Generator().manual_seed(seed + 1000)
    scales = [0.5, 1, 2, 4, 8, 16, 32, 64]
    rows = []
    for s in scales:
        for _ in range(points_per_scale):
            x = s * torch.randn(5, generator=gen, dtype=D64)
            h = torch.randn(5, generator=gen, dtype=D64)
            h = 1e-4 * h / h.norm()
            local = float((grad_f(x + h) - grad_f(x)).norm() / h.norm())
            rows.append((float(grad_f(x).norm()), local))
    rows.sort()
    k = max(1, len(rows) // 10)
    bottom, top = np.median([r[1] for r in rows[:k]]), np.median([r[1] for r in rows[-k:]])
    return {
        "alpha_hess_bound": bound,
        "bottom_decile_grad": float(np.median([r[0] for r in rows[:k]])),
        "top_decile_grad": float(np.median([r[0] for r in rows[-k:]])),
        "bottom_smoothness": float(bottom),
        "top_smoothness": float(top),
        "ratio": float(top / bottom),
        "points": rows,
    }


def part_d(points_per_scale: int = 20, control_seeds=(0, 1, 2, 3, 4)) -> dict:
    """Non-smoothness of the MAML objective (spec §6 D) + reported GD/SNGDM/clipped comparison."""
    main = smoothness_ratio(0, False, points_per_scale)
    controls = [smoothness_ratio(s, True, points_per_scale)["ratio"] for s in control_seeds]
    print(
        f"D  sine: ||grad F|| {main['bottom_decile_grad']:.2f} -> {main['top_decile_grad']:.1f}, "
        f"smoothness {main['bottom_smoothness']:.2f} -> {main['top_smoothness']:.2f}, "
        f"ratio {main['ratio']:.2f}; quadratic control ratios {[round(c, 3) for c in controls]}"
    )
    out = {"sine": main, "quadratic_control_ratios": controls}
    out["accept"] = {
        "sine_ratio>=2": main["ratio"] >= 2,
        "quadratic_control_in_[0.8,1.25]": all(0.8 <= c <= 1.25 for c in controls),
    }
    out["optimizers"] = compare_outer_optimizers()
    return out


def compare_outer_optimizers(steps: int = 300, seed: int = 0) -> dict:
    """Reported only: GD vs SNGDM (normalized) vs clipped from far starts on the sine toy."""
    grad_f, objective, _ = sine_toy(0, False)
    x0 = 32 * torch.randn(5, generator=torch.Generator().manual_seed(seed + 7), dtype=D64)
    runs = {
        "gd": lambda p: SNGDM(p, lr=0.5, momentum=0.0, mode="sgd"),
        "sngdm": lambda p: SNGDM(p, lr=0.5, momentum=0.9, mode="normalized"),
        "clipped": lambda p: SNGDM(p, lr=0.5, momentum=0.9, mode="clipped", clip_threshold=1.0),
    }
    out = {}
    for name, make in runs.items():
        x = x0.clone().requires_grad_(True)
        opt = make([x])
        trace = []
        for _ in range(steps):
            x.grad = grad_f(x.detach())
            opt.step()
            trace.append(float(objective(x.detach())))
        out[name] = trace
        print(f"D* {name:8s} F after {steps} steps: {trace[-1]:.4f}")
    return out
