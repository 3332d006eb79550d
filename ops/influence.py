"""Influence scores with HyperINF and its baselines (spec ``methods/hyperinf.md`` section 3).

Every collected gradient is an oriented 2-D matrix ``g_il`` of shape ``(r_l, d_l)`` ("rank axis
first", :func:`orient_grad`). The query is the mean validation gradient ``v_l`` (same shape). A
method turns ``v_l`` into a preconditioned ``h_l ~ v_l H_l^{-1}``; the score of training example
``i`` is ``IF_i = - sum_l <h_l, g_il>_F`` (:func:`influence_scores`).

Sign: ``IF_i > 0`` means harmful (up-weighting ``z_i`` increases the validation loss), so mislabeled
detection ranks by descending ``IF``. The exact Koh-Liang derivative carries an extra ``1/n``;
it is dropped here (it does not change rankings).

Methods (all share gradients, damping ``lambda_l`` and the score function):

* ``hyperinf``: ``h_l = v_l X_l``, ``X_l = Schulz(G_l + (lambda_l + delta) I)``, with the
  generalized Fisher ``G_l = (1/n) sum_i g_il^T g_il`` (``d_l x d_l``, independent of ``r_l``).
* ``exact_gfim``: the same ``h_l`` with a Cholesky solve in float64 (HyperINF's target).
* ``datainf``: ``(1/n) sum_i (lambda I + g g^T)^{-1} v`` on flattened gradients (Sherman-Morrison).
* ``lissa``: the stochastic Neumann recursion for ``(F_l + lambda_l I)^{-1} v`` (correct sign).
* ``lissa_code_faithful``: the official recursion with ``- lambda r`` (solves ``(F - lambda I)``).
* ``exact_fim``: ``(F_l + lambda_l I)^{-1} v`` on the full flattened layer Fisher.
* ``grad_dot``: ``h_l = v_l`` (the official "TracIn", a single-checkpoint gradient product).

Hessian-curvature baselines (not HyperINF's method; for the cross-check with libraries such as
dattri, whose explicit-inverse and LiSSA attributors invert the true Hessian, the Koh & Liang 2017
definition ``IF = - grad L_val^T H^{-1} grad l(z_i)``):

* ``exact_hessian``: ``(H_l + lambda_l I)^{-1} v`` with ``H_l`` the diagonal block of the Hessian
  of the mean training loss for tensor ``l`` (:func:`ops.per_sample_grads.loss_hessian_blocks`).
* ``lissa_hessian``: the ``lissa`` recursion with ``H_l`` in place of ``F_l``.

``F_l`` is PSD, ``H_l`` need not be (non-convex losses), so ``H_l + lambda_l I`` may be indefinite:
it is solved by LU, and the LiSSA recursion then grows along directions with ``mu + lambda < 0``.
"""

from __future__ import annotations

from typing import Literal

import torch

from ops.schulz import SchulzInfo, schulz_inverse

METHODS = (
    "hyperinf",
    "exact_gfim",
    "datainf",
    "lissa",
    "lissa_code_faithful",
    "exact_fim",
    "grad_dot",
    "exact_hessian",
    "lissa_hessian",
)
#: The methods whose solves run in float64 (whatever ``grads.dtype`` says).
FLOAT64_METHODS = ("exact_gfim", "exact_fim", "exact_hessian")


