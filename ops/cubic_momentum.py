"""Momentum estimators of the gradient and the Hessian for stochastic cubic Newton (Lightning-free).

Chayti, Doikov & Jaggi, *Improving Stochastic Cubic Newton with Momentum* (AISTATS 2025) put momentum on
both the gradient and the Hessian estimate. Which exact form the paper calls "special" is not
confirmable from its text, so three variants are provided (spec §3, **reconstructed** choice):

* ``ema``:               m_t = (1−α) m_{t−1} + α ĝ_t(x_t)
* ``extrapolated``:      m_t = (1−α) m_{t−1} + α ĝ_t(y_t),  y_t = x_t + ((1−α)/α)(x_t − x_{t−1})
                         (implicit gradient transport, Cutkosky & Mehta 2020)
* ``hessian_corrected``: m_t = (1−α)(m_{t−1} + H (x_t − x_{t−1})) + α ĝ_t(x_t)   [derived default]

and the Hessian EMA  H_t = (1−β) H_{t−1} + β Ĥ_t.  ``none`` is plain stochastic cubic Newton (α = β = 1).
The first step uses m_0 = ĝ_0 and H_0 = Ĥ_0 (no zero initialization, so no bias correction).
On a quadratic with the exact Hessian, ``hessian_corrected`` and ``extrapolated`` track ∇f(x_t) exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

MOMENTUM_TYPES = ("none", "ema", "extrapolated", "hessian_corrected")


def check_momentum_type(kind: str) -> None:
    if kind not in MOMENTUM_TYPES:
        raise ValueError(f"momentum_type must be one of {MOMENTUM_TYPES}, got {kind!r}")


def check_coefficient(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def extrapolate(x: Tensor, x_prev: Tensor, a: float) -> Tensor:
    """y = x + ((1−a)/a)(x − x_prev): the point whose gradient the ``extrapolated`` EMA averages."""
    check_coefficient("extrapolation coefficient", a)
    if a == 1.0:
        return x.clone()
    return x + ((1.0 - a) / a) * (x - x_prev)


def momentum_update(
    kind: str,
    m_prev: Tensor | None,
    g: Tensor,
    alpha: float,
    H: Tensor | Callable[[Tensor], Tensor] | None = None,
    dx: Tensor | None = None,
) -> Tensor:
    """One gradient-momentum update m_t (spec §3, step 5).

    Args:
        kind: one of ``none``, ``ema``, ``extrapolated``, ``hessian_corrected``.
        m_prev: m_{t−1}, or None at t = 0 (then m_0 = ĝ_0).
        g: the stochastic gradient ĝ_t (taken at y_t for ``extrapolated``, at x_t otherwise).
        alpha: α ∈ (0, 1]; α = 1 returns ĝ_t for every kind.
        H: Hessian (matrix or HVP callable) used to transport m_{t−1} (``hessian_corrected`` only).
        dx: x_t − x_{t−1} (``hessian_corrected`` only).

    Returns:
        m_t, a new tensor.
    """
    check_momentum_type(kind)
    check_coefficient("grad_momentum", alpha)
    if m_prev is None or kind == "none" or alpha == 1.0:
        return g.clone()
    if kind == "hessian_corrected":
        if H is None or dx is None:
            raise ValueError("hessian_corrected momentum needs the Hessian H and the step dx")
        transported = m_prev + (H(dx) if callable(H) else H @ dx)  # m_{t-1} moved to x_t
        return (1.0 - alpha) * transported + alpha * g
    return (1.0 - alpha) * m_prev + alpha * g  # ema and extrapolated


def hessian_momentum(H_prev: Tensor | None, H_hat: Tensor, beta: float) -> Tensor:
    """H_t = (1−β) H_{t−1} + β Ĥ_t, with H_0 = Ĥ_0 (spec §3, step 4)."""
    check_coefficient("hess_momentum", beta)
    if H_prev is None or beta == 1.0:
        return H_hat.clone()
    return (1.0 - beta) * H_prev + beta * H_hat
