"""Gradient-based meta-learning as a manual-optimization LightningModule (FO-B-MAML + baselines).

One ``training_step`` is one meta-step: every task of the meta-batch (this rank's share under DDP)
gets a meta-gradient estimate computed functionally on detached copies of ``net``'s parameters
(``ops.meta_gradients``); the estimates are summed, all-reduced explicitly together with the task
count, averaged, written to ``.grad`` and the outer optimizer steps. DDP's reducer never sees these
gradients (``torch.autograd.grad`` fires no reducer hooks and double backward through the wrapper
is unsupported), hence the explicit reduction (spec §9 DDP).

Methods (``method``):
    fo_b_maml_forward    (y^0 - y^{+nu}) / (alpha nu)            FO-B-MAML, forward difference
    fo_b_maml_symmetric  (y^{-nu} - y^{+nu}) / (2 alpha nu)      FO-B-MAML, symmetric difference
    maml                 grad_x f(y_K(x)) through the K-step loop (second order)
    fomaml               grad f(y_K) w.r.t. the adapted parameters
    reptile              (x - y_K) / (K gamma), inner loop on support ∪ query
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call, vmap

from modules.precision import refuse_float64_on_mps
from modules.weighted_mean import update_weighted, weighted_mean
from ops.meta_gradients import (
    Estimate,
    Params,
    fob_maml_grad,
    fomaml_grad,
    inner_solve,
    maml_grad,
    reptile_grad,
    task_objectives,
)
from ops.meta_gradients_batched import (
    batched_fob_maml_grads,
    batched_fomaml_grads,
    batched_inner_solve,
    batched_maml_grads,
    batched_reptile_grads,
)
from ops.meta_tasks_closed_form import LinearTasks, exact_meta_grad, exact_meta_grads
from ops.seeding import derive_seed, run_seed
from optim.sngdm import SNGDM

METHODS = ("fo_b_maml_forward", "fo_b_maml_symmetric", "maml", "fomaml", "reptile")
_STAGES = ("val", "test")
_EVAL_KEYS = ("pre_adapt_loss", "pre_adapt_acc", "query_loss", "query_acc")
_DROPOUT = nn.modules.dropout._DropoutNd


def half_mse(out: Tensor, target: Tensor) -> Tensor:
    """0.5 * mean squared error: the loss of the linear-regression closed forms."""
    return 0.5 * F.mse_loss(out, target)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "half_mse": half_mse,
}


class MetaLearningModule(L.LightningModule):
    """Meta-learn an initialization of ``net`` with FO-B-MAML or a baseline.

    Args:
        net: any ``nn.Module`` without BatchNorm running statistics (they break inner loops).
        loss: ``cross_entropy`` (classification, accuracy is logged), ``mse`` or ``half_mse``
            (0.5 MSE; the linear-regression closed forms assume it).
        method: ``fo_b_maml_forward``, ``fo_b_maml_symmetric``, ``maml``, ``fomaml`` or ``reptile``.
        objective: FO-B-MAML's inner problem. Only ``proximal`` (argmin of g + ‖y − x‖²/(2α),
            spec §3.1) is implemented; it is **reconstructed**: the paper may instead view K-step
            GD as an approximate argmin. The K-step objective is second-order MAML's
            (``method: maml``).
        nu: finite-difference perturbation nu of FO-B-MAML (keep >= 1e-2 in float32).
        alpha: proximal strength 1/alpha of the FO-B-MAML inner problem.
        inner_steps: inner GD steps K during meta-training.
        inner_lr: inner step size gamma.
        eval_inner_steps: K at validation/test (default: ``inner_steps``).
        eval_inner_lr: gamma at validation/test (default: ``inner_lr``).
        warm_start: FO-B-MAML's perturbed solves start from y^0 ([derived] flag ``warm_start``).
        reptile_uses_query: Reptile's inner loop runs on support ∪ query (Nichol et al. 2018);
            its training query loss/accuracy is then logged as ``train/reptile_fit_*``.
        baselines_use_proximal: FO-MAML and Reptile use the proximal solve y^0 with ``alpha``
            (the synthetic protocol of spec §3.8) instead of plain K-step GD; MAML ignores it.
        inner_batch_size: support mini-batch per inner step (common random numbers across the
            solves of one estimate); ``None`` = full support set.
        max_inner_steps_second_order: second-order MAML warns above this K (memory is linear in K).
        vectorize_tasks: compute all tasks of a (local) meta-batch in one ``torch.func.vmap``
            call (same results, much faster for small nets); ignored with ``inner_batch_size``.
            Nets with active dropout need ``False`` (and FO-B-MAML refuses them: spec §3.3).
        optimizer: outer optimizer factory; ``None`` means ``SNGDM(lr=1e-2, momentum=0.9)``
            (normalized momentum SGD). Not a class default: jsonargparse would carry SNGDM's
            ``eps`` over into e.g. Adam's init_args when the YAML switches class_path.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: str = "cross_entropy",
        method: str = "fo_b_maml_symmetric",
        objective: str = "proximal",
        nu: float = 1e-2,
        alpha: float = 1.0,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
        warm_start: bool = False,
        reptile_uses_query: bool = True,
        baselines_use_proximal: bool = False,
        inner_batch_size: int | None = None,
        max_inner_steps_second_order: int = 50,
        vectorize_tasks: bool = True,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"MetaLearningModule: method must be one of {METHODS}, got {method!r}")
        if objective != "proximal":
            raise ValueError(
                f"MetaLearningModule: objective must be 'proximal' (the only FO-B-MAML inner "
                f"problem implemented), got {objective!r}; the K-step GD objective is "
                "second-order MAML's: method: maml"
            )
        if loss not in LOSSES:
            raise ValueError(
                f"MetaLearningModule: loss must be one of {list(LOSSES)}, got {loss!r}"
            )
        if method.startswith("fo_b_maml") and (nu == 0 or alpha <= 0):
            raise ValueError(
                f"MetaLearningModule: FO-B-MAML needs nu != 0 and alpha > 0, got nu={nu}, alpha={alpha}"
            )
        if inner_steps < 1:
            raise ValueError(f"MetaLearningModule: inner_steps must be >= 1, got {inner_steps}")
        if eval_inner_steps is not None and eval_inner_steps < 0:
            raise ValueError(
                f"MetaLearningModule: eval_inner_steps must be >= 0, got {eval_inner_steps}"
            )
        for key, value in (("inner_lr", inner_lr), ("eval_inner_lr", eval_inner_lr)):
            if value is not None and value <= 0:
                raise ValueError(f"MetaLearningModule: {key} must be > 0, got {value}")
        if baselines_use_proximal and alpha <= 0:
            raise ValueError(
                f"MetaLearningModule: baselines_use_proximal needs alpha > 0, got alpha={alpha}"
            )
        if method == "maml" and inner_steps > max_inner_steps_second_order:
            warnings.warn(
                f"second-order MAML with inner_steps={inner_steps} > {max_inner_steps_second_order}:"
                " memory grows linearly with K; consider fo_b_maml_symmetric",
                stacklevel=2,
            )
        for name, module in net.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                raise ValueError(
                    f"MetaLearningModule: net.{name} is BatchNorm with running statistics; they "
                    "update during inner adaptation (learn2learn #377). Use GroupNorm or "
                    "track_running_stats=False"
                )
        dropout = [n for n, m in net.named_modules() if isinstance(m, _DROPOUT) and m.p > 0]
        if dropout and method.startswith("fo_b_maml"):
            raise ValueError(
                f"MetaLearningModule: net.{dropout[0]} is active dropout; the two solves of one "
                "FO-B-MAML estimate must see the same randomness (spec §3.3, common random "
                "numbers), and independent masks inflate the finite difference. Set p=0"
            )
        if dropout and vectorize_tasks and inner_batch_size is None:
            raise ValueError(
                f"MetaLearningModule: net.{dropout[0]} is active dropout, which the task-vectorized "
                "path (torch.func.vmap) cannot sample; set vectorize_tasks: false"
            )
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.automatic_optimization = False
        self.net = net
        self.loss_fn = LOSSES[loss]
        self.method = method
        self.nu, self.alpha = nu, alpha
        self.inner_steps, self.inner_lr = inner_steps, inner_lr
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
        self.warm_start = warm_start
        self.reptile_uses_query = reptile_uses_query
        self.baselines_use_proximal = baselines_use_proximal
        self.inner_batch_size = inner_batch_size
        self.vectorize_tasks = vectorize_tasks and inner_batch_size is None
        self.optimizer_factory = optimizer
        # Validation/test means over every scored task, exact under DDP (see ``_evaluate``). NaN
        # ``nan_strategy``: a NaN loss stays NaN (the default would drop it with a warning). The
        # states are not saved in checkpoints (torchmetrics' default: persistent=False).
        self.eval_metrics = nn.ModuleDict(
            {f"{s}_{m}": weighted_mean() for s in _STAGES for m in _EVAL_KEYS}
        )

    # -- configuration ------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            return SNGDM(self.net.parameters(), lr=1e-2, momentum=0.9)
        return self.optimizer_factory(self.net.parameters())

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise RuntimeError(
                "MetaLearningModule does not support FSDP: per-task functional parameter copies "
                "need full tensors (spec §9). Use strategy: ddp"
            )
        refuse_float64_on_mps(
            self.trainer.strategy.root_device, "MetaLearningModule",
            "accumulates its meta-gradients and task statistics",
        )  # fmt: skip
        precision = str(self.trainer.precision)
        # Meta-gradients are written to .grad by hand, so a loss scaler never sees a scaled loss,
        # and FO-B-MAML divides the difference of two solves by alpha * nu, which turns bf16
        # rounding into O(1) errors (72 % relative on the MNIST-1D net at nu = 1e-2).
        allowed = ("32-true", "64-true") if self.method.startswith("fo_b_maml") else (
            "32-true", "64-true", "bf16-mixed",
        )  # fmt: skip
        if precision not in allowed:
            raise ValueError(
                f"MetaLearningModule: trainer.precision={precision!r} is not supported with "
                f"method={self.method!r}; use one of {allowed}"
            )
        # A mismatch failed in the first step with a bare shape error naming no setting.
        data = self.trainer.datamodule
        for key, net_has, tasks_have in (
            ("n_way", "outputs", "classes"), ("dim", "input features", "input features"),
        ):  # fmt: skip
            net_value, data_value = getattr(self.net, key, None), getattr(data, key, None)
            if (
                isinstance(net_value, int)
                and isinstance(data_value, int)
                and net_value != data_value
            ):
                raise ValueError(
                    f"MetaLearningModule: the net has {net_value} {net_has} (model.init_args.net."
                    f"init_args.{key}) but the tasks have {data_value} {tasks_have} "
                    f"(data.init_args.{key})"
                )

    @property
    def proximal(self) -> bool:
        """Whether this method adapts with the proximal inner problem (alpha).

        ``baselines_use_proximal`` applies to FO-MAML and Reptile; second-order MAML always
        differentiates through plain K-step GD, so it is evaluated with it too (spec §3.8).
        """
        if self.method.startswith("fo_b_maml"):
            return True
        return self.baselines_use_proximal and self.method in ("fomaml", "reptile")

    def _check_grad_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "MetaLearningModule adapts on support sets during validation/test and needs "
                "gradients: set `trainer.inference_mode: false`"
            )

    def on_validation_start(self) -> None:
        self._check_grad_mode()

    def on_test_start(self) -> None:
        self._check_grad_mode()

    # -- per-task work ------------------------------------------------------------------------
    def _params(self) -> Params:
        return {n: p.detach() for n, p in self.net.named_parameters()}

    def _local_tasks(self, batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """This rank's share of the meta-batch: tasks rank, rank + W, rank + 2W, ..."""
        rank, world = self.global_rank, self.trainer.world_size if self._trainer else 1
        count = batch["support_x"].shape[0]
        keys = ("support_x", "support_y", "query_x", "query_y")
        return [{k: batch[k][i] for k in keys} for i in range(rank, count, world)]

    def estimate(self, task: dict[str, Tensor], x: Params, seed: int = 0) -> Estimate:
        """The chosen method's meta-gradient estimate for one task at meta-parameters ``x``."""
        support, query = (task["support_x"], task["support_y"]), (task["query_x"], task["query_y"])
        kw = {"inner_batch_size": self.inner_batch_size, "seed": seed}
        g, f = task_objectives(self.net, self.loss_fn, support, query, **kw)
        steps, lr = self.inner_steps, self.inner_lr
        base_alpha = self.alpha if self.baselines_use_proximal else None
        if self.method.startswith("fo_b_maml"):
            estimator = self.method.removeprefix("fo_b_maml_")
            return fob_maml_grad(
                g, f, x, nu=self.nu, alpha=self.alpha, steps=steps, lr=lr,
                estimator=estimator, warm_start=self.warm_start,
            )  # fmt: skip
        if self.method == "maml":
            return maml_grad(g, f, x, steps=steps, lr=lr)
        if self.method == "fomaml":
            return fomaml_grad(g, f, x, steps=steps, lr=lr, alpha=base_alpha)
        if self.reptile_uses_query:
            both = tuple(torch.cat([s, q]) for s, q in zip(support, query, strict=True))
            g, _ = task_objectives(self.net, self.loss_fn, both, query, **kw)
        return reptile_grad(g, x, steps=steps, lr=lr, alpha=base_alpha)

    def adapt(self, task: dict[str, Tensor], x: Params) -> Params:
        """Evaluation-time adaptation on the support set with the method's own inner procedure."""
        support, query = (task["support_x"], task["support_y"]), (task["query_x"], task["query_y"])
        g, _ = task_objectives(self.net, self.loss_fn, support, query)
        alpha = self.alpha if self.proximal else None
        return inner_solve(
            g, None, x, nu=0.0, alpha=alpha, steps=self.eval_inner_steps, lr=self.eval_inner_lr
        )

    def _rng_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def _local_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        keys = ("support_x", "support_y", "query_x", "query_y")
        rank, world = self.global_rank, self.trainer.world_size if self._trainer else 1
        return {k: batch[k][rank::world] for k in keys}

    def batched_estimate(
        self, b: dict[str, Tensor], x: Params
    ) -> tuple[Params, Params, Tensor | None]:
        """Vectorized ``estimate`` over the tasks of ``b``: per-task grads [T, ...], adapted, gaps."""
        support, query = (b["support_x"], b["support_y"]), (b["query_x"], b["query_y"])
        common = {"steps": self.inner_steps, "lr": self.inner_lr}
        base_alpha = self.alpha if self.baselines_use_proximal else None
        net, loss = self.net, self.loss_fn
        if self.method.startswith("fo_b_maml"):
            estimator = self.method.removeprefix("fo_b_maml_")
            return batched_fob_maml_grads(
                net, loss, x, support, query, nu=self.nu, alpha=self.alpha, estimator=estimator,
                warm_start=self.warm_start, **common,
            )  # fmt: skip
        if self.method == "maml":
            return (*batched_maml_grads(net, loss, x, support, query, **common), None)
        if self.method == "fomaml":
            grads = batched_fomaml_grads(net, loss, x, support, query, alpha=base_alpha, **common)
            return (*grads, None)
        data = support
        if self.reptile_uses_query:
            data = tuple(torch.cat([s, q], dim=1) for s, q in zip(support, query, strict=True))
        return (*batched_reptile_grads(net, loss, x, data, alpha=base_alpha, **common), None)

    @torch.no_grad()
    def _batched_score(self, params: Params, inputs: Tensor, targets: Tensor, batched: bool = True):
        """Per-task query loss and accuracy [T] for batched (or shared) parameters."""

        def score(p: Params, i: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            out = functional_call(self.net, p, (i,))
            if self.hparams.loss != "cross_entropy":  # as _score: no accuracy for regression
                return self.loss_fn(out, t), out.new_full((), float("nan"))
            return self.loss_fn(out, t), (out.argmax(-1) == t).float().mean()

        return vmap(score, in_dims=(0 if batched else None, 0, 0))(params, inputs, targets)

    @torch.no_grad()
    def _score(self, params: Params, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(self.net, params, (inputs,))
        loss = self.loss_fn(out, targets)
        if self.hparams.loss == "cross_entropy":
            return loss, (out.argmax(-1) == targets).float().mean()
        return loss, torch.full_like(loss, float("nan"))

    # -- closed-form diagnostics (linear-regression tasks) -------------------------------------
    def _closed_form(self) -> LinearTasks | None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        pool = getattr(dm, "closed_form", None)
        if not isinstance(pool, LinearTasks) or self.hparams.loss != "half_mse":
            return None
        if not self.proximal or list(self._params()) != ["weight"]:
            return None
        # The datamodule builds the pool on the CPU; the closed forms meet the weight's device
        # (one copy per pool and device, not one per step).
        key = (id(pool), self.device)
        if getattr(self, "_pool_on_device", (None, None))[0] != key:
            self._pool_on_device = (key, LinearTasks(*(t.to(self.device) for t in pool)))
        return self._pool_on_device[1]

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        x = self._params()
        names = list(x)
        grad_sum, stats = self._local_sums(batch, x, names)
        # Explicit reduction: the summed estimates and the task count travel in one all-reduce.
        packed = self.trainer.strategy.reduce(torch.cat([grad_sum, stats]), reduce_op="sum")
        grad_sum, (count, loss_sum, acc_sum, gap_sum) = packed[: grad_sum.numel()], packed[-4:]
        meta_grad = grad_sum / count
        # Closed-form diagnostics before the step: ``x`` aliases the parameters updated in place.
        closed_form = self._closed_form_logs(batch, x, meta_grad)
        offset = 0
        before = torch.cat([p.detach().flatten().double() for p in self.net.parameters()])
        for p in self.net.parameters():
            p.grad = meta_grad[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        opt.step()
        opt.zero_grad()
        self._step_schedulers("step")
        after = torch.cat([p.detach().flatten().double() for p in self.net.parameters()])
        # Reptile (with reptile_uses_query) adapts on the query set it is scored on: its query
        # loss is a fit, not a held-out meta-loss, and is logged under its own name.
        name = "train/reptile_fit" if self._adapts_on_query else "train/meta"
        logs = {
            f"{name}_loss": loss_sum / count,
            "train/meta_grad_norm": meta_grad.norm(),
            "train/step_norm": (after - before).norm(),
        }
        if self.hparams.loss == "cross_entropy":
            logs[f"{name}_acc"] = acc_sum / count
        if self.method.startswith("fo_b_maml"):
            logs["train/solve_gap"] = gap_sum / count
        logs.update(closed_form)
        loss_value = logs.pop(f"{name}_loss")
        self.log_dict({k: v.float() for k, v in logs.items()}, prog_bar=False)
        self.log(f"{name}_loss", loss_value.float(), prog_bar=True)

    @property
    def _adapts_on_query(self) -> bool:
        return self.method == "reptile" and self.reptile_uses_query

    def _step_schedulers(self, interval: str) -> None:
        """Step the configured LR schedulers: manual optimization leaves that to the module."""
        count = self.global_step if interval == "step" else self.current_epoch + 1
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or count % config.frequency:
                continue
            if config.reduce_on_plateau:
                raise ValueError(
                    "MetaLearningModule: ReduceLROnPlateau is not supported (manual optimization "
                    "has no monitored value at step time); use a schedule that needs no metric"
                )
            config.scheduler.step()

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._check_input_dtype(batch)

    def on_validation_batch_start(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._check_input_dtype(batch)  # the sanity check validates before any training batch

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_input_dtype(batch)

    def _check_input_dtype(self, batch: dict[str, Tensor]) -> None:
        inputs, dtype = batch["support_x"], next(self.net.parameters()).dtype
        if inputs.is_floating_point() and inputs.dtype != dtype:
            raise TypeError(
                f"MetaLearningModule: the task inputs are {inputs.dtype} but the net's parameters "
                f"are {dtype}; match them (e.g. trainer.precision: 64-true for float64 data, or "
                "the datamodule's dtype)"
            )

    def _local_sums(self, batch, x: Params, names: list[str]) -> tuple[Tensor, Tensor]:
        """Sum over this rank's tasks of the estimates, and of [1, query loss, acc, solve gap]."""
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)  # count, loss, acc, gap
        numel = sum(v.numel() for v in x.values())
        if self.vectorize_tasks and batch["support_x"].shape[0] <= self.global_rank:
            # More ranks than tasks: this rank contributes nothing to the all-reduced sums.
            return torch.zeros(numel, dtype=torch.float64, device=self.device), stats
        if self.vectorize_tasks:
            b = self._local_batch(batch)
            grads, adapted, gaps = self.batched_estimate(b, x)
            loss, acc = self._batched_score(adapted, b["query_x"], b["query_y"])
            grad_sum = torch.cat([grads[n].sum(0).flatten() for n in names]).double()
            # Summed on the device (float() here would sync the GPU every step).
            gap = gaps.sum() if gaps is not None else loss.new_zeros(())
            stats[0] += len(loss)
            stats[1:] += torch.stack([loss.sum().double(), acc.sum().double(), gap.double()])
            return grad_sum, stats
        grad_sum = torch.zeros(numel, dtype=torch.float64, device=self.device)
        world = self.trainer.world_size if self._trainer else 1
        for i, task in enumerate(self._local_tasks(batch)):
            # Keyed by the task's index in the whole meta-batch (rank + world * i), not by the
            # rank: its mini-batches and dropout masks are then the same with 1 or N processes,
            # and different tasks never share them. The run's seed (seed_everything) enters
            # too: runs with other seeds must not share this noise.
            seed = derive_seed(run_seed(), self.global_step, self.global_rank + world * i)
            with torch.random.fork_rng(devices=self._rng_devices()):
                torch.manual_seed(seed)
                est = self.estimate(task, x, seed=seed)
            grad_sum += torch.cat([est.grad[n].flatten() for n in names]).double()
            loss, acc = self._score(est.adapted, task["query_x"], task["query_y"])
            stats[0] += 1
            stats[1:3] += torch.stack([loss.double(), acc.double()])
            stats[3] += est.solve_gap or 0.0
        return grad_sum, stats

    def _closed_form_logs(self, batch, x: Params, meta_grad: Tensor) -> dict[str, Tensor]:
        pool = self._closed_form()
        if pool is None:
            return {}
        w = x["weight"].to(pool.S.dtype)
        batch_tasks = LinearTasks.from_data(
            *(batch[k].to(pool.S.dtype) for k in ("support_x", "support_y", "query_x", "query_y"))
        )
        batch_true = exact_meta_grads(w, batch_tasks, self.alpha).mean(0)
        true = exact_meta_grad(w, pool, self.alpha)
        err = (meta_grad.to(batch_true.dtype) - batch_true).norm()
        return {
            "train/true_meta_grad_norm": true.norm(),
            "train/estimator_error": err,
            "train/estimator_rel_error": err / batch_true.norm().clamp_min(1e-30),
        }

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Tensor], prefix: str) -> None:
        """Log the mean pre-/post-adaptation query loss (and accuracy) over the scored tasks.

        Padding tasks (``scored`` False: ``EvenEvalSampler`` pads the shards so that every rank
        runs the same number of batches) are dropped before any work. Each batch adds its mean
        with weight = its number of scored tasks to a ``MeanMetric`` whose float sums are
        all-reduced at epoch end. (``self.log(..., batch_size=n, sync_dist=True)`` is not exact
        once ranks score different numbers of tasks: Lightning averages the integer batch-size
        totals over the ranks and truncates, 21 tasks on 2 ranks counting as 20.) A batch of
        padding only adds zeros with weight 0, so no NaN and nothing counted, and still logs, so
        every rank syncs the same metrics. In one process the result is bit for bit the
        batch-size-weighted mean the plain ``self.log`` gave.
        """
        b = self._scored_tasks(batch)
        n = b["support_x"].shape[0]
        x = self._params()
        if n == 0:
            vals = torch.zeros(4, dtype=next(iter(x.values())).dtype, device=self.device)
        elif self.vectorize_tasks:
            alpha = self.alpha if self.proximal else None
            with torch.enable_grad():
                y = batched_inner_solve(
                    self.net, self.loss_fn, x, (b["support_x"], b["support_y"]), None, nu=0.0,
                    alpha=alpha, steps=self.eval_inner_steps, lr=self.eval_inner_lr,
                )  # fmt: skip
            pre = self._batched_score(x, b["query_x"], b["query_y"], batched=False)
            post = self._batched_score(y, b["query_x"], b["query_y"])
            vals = torch.stack([pre[0].mean(), pre[1].mean(), post[0].mean(), post[1].mean()])
        else:
            rows = []
            for task in self._local_tasks_eval(b):
                with torch.enable_grad():
                    y = self.adapt(task, x)
                rows.append((*self._score(x, task["query_x"], task["query_y"]),
                             *self._score(y, task["query_x"], task["query_y"])))  # fmt: skip
            vals = torch.stack([torch.stack(r) for r in rows]).mean(0)
        keys = ["pre_adapt_loss", "query_loss"]
        if self.hparams.loss == "cross_entropy":
            keys += ["pre_adapt_acc", "query_acc"]
        for key in keys:
            metric = self.eval_metrics[f"{prefix}_{key}"]
            update_weighted(metric, vals[_EVAL_KEYS.index(key)], n)
            # The bar shows the query accuracy, or the query loss where there is none.
            main = "query_acc" if "query_acc" in keys else "query_loss"
            self.log(f"{prefix}/{key}", metric, prog_bar=key == main)

    @staticmethod
    def _scored_tasks(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's tasks that count: rows with ``scored`` False are evaluation padding."""
        keys = ("support_x", "support_y", "query_x", "query_y")
        scored = batch.get("scored")
        if scored is None or bool(scored.all()):
            return {k: batch[k] for k in keys}
        return {k: batch[k][scored] for k in keys}

    def _local_tasks_eval(self, batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        keys = ("support_x", "support_y", "query_x", "query_y")
        return [{k: batch[k][i] for k in keys} for i in range(batch["support_x"].shape[0])]

    def on_validation_epoch_start(self) -> None:
        self._reset_eval_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._reset_eval_metrics("test")

    def _reset_eval_metrics(self, stage: str) -> None:
        # Lightning resets logged metrics after computing them; this also clears an epoch that
        # was interrupted before its end.
        for key in _EVAL_KEYS:
            self.eval_metrics[f"{stage}_{key}"].reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")
