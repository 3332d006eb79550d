"""Cubic-regularized Newton subproblem solvers (Lightning-free, float64).

One convention everywhere in this project, the **M/6** one (Nesterov & Polyak 2006; OPTAMI):

    Φ(h) = <g, h> + ½ <H h, h> + (M/6) ‖h‖³,          M ≈ Lipschitz constant of the Hessian.

Its global minimizer h* is characterised by (Nesterov & Polyak 2006, Thm. 10)

    (H + (M r / 2) I) h* = −g,     H + (M r / 2) I ⪰ 0,     r = ‖h*‖.

`konstmish/opt_methods` writes the cubic term as (M/3)‖h‖³; :func:`from_m3_convention` converts such an
M so the two code bases can be compared without silently doubling or halving the regularization.

Solvers:

* :func:`solve_cubic_exact` eigendecomposes H and solves the scalar secular equation φ(r) = r by
  bracketing + safeguarded Newton with bisection fallback, with the "hard case" (g ⟂ the λ₁-eigenspace) handled.
* :func:`solve_cubic_hvp` only needs Hessian-vector products: gradient descent on Φ started at the
  Cauchy point with a tiny random perturbation of g (Carmon & Duchi 2019, "Gradient descent finds the
  cubic-regularized nonconvex Newton step").
* :func:`reg_newton_step` is the gradient-regularized Newton step −(H + √(M‖g‖) I)⁻¹ g (Mishchenko 2023),
  the step the convex variant of the method uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

HVP = Callable[[Tensor], Tensor]


class CubicStep(NamedTuple):
    """A solved subproblem plus the diagnostics a trainer logs.

    Attributes:
        h: the step, in the dtype of the input ``g``.
        model_value: Φ(h) (float64 scalar tensor).
        residual: ‖∇Φ(h)‖ = ‖g + H h + (M/2)‖h‖ h‖, the first-order optimality residual.
        iterations: bisection/Newton iterations (exact) or gradient steps (HVP).
        hard_case: True when the exact solver took the hard-case branch.
        lambda_min: smallest eigenvalue of H (exact solver; NaN for the HVP solver).
    """

    h: Tensor
    model_value: Tensor
    residual: Tensor
    iterations: int
    hard_case: bool
    lambda_min: float


def from_m3_convention(m3: float) -> float:
    """Convert a regularization constant of the (M/3)‖h‖³ convention into this project's M/6 one.

    (M₃/3)‖h‖³ = (M₆/6)‖h‖³  ⇔  M₆ = 2 M₃.
    """
    return 2.0 * m3


def _check_inputs(g: Tensor, M: float, H: Tensor | None = None) -> None:
    if g.dim() != 1:
        raise ValueError(f"g must be a flat vector, got shape {tuple(g.shape)}")
    # A NaN or inf would never satisfy the root bracketing and hang the solve (and, under DDP, every
    # rank waiting for it): fail loudly instead.
    for name, t in (("g", g), ("H", H)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"cubic subproblem: {name} has non-finite entries (nan/inf)")
    if not (M > 0 and math.isfinite(M)):
        raise ValueError(f"cubic regularization M must be a positive finite number, got M={M}")


#: Doublings of the root bracket before giving up (2¹⁰⁷⁴ spans all of float64).
_MAX_BRACKET_DOUBLINGS = 2100


def _norm(v: np.ndarray) -> float:
    """‖v‖ without the overflow (or underflow to 0) of the squared sum: ‖h‖ ≳ 1e154 happens with a
    tiny M. The plain formula is kept where it is finite, so ordinary solves are unchanged."""
    with np.errstate(over="ignore"):
        squared = float(v @ v)
    if math.isfinite(squared) and (squared > 0.0 or not v.any()):
        return math.sqrt(squared)
    top = float(np.abs(v).max())
    return top * math.sqrt(float((v / top) @ (v / top)))


def _sqrt_square_plus(a: float, b: float) -> float:
    """√(a² + b), b ≥ 0; through hypot where Python's float power would raise OverflowError."""
    if abs(a) < 1e150:
        return math.sqrt(a**2 + b)
    return math.hypot(a, math.sqrt(b))


