"""Lion and the normalized variants LionA and LionAR of Kosson, Messmer & Jaggi (NeurIPS 2024).

* :class:`Lion`: c = β₁m + (1−β₁)g; w ← w − η(sign(c) + λw); m ← β₂m + (1−β₂)g (Chen et al. 2023).
* :class:`LionA`: the same direction rescaled to a fixed ℓ2 norm κ√C (reconstructed form).
* :class:`LionAR`: rotational Lion: each neuron turns by a fixed angle per step and its norm is
  held at its initial value by projection, which replaces weight decay (mechanics of epfml/REQ).

All three share the momentum variants of spec §3.4 (Nesterov look-ahead, inverse bias correction)
and the SNR-based RRC correction of §3.5, each behind its own flag. State holds only tensors and
ints, so ``torch.load(weights_only=True)`` reads checkpoints and resumes are bit-exact.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ops.sharding import is_fsdp_shard, refuse_fsdp_shards
from ops.warmup import lionar_target_angle, rrc_lr_factor

log = logging.getLogger(__name__)

RRCMode = Literal["none", "derived"]

# Name patterns of the parameters inside transformer blocks (Llama/Mistral ``layers``, GPT-2 ``h``,
# nanoGPT-style ``blocks``); used by ``LionAR(rotational="blocks")``.
#: Names of the groups LionAR splits each param group into (rotational tensors, other
#: matrices, vectors), which LearningRateMonitor logs their LRs by.
SPLIT_GROUP_NAMES = {"rot": "rotational", "mat": "matrices", "vec": "vectors"}
BLOCK_PATTERNS = ("*.layers.*", "*.h.*", "*.blocks.*", "layers.*", "h.*", "blocks.*")


class Lion(Optimizer):
    """Lion with optional Nesterov momentum, inverse bias correction and RRC correction.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate η.
        betas: (β₁, β₂): interpolation factor of the update direction and momentum decay.
        weight_decay: decoupled weight decay λ (the step is η(sign(c) + λw)).
        nesterov: Nesterov form (reconstructed): m ← β₂m + (1−β₂)g first, then the direction is
            sign(β₁m + (1−β₁)g); identical to Lion with betas (β₁β₂, β₂).
        inverse_bias_correction: multiply the step by σ_t = 1 − β₂ᵗ (reconstructed, low
            confidence; acts like a built-in warmup over ~1/(1−β₂) steps).
        rrc_correction: ``"derived"`` multiplies the step by ρ_t = √((1+Bφ)/(1+B²φ)) from the
            gradient SNR φ that ``UpdateDiagnostics`` hands over via :meth:`set_gradient_snr`
            (reconstructed; spec §3.5). ``"none"`` disables it.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        nesterov: bool = False,
        inverse_bias_correction: bool = False,
        rrc_correction: RRCMode = "none",
    ) -> None:
        self._init_lion(
            params, lr, betas, weight_decay, nesterov, inverse_bias_correction, rrc_correction, {}
        )

    def _init_lion(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        nesterov: bool,
        inverse_bias_correction: bool,
        rrc_correction: RRCMode,
        extra_defaults: dict[str, Any],
    ) -> None:
        """The shared constructor; ``extra_defaults`` are the subclasses' own group settings
        (not a ``**kwargs`` of ``Lion``, which took any misspelled or foreign keyword, e.g.
        ``maximize=True``, and ignored it)."""
        if not lr >= 0:  # also NaN
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if rrc_correction not in ("none", "derived"):
            raise ValueError(f"rrc_correction={rrc_correction!r}: expected 'none' or 'derived'")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            nesterov=nesterov,
            inverse_bias_correction=inverse_bias_correction,
            rrc_correction=rrc_correction,
            snr_phi=-1.0,  # per-sample SNR φ from the diagnostics callback; < 0 = not provided
            snr_batch_size=0,
            **extra_defaults,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(
                        f"{type(self).__name__} does not support complex parameters "
                        f"(got {p.dtype}): sign() of a complex momentum is not defined"
                    )

    def set_gradient_snr(self, phi: float, batch_size: int) -> None:
        """Store the per-sample gradient SNR φ and the (global) batch size for the RRC correction.

        Stored in the param groups so it is checkpointed with the optimizer.
        """
        for group in self.param_groups:
            group["snr_phi"], group["snr_batch_size"] = float(phi), int(batch_size)

    @property
    def wants_gradient_snr(self) -> bool:
        """True when a group uses the RRC correction (the callback then measures φ every step)."""
        return any(g["rrc_correction"] != "none" for g in self.param_groups)

    # -- shared pieces --------------------------------------------------------------------------

    @staticmethod
    def _effective_betas(group: dict[str, Any]) -> tuple[float, float]:
        b1, b2 = group["betas"]
        return (b1 * b2, b2) if group["nesterov"] else (b1, b2)

    def _step_multiplier(self, group: dict[str, Any], step: int) -> float:
        """σ_t (inverse bias correction) times ρ_t (RRC correction)."""
        mult = 1.0 - group["betas"][1] ** step if group["inverse_bias_correction"] else 1.0
        if group["rrc_correction"] == "derived":
            mult *= rrc_lr_factor(group["snr_phi"], group["snr_batch_size"])
        return mult

    def _check_before_step(self) -> None:
        """Raise before any state changes (a step that failed halfway left its momentum and
        step count advanced) on a sparse gradient, or when the RRC correction has no SNR for
        this step."""
        for group in self.param_groups:
            if any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if group["rrc_correction"] == "derived" and (
                group["snr_phi"] < 0 or group["snr_batch_size"] < 1
            ):
                raise RuntimeError(
                    "rrc_correction='derived' needs the gradient SNR every step: add "
                    "callbacks.warmup_diagnostics.UpdateDiagnostics to trainer.callbacks "
                    "(or call optimizer.set_gradient_snr(phi, batch_size) before step())"
                )

    def _sign_direction(self, p: Tensor, group: dict[str, Any]) -> tuple[Tensor, int]:
        """Advance the momentum of ``p`` and return (sign(c), step count t ≥ 1)."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        g, m = p.grad, state["exp_avg"]
        b1, b2 = group["betas"]
        if group["nesterov"]:
            m.lerp_(g, 1 - b2)  # m_t first, then look ahead from it (spec §3.4)
            direction = torch.lerp(m, g, 1 - b1).sign_()
        else:
            direction = torch.lerp(m, g, 1 - b1).sign_()
            m.lerp_(g, 1 - b2)
        return direction, state["step"]

    def _direction(self, p: Tensor, sign: Tensor, group: dict[str, Any]) -> Tensor:
        return sign

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                sign, t = self._sign_direction(p, group)
                # Recorded per tensor for the warmup diagnostics, which divide Δw by the LR
                # applied: σ_t depends on the tensor's own step count.
                mult = self.state[p]["lr_multiplier"] = self._step_multiplier(group, t)
                lr = group["lr"] * mult
                p.mul_(1 - lr * group["weight_decay"])  # decoupled decay: η·λw
                p.add_(self._direction(p, sign, group), alpha=-lr)
        return loss


class LionA(Lion):
    """Lion whose update has a fixed ℓ2 norm: u = κ√C·s/‖s‖ with s = sign(c) (reconstructed).

    Sign updates of low-precision gradients contain exact zeros, so plain Lion's norm drops below
    √C; LionA renormalizes (u = 0 when s = 0). The step is w ← w − η(u + λw).

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate η.
        betas: (β₁, β₂) as in :class:`Lion`.
        weight_decay: decoupled weight decay λ.
        nesterov: Nesterov form of the momentum (see :class:`Lion`).
        inverse_bias_correction: multiply the step by 1 − β₂ᵗ (reconstructed).
        rrc_correction: ``"none"`` or ``"derived"`` (see :class:`Lion`).
        update_norm_scale: κ, the update's RMS; ‖u‖ = κ√C (κ = 1 is Lion's norm without zeros).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        nesterov: bool = False,
        inverse_bias_correction: bool = False,
        rrc_correction: RRCMode = "none",
        update_norm_scale: float = 1.0,
    ) -> None:
        if update_norm_scale <= 0:
            raise ValueError(f"update_norm_scale must be > 0, got {update_norm_scale}")
        self._init_lion(
            params, lr, betas, weight_decay, nesterov, inverse_bias_correction, rrc_correction,
            {"update_norm_scale": update_norm_scale},
        )  # fmt: skip
        refuse_fsdp_shards(
            (p for g in self.param_groups for p in g["params"]),
            "LionA",
            "it scales each tensor's update by its sign's norm, and FSDP hands it shards",
        )

    def _direction(self, p: Tensor, sign: Tensor, group: dict[str, Any]) -> Tensor:
        # A nonzero sign vector has norm >= 1, so the clamp changes nothing but the all-zero case
        # (which stays 0) and avoids a `norm == 0` test that would sync the GPU per tensor.
        norm = sign.norm().clamp_min(1.0)
        return sign.mul_(group["update_norm_scale"] * math.sqrt(sign.numel()) / norm)


