"""Update geometry of one training step: the math behind the warmup diagnostics.

Kosson, Messmer, Jaggi, *Analyzing & Reducing the Need for Learning Rate Warmup in GPT Training*
(NeurIPS 2024) measure an update Δw_t = w_{t+1} − w_t in three ways (ℓ2 norm, angle, relative
representation change) and relate warmup to the gradient signal-to-noise ratio. Everything here
is Lightning-free and works on detached tensors; norms and angles are formed in float64 because
equilibrium angles (1e-3 to 1e-2 rad) are below what float32 ``arccos`` can resolve.

Section numbers refer to the project spec ``methods/warmup-diagnostics.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "FLOAT64_BLOCK",
    "adamw_white_noise_rms",
    "angle_from_sums",
    "angular_update",
    "equilibrium_angle",
    "inner_products",
    "lionar_target_angle",
    "noise_scale",
    "normalized_difference_sums",
    "rows",
    "rrc",
    "rrc_lr_factor",
    "squared_norm",
    "update_norms",
]


# Elements per float64 block. Norms, angles and RRC are accumulated block by block, so the
# transient float64 memory stays ~8 MB per operand instead of several copies of the largest tensor
# (the callback's only model-sized memory is its one snapshot of the weights).
FLOAT64_BLOCK = 1 << 20


def rows(t: Tensor) -> Tensor:
    """View a tensor as (neurons, fan_in): one row per output feature (dim 0), in its own dtype.

    The per-neuron convention (dim 0 = output features) holds for ``nn.Linear`` and conv weights;
    a vector is one neuron. A contiguous tensor gives a view (no copy).
    """
    t = t.detach()
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def _flat_blocks(*tensors: Tensor):
    """Matching float64 blocks of the flattened ``tensors`` (each at most FLOAT64_BLOCK long)."""
    flats = [t.detach().reshape(-1) for t in tensors]
    for start in range(0, flats[0].numel(), FLOAT64_BLOCK):
        yield [f[start : start + FLOAT64_BLOCK].to(torch.float64) for f in flats]


def _row_blocks(*tensors: Tensor, width: int | None = None):
    """Matching float64 blocks of whole rows of ``rows(t)`` for each tensor."""
    views = [rows(t) for t in tensors]
    per_block = max(1, FLOAT64_BLOCK // max(1, width or views[0].shape[1]))
    for start in range(0, views[0].shape[0], per_block):
        yield [v[start : start + per_block].to(torch.float64) for v in views]


def squared_norm(t: Tensor) -> float:
    """‖t‖² accumulated in float64, block by block."""
    return float(sum(block.square().sum() for (block,) in _flat_blocks(t)))


def inner_products(a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """(⟨a,b⟩, ‖a‖², ‖b‖²) accumulated in float64, block by block."""
    dot = aa = bb = 0.0
    for x, y in _flat_blocks(a, b):
        dot += float((x * y).sum())
        aa += float(x.square().sum())
        bb += float(y.square().sum())
    return dot, aa, bb


def normalized_difference_sums(a: Tensor, b: Tensor, norm_a: float, norm_b: float):
    """(‖a/‖a‖ − b/‖b‖‖², ‖a/‖a‖ + b/‖b‖‖²) in float64, given the norms; inputs to the angle.

    Several tensors' contributions can be summed to get the angle of their concatenation.
    """
    diff = plus = torch.zeros((), dtype=torch.float64)
    for x, y in _flat_blocks(a, b):
        x, y = x / norm_a, y / norm_b
        diff, plus = diff + (x - y).square().sum().cpu(), plus + (x + y).square().sum().cpu()
    return diff, plus


def angle_from_sums(diff_sq: Tensor, sum_sq: Tensor) -> Tensor:
    """θ = 2·atan2(‖a−b‖, ‖a+b‖) for unit vectors a, b, given ‖a−b‖² and ‖a+b‖² (spec D2).

    Unlike ``arccos(⟨a,b⟩)`` this keeps full relative precision for tiny angles.
    """
    return 2.0 * torch.atan2(diff_sq.clamp_min(0).sqrt(), sum_sq.clamp_min(0).sqrt())


def angular_update(w_old: Tensor, w_new: Tensor, per_neuron: bool = False) -> Tensor:
    """Angle in radians between ``w_old`` and ``w_new`` (spec D2), computed in float64.

    Args:
        w_old: weights before the step.
        w_new: weights after the step (same shape).
        per_neuron: return one angle per row of dim 0 (shape ``(rows,)``) instead of a scalar.

    A zero vector has no direction; its angle is reported as 0 (e.g. a step skipped by AMP).
    Non-finite weights give NaN, not 0: a diverged model must not read as "no update".
    """
    if w_old.shape != w_new.shape:
        raise ValueError(
            f"shape mismatch: w_old {tuple(w_old.shape)} vs w_new {tuple(w_new.shape)}"
        )
    if not per_neuron:
        na, nb = math.sqrt(squared_norm(w_old)), math.sqrt(squared_norm(w_new))
        if not math.isfinite(na + nb):
            return torch.full((), math.nan, dtype=torch.float64)
        if na == 0 or nb == 0:
            return torch.zeros((), dtype=torch.float64)
        return angle_from_sums(*normalized_difference_sums(w_old, w_new, na, nb))
    thetas = []
    for a, b in _row_blocks(w_old, w_new):
        na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
        ok = (na > 0) & (nb > 0)
        a = torch.where(ok, a / na.clamp_min(1e-300), torch.zeros_like(a))
        b = torch.where(ok, b / nb.clamp_min(1e-300), torch.zeros_like(b))
        theta = angle_from_sums(((a - b) ** 2).sum(1), ((a + b) ** 2).sum(1))
        undefined = torch.where(torch.isfinite(na + nb), 0.0, math.nan).squeeze(1).to(theta)
        thetas.append(torch.where(ok.squeeze(1), theta, undefined))
    return torch.cat(thetas)


def update_norms(
    w_old: Tensor, w_new: Tensor, lr: float, weight_decay: float = 0.0, decoupled: bool = True
) -> tuple[float, float]:
    """ℓ2 norm of the total update and RMS of the optimizer direction (spec D1).

    The direction u_t is recovered from the step, so any optimizer works: with decoupled weight
    decay (AdamW, Lion) Δw = −η(u + λw_t), hence u = −Δw/η − λw_t; with coupled decay (SGD, Adam's
    L2) the decay is already part of u and u = −Δw/η.

    Args:
        w_old: weights before the step.
        w_new: weights after the step.
        lr: the learning rate η_t that was applied in this step.
        weight_decay: the group's weight decay λ.
        decoupled: whether λ is decoupled from the gradient (AdamW-style).

    Returns:
        ``(‖Δw‖₂, ‖u‖₂/√C)``; the second is ``nan`` when ``lr == 0``.
    """
    dw_sq = u_sq = 0.0
    for a, b in _flat_blocks(w_old, w_new):
        delta = b - a
        dw_sq += float(delta.square().sum())
        if lr != 0:
            u = -delta / lr - (weight_decay * a if decoupled else 0.0)
            u_sq += float(u.square().sum())
    if lr == 0:
        return math.sqrt(dw_sq), math.nan
    return math.sqrt(dw_sq), math.sqrt(u_sq) / math.sqrt(max(1, w_old.numel()))


def rrc(x_probe: Tensor, w_old: Tensor, w_new: Tensor) -> float:
    """Relative representation change of a linear layer y = x Wᵀ on fixed inputs (spec D3).

    RRC = ‖X (W_{t+1} − W_t)ᵀ‖_F / ‖X W_tᵀ‖_F; a bias would cancel in the numerator and is left
    out of both terms. ``x_probe`` has shape ``(..., fan_in)``.
    """
    x = x_probe.detach().to(torch.float64).reshape(-1, x_probe.shape[-1])
    fan_in = rows(w_old).shape[1]
    if fan_in != x.shape[1]:
        raise ValueError(f"probe fan_in {x.shape[1]} does not match weight fan_in {fan_in}")
    num_sq = den_sq = 0.0
    # Blocks of output rows: the (tokens, rows) products stay within FLOAT64_BLOCK elements.
    for a, b in _row_blocks(w_old, w_new, width=max(x.shape)):
        num_sq += float((x @ (b - a).T).square().sum())
        den_sq += float((x @ a.T).square().sum())
    return math.sqrt(num_sq / den_sq) if den_sq > 0 else math.nan


def noise_scale(g1: Tensor, g2: Tensor, batch_size: int) -> tuple[float, float]:
    """Two-batch estimates of |G|² and tr Σ (McCandlish et al. 2018, App. A; spec D4).

    ``g1``, ``g2`` are the mean gradients of the two halves of a batch of ``batch_size`` samples
    (flattened and concatenated over tensors, or already all-reduced under DDP). With
    B_small = B/2 and B_big = B the unbiased estimators reduce to
    |G|² ≈ ⟨G₁, G₂⟩ and tr Σ ≈ (B/4)·‖G₁ − G₂‖². The simple noise scale is B_noise = tr Σ / |G|²
    and the per-sample SNR is φ = 1/B_noise. The |G|² estimate may be negative for a single draw,
    so smooth (EMA or sum over draws) before taking the ratio.
    """
    # Float64 block by block, like the norms above (whole float64 copies of g1, g2 and g1 - g2
    # were the largest buffers of a diagnosed step), summed on the device: one host sync.
    dot = sq_diff = torch.zeros((), dtype=torch.float64, device=g1.device)
    for a, b in _flat_blocks(g1, g2):
        dot = dot + a @ b
        sq_diff = sq_diff + (a - b).square().sum()
    return float(dot), batch_size / 4.0 * float(sq_diff)


def adamw_white_noise_rms(t: int, beta1: float) -> float:
    """Expected ‖u_t‖/√C of Adam's direction under i.i.d. N(0, σ²) gradients (spec §7).

    The bias-corrected momentum averages t noise samples with EMA weights, so its RMS relative to
    the √v normalizer is √((1−β₁)(1+β₁ᵗ) / ((1+β₁)(1−β₁ᵗ))) (β₂'s long memory makes √v ≈ σ).
    It is 1 at t = 1 (a sign-like first step) and tends to √((1−β₁)/(1+β₁)): the first update is
    √((1+β₁)/(1−β₁)) times the steady state, 4.36× for β₁ = 0.9.
    """
    if t < 1:
        raise ValueError(f"step t counts from 1, got {t}")
    return math.sqrt((1 - beta1) * (1 + beta1**t) / ((1 + beta1) * (1 - beta1**t)))


def lionar_target_angle(lr: float, weight_decay: float, betas: tuple[float, float]) -> float:
    """Rotational-equilibrium angle η_r of Lion (REQ; spec §3.3), used as LionAR's target.

    η_r = √(π/2)·√(2ηλ)·√((1−β₁)² + β₁²(1−β₂)/(1+β₂)). η is the *scheduled* LR, so η_r ∝ √η_t:
    a linear warmup of η is a square-root warmup of the angle.
    """
    b1, b2 = betas
    return (
        math.sqrt(math.pi / 2)
        * math.sqrt(2 * lr * weight_decay)
        * math.sqrt((1 - b1) ** 2 + b1**2 * (1 - b2) / (1 + b2))
    )


def equilibrium_angle(
    kind: str, lr: float, weight_decay: float, betas_or_momentum: float | tuple[float, float]
) -> float:
    """Expected angular update per step in rotational equilibrium (Kosson et al. 2024, REQ).

    Args:
        kind: ``"adamw"`` (√(2ηλ(1−β₁)/(1+β₁))), ``"sgdm"`` (√(2ηλ/(1+μ))) or ``"lion"``
            (see :func:`lionar_target_angle`; accurate for small ηλ only).
        lr: learning rate η.
        weight_decay: decoupled weight decay λ.
        betas_or_momentum: (β₁, β₂) for AdamW and Lion, μ for SGDM.
    """
    if kind == "adamw":
        b1 = (
            betas_or_momentum[0]
            if isinstance(betas_or_momentum, tuple | list)
            else betas_or_momentum
        )
        return math.sqrt(2 * lr * weight_decay * (1 - b1) / (1 + b1))
    if kind == "sgdm":
        mu = float(betas_or_momentum)  # type: ignore[arg-type]
        return math.sqrt(2 * lr * weight_decay / (1 + mu))
    if kind == "lion":
        b1, b2 = betas_or_momentum  # type: ignore[misc]
        return lionar_target_angle(lr, weight_decay, (b1, b2))
    raise ValueError(f"kind={kind!r}: expected 'adamw', 'sgdm' or 'lion'")


def rrc_lr_factor(phi: float, batch_size: int) -> float:
    """Step multiplier that holds the RRC at its noise-floor value (spec §3.5, derived).

    For a normalized step on a linear layer, RRC² ∝ η²(φ + 1/B²)/(φ + 1/B) for a per-sample SNR φ;
    keeping it at the φ → 0 value gives ρ = √((1 + Bφ)/(1 + B²φ)): 1 for pure noise, 1/√B when the
    signal dominates, so a high early SNR lowers the step like an automatic warmup.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    phi = max(0.0, float(phi)) if math.isfinite(phi) else math.inf
    if math.isinf(phi):
        return 1.0 / math.sqrt(batch_size)
    return math.sqrt((1 + batch_size * phi) / (1 + batch_size**2 * phi))
