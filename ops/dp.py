"""Clipping, Gaussian noise and privacy accounting for federated clients (spec section 3.4b).

Three noise modes, named as in the module's ``noise_mode``:

* ``output_perturbation`` (official ``src/dp.py``, "DP-LoRA style", a *heuristic*): after local
  training add ``N(0, (lr * sigma * C)^2)`` once to every trainable tensor, with
  ``sigma = c2 * q * sqrt(T ln(1/delta)) / epsilon``. Its epsilon is not a DP guarantee (the
  clipping is batch-level), so it is reported as "heuristic epsilon".
* ``weight_noise`` (official ``src/noise.py``): a fresh adapter ``A`` (Kaiming) and ``B = 0`` get
  ``N(0, sigma^2)`` noise and are merged, i.e. the weight moves by ``s * N_B (A + N_A)``.
* ``dp_sgd`` (Abadi et al. 2016, record-level DP per client): Poisson-sample each local batch at
  rate ``q``, clip each per-sample gradient to norm ``C``, sum, add ``N(0, sigma^2 C^2 I)`` and
  divide by the expected batch size. Epsilon comes from Opacus' RDP accountant (Mironov 2017),
  one ``step(noise_multiplier=sigma, sample_rate=q)`` per local step summed over all rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def output_perturbation_sigma(
    epsilon: float, delta: float, sample_rate: float, steps: int, c2: float = 1.1
) -> float:
    """Heuristic noise scale of the official code, ``c2 * q * sqrt(T ln(1/delta)) / epsilon``."""
    if epsilon <= 0 or not 0 < delta < 1 or steps < 1:
        raise ValueError(
            f"need epsilon > 0, 0 < delta < 1, steps >= 1; got {epsilon}, {delta}, {steps}"
        )
    return c2 * sample_rate * math.sqrt(steps * math.log(1.0 / delta)) / epsilon


@torch.no_grad()
def add_output_perturbation(
    tensors: Sequence[Tensor], lr: float, sigma: float, clip_norm: float, generator: torch.Generator
) -> None:
    """Add ``N(0, (lr * sigma * C)^2)`` to each tensor in place (noise before any merge)."""
    std = lr * sigma * clip_norm
    for t in tensors:
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        t.add_(noise.to(t.device, t.dtype), alpha=std)


def weight_noise_delta(
    in_features: int, out_features: int, rank: int, scale: float, sigma: float, generator
) -> Tensor:
    """Low-rank perturbation ``s * N_B (A + N_A)`` of one weight (official ``noise.py``)."""
    a = torch.empty(rank, in_features)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    noise_a = sigma * torch.randn(rank, in_features, generator=generator)
    noise_b = sigma * torch.randn(out_features, rank, generator=generator)
    return scale * noise_b @ (a + noise_a)


def poisson_sample(num_samples: int, sample_rate: float, generator: torch.Generator) -> Tensor:
    """Indices of a Poisson-sampled batch: each record independently with probability ``q``."""
    return torch.nonzero(torch.rand(num_samples, generator=generator) < sample_rate).flatten()


def per_sample_gradients(
    sample_loss: Callable[[int], Tensor], params: Sequence[Tensor], num_samples: int
) -> list[Tensor]:
    """Per-sample gradients stacked as ``(num_samples, *p.shape)``, one backward per sample.

    A loop rather than ``vmap`` so it works with any Hugging Face model (their mask helpers are
    not vmap-safe); exact, and cheap enough for the tiny models DP is evaluated on here.
    """
    grads: list[list[Tensor]] = [[] for _ in params]
    for i in range(num_samples):
        g = torch.autograd.grad(sample_loss(i), list(params), allow_unused=True)
        for slot, gi, p in zip(grads, g, params, strict=True):
            slot.append(torch.zeros_like(p) if gi is None else gi.detach())
    return [torch.stack(slot) for slot in grads]


def clip_per_sample(per_sample: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """Scale each sample's gradient (global norm over all tensors) to norm ``<= max_norm``."""
    if not per_sample:
        raise ValueError("clip_per_sample: no gradient tensors (nothing is trainable?)")
    norms = torch.sqrt(sum(g.flatten(1).float().pow(2).sum(1) for g in per_sample))
    factor = (max_norm / (norms + 1e-12)).clamp(max=1.0)
    return [g * factor.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for g in per_sample]


def dp_noise(
    summed: Sequence[Tensor],
    sigma: float,
    clip_norm: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> list[Tensor]:
    """``(sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / B`` per tensor (DP-SGD's noisy mean)."""
    out = []
    for s in summed:
        noise = torch.randn(s.shape, generator=generator, dtype=torch.float32).to(s.device)
        out.append((s + sigma * clip_norm * noise.to(s.dtype)) / expected_batch_size)
    return out


def make_accountant():
    """A fresh Opacus ``RDPAccountant`` (one per client)."""
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as err:  # pragma: no cover - opacus is a declared dependency
        raise ImportError("noise_mode='dp_sgd' needs opacus (pip install opacus)") from err
    return RDPAccountant()


def noise_multiplier_for_epsilon(
    target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Smallest noise multiplier reaching ``target_epsilon`` after ``steps`` (Opacus search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
        )
    )


def rdp_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps under RDP accounting."""
    acc = make_accountant()
    acc.history.append((sigma, sample_rate, steps))
    return float(acc.get_epsilon(delta))
