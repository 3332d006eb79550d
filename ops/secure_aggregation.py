"""Secure aggregation by pairwise additive masks in fixed-point arithmetic (Bonawitz et al. 2017).

Semantics of SecAgg with full participation (spec section 3.4c):

1. client ``c`` pre-scales its update by its public weight, ``u_c = w_c Delta_c``;
2. fixed point: ``q_c = round(clip(u_c, -R, R) * 2^f)`` (int64), encoded ``e_c = q_c mod M``,
   ``M = 2^m``;
3. every pair ``i < j`` shares a seed ``s_ij = H(master_seed, round, i, j)`` (standing in for the
   key agreement) and expands it to a mask ``m_ij`` uniform in ``[0, M)``;
4. client ``i`` uploads ``y_i = (e_i + sum_{j>i} m_ij - sum_{j<i} m_ji) mod M``;
5. the server computes ``S = sum_i y_i mod M`` (the masks cancel), maps ``S >= M/2`` to ``S - M``
   and returns ``S / 2^f ~= sum_c u_c``, within ``C * 2^-(f+1)`` per coordinate plus clipping.

The sum is exact up to quantization, so secure aggregation *cannot change memorization*: it only
restricts what the server observes (each ``y_i`` alone is uniform noise). Dropped clients are not
recoverable here (no Shamir shares / self-masks): ``mask_update`` needs the full participant list
and ``unmask_sum`` is only correct when every listed participant's ``y_i`` is in the sum.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor


def check_no_wrap(num_clients: int, clip_range: float, frac_bits: int, modulus_bits: int) -> None:
    """Raise unless ``C * R * 2^f < M / 2``: otherwise the modular sum could wrap around."""
    if not 0 < modulus_bits <= 62:
        raise ValueError(f"modulus_bits must lie in [1, 62] (int64 sums), got {modulus_bits}")
    if num_clients * clip_range * 2.0**frac_bits >= 2.0 ** (modulus_bits - 1):
        raise ValueError(
            f"secure aggregation would overflow: clients={num_clients} * clip_range={clip_range} "
            f"* 2^frac_bits(={frac_bits}) >= M/2 = 2^{modulus_bits - 1}; raise modulus_bits or "
            "lower frac_bits / clip_range"
        )


def quantize(
    update: Tensor,
    clip_range: float,
    frac_bits: int,
    modulus_bits: int,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Fixed-point encode ``update``: returns ``(q mod M as int64, number of clipped entries)``."""
    x = update.detach().to(torch.float64).reshape(-1)
    clipped = int((x.abs() > clip_range).sum())
    scaled = x.clamp(-clip_range, clip_range) * 2.0**frac_bits
    if stochastic_rounding:
        floor = torch.floor(scaled)
        u = torch.rand(scaled.shape, dtype=torch.float64, generator=generator)
        q = floor + (u < (scaled - floor)).to(torch.float64)
    else:
        q = torch.round(scaled)
    return torch.remainder(q.to(torch.int64), 2**modulus_bits), clipped


def dequantize(encoded_sum: Tensor, frac_bits: int, modulus_bits: int) -> Tensor:
    """Map a sum mod ``M`` back to signed fixed point and to float64 (``S / 2^f``)."""
    m = 2**modulus_bits
    s = torch.remainder(encoded_sum.to(torch.int64), m)
    s = torch.where(s >= m // 2, s - m, s)
    return s.to(torch.float64) / 2.0**frac_bits


def pair_seed(master_seed: int, round_index: int, i: int, j: int) -> int:
    """Deterministic 63-bit seed shared by clients ``i < j`` in one round (SHA-256 of the ids)."""
    if i >= j:
        raise ValueError(f"pair_seed expects i < j, got i={i}, j={j}")
    digest = hashlib.sha256(f"secagg:{master_seed}:{round_index}:{i}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def pairwise_mask(seed: int, numel: int, modulus_bits: int) -> Tensor:
    """PRG expansion of a pair seed: ``numel`` int64 values uniform in ``[0, M)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**modulus_bits, (numel,), generator=gen, dtype=torch.int64)


def mask_update(
    encoded: Tensor,
    client: int,
    participants: Sequence[int],
    master_seed: int,
    round_index: int,
    modulus_bits: int,
) -> Tensor:
    """``y_i = (e_i + sum_{j>i} m_ij - sum_{j<i} m_ji) mod M`` for ``client`` = i."""
    if client not in participants:
        raise ValueError(f"client {client} is not among the participants {list(participants)}")
    if len(set(participants)) != len(participants):
        raise ValueError(f"participants contain duplicates: {list(participants)}")
    m = 2**modulus_bits
    y = encoded.to(torch.int64).clone()
    for j in participants:
        if j == client:
            continue
        lo, hi = min(client, j), max(client, j)
        mask = pairwise_mask(pair_seed(master_seed, round_index, lo, hi), y.numel(), modulus_bits)
        y = y + mask if client < j else y - mask
        y = torch.remainder(y, m)
    return y


def unmask_sum(masked: Sequence[Tensor] | Tensor, frac_bits: int, modulus_bits: int) -> Tensor:
    """Server side: ``dequantize(sum_i y_i mod M)``; accepts the list of ``y_i`` or their sum."""
    if isinstance(masked, Tensor):
        total = masked
    else:
        m = 2**modulus_bits
        total = torch.zeros_like(masked[0])
        for y in masked:
            total = torch.remainder(total + y, m)
    return dequantize(total, frac_bits, modulus_bits)


def secure_sum(
    updates: Sequence[Tensor],
    participants: Sequence[int],
    master_seed: int,
    round_index: int,
    clip_range: float = 1.0,
    frac_bits: int = 24,
    modulus_bits: int = 40,
) -> Tensor:
    """End-to-end SecAgg of already weight-scaled updates ``u_c`` (single-process reference)."""
    check_no_wrap(len(participants), clip_range, frac_bits, modulus_bits)
    masked = [
        mask_update(
            quantize(u, clip_range, frac_bits, modulus_bits)[0],
            c,
            participants,
            master_seed,
            round_index,
            modulus_bits,
        )
        for u, c in zip(updates, participants, strict=True)
    ]
    return unmask_sum(masked, frac_bits, modulus_bits).view_as(updates[0])


def error_bound(num_clients: int, frac_bits: int, stochastic_rounding: bool = False) -> float:
    """Worst-case rounding error of the secure sum per coordinate: ``C * 2^-(f+1)`` with
    round-to-nearest, ``C * 2^-f`` with stochastic rounding (a value may go to either
    neighbouring grid point)."""
    return num_clients * 2.0 ** -(frac_bits if stochastic_rounding else frac_bits + 1)
