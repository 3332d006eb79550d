"""The update metrics of one optimizer step over all followed tensors (spec D1-D2).

``UpdateDiagnostics`` snapshots every followed tensor before the step; afterwards this module
turns each ``(w_t, w_{t+1})`` pair into its update norm ‖Δw‖₂, the RMS of the optimizer direction
and the angular update (per tensor, per neuron and for all matrices concatenated), using the
float64 primitives of ``ops.warmup``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ops.warmup import (
    angle_from_sums,
    angular_update,
    normalized_difference_sums,
    squared_norm,
    update_norms,
)


class TensorSnapshot(NamedTuple):
    """One followed tensor at a logging step, taken before the optimizer step."""

    name: str
    param: Tensor  # the live parameter: w_{t+1} once the step has run
    before: Tensor  # its copy w_t
    lr: float  # the scheduled LR of its param group
    weight_decay: float
    decoupled: bool  # the decay is decoupled (AdamW, Lion): Δw = -lr (u + wd w)


def step_update_metrics(
    snapshots: list[TensorSnapshot],
    lr_multipliers: dict[int, float],
    transposed: set[int],
    per_neuron: bool,
    per_tensor: bool,
) -> tuple[dict[str, float], list[Tensor]]:
    """Update norms and angles of one step.

    Args:
        snapshots: the followed tensors, taken before the step.
        lr_multipliers: by ``id(param)``, the factor the optimizer applied to the scheduled LR
            (Lion/LionA/LionAR's σ_t·ρ_t); missing = 1.
        transposed: ``id`` of weights stored as ``(in, out)`` (GPT-2 ``Conv1D``): their neurons
            are columns.
        per_neuron: compute per-neuron angles of matrices (rows of dim 0).
        per_tensor: return the per-tensor scalars, not only the global ones.

    Returns:
        The scalars (``warmup/...``) and the per-neuron angle vectors (for a histogram).
    """
    out: dict[str, float] = {}
    norms: dict[str, tuple[float, float]] = {}
    per_neuron_angles: list[Tensor] = []
    dw_sq, u_sq, n_u = 0.0, 0.0, 0
    for name, p, old, lr, wd, decoupled in snapshots:
        new = p.detach()
        # Lion/LionA/LionAR scale the scheduled LR by σ_t·ρ_t (inverse bias correction, RRC
        # correction): divide Δw by the LR this tensor actually got.
        lr *= float(lr_multipliers.get(id(p), 1.0))
        dw, u_rms = update_norms(old, new, lr, wd, decoupled)
        dw_sq += dw**2
        if math.isfinite(u_rms):
            u_sq, n_u = u_sq + u_rms**2 * old.numel(), n_u + old.numel()
        na, nb = math.sqrt(squared_norm(old)), math.sqrt(squared_norm(new))
        norms[name] = (na, nb)
        if per_tensor:
            out[f"warmup/update_norm/{name}"] = dw
            out[f"warmup/direction_rms/{name}"] = u_rms
            out[f"warmup/angle/{name}"] = (  # angular_update, reusing the norms above
                float(angle_from_sums(*normalized_difference_sums(old, new, na, nb)))
                if na > 0 and nb > 0
                else (0.0 if math.isfinite(na + nb) else math.nan)  # as angular_update
            )
        if per_neuron and old.dim() >= 2:
            pair = (old.T, new.T) if id(p) in transposed else (old, new)
            angles = angular_update(*pair, per_neuron=True)
            per_neuron_angles.append(angles)
            if per_tensor:
                out[f"warmup/angle_neuron_mean/{name}"] = float(angles.mean())
                out[f"warmup/angle_neuron_max/{name}"] = float(angles.max())
    out["warmup/global/update_norm"] = math.sqrt(dw_sq)
    out["warmup/global/direction_rms"] = math.sqrt(u_sq / n_u) if n_u else math.nan
    out.update(_global_matrix_angle(snapshots, norms))
    return out, per_neuron_angles


def _global_matrix_angle(
    snapshots: list[TensorSnapshot], norms: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Angle of all matrices concatenated: a second pass with the global norms, since
    2·atan2(‖a−b‖, ‖a+b‖) needs the normalized vectors, not the per-tensor angles."""
    mats = [s for s in snapshots if s.before.dim() >= 2]
    if not mats:
        return {}
    na = math.sqrt(sum(norms[s.name][0] ** 2 for s in mats))
    nb = math.sqrt(sum(norms[s.name][1] ** 2 for s in mats))
    if na > 0 and nb > 0:
        diff = plus = torch.zeros((), dtype=torch.float64)
        for s in mats:
            d, q = normalized_difference_sums(s.before, s.param, na, nb)
            diff, plus = diff + d, plus + q
        return {"warmup/global/angle": float(angle_from_sums(diff, plus))}
    if not math.isfinite(na + nb):  # as angular_update: NaN, not "no update"
        return {"warmup/global/angle": math.nan}
    return {}