def _named(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Normalize optimizer input to groups whose ``params`` are (name | None, tensor) pairs."""
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    for g in groups:
        ps = g["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        pairs = [p if isinstance(p, tuple) else (None, p) for p in ps]
        names = g.get("param_names")
        if names is not None:
            pairs = [(n, p) for n, (_, p) in zip(names, pairs, strict=True)]
        out.append({**{k: v for k, v in g.items() if k != "param_names"}, "params": pairs})
    return out


class LionAR(Lion):
    """Rotational Lion: fixed angular updates, weight decay replaced by a norm projection.

    For each rotational tensor (per neuron = row of dim 0 when ``per_neuron``), following
    epfml/REQ ``perform_rotational_update`` (spec §3.3):

    1. d = sign(c) as in Lion (or its Nesterov form); update m.
    2. With ``zero_mean``, subtract the per-neuron mean of d.
    3. Remove the radial part: d ← d − w⟨d, w⟩/n₀², with n₀ = ‖w₀‖ stored at the first step.
    4. q ← ν q + (1−ν)‖d‖², d̄ = √(q/(1−νᵗ)) (ν = ``update_norm_decay``).
    5. w' = w − σ_t ρ_t η_r n₀ d/(d̄ + ε); w ← w' n₀/‖w'‖.

    The target angle is η_r = √(π/2)√(2ηλ)√((1−β₁)² + β₁²(1−β₂)/(1+β₂)) with the scheduled η
    (so η_r ∝ √η_t) and the effective betas (β₁β₂, β₂) under Nesterov; with ν = 0 each neuron
    turns by exactly atan(σ_t ρ_t η_r) per step. Non-rotational tensors (embeddings, head, gains,
    biases by default) get plain Lion in their own groups with ``lr_other``.

    Args:
        params: parameters, ``named_parameters()`` (needed for ``rotational="blocks"`` or
            patterns) or param-group dicts; a group with a ``rotational: bool`` key is used as is.
        lr: the "virtual" learning rate η that sets the angle (not comparable to AdamW's LR).
        betas: (β₁, β₂) as in :class:`Lion`; [paper] uses β = (0.98, 0.98) with Nesterov.
        weight_decay: λ; enters only through η_r for rotational tensors and must be > 0 there.
        nesterov: Nesterov form of the momentum (reconstructed; see :class:`Lion`).
        inverse_bias_correction: multiply every step by 1 − β₂ᵗ (reconstructed, low confidence).
        update_norm_decay: ν, EMA decay of the squared update norm; 0 = strict per-step control
            (reconstructed default; epfml/REQ uses 0.9).
        per_neuron: control each row of dim 0 separately (REQ default) or the whole tensor
            (``False``; which one the paper uses is reconstructed).
        zero_mean: center the direction per neuron, and each rotational neuron once before the
            first step (REQ default).
        rotational_eps: ε added to d̄ in step 5.
        rrc_correction: ``"none"`` or ``"derived"`` (see :class:`Lion`); scales η_r.
        rotational: which tensors rotate when a group has no ``rotational`` key:
            ``"all_matrices"`` (every ≥2-D tensor, REQ default), ``"blocks"`` (≥2-D tensors
            inside transformer blocks, project default; needs names), ``"none"``, or a list of
            fnmatch patterns over parameter names (≥2-D tensors with λ > 0 only; a group that
            sets ``weight_decay: 0`` keeps all its tensors on Lion).
        lr_other: Lion learning rate of the non-rotational tensors [derived].
        weight_decay_other: weight decay of the non-rotational matrices (``None``: ``weight_decay``).
        vector_weight_decay: weight decay of gains and biases (≤1-D tensors).
        center_in_constructor: center the rotational weights in ``__init__`` as REQ does
            (code-faithful flag; by default centering happens once, at the first step or when the
            module calls :meth:`center_rotational_weights`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.1,
        nesterov: bool = False,
        inverse_bias_correction: bool = False,
        update_norm_decay: float = 0.0,
        per_neuron: bool = True,
        zero_mean: bool = True,
        rotational_eps: float = 1e-8,
        rrc_correction: RRCMode = "none",
        rotational: str | list[str] = "blocks",
        lr_other: float = 3e-4,
        weight_decay_other: float | None = None,
        vector_weight_decay: float = 0.0,
        center_in_constructor: bool = False,
    ) -> None:
        if not 0.0 <= update_norm_decay < 1.0:
            raise ValueError(f"update_norm_decay must lie in [0, 1), got {update_norm_decay}")
        wd_other = weight_decay if weight_decay_other is None else weight_decay_other
        for setting, value in (("lr_other", lr_other), ("weight_decay_other", wd_other),
                               ("vector_weight_decay", vector_weight_decay),
                               ("rotational_eps", rotational_eps)):  # fmt: skip
            if not value >= 0:  # also NaN
                raise ValueError(f"LionAR: {setting} must be >= 0, got {value}")
        self._lr_other = lr_other  # the LR of groups added without one (add_param_group)
        named_groups = _named(params)
        if rotational != "none" and any(
            is_fsdp_shard(p) for g in named_groups for _, p in g["params"]
        ):
            raise ValueError(
                "LionAR needs whole weight rows for its per-neuron norms, projection and "
                "centering, but FSDP shards them (its 1-D views would silently run as plain "
                "Lion); use DDP, or rotational: none"
            )
        groups = []
        selected, excluded_by_zero_decay = False, False
        for index, g in enumerate(named_groups, start=1):
            if "rotational" in g:
                groups.append(g)
                continue
            selected = True
            # Each split group is named for LearningRateMonitor (its LR differs by kind):
            # "<group name>/rotational", ..., or just "rotational", ... for a single group.
            prefix = g.get("name") or (f"pg{index}" if len(named_groups) > 1 else "")
            split: dict[str, list] = {"rot": [], "mat": [], "vec": []}
            # A group's own weight_decay (e.g. a "no decay" group of a LightningModule) wins;
            # only tensors with λ > 0 can rotate (REQ: every ≥2-D tensor with λ > 0).
            group_wd = g.get("weight_decay", weight_decay)
            for name, p in g["params"]:
                kind = "vec" if p.dim() < 2 else "mat"
                if kind == "mat" and _is_rotational(name, rotational):
                    if group_wd > 0:
                        kind = "rot"
                    else:
                        excluded_by_zero_decay = True
                split[kind].append((name, p))
            base = {k: v for k, v in g.items() if k != "params"}
            names = {
                kind: f"{prefix}/{label}" if prefix else label
                for kind, label in SPLIT_GROUP_NAMES.items()
            }
            if split["rot"]:
                groups.append(
                    {**base, "params": split["rot"], "rotational": True, "name": names["rot"]}
                )
            for kind, wd in (("mat", wd_other), ("vec", vector_weight_decay)):
                if split[kind]:
                    groups.append(
                        {"weight_decay": wd, **base, "params": split[kind]}
                        | {"rotational": False, "lr": lr_other, "name": names[kind]}
                    )
        if selected and rotational != "none" and not any(g.get("rotational") for g in groups):
            # Spec §4.4: λ = 0 gives η_r = 0. Without this check every tensor would quietly
            # train as plain Lion at lr_other and the user's lr would be ignored.
            reason = (
                "the tensors it selects have weight_decay=0, so η_r ∝ √(ηλ) would be 0"
                if excluded_by_zero_decay
                else "it matched no ≥2-D parameter"
            )
            raise ValueError(
                f"LionAR rotational={rotational!r} rotates nothing: {reason}; every tensor would "
                f"train as plain Lion at lr_other={lr_other} and lr={lr} would be ignored. Set "
                "weight_decay > 0, change rotational, or use Lion/LionA"
            )
        named = [p for g in groups for p in g["params"]]
        if all(n is not None for n, _ in named):
            for g in groups:
                g["params"] = list(g["params"])
        else:
            for g in groups:
                g["params"] = [p for _, p in g["params"]]
        extra = {"update_norm_decay": update_norm_decay, "per_neuron": per_neuron,
                 "zero_mean": zero_mean, "rotational_eps": rotational_eps, "rotational": False}  # fmt: skip
        self._init_lion(
            groups, lr, betas, weight_decay, nesterov, inverse_bias_correction, rrc_correction,
            extra,
        )  # fmt: skip
        if center_in_constructor:
            self.center_rotational_weights()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (also each group of the constructor). A group without a ``rotational``
        key trains as plain Lion at ``lr_other`` unless it sets ``lr`` (it took the virtual LR,
        ~300x ``lr_other``); a rotational group is checked as in the constructor."""
        group = dict(param_group)
        if not group.setdefault("rotational", False):
            group.setdefault("lr", self._lr_other)
        super().add_param_group(group)
        if group["rotational"]:
            self._check_rotational(len(self.param_groups) - 1)

    def _check_rotational(self, index: int) -> None:
        g = self.param_groups[index]
        if not g["weight_decay"] > 0:
            raise ValueError(
                f"param group {index} is rotational but has weight_decay={g['weight_decay']}: "
                "the target angle η_r ∝ √(ηλ) would be 0; set weight_decay > 0 or "
                "rotational: false for this group"
            )
        for j, p in enumerate(g["params"]):
            if is_fsdp_shard(p):
                raise ValueError(
                    "LionAR needs whole weight rows for its per-neuron norms, projection and "
                    "centering, but FSDP shards them; use DDP, or rotational: none"
                )
            rows = _rows(p.detach(), g["per_neuron"])
            name = g.get("param_names", [None] * len(g["params"]))[j] or f"#{j}"
            if rows.norm(dim=1).min() == 0:
                raise ValueError(
                    f"parameter {name} (group {index}) has a zero-norm neuron and cannot rotate "
                    "(e.g. a zero-initialized LoRA B matrix); exclude it from the rotational set"
                )
            centered = rows - rows.mean(dim=1, keepdim=True)
            if g["zero_mean"] and centered.norm(dim=1).min() == 0:
                # centering before the first step would zero it: n0 = 0, NaN weights
                raise ValueError(
                    f"parameter {name} (group {index}) has a constant neuron (e.g. fan-in 1), "
                    "zero once centered; exclude it from the rotational set or set zero_mean: false"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim`` casts floating state to each parameter's dtype on load; the rotation
        keeps ``n0`` and the update-norm EMA in at least float32, so they are restored from the
        saved values (a cast bf16 -> float32 after the load would have lost their low bits)."""
        saved = {
            index: {k: v for k, v in st.items() if k in ("n0", "update_norm_sq")}
            for index, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        indices = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(indices, params, strict=True):
            for key, value in saved.get(index, {}).items():
                self.state[p][key] = value.detach().to(p.device, _rotation_dtype(p)).clone()

    @torch.no_grad()
    def center_rotational_weights(self) -> int:
        """Center each rotational neuron and rescale it to its original norm, once (idempotent).

        Returns the number of tensors centered now. A tensor whose optimizer state exists (it has
        taken a step, or was restored from a checkpoint) is never centered again.
        """
        done = 0
        for g in self.param_groups:
            if not (g["rotational"] and g["zero_mean"]):
                continue
            for p in g["params"]:
                state = self.state[p]
                if state.get("centered", 0):
                    continue
                w = _rows(p, g["per_neuron"])
                norm = w.norm(dim=1, keepdim=True)
                w.sub_(w.mean(dim=1, keepdim=True))
                w.mul_(norm / w.norm(dim=1, keepdim=True).clamp_min(1e-30))
                _write_rows(p, w)
                state["centered"] = 1
                done += 1
        if done:
            log.info("LionAR: centered %d rotational tensors (zero_mean=True)", done)
        return done

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()
        if any(g["rotational"] and g["zero_mean"] for g in self.param_groups):
            self.center_rotational_weights()  # no-op after the first step
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:  # REQ indexes such tensors and crashes (spec §4.1): skip them
                    continue
                sign, t = self._sign_direction(p, group)
                mult = self.state[p]["lr_multiplier"] = self._step_multiplier(group, t)
                if group["rotational"]:
                    self._rotate(p, sign, group, t, mult)
                else:
                    lr = group["lr"] * mult
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(sign, alpha=-lr)
        return loss

    def _rotate(self, p: Tensor, sign: Tensor, group: dict[str, Any], t: int, mult: float) -> None:
        state = self.state[p]
        rows = _rows(p, group["per_neuron"])
        # The rotation runs in at least float32 (n0 and the EMA are stored in it too): in bf16
        # the re-projection onto n0 drifts the neuron norms by ~0.6 % over 200 steps.
        w = rows.to(_rotation_dtype(p))
        d = _rows(sign, group["per_neuron"]).to(w.dtype)
        if "n0" not in state:
            state["n0"] = w.norm(dim=1, keepdim=True)
            state["update_norm_sq"] = torch.zeros_like(state["n0"])
        n0, q = state["n0"], state["update_norm_sq"]
        if group["zero_mean"]:
            d.sub_(d.mean(dim=1, keepdim=True))
        d.sub_(w * ((d * w).sum(dim=1, keepdim=True) / n0.square()))  # tangent to the sphere
        nu = group["update_norm_decay"]
        q.mul_(nu).add_((1 - nu) * d.square().sum(dim=1, keepdim=True))
        d_bar = (q / (1 - nu**t)).sqrt()
        eta_r = lionar_target_angle(
            group["lr"], group["weight_decay"], self._effective_betas(group)
        )
        w.sub_(d * (mult * eta_r * n0 / (d_bar + group["rotational_eps"])))
        w.mul_(n0 / w.norm(dim=1, keepdim=True))  # projection replaces weight decay
        _write_rows(p, w)


def _rotation_dtype(p: Tensor) -> torch.dtype:
    """float32 for half-precision weights, the weight's own dtype from float32 up (float64
    weights rotated in float32 were off their reference by ~4e-7)."""
    return torch.promote_types(p.dtype, torch.float32)


def _rows(t: Tensor, per_neuron: bool = True) -> Tensor:
    """``t`` as (neurons, fan_in): a view sharing its storage when the layout allows (a copy
    for e.g. channels-last convolution weights; :func:`_write_rows` writes it back)."""
    if not per_neuron or t.dim() < 2:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def _write_rows(p: Tensor, rows: Tensor) -> None:
    """Store rows computed in place back into ``p`` unless they already are its storage."""
    if rows.data_ptr() != p.data_ptr() or rows.dtype != p.dtype:
        p.copy_(rows.reshape(p.shape))


def _is_rotational(name: str | None, rotational: str | list[str]) -> bool:
    if rotational == "all_matrices":
        return True
    if rotational == "none":
        return False
    patterns = BLOCK_PATTERNS if rotational == "blocks" else rotational
    if isinstance(patterns, str):
        raise ValueError(
            f"rotational={rotational!r}: expected 'all_matrices', 'blocks', 'none' or a list of "
            "name patterns"
        )
    if name is None:
        raise ValueError(
            f"rotational={rotational!r} selects tensors by name: pass model.named_parameters() "
            "(or param groups with 'param_names') to LionAR"
        )
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