def orient_grad(name: str, grad: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """Bring a (per-sample) gradient to the ``(r, d)`` "rank axis first" layout (spec 3.2).

    peft ``lora_B`` weights ``(d_out, r)`` are transposed to ``(r, d_out)`` so the GFIM is
    ``d_out x d_out``; other 2-D tensors are kept; 1-D ``(d,)`` becomes ``(1, d)``.

    Args:
        name: parameter name (``lora_B`` in it selects the transpose).
        grad: ``(*shape)`` or, with ``batched``, ``(B, *shape)``.
        batched: whether ``grad`` has a leading per-sample axis.
    """
    shape = grad.shape[1:] if batched else grad.shape
    if len(shape) == 1:
        return grad.unsqueeze(-2)
    if len(shape) != 2:
        raise ValueError(
            f"parameter {name!r} has shape {tuple(shape)}: only 1-D and 2-D tensors are supported"
        )
    return grad.transpose(-1, -2) if "lora_B" in name else grad


def relative_damping(sq_mean_sum: torch.Tensor | float, n: int, lambda_const: float) -> float:
    """DataInf damping ``lambda_l = (1/lambda_const) (1/n) sum_i mean(g_il ** 2)`` (spec 3.3.2).

    Args:
        sq_mean_sum: ``sum_i mean(g_il ** 2)`` over the ``n`` training examples.
        n: number of training examples.
        lambda_const: the constant (10 in the official code).
    """
    if n <= 0:
        raise ValueError(f"relative_damping: n={n} must be positive")
    return float(sq_mean_sum) / (n * lambda_const)


def gfim(grads: torch.Tensor) -> torch.Tensor:
    """Generalized Fisher ``G = (1/n) sum_i g_i^T g_i`` of oriented gradients ``(n, r, d)``."""
    n = grads.shape[0]
    flat = grads.reshape(-1, grads.shape[-1])  # the r rows of every sample act as samples
    return flat.T @ flat / n


def precondition_grad_dot(v: torch.Tensor) -> torch.Tensor:
    """``h = v``: gradient dot product, the official "TracIn"."""
    return v.clone()


def precondition_exact_gfim(v: torch.Tensor, G: torch.Tensor, damping: float) -> torch.Tensor:
    """``h = v (G + damping I)^{-1}`` by Cholesky in float64 (spec 3.5 ``exact_gfim``)."""
    A = G.double() + damping * torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
    L = torch.linalg.cholesky(A)
    # A is symmetric, so v A^{-1} = (A^{-1} v^T)^T
    return torch.cholesky_solve(v.double().T, L).T.to(v.dtype)


def precondition_hyperinf(
    v: torch.Tensor,
    G: torch.Tensor,
    damping: float,
    **schulz_kwargs,
) -> tuple[torch.Tensor, SchulzInfo]:
    """``h = v Schulz(G + damping I)`` (spec 3.3 steps 3-4).

    ``(I_r (x) A)^{-1} = I_r (x) A^{-1}``: every row of ``v`` is preconditioned by the same
    ``d x d`` inverse, which is what makes the curvature independent of the LoRA rank.

    Args:
        v: query ``(r, d)``.
        G: generalized Fisher ``(d, d)``.
        damping: ``lambda_l + delta``.
        **schulz_kwargs: forwarded to :func:`ops.schulz.schulz_inverse`.
    """
    A = G + damping * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    X, info = schulz_inverse(A, **schulz_kwargs)
    return v.to(X.dtype) @ X, info


def datainf_terms(v: torch.Tensor, grads: torch.Tensor, damping: float) -> torch.Tensor:
    """``sum_i (vh - c_i gh_i)``, ``c_i = <vh, gh_i> / (damping + ||gh_i||^2)`` (DataInf eq. 5).

    A partial sum that can be accumulated batch by batch (and across ranks).

    Args:
        v: query ``(r, d)``.
        grads: oriented gradients ``(n, r, d)``.
        damping: ``lambda_l``.
    """
    gh = grads.reshape(grads.shape[0], -1)
    vh = v.reshape(-1)
    c = (gh @ vh) / (damping + (gh * gh).sum(1))
    return (vh.unsqueeze(0) - c.unsqueeze(1) * gh).sum(0).reshape(v.shape)


def precondition_datainf(v: torch.Tensor, grads: torch.Tensor, damping: float) -> torch.Tensor:
    """DataInf: ``(1/n) sum_i (damping I + gh_i gh_i^T)^{-1} vh`` via Sherman-Morrison (spec 3.5)."""
    return datainf_terms(v, grads, damping) / (grads.shape[0] * damping)


def fim(grads: torch.Tensor) -> torch.Tensor:
    """Full flattened layer Fisher ``F = (1/n) sum_i vec(g_i) vec(g_i)^T`` (``rd x rd``)."""
    gh = grads.reshape(grads.shape[0], -1)
    return gh.T @ gh / grads.shape[0]


def lissa_scale(F: torch.Tensor, damping: float, scale: Literal["trace", "frobenius"] | float):
    """LiSSA scale ``s``: ``trace(F) + lambda`` (default), ``||F + lambda I||_F + 1`` or a number."""
    if isinstance(scale, (int, float)):
        return float(scale)
    if scale == "trace":
        return float(torch.trace(F)) + damping
    if scale == "frobenius":  # official rebuttal notebook: s = ||A||_F + 1
        A = F + damping * torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
        return float(torch.linalg.matrix_norm(A, ord="fro")) + 1.0
    raise ValueError(f"lissa scale={scale!r}: expected 'trace', 'frobenius' or a number")


def precondition_lissa(
    v: torch.Tensor,
    F: torch.Tensor,
    damping: float,
    iters: int = 100,
    scale: Literal["trace", "frobenius"] | float = "trace",
) -> torch.Tensor:
    """LiSSA with the correct damping sign (spec 3.5 ``lissa``; ``lissa_hessian`` with ``F = H``).

    ``r_0 = v``, ``r_{t+1} = v + r_t - (F r_t + lambda r_t)/s``, output ``r_T / s``; the fixed point
    is ``(F + lambda I)^{-1} v`` and it converges iff every eigenvalue ``mu`` of ``F + lambda I``
    lies in ``(0, 2 s)``. dattri's ``ihvp_lissa`` runs ``r_{t+1} = v + (1 - damping) r_t - H r_t/s``
    with the same output ``r_T / s``: the same recursion with ``damping = lambda / s``.

    Args:
        v: query ``(r, d)``.
        F: flattened Fisher ``(rd, rd)`` (or a Hessian block for ``lissa_hessian``).
        damping: ``lambda_l``.
        iters: number of recursion steps ``T``.
        scale: ``s``, see :func:`lissa_scale`.
    """
    s = lissa_scale(F, damping, scale)
    vh = v.reshape(-1)
    r = vh.clone()
    for _ in range(iters):
        r = vh + r - (F @ r + damping * r) / s
    return (r / s).reshape(v.shape)


def precondition_lissa_code_faithful(
    v: torch.Tensor, F: torch.Tensor, damping: float, iters: int = 10
) -> torch.Tensor:
    """The official LiSSA: ``r_{t+1} = v + r_t - (F r_t - lambda r_t)``, ``s = 1`` (quirk 3).

    Its fixed point solves ``(F - lambda I) x = v``; it diverges once ``mu_max(F) - lambda > 2``.
    Kept only to reproduce the official numbers.
    """
    vh = v.reshape(-1)
    r = vh.clone()
    for _ in range(iters):
        r = vh + r - (F @ r - damping * r)
    return r.reshape(v.shape)


def precondition_exact_fim(
    v: torch.Tensor,
    damping: float,
    F: torch.Tensor | None = None,
    grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(F + lambda I)^{-1} vh`` on the full flattened layer Fisher (spec 3.5 ``exact_fim``).

    Given ``F`` it is a dense Cholesky solve; given per-sample ``grads`` ``(n, r, d)`` with
    ``n < r d`` it uses Woodbury, ``(1/lambda)(vh - Gm^T (n lambda I + Gm Gm^T)^{-1} Gm vh)``,
    which costs ``n x n`` instead of ``rd x rd``. Computed in float64.
    """
    vh = v.reshape(-1).double()
    if F is None:
        if grads is None:
            raise ValueError("precondition_exact_fim needs F or grads")
        Gm = grads.reshape(grads.shape[0], -1).double()
        n, p = Gm.shape
        if n < p:
            K = Gm @ Gm.T + n * damping * torch.eye(n, dtype=torch.float64, device=Gm.device)
            x = (vh - Gm.T @ torch.linalg.solve(K, Gm @ vh)) / damping
            return x.reshape(v.shape).to(v.dtype)
        F = Gm.T @ Gm / n
    A = F.double() + damping * torch.eye(F.shape[0], dtype=torch.float64, device=F.device)
    x = torch.cholesky_solve(vh.unsqueeze(1), torch.linalg.cholesky(A)).squeeze(1)
    return x.reshape(v.shape).to(v.dtype)


def precondition_exact_hessian(v: torch.Tensor, H: torch.Tensor, damping: float) -> torch.Tensor:
    """``(H + lambda I)^{-1} vh`` with a true-Hessian block ``H`` (``exact_hessian``, Koh & Liang).

    LU solve in float64 rather than Cholesky: the damped Hessian of a non-convex loss can be
    indefinite. The same damping convention as dattri's ``ihvp_explicit(regularization=lambda)``.
    """
    A = H.double() + damping * torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    x = torch.linalg.solve(A, v.reshape(-1).double())
    return x.reshape(v.shape).to(v.dtype)


def influence_scores(h: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """``IF_i = - sum_l <h_l, g_il>_F`` for a batch of oriented gradients ``(B, r, d)`` per tensor."""
    if set(h) != set(grads):
        raise ValueError(f"influence_scores: tensors differ, {sorted(h)} vs {sorted(grads)}")
    if not grads:
        raise ValueError("influence_scores: no tensors (select at least one parameter)")
    total = None
    for name, g in grads.items():
        s = (g * h[name].to(g.dtype).unsqueeze(0)).flatten(1).sum(1)
        total = s if total is None else total + s
    return -total
