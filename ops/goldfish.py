"""Goldfish loss (Hans et al. 2024, "Be like a Goldfish, Don't Memorize!", arXiv:2406.10209).

A deterministic pseudo-random 1/k of the target tokens is dropped from the loss, so the model never
receives a gradient for those tokens and cannot reproduce a training sequence verbatim. With the
``hash_table`` strategy the decision for target ``t`` depends only on the ``h`` tokens ending at
``t``: a repeated passage (a canary replicated 10 times) is masked identically every time, which
is what stops memorization of duplicates.

* ``static``: drop positions ``start, start + k, start + 2k, ...``;
* ``hash_table``: for 0-indexed ``t >= h - 1``, ``key_t = prod_{u=t-h+1..t} y_u mod P`` with
  ``P = 1_000_003``; drop iff ``table[key_t] < 1/k``; ``table`` holds ``P`` uniforms drawn by a CPU
  generator seeded 2971215073 (built on CPU so the mask is device-independent). The first
  ``h - 1`` positions are never dropped (reference), or always with ``incomplete_window="drop"``
  (our addition for packed rows).

Token id 0 makes the product 0, so every window containing id 0 shares one decision (a known
property of the reference hash); never hash ignore-index labels.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

TABLE_SIZE = 1_000_003
TABLE_SEED = 2971215073
IGNORE_INDEX = -100

GoldfishStrategy = Literal["hash_table", "static"]
GoldfishHash = Literal["mod_product", "wrapping_product"]
IncompleteWindow = Literal["keep", "drop"]


@lru_cache(maxsize=2)
def goldfish_table(size: int = TABLE_SIZE, seed: int = TABLE_SEED) -> Tensor:
    """The ``size`` uniform [0, 1) values of the reference hash table (always drawn on CPU)."""
    return torch.rand(size, generator=torch.Generator().manual_seed(seed))


@lru_cache(maxsize=4)
def _table_on(device: torch.device) -> Tensor:
    """The reference table copied once to ``device`` (a per-step CPU lookup would sync the GPU)."""
    return goldfish_table().to(device)


def _window_keys(ids: Tensor, h: int, hash_mode: GoldfishHash, size: int) -> Tensor:
    """Hash keys of the windows ``ids[..., t-h+1 : t+1]`` for ``t >= h-1``; shape ``[..., T-h+1]``."""
    windows = ids.to(torch.int64).unfold(-1, h, 1)
    if hash_mode == "mod_product":
        # Product taken modulo P after every factor: never overflows (P^2 < 2^63).
        key = torch.ones(windows.shape[:-1], dtype=torch.int64, device=ids.device)
        for j in range(h):
            key = torch.remainder(key * torch.remainder(windows[..., j], size), size)
        return key
    if hash_mode == "wrapping_product":
        # The reference's int64 product, which wraps around on overflow, then mod P.
        return torch.remainder(torch.prod(windows, dim=-1), size)
    raise ValueError(
        f"goldfish hash must be 'mod_product' or 'wrapping_product', got {hash_mode!r}"
    )


def goldfish_drop_mask(
    ids: Tensor,
    k: float,
    h: int = 13,
    strategy: GoldfishStrategy = "hash_table",
    hash_mode: GoldfishHash = "mod_product",
    start: int | None = None,
    table: Tensor | None = None,
    incomplete_window: IncompleteWindow = "keep",
) -> Tensor:
    """Boolean mask of the target positions dropped from the loss (``True`` = dropped).

    Args:
        ids: target token ids ``[..., T]`` (the shifted inputs, *before* ignore-index masking).
        k: drop frequency; about ``1/k`` of the positions are dropped, ``k = inf`` drops none.
        h: context width of the hash (``hash_table``).
        strategy: ``hash_table`` (default) or ``static``.
        hash_mode: ``mod_product`` (overflow-free, default) or ``wrapping_product`` (reference).
        start: first dropped position for ``static`` (default ``k - 1``: every k-th token).
        table: hash table (default ``goldfish_table()``).
        incomplete_window: what ``hash_table`` does with the first ``h - 1`` positions, whose
            window is cut by the start of the row. ``keep`` (reference): never dropped. ``drop``:
            always left out of the loss. Use ``drop`` on packed rows (our addition, not in the
            Goldfish paper): a row then starts mid-document, and with ``keep`` every replica of a
            duplicated passage that straddles a row boundary is trained unmasked on up to
            ``h - 1`` of its tokens, at a different offset per replica, so the replicas together
            expose most of the positions the hash drops.
    """
    if not k >= 1:
        raise ValueError(f"goldfish k must be >= 1 (drop rate 1/k), got {k}")
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    if math.isinf(k):
        return mask
    if strategy == "static":
        step = int(k)
        if step != k:
            raise ValueError(f"static goldfish needs an integer k, got {k}")
        mask[..., (step - 1 if start is None else start) :: step] = True
        return mask
    if strategy != "hash_table":
        raise ValueError(f"goldfish strategy must be 'hash_table' or 'static', got {strategy!r}")
    if h < 1:
        raise ValueError(f"goldfish context width h must be >= 1, got {h}")
    if incomplete_window not in ("keep", "drop"):
        raise ValueError(
            f"goldfish incomplete_window must be 'keep' or 'drop', got {incomplete_window!r}"
        )
    mask[..., : h - 1] = incomplete_window == "drop"
    if ids.shape[-1] < h:
        return mask
    table = _table_on(ids.device) if table is None else table.to(ids.device)
    keys = _window_keys(ids, h, hash_mode, table.numel())
    drop = table[keys] < 1.0 / k  # the same CPU-drawn values on every device
    mask[..., h - 1 :] = drop
    return mask


def goldfish_cross_entropy(
    logits: Tensor, targets: Tensor, drop_mask: Tensor | None, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean token cross-entropy over kept, non-ignored targets (Goldfish loss).

    Args:
        logits: ``[B, T, V]`` predictions for the targets.
        targets: ``[B, T]`` target ids, ``ignore_index`` where no loss is taken.
        drop_mask: ``[B, T]`` from ``goldfish_drop_mask`` (``None`` = plain cross-entropy).
    """
    keep = targets != ignore_index
    if drop_mask is not None:
        keep = keep & ~drop_mask
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.masked_fill(~keep, 0).reshape(-1),
        reduction="none",
    )
    return (ce * keep.reshape(-1)).sum() / keep.sum().clamp(min=1)
