"""FedAvg aggregation of client updates and the server-optimizer view of a federated round.

Two named ways to average LoRA clients (Bossy et al. 2025, spec section 3.3):

* ``merged_delta_mean`` (the paper's protocol): every client trains a *fresh* adapter, its update
  of a target weight is the merged low-rank delta ``s * B_c @ A_c`` and the server averages the
  deltas, ``theta_{r+1} = theta_r + sum_c w_c s B_c A_c``. The aggregate has rank <= C * r.
* ``factor_mean`` (OpenFedLLM / FlowerTune style): the adapter persists across rounds and the
  server averages the factors, ``A_bar = sum_c w_c A_c``, ``B_bar = sum_c w_c B_c``. Note that
  ``s B_bar A_bar`` is *not* the average of the products; the two modes are never mixed silently.

Full fine-tuning uses the same path with ``Delta_c = theta_c - theta_r``.

Server optimizer form (Reddi et al. 2021): the pseudo-gradient ``g = theta_r - sum_c w_c theta_c
= -sum_c w_c Delta_c`` is written into ``p.grad`` and an ordinary ``torch.optim`` optimizer steps:
``SGD(lr=1)`` is exactly FedAvg, SGD with momentum is FedAvgM, ``Adam`` is FedAdam.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

AGGREGATION_MODES = ("merged_delta_mean", "factor_mean")
LoraAggregation = Literal["merged_delta_mean", "factor_mean"]


def normalize_weights(weights: Sequence[float] | Tensor) -> Tensor:
    """FedAvg weights ``w_c = n_c / sum(n)`` as a float64 vector summing to 1.

    Raises on negative entries or a zero total; zero-weight clients stay at weight 0 (ignored).
    """
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() == 0:
        raise ValueError("client weights are empty: at least one client must take part")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"client weights must be finite and >= 0, got {w.tolist()}")
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"client weights sum to {total}; at least one weight must be > 0")
    return w / total


def lora_delta(lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """The merged low-rank update ``s * B @ A`` of one target weight (peft's ``get_delta_weight``).

    Args:
        lora_a: ``A`` with shape ``(r, in_features)``.
        lora_b: ``B`` with shape ``(out_features, r)``.
        scale: ``alpha / r`` (standard LoRA scaling).
    """
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"LoRA factors need A (r, in) and B (out, r); got A {tuple(lora_a.shape)}, "
            f"B {tuple(lora_b.shape)}"
        )
    return scale * (lora_b @ lora_a)


def weighted_sum(updates: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """``sum_c w_c u_c`` with normalized weights, accumulated in fp32 (or the input's wider dtype).

    Zero-weight clients are skipped, so a client with ``n_c = 0`` cannot inject NaNs.
    """
    w = normalize_weights(weights)
    if len(updates) != w.numel():
        raise ValueError(f"{len(updates)} updates but {w.numel()} weights")
    dtype = torch.promote_types(updates[0].dtype, torch.float32)
    out = torch.zeros_like(updates[0], dtype=dtype)
    for u, wc in zip(updates, w.tolist(), strict=True):
        if wc != 0.0:
            out.add_(u.to(dtype), alpha=wc)
    return out


def merged_delta_mean(
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    scale: float,
    weights: Sequence[float] | Tensor,
) -> Tensor:
    """Paper aggregation of one target weight: ``sum_c w_c * s * B_c @ A_c``."""
    deltas = [lora_delta(a, b, scale) for a, b in zip(lora_as, lora_bs, strict=True)]
    return weighted_sum(deltas, weights)


def factor_mean(
    lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor], weights: Sequence[float] | Tensor
) -> tuple[Tensor, Tensor]:
    """FlowerTune/OpenFedLLM aggregation: ``(sum_c w_c A_c, sum_c w_c B_c)``."""
    return weighted_sum(lora_as, weights), weighted_sum(lora_bs, weights)


def pseudo_gradient(aggregate_delta: Tensor) -> Tensor:
    """Server pseudo-gradient ``g = theta_r - mean_c theta_c = -sum_c w_c Delta_c``."""
    return -aggregate_delta


def flatten_tensors(
    tensors: Iterable[Tensor], dtype: torch.dtype = torch.float32, numel: int | None = None
) -> Tensor:
    """Concatenate tensors into one flat buffer (the unit that is all-reduced once per round).

    With ``numel`` (their total size) each tensor is copied into the preallocated buffer as it
    comes: a generator that computes them (a client's merged deltas, model-sized in all) then
    never holds more than one besides the buffer, where ``torch.cat`` holds them all.
    """
    if numel is None:
        return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    out, offset = None, 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        if out is None:
            out = torch.empty(numel, dtype=dtype, device=flat.device)
        if offset + flat.numel() > numel:
            raise ValueError(f"the tensors have more than numel={numel} entries")
        out[offset : offset + flat.numel()].copy_(flat)
        offset += flat.numel()
    if offset != numel:
        raise ValueError(f"the tensors have {offset} entries, not numel={numel}")
    return out if out is not None else torch.empty(0, dtype=dtype)


def unflatten_like(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat buffer back into tensors shaped (and typed) like ``like``."""
    total = sum(t.numel() for t in like)
    if flat.numel() != total:
        raise ValueError(f"flat buffer has {flat.numel()} entries, the tensors need {total}")
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


def apply_server_update(
    params: Sequence[Tensor],
    aggregate_delta: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    step: Callable[[], object] | None = None,
) -> None:
    """Write the pseudo-gradient into ``p.grad`` and step the server optimizer.

    Args:
        params: the server parameters the optimizer owns (global weights or adapter factors).
        aggregate_delta: ``sum_c w_c Delta_c`` per parameter.
        optimizer: ``SGD(lr=1)`` = FedAvg, ``SGD(momentum=...)`` = FedAvgM, ``Adam`` = FedAdam.
        step: what to call instead of ``optimizer.step`` (Lightning's wrapped optimizer counts
            ``global_step`` through it); ``None`` calls ``optimizer.step()``.
    """
    for p, d in zip(params, aggregate_delta, strict=True):
        p.grad = pseudo_gradient(d).to(p.dtype).view_as(p).clone()
    (step or optimizer.step)()
    optimizer.zero_grad(set_to_none=True)


def fedadam(params: Iterable[Tensor], lr: float = 1e-2) -> torch.optim.Adam:
    """FedAdam server optimizer with the spec's constants ``betas=(0.9, 0.99), eps=1e-3``."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-3)