def _hard_case_tau(coef: np.ndarray, r_lo: float) -> float | None:
    """τ = √(r_lo² − ‖coef‖²) when ‖coef‖ ≤ r_lo (the hard case), else ``None``; scaled by r_lo
    where r_lo² would overflow."""
    if r_lo < 1e150:
        squared = float(coef @ coef)
        return math.sqrt(r_lo**2 - squared) if squared <= r_lo**2 else None
    ratio = _norm(coef) / r_lo
    return r_lo * math.sqrt((1.0 - ratio) * (1.0 + ratio)) if ratio <= 1.0 else None


def _check_step_bound(what: str, value: float, M: float, curvature: str) -> None:
    """A step-norm bound that overflowed float64 (M tiny for the curvature) would otherwise turn
    the bracketing into a NaN loop that never ends (and ignores SIGTERM)."""
    if not math.isfinite(value):
        raise ValueError(
            f"cubic subproblem: {what} overflows float64 (M={M:g}, {curvature}): "
            "M is too small for this curvature; use a larger M"
        )


def cubic_model(h: Tensor, g: Tensor, H: Tensor | HVP, M: float) -> Tensor:
    """Φ(h) = <g,h> + ½<Hh,h> + (M/6)‖h‖³ (M/6 convention). ``H`` is a matrix or an HVP callable."""
    Hh = H(h) if callable(H) else H @ h
    return g @ h + 0.5 * (h @ Hh) + (M / 6.0) * torch.linalg.vector_norm(h) ** 3


def cubic_model_grad(h: Tensor, g: Tensor, H: Tensor | HVP, M: float) -> Tensor:
    """∇Φ(h) = g + Hh + (M/2)‖h‖h."""
    Hh = H(h) if callable(H) else H @ h
    return g + Hh + 0.5 * M * torch.linalg.vector_norm(h) * h


