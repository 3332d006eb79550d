"""``UpdateDiagnostics``: how large is each training step, by which measure (Kosson et al. 2024).

At logging steps (every step up to ``dense_steps``, then every ``log_every_n_steps``) it logs, per
trainable tensor and globally (spec D1-D5, math in ``ops.warmup``):

* ``warmup/update_norm/*`` ‖Δw‖₂ (weight decay included) and ``warmup/direction_rms/*`` ‖u‖/√C
  of the optimizer direction without LR and decay;
* ``warmup/angle/*`` the angular update in float64, per tensor, per neuron (mean and max) and for
  all matrices concatenated (``warmup/global/angle``);
* ``warmup/rrc/*`` the relative representation change of the selected layers on a fixed probe;
* ``warmup/snr/*`` the two-batch noise scale B_noise = tr Σ/|G|² and per-sample SNR φ = 1/B_noise;
* ``warmup/momentum/*`` cos(g_t, m_{t−1}) and ‖m_t‖/‖g_t‖ when the optimizer keeps ``exp_avg``.

It works with any optimizer (the direction is recovered from Δw), with gradient accumulation (it
keys on ``global_step``), under DDP (weights are identical after the synchronized step; G₁, G₂
are all-reduced) and with LoRA (only ``requires_grad`` tensors). Its persistent extra memory is one
copy of the trainable weights at logging steps plus the probe activations of the RRC layers;
SNR steps transiently hold two gradient-sized buffers.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from callbacks.direct_logging import log_scalars
from modules.eval_mode import eval_mode
from modules.precision import refuse_float64_on_mps
from ops.warmup import inner_products, noise_scale, rrc, squared_norm
from ops.warmup_batches import batch_size, flat_grad, split_halves, to_cpu
from ops.warmup_step_metrics import TensorSnapshot, step_update_metrics
from optim.lion import Lion

try:  # GPT-2 style layers store their weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

DEFAULT_RRC_LAYERS = ["*.q_proj", "*.up_proj", "*.c_attn", "*.c_fc", "*.qkv", "*.fc"]


class UpdateDiagnostics(Callback):
    """Update norms, angular updates, representation change, gradient SNR and momentum.

    Args:
        log_every_n_steps: logging interval after the dense phase.
        dense_steps: log every step while ``global_step < dense_steps`` (warmup happens here).
        per_neuron: also log per-neuron angles (rows of dim 0) as mean and max per tensor.
        log_per_tensor: log the per-tensor scalars (off: global scalars only).
        rrc_layers: fnmatch patterns of module names whose relative representation change is
            measured (Llama ``q_proj``/``up_proj``, GPT-2 ``c_attn``/``c_fc``, nanoGPT
            ``qkv``/``fc``); empty disables RRC.
        rrc_mode: ``"layer"``: ‖XΔWᵀ‖/‖XWᵀ‖ on the layer's probe inputs X captured once;
            ``"network"``: ‖h_{t+1}(X) − h_t(X)‖/‖h_t(X)‖ of the selected modules' outputs when
            the whole probe batch runs through the network before and after the step.
        probe_batch_size: samples of the fixed probe batch, drawn once with a private generator.
        snr_every_n_steps: interval of the gradient-noise measurement; 0 disables it. It runs
            every step when the optimizer asks for the SNR (``rrc_correction: derived``).
        snr_dense_steps: also measure at every step below this one (the SNR changes fastest early).
        snr_ema: EMA decay of the |G|² and tr Σ estimates before their ratio ``b_noise``.
        snr_fresh_batches: 0 splits the current batch into halves; k > 0 draws k fresh batches of
            the training batch size from a dedicated generator and sums the estimates.
        track_momentum: log gradient-momentum alignment and magnitude ratio.
        max_tensors: follow only the first N trainable tensors (memory cap); ``None`` = all.
        log_histograms: log per-neuron angle histograms to TensorBoard at logging steps.
        keep_history: also keep every logged record in ``self.history`` (for scripts and tests;
            grows with the run length times the number of tensors).
        seed: seed of the private generator for probe and fresh batches.
    """

    def __init__(
        self,
        log_every_n_steps: int = 25,
        dense_steps: int = 100,
        per_neuron: bool = True,
        log_per_tensor: bool = True,
        rrc_layers: list[str] | None = None,
        rrc_mode: Literal["layer", "network"] = "layer",
        probe_batch_size: int = 16,
        snr_every_n_steps: int = 25,
        snr_dense_steps: int = 10,
        snr_ema: float = 0.9,
        snr_fresh_batches: int = 0,
        track_momentum: bool = True,
        max_tensors: int | None = None,
        log_histograms: bool = False,
        keep_history: bool = False,
        seed: int = 0,
    ) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if rrc_mode not in ("layer", "network"):
            raise ValueError(f"rrc_mode={rrc_mode!r}: expected 'layer' or 'network'")
        if not 0.0 <= snr_ema < 1.0:
            raise ValueError(f"snr_ema must lie in [0, 1), got {snr_ema}")
        for key, value, low in (
            ("snr_every_n_steps", snr_every_n_steps, 0),
            ("snr_fresh_batches", snr_fresh_batches, 0),
            ("probe_batch_size", probe_batch_size, 1),
            ("dense_steps", dense_steps, 0),
            ("snr_dense_steps", snr_dense_steps, 0),
            ("max_tensors", 1 if max_tensors is None else max_tensors, 1),  # 0 logged zeros
        ):
            if value < low:
                raise ValueError(f"{key} must be >= {low}, got {value}")
        self.log_every_n_steps, self.dense_steps = log_every_n_steps, dense_steps
        self.per_neuron, self.log_per_tensor = per_neuron, log_per_tensor
        self.rrc_layers = DEFAULT_RRC_LAYERS if rrc_layers is None else list(rrc_layers)
        self._rrc_explicit = rrc_layers is not None
        self.rrc_mode, self.probe_batch_size = rrc_mode, probe_batch_size
        self.snr_every_n_steps, self.snr_dense_steps = snr_every_n_steps, snr_dense_steps
        self.snr_ema, self.snr_fresh_batches = snr_ema, snr_fresh_batches
        self.track_momentum, self.max_tensors = track_momentum, max_tensors
        self.log_histograms, self.keep_history, self.seed = log_histograms, keep_history, seed
        self.history: list[dict[str, float]] = []  # logged records when keep_history
        self._probe: Any = None
        self._probe_inputs: dict[str, Tensor] = {}
        self._ema = {"g2": 0.0, "tr": 0.0, "n": 0}
        self._draws = 0  # fresh SNR batches drawn so far (the same count on every rank)
        self._inputs_restored = False
        self._pending: dict[str, Any] | None = None
        self._snr_done_step = -1
        self._hist: Tensor | None = None
        self._warned_nan = False
        self._transposed: set[int] = set()  # ids of (in, out)-stored weights (GPT-2 Conv1D)

    # ---------------------------------------------------------------- selection and schedule
    def is_log_step(self, step: int) -> bool:
        return step < self.dense_steps or step % self.log_every_n_steps == 0

    def is_snr_step(self, step: int, optimizer: Any = None) -> bool:
        if getattr(optimizer, "wants_gradient_snr", False):
            return True
        if self.snr_every_n_steps == 0:
            return False
        return step < self.snr_dense_steps or step % self.snr_every_n_steps == 0

    def _tensors(self, pl_module: L.LightningModule) -> list[tuple[str, Tensor]]:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        return named if self.max_tensors is None else named[: self.max_tensors]

    def _rrc_modules(self, pl_module: L.LightningModule) -> dict[str, nn.Module]:
        """The modules ``rrc_layers`` selects that have a weight to measure."""
        return {
            n: m
            for n, m in pl_module.named_modules()
            if n
            and any(fnmatch.fnmatchcase(n, pat) for pat in self.rrc_layers)
            and isinstance(getattr(m, "weight", None), torch.Tensor)
        }

    def _check_rrc_selection(self, pl_module: L.LightningModule, modules: dict) -> None:
        """D3 must not switch itself off silently when the patterns match nothing."""
        if not self.rrc_layers or modules:
            return
        names = [
            n
            for n, m in pl_module.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)
        ]
        message = (
            f"rrc_layers={self.rrc_layers} match no module with a weight, so D3 (RRC) is off; "
            f"modules with weights are e.g. {names[:6]}"
        )
        if self._rrc_explicit:
            raise ValueError(message)
        rank_zero_warn(message)

    def _generator(self, trainer: L.Trainer) -> torch.Generator:
        """A generator for the next fresh batch of this rank, from (seed, rank, draws so far).

        Derived rather than stored, so that a run resumed from a checkpoint (written by rank 0)
        still draws different batches on every rank, and the same ones as without the resume.
        """
        entropy = [self.seed, trainer.global_rank, self._draws]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
        self._draws += 1
        return torch.Generator().manual_seed(seed & (2**63 - 1))

    # ---------------------------------------------------------------- data helpers
    def _draw(
        self, trainer: L.Trainer, pl_module: L.LightningModule, n: int, rank_seeded: bool
    ) -> Any:
        loader = trainer.train_dataloader
        if isinstance(loader, list | tuple):
            loader = loader[0]
        if isinstance(loader, dict):
            loader = next(iter(loader.values()))
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise TypeError(
                "UpdateDiagnostics draws probe/fresh batches from a map-style training dataset; "
                f"got {type(dataset).__name__}: set snr_fresh_batches=0 and rrc_layers=[]"
            )
        gen = self._generator(trainer) if rank_seeded else torch.Generator().manual_seed(self.seed)
        idx = torch.randint(len(dataset), (n,), generator=gen).tolist()
        batch = loader.collate_fn([dataset[i] for i in idx])
        return trainer.strategy.batch_to_device(batch, pl_module.device)

    @staticmethod
    def _loss(pl_module: L.LightningModule) -> Callable[[Any], Tensor]:
        if hasattr(pl_module, "compute_loss"):
            return pl_module.compute_loss  # type: ignore[return-value]

        def hf_loss(batch: Any) -> Tensor:  # Hugging Face convention: the output has .loss
            if not isinstance(batch, dict):
                raise TypeError(
                    f"{type(pl_module).__name__} has no compute_loss(batch) and its batch is not "
                    "a dict of model inputs: define compute_loss to enable the SNR / RRC probes"
                )
            out = pl_module(**batch)
            if getattr(out, "loss", None) is None:
                raise TypeError(f"{type(pl_module).__name__}(**batch) returned no .loss")
            return out.loss

        return hf_loss

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            # Each rank holds flat 1-D shards: per-tensor, per-neuron and RRC metrics, and the
            # global angle over matrices, would describe one rank's shard, not the model.
            raise ValueError(
                "UpdateDiagnostics does not support FSDP: every rank holds only flat shards of the "
                "weights, so its norms and angles would describe one shard. Measure under DDP "
                "(same optimizer and schedule) or remove the callback from trainer.callbacks"
            )
        refuse_float64_on_mps(
            trainer.strategy.root_device, "UpdateDiagnostics", "measures norms and angles"
        )
        if (
            self.track_momentum
            and trainer.gradient_clip_val
            and (trainer.gradient_clip_algorithm == "value")
        ):
            # Norm clipping scales g by one factor (cosines unchanged, ratio_global reads the
            # clipped g); value clipping changes g's direction after on_before_optimizer_step.
            rank_zero_warn(
                "gradient_clip_algorithm='value': warmup/momentum/cos* use the gradient before "
                "clipping, not the clipped one the optimizer steps with"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._transposed = {id(m.weight) for m in pl_module.modules() if isinstance(m, Conv1D)}
        modules = self._rrc_modules(pl_module)
        self._check_rrc_selection(pl_module, modules)
        if not self.rrc_layers or not modules:
            self._probe_inputs, self._inputs_restored = {}, False
            return
        if self._probe is None:
            self._probe = self._draw(trainer, pl_module, self.probe_batch_size, rank_seeded=False)
        else:
            self._probe = trainer.strategy.batch_to_device(self._probe, pl_module.device)
        if self.rrc_mode == "layer":
            if self._inputs_restored:  # the inputs of the initial network, not of w_resume
                self._inputs_restored = False
                # A resume may select fewer layers; layers it adds have no initial inputs
                # (capturing them now would measure against w_resume) and are not measured.
                self._probe_inputs = {
                    n: x.to(pl_module.device) for n, x in self._probe_inputs.items() if n in modules
                }
                added = sorted(set(modules) - set(self._probe_inputs))
                if added:
                    rank_zero_warn(
                        f"rrc_layers now also selects {added[:6]}, whose initial-network inputs "
                        "were not in the checkpoint: their RRC is not measured in this run"
                    )
            else:
                self._probe_inputs = self._capture(pl_module, modules, inputs=True)

    def _capture(
        self, pl_module: L.LightningModule, modules: dict[str, nn.Module], inputs: bool
    ) -> dict[str, Tensor]:
        """Run the probe batch through the network, keeping the inputs or outputs of ``modules``."""
        seen: dict[str, Tensor] = {}

        def hook(name: str):
            def fn(_mod: nn.Module, args: tuple, out: Any) -> None:
                value = args[0] if inputs else (out[0] if isinstance(out, tuple) else out)
                seen[name] = value.detach().clone()

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
        # No dropout: the probe measures the weights, not the noise.
        try:
            with eval_mode(pl_module), torch.no_grad(), _fork_rng(pl_module.device):
                self._loss(pl_module)(self._probe)
        finally:
            for h in handles:
                h.remove()
        return seen

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if step == self._snr_done_step or not self.is_snr_step(step, optimizer):
            return
        self._snr_done_step = step  # first micro-batch of the step: weights are w_t
        self._measure_snr(trainer, pl_module, batch, optimizer)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        step = trainer.global_step
        if not self.is_log_step(step):
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)
        center = getattr(optimizer, "center_rotational_weights", None)
        if callable(center):
            # LionAR centers its rotational neurons once, inside its first step(). Doing it here
            # (after backward, before the update: the same weights and gradients) keeps that
            # one-off move out of the measured update; later calls are no-ops.
            center()
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        tensors = self._tensors(pl_module)
        pending: dict[str, Any] = {"step": step, "tensors": [], "record": {}}
        decoupled = isinstance(optimizer, torch.optim.AdamW | Lion)
        dots = g_sq = m_sq = 0.0
        with_momentum = []
        for name, p in tensors:
            g = group_of.get(id(p), {})
            rotational = bool(g.get("rotational", False))
            pending["tensors"].append(
                TensorSnapshot(
                    name,
                    p,
                    p.detach().clone(),
                    float(g.get("lr", math.nan)),
                    float(g.get("weight_decay", 0.0)),
                    (decoupled or g.get("decoupled_weight_decay", False)) and not rotational,
                )
            )
            m = optimizer.state.get(p, {}).get("exp_avg") if self.track_momentum else None
            if m is not None and p.grad is not None:
                with_momentum.append(p)
                dot, gn, mn = inner_products(p.grad, m)
                dots, g_sq, m_sq = dots + dot, g_sq + gn, m_sq + mn
                if self.log_per_tensor and gn > 0 and mn > 0:
                    pending["record"][f"warmup/momentum/cos/{name}"] = dot / math.sqrt(gn * mn)
        if self.track_momentum and g_sq > 0:
            pending["momentum_tensors"] = with_momentum
            if m_sq > 0:
                pending["record"]["warmup/momentum/cos_global"] = dots / math.sqrt(g_sq * m_sq)
        if self._probe is not None and self.rrc_mode == "network":
            pending["outputs"] = self._capture(
                pl_module, self._rrc_modules(pl_module), inputs=False
            )
        self._pending = pending

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        pending = self._pending
        if pending is None or trainer.global_step <= pending["step"]:
            return  # accumulating micro-batches: the update has not happened yet
        self._pending = None
        optimizer = getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])
        # Lion/LionA/LionAR record per tensor the factor σ_t·ρ_t they applied to the LR.
        pending["lr_multipliers"] = {
            id(p): optimizer.state.get(p, {}).get("lr_multiplier", 1.0)
            for _, p, *_ in pending["tensors"]
        }
        update, per_neuron_angles = step_update_metrics(
            pending["tensors"], pending["lr_multipliers"], self._transposed,
            self.per_neuron, self.log_per_tensor,
        )  # fmt: skip
        if self.log_histograms and per_neuron_angles:
            self._hist = torch.cat([a.cpu() for a in per_neuron_angles])
        record = {"step": pending["step"], **pending["record"], **update}
        record.update(self._rrc_metrics(pl_module, pending))
        if "momentum_tensors" in pending:
            # ‖m_t‖/‖g_t‖ with g_t as the step used it: Lightning clips the gradients after
            # on_before_optimizer_step, and they stay in .grad until the next step zeroes them.
            params = [p for p in pending["momentum_tensors"] if p.grad is not None]
            m_sq = sum(squared_norm(optimizer.state[p]["exp_avg"]) for p in params)
            g_sq = sum(squared_norm(p.grad) for p in params)
            if g_sq > 0:
                record["warmup/momentum/ratio_global"] = math.sqrt(m_sq / g_sq)
        self._emit(trainer, pending["step"], record)

    # ---------------------------------------------------------------- metrics
    def _rrc_metrics(
        self, pl_module: L.LightningModule, pending: dict[str, Any]
    ) -> dict[str, float]:
        if self._probe is None:
            return {}
        values: dict[str, float] = {}
        modules = self._rrc_modules(pl_module)
        if self.rrc_mode == "network":
            after = self._capture(pl_module, modules, inputs=False)
            for n, before in pending["outputs"].items():
                den = before.double().norm()
                values[n] = (
                    float((after[n].double() - before.double()).norm() / den)
                    if den > 0
                    else math.nan
                )
        else:
            snaps = {id(p): old for _, p, old, *_ in pending["tensors"]}
            for n, x in self._probe_inputs.items():
                w = getattr(modules[n], "weight", None)
                if w is None or id(w) not in snaps:  # frozen (LoRA base) or not followed
                    continue
                old, new = snaps[id(w)], w.detach()
                if isinstance(modules[n], Conv1D):
                    old, new = old.T, new.T
                values[n] = rrc(x, old, new)
        out = {f"warmup/rrc/{n}": v for n, v in values.items()} if self.log_per_tensor else {}
        finite = [v for v in values.values() if math.isfinite(v)]
        if finite:
            out["warmup/rrc_median"], out["warmup/rrc_max"] = statistics.median(finite), max(finite)
        return out

    def _measure_snr(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, optimizer: Any
    ) -> None:
        # All trainable tensors: ``max_tensors`` caps the weight snapshots, not the SNR estimate.
        params = [p for p in pl_module.parameters() if p.requires_grad]
        loss_fn = self._loss(pl_module)
        b_local = batch_size(batch)  # fresh batches have the training batch size too
        if b_local < 2:
            raise ValueError(
                f"the two-batch SNR estimate needs a batch of at least 2 samples, got {b_local}; "
                "raise the batch size or set snr_every_n_steps: 0 to turn the estimate off"
            )
        if self.snr_fresh_batches:
            pairs = [
                split_halves(self._draw(trainer, pl_module, b_local, True))
                for _ in range(self.snr_fresh_batches)
            ]
        else:
            pairs = [split_halves(batch)]
        world = trainer.world_size
        g2_sum = tr_sum = 0.0
        with _fork_rng(pl_module.device), _preserve_buffers(pl_module):
            for h1, h2 in pairs:
                g1, g2 = (flat_grad(loss_fn(h), params) for h in (h1, h2))
                if world > 1:  # G₁, G₂ are global means; B is the global batch (spec D4)
                    g1, g2 = (
                        trainer.strategy.reduce(g1, reduce_op="mean"),
                        trainer.strategy.reduce(g2, reduce_op="mean"),
                    )
                # Each half holds floor(B/2) samples (an odd batch drops one): B is what they hold.
                g2_est, tr_est = noise_scale(g1, g2, 2 * (b_local // 2) * world)
                g2_sum, tr_sum = g2_sum + g2_est, tr_sum + tr_est
        k = len(pairs)
        e = self._ema
        measured = math.isfinite(g2_sum + tr_sum)
        if measured:  # one NaN would stay in the EMA for good
            e["g2"] = self.snr_ema * e["g2"] + (1 - self.snr_ema) * g2_sum / k
            e["tr"] = self.snr_ema * e["tr"] + (1 - self.snr_ema) * tr_sum / k
            e["n"] += 1  # the ratio of two equally debiased EMAs needs no bias correction
        b_noise = e["tr"] / e["g2"] if e["g2"] > 0 else math.inf
        phi = 1.0 / b_noise if b_noise > 0 else math.inf
        if hasattr(optimizer, "set_gradient_snr"):  # ρ_t needs the batch of one optimizer step
            optimizer.set_gradient_snr(phi, b_local * world * trainer.accumulate_grad_batches)
        record = {
            "step": trainer.global_step,
            "warmup/snr/b_noise_raw": (
                tr_sum / g2_sum if g2_sum > 0 else (math.inf if measured else math.nan)
            ),
            "warmup/snr/b_noise": b_noise,
            "warmup/snr/phi": phi,
            "warmup/snr/grad_sq": g2_sum / k,
            "warmup/snr/trace_sigma": tr_sum / k,
        }
        if self.is_snr_step(trainer.global_step):
            self._emit(trainer, trainer.global_step, record)
        elif self.keep_history:
            # Measured only for the optimizer (LionA/LionAR's RRC correction wants it every
            # step): logged on the configured schedule, so the event file does not grow by five
            # scalars a step.
            self.history.append(record)

    def _emit(self, trainer: L.Trainer, step: int, record: dict[str, float]) -> None:
        if self.keep_history:
            self.history.append(record)
        if not trainer.is_global_zero:
            return
        # ±inf is a legitimate "unbounded" estimate (b_noise before any signal): left out of the
        # charts. NaN is a failure (non-finite weights or gradients): logged, so that TensorBoard
        # and metrics.json show it rather than the last finite value, and named once.
        scalars = {k: v for k, v in record.items() if k != "step" and not math.isinf(v)}
        failed = sorted(k for k, v in scalars.items() if math.isnan(v))
        if failed and not self._warned_nan:
            self._warned_nan = True
            rank_zero_warn(
                f"UpdateDiagnostics: {len(failed)} diagnostics are NaN at step {step} "
                f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}): the weights "
                "or gradients are not finite (a diverged run?); they are logged as NaN"
            )
        log_scalars(trainer, scalars, step)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            finite = None if self._hist is None else self._hist[torch.isfinite(self._hist)]
            if finite is not None and finite.numel() and hasattr(experiment, "add_histogram"):
                # (TensorBoard refuses a histogram with no finite value)
                experiment.add_histogram("warmup/angle_per_neuron", finite, global_step=step)
        self._hist = None

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        probe = to_cpu(self._probe) if self._probe is not None else None
        inputs = {n: x.cpu() for n, x in self._probe_inputs.items()}
        return {
            "probe": probe,
            "probe_inputs": inputs,
            "ema": dict(self._ema),
            "draws": self._draws,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._probe, self._ema = state_dict["probe"], dict(state_dict["ema"])
        self._probe_inputs = dict(state_dict.get("probe_inputs", {}))
        self._inputs_restored = bool(self._probe_inputs)
        self._draws = int(state_dict.get("draws", 0))


@contextmanager
def _preserve_buffers(module: nn.Module):
    """Restore every buffer afterwards: the probe's train-mode forwards would otherwise update
    BatchNorm running statistics, and the run would no longer match one without the callback."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _fork_rng(device: torch.device):
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
