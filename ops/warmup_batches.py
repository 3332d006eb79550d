"""Batch plumbing for the gradient-noise probe: split a batch in halves, flatten gradients.

Lightning-free helpers used by ``callbacks.warmup_diagnostics``; a batch is a tensor, a dict or a
list/tuple of tensors with the sample dimension first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_size", "flat_grad", "split_halves", "to_cpu"]


def batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, Tensor):
            return v.shape[0]
    raise TypeError(f"cannot find a batch dimension in a batch of type {type(batch).__name__}")


def split_halves(batch: Any) -> tuple[Any, Any]:
    half = batch_size(batch) // 2

    def cut(x: Any, sl: slice) -> Any:
        if isinstance(x, Tensor):
            return x[sl]
        if isinstance(x, dict):
            return {k: cut(v, sl) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(cut(v, sl) for v in x)
        return x

    return cut(batch, slice(0, half)), cut(batch, slice(half, 2 * half))


def flat_grad(loss: Tensor, params: list[Tensor]) -> Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def to_cpu(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(to_cpu(v) for v in x)
    return x