def solve_cubic_exact(
    g: Tensor,
    H: Tensor,
    M: float,
    tol: float = 1e-10,
    max_iter: int = 200,
    hard_case_sign: float = 1.0,
) -> CubicStep:
    """Global minimizer of Φ by eigendecomposition (small d), always computed in float64.

    Args:
        g: gradient (or its momentum estimate), shape (d,).
        H: symmetric Hessian (estimate), shape (d, d). It is symmetrised as (H + Hᵀ)/2.
        M: cubic regularization constant of the M/6 convention, > 0.
        tol: relative accuracy of the Newton iteration on s = ‖h‖ − r_lo.
        max_iter: maximum Newton/bisection iterations.
        hard_case_sign: sign (+1/−1) of the λ₁-eigenvector component in the exact hard case (g has
            no component along it, so both signs are global minimizers).

    Returns:
        :class:`CubicStep` with ``h`` cast back to ``g.dtype``.
    """
    _check_inputs(g, M, H)
    if H.shape != (g.numel(), g.numel()):
        raise ValueError(f"H must have shape {(g.numel(), g.numel())}, got {tuple(H.shape)}")
    g64 = g.detach().to(torch.float64)
    H64 = H.detach().to(torch.float64)
    H64 = 0.5 * (H64 + H64.T)
    lam_t, U = torch.linalg.eigh(H64)  # λ₁ ≤ … ≤ λ_d
    m_hat_t = U.T @ g64
    # The scalar root finding runs on d-vectors in numpy: ~40 tiny evaluations of φ, where per-op torch
    # dispatch overhead would dominate the whole step for small d.
    lam, m_hat = lam_t.cpu().numpy(), m_hat_t.cpu().numpy()
    lam1 = float(lam[0])
    r_lo = max(0.0, -2.0 * lam1 / M)  # H + (M r/2) I ⪰ 0  ⇔  r ≥ r_lo
    _check_step_bound("r_lo = -2 λ_min / M", r_lo, M, f"λ_min={lam1:.3g}")
    # Work with s = r − r_lo and base = Λ + (M r_lo/2) I = Λ − λ₁ (exactly 0 at i = 1 when λ₁ < 0):
    # the denominators base + M s/2 then carry no cancellation, so near-hard cases (root within
    # machine precision of r_lo in r) are still resolved to full relative accuracy in s.
    base = lam - lam1 if lam1 < 0.0 else lam

    def finish(coef: np.ndarray, iters: int, hard: bool) -> CubicStep:
        h64 = U @ torch.as_tensor(coef, dtype=torch.float64, device=U.device)
        res = torch.linalg.vector_norm(cubic_model_grad(h64, g64, H64, M))
        return CubicStep(h64.to(g.dtype), cubic_model(h64, g64, H64, M), res, iters, hard, lam1)

    g_norm = float(np.linalg.norm(m_hat))
    if g_norm == 0.0 and lam1 >= 0.0:
        return finish(np.zeros_like(m_hat), 0, False)

    # Hard case: λ₁ < 0 and m̂ vanishes on the λ₁-eigenspace, so φ(s) = ‖m̂/(base + Ms/2)‖ stays
    # finite as s → 0⁺; if φ(0⁺) ≤ r_lo there is no root with s > 0 and the minimizer is
    # h = −(H + (M r_lo/2) I)⁺ g + τ u₁ with ‖h‖ = r_lo (Nesterov & Polyak 2006, §5).
    if lam1 < 0.0:
        null = base <= 0.0
        if not np.any(m_hat[null]):
            coef = np.zeros_like(m_hat)
            coef[~null] = -m_hat[~null] / base[~null]
            tau = _hard_case_tau(coef, r_lo)
            if tau is not None:
                coef[0] = math.copysign(1.0, hard_case_sign) * tau
                return finish(coef, 0, True)

    # Bracket the root of φ(s) = r_lo + s in [a, b]: φ(0⁺) > r_lo here, and b comes from the bound
    # (M/2) r² ≤ ‖g‖ + ‖H‖ r  ⇒  r ≤ (‖H‖ + √(‖H‖² + 2M‖g‖))/M on the minimizer's norm.
    h_norm_bound = float(np.abs(lam).max())
    r_hi = (h_norm_bound + _sqrt_square_plus(h_norm_bound, 2.0 * M * g_norm)) / M
    _check_step_bound("the bound on ‖h‖", r_hi, M, f"‖H‖={h_norm_bound:.3g}")
    a, b = 0.0, max(r_hi - r_lo, 1e-300)
    for _ in range(_MAX_BRACKET_DOUBLINGS):  # numerical safety only: r_hi already brackets
        q = m_hat / (base + 0.5 * M * b)
        if _norm(q) <= r_lo + b:
            break
        b *= 2.0
    else:
        raise ValueError(
            f"cubic subproblem: no root bracket for ‖h‖ up to {b:.3g} (M={M:g}, "
            f"λ_min={lam1:.3g}, ‖g‖={g_norm:.3g})"
        )
    # Safeguarded Newton on ψ(s) = 1/φ(s) − 1/(r_lo + s) (increasing, nearly linear), falling back to
    # (geometric, when the bracket spans decades) bisection if an iterate leaves the bracket.
    s_, iters = b, 0
    while iters < max_iter:
        iters += 1
        d = base + 0.5 * M * s_
        q = m_hat / d
        phi_s = _norm(q)
        r = r_lo + s_
        if phi_s > r:
            a = s_
        else:
            b = s_
        if phi_s == r or b - a <= 1e-15 * b:  # exact root, or bracket exhausted
            break
        # dφ/ds = −(M/2) Σ m̂ᵢ²/dᵢ³ / φ,  dψ/ds = −φ'/φ² + 1/r²
        q_d = float(q @ (q / d))
        if math.isfinite(q_d) and max(phi_s, r) < 1e150:
            dphi = -0.5 * M * q_d / phi_s
            dpsi = -dphi / phi_s**2 + 1.0 / r**2
        else:  # the same with u = q/φ (‖u‖ = 1): Σ qᵢ²/dᵢ or the squares would overflow
            u = q / phi_s
            dpsi = 0.5 * M * float(u @ (u / d)) / phi_s + 1.0 / r / r
        s_new = s_ - (1.0 / phi_s - 1.0 / r) / dpsi
        if not a < s_new < b:
            s_new = (
                math.sqrt(a * b)
                if a > 0.0 and b > 4.0 * a
                else (0.5 * (a + b) if a > 0 else 1e-4 * b)
            )
        elif abs(s_new - s_) <= tol * s_:  # quadratic convergence: s_new is accurate to ~tol²
            s_ = s_new
            break
        s_ = s_new
    return finish(-(m_hat / (base + 0.5 * M * s_)), iters, False)


