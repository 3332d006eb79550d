"""Schulz (Newton-Schulz, hyperpower order 2) inversion of an SPD matrix.

HyperINF (Zhou, Fan, Jaggi 2024, arXiv 2410.05090) inverts each damped generalized Fisher
``A = G + lambda I`` with the Schulz iteration ``X_{k+1} = X_k (2I - A X_k)``, which needs only
matrix products and converges quadratically once ``||I - A X_k|| < 1``.

With ``X_0 = alpha I`` the error has the closed form ``E_k = I - A X_k = (I - alpha A)^(2^k)``, so an
eigen-direction with eigenvalue ``mu`` has error ``(1 - alpha mu)^(2^k)``: the iteration converges
iff ``0 < alpha mu_max < 2``. The official code starts at a fixed ``alpha = 5e-5`` (scale dependent,
diverges if ``mu_max > 4e4``); the default here is ``alpha = 1/||A||_F`` which satisfies
``alpha mu <= 1`` for every SPD ``A`` (``||A||_F >= mu_max``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

SchulzInit = Literal["frobenius", "trace", "legacy"]

#: Fixed start of the official code (all paths of github.com/Blackzxy/HyperINF).
LEGACY_ALPHA = 5e-5


class SchulzDivergenceError(RuntimeError):
    """The Schulz residual grew beyond ten times its start or became non-finite."""


@dataclass
class SchulzInfo:
    """Diagnostics of one Schulz solve.

    Attributes:
        alpha: the start scale, ``X_0 = alpha I``.
        iters: index ``k`` of the returned iterate ``X_k``, i.e. the updates that produced it (an
            update discarded by the stagnation stop is not counted).
        residual: ``||I - A X||_F / sqrt(d)`` of the returned iterate.
        converged: ``residual <= accept_tol``.
        history: residual of every iterate ``X_0, X_1, ...`` that was evaluated.
        stop: why the loop ended: ``tol``, ``stagnation`` (the last entry of ``history`` is the
            rejected iterate that triggered it) or ``max_iter``.
    """

    alpha: float
    iters: int
    residual: float
    converged: bool
    history: list[float]
    stop: Literal["tol", "stagnation", "max_iter"] = "max_iter"


def schulz_alpha(A: torch.Tensor, init: SchulzInit) -> float:
    """Scale ``alpha`` of the start ``X_0 = alpha I`` (spec 3.4 step 1).

    ``frobenius`` and ``trace`` bound ``mu_max`` from above for SPD ``A`` so ``alpha mu in (0, 1]``;
    ``legacy`` is the official fixed ``5e-5``.
    """
    if init == "frobenius":
        return 1.0 / float(torch.linalg.matrix_norm(A, ord="fro"))
    if init == "trace":
        return 1.0 / float(torch.trace(A))
    if init == "legacy":
        return LEGACY_ALPHA
    raise ValueError(f"schulz init={init!r}: expected 'frobenius', 'trace' or 'legacy'")


def _divergence_hint(init: SchulzInit) -> str:
    """Likely cause of a diverging solve, for the error message of the ``init`` actually used."""
    if init == "legacy":
        return "with init='legacy' this happens when the largest eigenvalue exceeds 2/alpha"
    # alpha * mu <= 1 for every eigenvalue of an SPD matrix, so this start cannot diverge on one
    return (
        f"init={init!r} converges for every symmetric positive definite A, so A is not SPD "
        "(check the damping: it must be > 0) or not finite"
    )


def schulz_inverse(
    A: torch.Tensor,
    init: SchulzInit = "frobenius",
    max_iter: int = 60,
    tol: float = 1e-6,
    accept_tol: float = 1e-3,
    early_stop: bool = True,
    raise_on_divergence: bool = True,
    symmetrize: bool = True,
    on_iterate: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, SchulzInfo]:
    """Approximate ``A^{-1}`` of an SPD matrix with Schulz iterations (spec 3.4).

    Args:
        A: symmetric positive definite ``(d, d)`` matrix; the iteration runs in its dtype.
        init: start ``X_0 = alpha I`` with ``alpha = 1/||A||_F`` (``frobenius``), ``1/trace(A)``
            (``trace``) or the official fixed ``5e-5`` (``legacy``).
        max_iter: maximum number of updates.
        tol: stop once ``||I - A X_k||_F / sqrt(d) <= tol``.
        accept_tol: residual under which the result counts as converged (a warning otherwise).
        early_stop: apply the ``tol`` and stagnation stops; ``False`` runs exactly ``max_iter``
            updates as the official code does.
        raise_on_divergence: raise :class:`SchulzDivergenceError` when the residual is non-finite
            or exceeds ``10 * rho_0``; ``False`` warns and continues (code-faithful).
        symmetrize: replace ``X`` by ``(X + X^T)/2`` after each update; exact iterates are
            polynomials in ``A`` and hence symmetric, so this only removes rounding drift.
        on_iterate: called as ``on_iterate(k, X_k)`` for every evaluated iterate (convergence
            curves in experiments); must not modify ``X_k``.

    Returns:
        ``(X, info)``: the approximate inverse and its :class:`SchulzInfo`.
    """
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"schulz_inverse: A must be a square matrix, got shape {tuple(A.shape)}")
    if max_iter < 0:
        raise ValueError(f"schulz_inverse: max_iter={max_iter} must be >= 0")
    d = A.shape[0]
    eye = torch.eye(d, dtype=A.dtype, device=A.device)
    alpha = schulz_alpha(A, init)
    X = alpha * eye
    best_X, best_rho, best_k = X, math.inf, 0
    history: list[float] = []
    diverged_warned = False
    iters, stop = 0, "max_iter"
    for k in range(max_iter + 1):
        R = eye - A @ X
        rho = float(torch.linalg.matrix_norm(R, ord="fro")) / math.sqrt(d)
        history.append(rho)
        if on_iterate is not None:
            on_iterate(k, X)
        if not math.isfinite(rho) or rho > 10.0 * history[0]:
            msg = (
                f"Schulz iteration diverged at step {k} (residual {rho:.3e}, start "
                f"{history[0]:.3e}, init={init!r}, alpha={alpha:.3e}); {_divergence_hint(init)}"
            )
            if raise_on_divergence:
                raise SchulzDivergenceError(msg)
            if not diverged_warned:
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                diverged_warned = True
        if rho < best_rho:
            best_X, best_rho, best_k = X, rho, k
        if early_stop:
            if rho <= tol:
                stop = "tol"
                break
            # At the floating-point floor (~kappa * eps) the residual stops falling: keep the
            # better iterate instead of iterating on rounding noise.
            if k >= 1 and history[-2] < 1e-2 and rho >= history[-2]:
                X, rho = best_X, best_rho
                stop = "stagnation"
                break
        if k == max_iter:
            break
        X = X + X @ R  # X_{k+1} = X_k (2I - A X_k), two d x d products per step
        if symmetrize:
            X = 0.5 * (X + X.T)
        iters += 1
    if not early_stop:
        best_X, best_rho = X, rho  # code-faithful: the last iterate, whatever its residual
    info = SchulzInfo(
        alpha=alpha,
        # early stop returns the best iterate, which is not the last one after a stagnation stop
        iters=best_k if early_stop else iters,
        residual=best_rho if early_stop else rho,
        converged=(best_rho if early_stop else rho) <= accept_tol,
        history=history,
        stop=stop,
    )
    if not info.converged:
        warnings.warn(
            f"Schulz iteration did not reach accept_tol={accept_tol:g} "
            f"(residual {info.residual:.3e} after {info.iters} updates, init={init!r})",
            RuntimeWarning,
            stacklevel=2,
        )
    return (best_X if early_stop else X), info
