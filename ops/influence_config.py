"""Argument groups of the influence engine (dataclasses, so LightningCLI validates them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def _check(group: str, **bounds: tuple[float, float]) -> None:
    """Raise naming ``group.key`` when a value lies below its lower bound (checked at parse time)."""
    for key, (value, low) in bounds.items():
        if value < low:
            raise ValueError(f"{group}.{key}={value!r} must be >= {low}")


@dataclass
class DampingConfig:
    """Damping ``lambda_l`` added to every curvature (spec 3.3 step 2, 3.5 ``damping_mode``).

    Args:
        mode: ``relative``: ``lambda_l = (1/lambda_const)(1/n) sum_i mean(g_il^2)`` (DataInf
            heuristic, official); ``fixed``: ``lambda_l = value`` for every tensor.
        lambda_const: the relative-damping constant (10 in the official code).
        value: the fixed damping (``mode="fixed"`` only).
        extra: extra absolute damping ``delta`` added to the GFIM for ``hyperinf``/``exact_gfim``
            (0 by default; the official mislabel path uses 1e-3, spec quirk 2).
    """

    mode: Literal["relative", "fixed"] = "relative"
    lambda_const: float = 10.0
    value: float | None = None
    extra: float = 0.0


@dataclass
class SchulzConfig:
    """Schulz iteration settings (spec 3.4).

    Args:
        init: start ``X_0 = alpha I``: ``frobenius`` (``1/||A||_F``, convergent), ``trace``
            (``1/trace A``) or ``legacy`` (official fixed ``5e-5``, may diverge).
        max_iter: maximum number of updates.
        tol: residual ``||I - AX||_F/sqrt(d)`` at which to stop.
        accept_tol: residual under which a solve counts as converged (warning otherwise).
        early_stop: use the ``tol`` and stagnation stops (``False``: exactly ``max_iter`` updates).
        symmetrize: replace ``X`` by ``(X + X^T)/2`` after each update (reconstructed, not in the
            official code; exact iterates are polynomials in ``A``, so only rounding changes).
            The code-faithful presets keep this setting.
    """

    init: Literal["frobenius", "trace", "legacy"] = "frobenius"
    max_iter: int = 60
    tol: float = 1e-6
    accept_tol: float = 1e-3
    early_stop: bool = True
    symmetrize: bool = True

    def __post_init__(self) -> None:
        _check("schulz", max_iter=(self.max_iter, 0), tol=(self.tol, 0.0))
        _check("schulz", accept_tol=(self.accept_tol, 0.0))


@dataclass
class LissaConfig:
    """LiSSA baseline settings (spec 3.5).

    Args:
        iters: recursion steps ``T`` of the correct-sign ``lissa``.
        scale: ``s``: ``trace`` (``trace F + lambda``, provable bound), ``frobenius``
            (``||F + lambda I||_F + 1``, official rebuttal) or a number.
        code_faithful_iters: recursion steps of ``lissa_code_faithful`` (10 officially).
    """

    iters: int = 100
    scale: Literal["trace", "frobenius"] | float = "trace"
    code_faithful_iters: int = 10

    def __post_init__(self) -> None:
        _check("lissa", iters=(self.iters, 1), code_faithful_iters=(self.code_faithful_iters, 1))
        if not isinstance(self.scale, str) and not self.scale > 0:
            raise ValueError(f"lissa.scale={self.scale!r} must be > 0, 'trace' or 'frobenius'")


@dataclass
class GradConfig:
    """Per-sample gradient collection (spec 3.6).

    Args:
        mode: ``vmap`` (``torch.func``) or ``loop`` (batch-1 autograd fallback).
        batch_size: examples per gradient batch.
        cache: ``auto`` keeps oriented gradients on CPU while they fit ``cache_limit_bytes``
            (else streams: one more pass, memory independent of ``n``); ``always`` / ``never``.
        cache_limit_bytes: cache budget for ``auto``.
        dtype: accumulation and Schulz dtype (``float32``; ``float64`` for tests).
        fim_max_dim: largest flattened tensor size ``r*d`` for which ``lissa``/``exact_fim``
            may build the dense ``rd x rd`` Fisher. Above it ``exact_fim`` (without ``lissa``)
            solves by Woodbury on the ``n x rd`` training-gradient matrix, gathered from all
            ranks, which must fit the same ``fim_max_dim**2`` values (so ``n < rd``).
    """

    mode: Literal["vmap", "loop"] = "vmap"
    batch_size: int = 32
    cache: Literal["auto", "always", "never"] = "auto"
    cache_limit_bytes: int = 2**31
    dtype: Literal["float32", "float64"] = "float32"
    fim_max_dim: int = 8192

    def __post_init__(self) -> None:
        _check("grads", batch_size=(self.batch_size, 1), fim_max_dim=(self.fim_max_dim, 1))
        _check("grads", cache_limit_bytes=(self.cache_limit_bytes, 0))


#: Code-faithful HyperINF presets (spec 3.4 table): extra damping, start, iterations, early stop.
CODE_FAITHFUL_PRESETS: dict[str, dict] = {
    "mislabel": {"extra": 1e-3, "init": "legacy", "max_iter": 30},
    "llm_selection": {"extra": 0.0, "init": "legacy", "max_iter": 30},
    "vlm_selection": {"extra": 0.0, "init": "legacy", "max_iter": 15},
}