def _randn(d: int, dtype, device, generator: torch.Generator | None) -> Tensor:
    """N(0, I) drawn on the generator's own device, then moved: a CPU generator (the optimizer's,
    checkpointed) also serves CUDA parameters, with the same numbers on either device."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(d, dtype=dtype, device=draw_on, generator=generator).to(device)


def _power_norm(hvp: HVP, d: int, iters: int, dtype, device, generator) -> float:
    v = _randn(d, dtype, device, generator)
    v = v / torch.linalg.vector_norm(v)
    est = torch.zeros((), dtype=dtype, device=device)
    for _ in range(iters):
        w = hvp(v)
        est = torch.linalg.vector_norm(w)
        # On the device: a float() here was one host sync per iteration. H v = 0 keeps v = 0
        # and the estimate 0 (the division by a clamped norm stays finite).
        v = w / est.clamp_min(torch.finfo(dtype).tiny)
    return float(est)


def solve_cubic_hvp(
    g: Tensor,
    hvp: HVP,
    M: float,
    L: float | None = None,
    rel_acc: float = 1e-2,
    max_iters: int = 200,
    perturb: float = 1e-6,
    power_iters: int = 20,
    generator: torch.Generator | None = None,
) -> CubicStep:
    """Approximate minimizer of Φ with Hessian-vector products only (Carmon & Duchi 2019).

    Gradient descent on Φ from the Cauchy point, with g perturbed by σq (q uniform on the sphere) so
    that the hard case has probability zero. Iterates run in float64; ``hvp`` is called with vectors in
    ``g.dtype`` and its output is promoted.

    Args:
        g: gradient (or momentum) vector, shape (d,).
        hvp: v ↦ H v.
        M: cubic regularization constant (M/6 convention), > 0.
        L: upper bound on ‖H‖; estimated with ``power_iters`` power iterations when None.
        rel_acc: stop when ‖∇Φ̃(h)‖ ≤ rel_acc · ‖g‖ (Φ̃: the perturbed model; absolute when g = 0).
        max_iters: maximum gradient steps.
        perturb: σ = perturb · ‖g‖ (σ = perturb when g = 0, so the step is never exactly 0 at a
            saddle). The stopping test is first order: at a strict saddle of Φ it may return a step
            of norm ~σ; the escape then takes several outer steps (the exact solver makes it in one).
        power_iters: power iterations for estimating L.
        generator: torch generator for the perturbation and the power-iteration start.

    Returns:
        :class:`CubicStep`; ``lambda_min`` is NaN (not computed).
    """
    _check_inputs(g, M)
    in_dtype, device, d = g.dtype, g.device, g.numel()

    def H(v: Tensor) -> Tensor:
        return hvp(v.to(in_dtype)).detach().to(torch.float64)

    g64 = g.detach().to(torch.float64)
    g_norm = float(torch.linalg.vector_norm(g64))
    if L is None:
        L = _power_norm(H, d, power_iters, torch.float64, device, generator)
    q = _randn(d, torch.float64, device, generator)
    sigma = perturb * g_norm if g_norm > 0 else perturb
    g_t = g64 + sigma * q / torch.linalg.vector_norm(q)
    gt_norm = torch.linalg.vector_norm(g_t)
    # A-priori bound on ‖h*‖ of the perturbed model that GD minimizes (> 0 since g̃ ≠ 0).
    R = (L + _sqrt_square_plus(L, 2.0 * M * float(gt_norm))) / M
    if math.isfinite(L):  # a non-finite L is reported below, with the HVPs that caused it
        _check_step_bound("the bound R on ‖h‖", R, M, f"‖H‖≈{L:.3g}")
    # Cauchy point: minimizer of Φ along −g̃ (closed form of the 1-d cubic).
    kappa = float(g_t @ H(g_t)) / float(gt_norm) ** 2
    r_c = (-kappa + _sqrt_square_plus(kappa, 2.0 * M * float(gt_norm))) / M
    h = -r_c * g_t / gt_norm
    eta = 1.0 / (4.0 * (L + 0.5 * M * R))
    target = rel_acc * (g_norm if g_norm > 0 else 1.0)
    it = 0
    for it in range(1, max_iters + 1):
        # Gradient of the perturbed model Φ̃ (g̃ in place of g), the function GD actually minimizes;
        # ‖∇Φ̃ − ∇Φ‖ = σ, negligible against the default rel_acc = 1e-2.
        grad = g_t + H(h) + 0.5 * M * torch.linalg.vector_norm(h) * h
        if float(torch.linalg.vector_norm(grad)) <= target:
            it -= 1
            break
        h = h - eta * grad
    if not (math.isfinite(L) and math.isfinite(kappa) and bool(torch.isfinite(h).all())):
        # Gradient descent would carry a NaN/inf product through every iteration into the step.
        raise ValueError(
            f"solve_cubic_hvp: non-finite Hessian-vector products (L={L}, "
            f"curvature along g={kappa}, finite step: {bool(torch.isfinite(h).all())})"
        )
    res = torch.linalg.vector_norm(cubic_model_grad(h, g64, H, M))
    return CubicStep(h.to(in_dtype), cubic_model(h, g64, H, M), res, it, False, float("nan"))


def reg_newton_step(g: Tensor, H: Tensor, M: float) -> CubicStep:
    """Gradient-regularized Newton step h = −(H + λI)⁻¹ g with λ = √(M‖g‖) (Mishchenko 2023).

    Meant for convex problems (H ⪰ 0, so H + λI ≻ 0 whenever g ≠ 0). Computed in float64.
    ``model_value`` is the quadratic model <g,h> + ½<Hh,h>; ``residual`` is ‖(H + λI)h + g‖.
    """
    _check_inputs(g, M, H)
    g64 = g.detach().to(torch.float64)
    H64 = H.detach().to(torch.float64)
    H64 = 0.5 * (H64 + H64.T)
    lam_reg = math.sqrt(M * float(torch.linalg.vector_norm(g64)))
    if lam_reg == 0.0:  # g = 0: a stationary point of the model; H may be singular here
        zero = torch.zeros_like(g64)
        lam_min = float(torch.linalg.eigvalsh(H64)[0])
        return CubicStep(zero.to(g.dtype), zero.sum(), zero.sum(), 0, False, lam_min)
    A = H64 + lam_reg * torch.eye(g.numel(), dtype=torch.float64, device=g.device)
    h64 = -torch.linalg.solve(A, g64)
    res = torch.linalg.vector_norm(A @ h64 + g64)
    model = g64 @ h64 + 0.5 * (h64 @ (H64 @ h64))
    lam_min = float(torch.linalg.eigvalsh(H64)[0])
    return CubicStep(h64.to(g.dtype), model, res, 1, False, lam_min)
