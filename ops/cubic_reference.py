"""NumPy reference of stochastic cubic Newton with momentum on logistic regression (experiments only).

The validation experiment needs ~100 runs × 4000 steps of a d = 30 problem. Per-op dispatch cost of
torch on such tiny tensors makes ``StochasticCubicNewton`` ~10× slower than this NumPy transcription
of the same iteration (spec §3), so ``experiments/cubic_newton.py`` runs this loop on the very same
per-step samples as ``LogisticToyDataModule``. ``tests/ops/test_cubic_reference.py`` pins that this
loop and the project's optimizer produce the same iterates (to 1e-9) for every momentum type and step
type, and the module tests pin the optimizer to the LightningModule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def logistic_grad(x, A, y, lam: float, reg: str) -> np.ndarray:
    """∇ of mean log(1+exp(−y aᵀx)) + r(x); r = λΣx²/(1+x²) (``nonconvex``) or (λ/2)‖x‖² (``l2``)."""
    s = 0.5 * (1.0 - np.tanh(0.5 * y * (A @ x)))  # σ(−y z), overflow-free
    g = -(A.T @ (y * s)) / A.shape[0]
    return g + (2.0 * lam * x / (1.0 + x * x) ** 2 if reg == "nonconvex" else lam * x)


def logistic_hess(x, A, y, lam: float, reg: str) -> np.ndarray:
    s = 0.5 * (1.0 - np.tanh(0.5 * y * (A @ x)))
    H = (A.T * (s * (1.0 - s))) @ A / A.shape[0]
    q = 1.0 + x * x
    diag = 2.0 * lam * (1.0 - 3.0 * x * x) / q**3 if reg == "nonconvex" else lam * np.ones_like(x)
    return H + np.diag(diag)


def logistic_value(x, A, y, lam: float, reg: str) -> float:
    z = -y * (A @ x)
    loss = float(np.mean(np.logaddexp(0.0, z)))
    r = (
        lam * float(np.sum(x * x / (1.0 + x * x)))
        if reg == "nonconvex"
        else 0.5 * lam * float(x @ x)
    )
    return loss + r


def cubic_step(m: np.ndarray, H: np.ndarray, M: float, tol: float = 1e-10) -> np.ndarray:
    """argmin <m,h> + ½<Hh,h> + (M/6)‖h‖³; same s-parametrised secular solve as ``solve_cubic_exact``."""
    if not (np.isfinite(m).all() and np.isfinite(H).all()):
        raise ValueError("cubic subproblem: m or H has non-finite entries (nan/inf)")
    lam, U = np.linalg.eigh(0.5 * (H + H.T))
    mh = U.T @ m
    lam1 = lam[0]
    r_lo = max(0.0, -2.0 * lam1 / M)
    base = lam - lam1 if lam1 < 0 else lam
    if not np.any(mh) and lam1 >= 0:
        return np.zeros_like(m)
    if lam1 < 0:
        null = base <= 0.0
        if not np.any(mh[null]):
            coef = np.zeros_like(mh)
            coef[~null] = -mh[~null] / base[~null]
            if coef @ coef <= r_lo**2:
                coef[0] = math.sqrt(r_lo**2 - coef @ coef)
                return U @ coef
    L = np.abs(lam).max()
    a, b = 0.0, max((L + math.sqrt(L * L + 2 * M * np.linalg.norm(mh))) / M - r_lo, 1e-300)
    if not math.isfinite(b):  # M tiny for the curvature: the bracket below would never end
        raise ValueError(f"cubic subproblem: the step bound overflows float64 (M={M:g})")
    for _ in range(2100):
        q = mh / (base + 0.5 * M * b)
        if math.sqrt(q @ q) <= r_lo + b:
            break
        b *= 2.0
    else:
        raise ValueError(f"cubic subproblem: no root bracket up to {b:.3g} (M={M:g})")
    s = b
    for _ in range(200):
        d = base + 0.5 * M * s
        q = mh / d
        phi = math.sqrt(q @ q)
        r = r_lo + s
        if phi > r:
            a = s
        else:
            b = s
        if phi == r or b - a <= 1e-15 * b:
            break
        dphi = -0.5 * M * (q @ (q / d)) / phi
        s_new = s - (1.0 / phi - 1.0 / r) / (-dphi / phi**2 + 1.0 / r**2)
        if not a < s_new < b:
            s_new = (
                math.sqrt(a * b) if a > 0 and b > 4 * a else (0.5 * (a + b) if a > 0 else 1e-4 * b)
            )
        elif abs(s_new - s) <= tol * s:
            s = s_new
            break
        s = s_new
    return -(U @ (mh / (base + 0.5 * M * s)))


def run_reference(
    A: np.ndarray,
    y: np.ndarray,
    batches: list[tuple[np.ndarray, np.ndarray]],
    lam: float,
    reg: str,
    M: float = 1.0,
    grad_momentum: float = 0.01,
    hess_momentum: float = 0.01,
    momentum_type: str = "hessian_corrected",
    step_type: str = "cubic",
    transport_hessian: str = "momentum",
    momentum_decay: float | None = None,
    callback: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Run len(batches) steps from x₀ = 0; ``batches[t] = (idx_g, idx_h)`` are row indices of (A, y).

    ``callback(t, x_t)`` is called after every step (t = 1, 2, ...). Returns the final x.
    ``transport_hessian`` is ``momentum`` (H_t) or ``sample`` (Ĥ_t) as in the optimizer, or ``full``:
    the full-data Hessian at x_t, an oracle that no stochastic method has. It exists only to
    separate the bias of H_t from the noise of Ĥ_t in ``experiments/cubic_newton.py``.
    """
    alpha0, beta0 = (1.0, 1.0) if momentum_type == "none" else (grad_momentum, hess_momentum)
    x = np.zeros(A.shape[1])
    x_prev = m = Hm = None
    for t, (ig, ih) in enumerate(batches):
        alpha, beta = alpha0, beta0
        if momentum_decay is not None and momentum_type != "none":
            decay = (t + 1) ** (-momentum_decay)
            alpha, beta = max(alpha0, decay), max(beta0, decay)
        yp = zp = x
        if momentum_type == "extrapolated" and x_prev is not None:
            yp = x if alpha == 1 else x + ((1 - alpha) / alpha) * (x - x_prev)
            zp = x if beta == 1 else x + ((1 - beta) / beta) * (x - x_prev)
        g = logistic_grad(yp, A[ig], y[ig], lam, reg)
        H_hat = logistic_hess(zp, A[ih], y[ih], lam, reg)
        Hm = H_hat.copy() if Hm is None or beta == 1 else (1 - beta) * Hm + beta * H_hat
        if m is None or alpha == 1:
            m = g.copy()
        elif momentum_type == "hessian_corrected":
            if transport_hessian == "momentum":
                Ht = Hm
            elif transport_hessian == "sample":
                Ht = H_hat
            elif transport_hessian == "full":  # diagnostic oracle, see the docstring
                Ht = logistic_hess(x, A, y, lam, reg)
            else:
                raise ValueError(f"unknown transport_hessian {transport_hessian!r}")
            m = (1 - alpha) * (m + Ht @ (x - x_prev)) + alpha * g
        else:
            m = (1 - alpha) * m + alpha * g
        if step_type == "cubic":
            h = cubic_step(m, Hm, M)
        else:
            lam_reg = math.sqrt(M * np.linalg.norm(m))
            h = -np.linalg.solve(0.5 * (Hm + Hm.T) + lam_reg * np.eye(len(m)), m)
        x_prev, x = x, x + h
        if callback is not None:
            callback(t + 1, x)
    return x
