"""SNGDM: normalized (or clipped) SGD with momentum, the outer optimizer of FO-B-MAML.

The MAML objective is not L-smooth: its smoothness grows with ||grad F|| ((L0, L1)-smoothness,
Chayti & Jaggi, spec §3.7), so a fixed step must shrink where the gradient is large. Normalized
and clipped momentum steps adapt automatically (Cutkosky & Mehta 2020; spec §3.6):

    m_t     = beta m_{t-1} + (1 - beta) g_t
    normalized:  x_{t+1} = x_t - lr * m_t / max(||m_t||, eps)
    clipped:     x_{t+1} = x_t - min(lr, c / ||m_t||) * m_t
    sgd:         x_{t+1} = x_t - lr * m_t

||m_t|| is the *global* norm over every parameter of every param group, not per tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ops.sharding import refuse_fsdp_shards

MODES = ("normalized", "clipped", "sgd")


class SNGDM(Optimizer):
    """Normalized / clipped SGD with momentum.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: step size eta; in ``normalized`` mode the step norm equals ``lr`` exactly (one group).
        momentum: beta of the momentum average ``m = beta m + (1 - beta) g``; 0 gives normalized GD.
        mode: ``normalized``, ``clipped`` or ``sgd`` (plain momentum SGD with the same average).
        clip_threshold: c of the ``clipped`` mode (required there): the step is
            ``min(lr, c/||m||) m``, i.e. SGD whenever ``lr ||m|| <= c``.
        eps: floor of ||m|| in ``normalized`` mode (avoids 0/0 at a stationary point).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-2,
        momentum: float = 0.9,
        mode: str = "normalized",
        clip_threshold: float | None = None,
        eps: float = 1e-12,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"SNGDM: lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SNGDM: momentum must be in [0, 1), got {momentum}")
        if mode not in MODES:
            raise ValueError(f"SNGDM: mode must be one of {MODES}, got {mode!r}")
        if mode == "clipped" and (clip_threshold is None or clip_threshold <= 0):
            raise ValueError(
                f"SNGDM: mode='clipped' needs clip_threshold > 0, got {clip_threshold}"
            )
        if not eps > 0:
            raise ValueError(f"SNGDM: eps must be > 0, got {eps}")
        defaults = {"lr": lr, "momentum": momentum}
        super().__init__(params, defaults)
        if any(p.is_complex() for g in self.param_groups for p in g["params"]):
            # the global norm is taken in float64, which would drop imaginary parts
            raise ValueError("SNGDM does not support complex parameters")
        if mode != "sgd":
            refuse_fsdp_shards(
                (p for g in self.param_groups for p in g["params"]),
                f"SNGDM(mode={mode!r})",
                "its step uses the global norm of the momentum, and FSDP hands it shards",
            )
        self.mode = mode
        self.clip_threshold = clip_threshold
        self.eps = eps

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["sngdm"] = {"mode": self.mode, "clip_threshold": self.clip_threshold, "eps": self.eps}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the momentum and, as ``torch.optim`` restores the param groups' settings, the
        checkpoint's mode, threshold and eps, with a warning naming those this run set
        otherwise (they changed silently)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("sngdm", None)
        super().load_state_dict(state_dict)
        if saved is None:
            return
        current = {"mode": self.mode, "clip_threshold": self.clip_threshold, "eps": self.eps}
        changed = [f"{k} {v} -> {saved[k]}" for k, v in current.items() if saved[k] != v]
        if changed:
            warnings.warn(
                f"SNGDM keeps the resumed checkpoint's settings ({', '.join(changed)}), not "
                "this run's",
                stacklevel=2,
            )
        self.mode, self.clip_threshold, self.eps = (
            saved["mode"], saved["clip_threshold"], saved["eps"],
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # First pass: update every momentum buffer, accumulate the global squared norm.
        sq = None
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.mul_(beta).add_(p.grad, alpha=1.0 - beta)
                part = m.double().pow(2).sum()
                sq = part if sq is None else sq + part
        if sq is None:
            return loss
        norm = float(sq.sqrt())
        # Second pass: one global scale per group (lr may differ across groups).
        for group in self.param_groups:
            if self.mode == "normalized":
                scale = group["lr"] / max(norm, self.eps)
            elif self.mode == "clipped":
                scale = min(group["lr"], self.clip_threshold / norm) if norm > 0 else group["lr"]
            else:
                scale = group["lr"]
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(self.state[p]["momentum_buffer"], alpha=-scale)
        return loss
