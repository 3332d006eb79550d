"""``CubicNewtonModule``: stochastic cubic Newton with momentum as a manual-optimization LightningModule.

Chayti, Doikov & Jaggi, *Improving Stochastic Cubic Newton with Momentum* (AISTATS 2025). One training
step is one iteration of spec §3: get the oracle points (y_t, z_t) from the optimizer, compute the
stochastic gradient ĝ_t = ∇f_ξ(y_t) and Hessian Ĥ_t = ∇²f_ξ'(z_t) (or HVPs) of the flattened parameter
vector with ``torch.func`` on independent batches ξ, ξ', average them across ranks explicitly (DDP does
not synchronise ``torch.func`` gradients), and let :class:`optim.cubic_solvers.StochasticCubicNewton`
update the momenta and take the cubic (or gradient-regularized Newton) step.

The objective is f(x; batch) = loss(model(inputs; x), targets) + regularizer(x), or model(*batch) +
regularizer(x) when no loss is given (the model computes its own objective). The validation loop
evaluates the full-batch ‖∇f‖, f and λ_min(∇²f) (small d): set ``val_check_interval`` to the evaluation
period in steps.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from modules.precision import refuse_float64_on_mps
from optim.cubic_solvers import StochasticCubicNewton


def _clone_tree(batch: Any) -> Any:
    # Batches built under inference mode cannot enter autograd; a clone made outside it can.
    if isinstance(batch, Tensor):
        return batch.clone()
    return type(batch)(_clone_tree(b) for b in batch)


class CubicNewtonModule(L.LightningModule):
    """Stochastic cubic-regularized Newton with gradient and Hessian momentum.

    Args:
        model: any ``nn.Module``; all its trainable parameters form the optimization variable x.
        loss: ``loss(model(inputs), targets)`` for batches ``(inputs, targets)``; None when
            ``model(*batch)`` already returns the objective.
        regularizer: optional module applied to the flat parameter vector x (added to every sample).
        M: cubic regularization constant of the M/6 convention (≈ Hessian Lipschitz constant).
        grad_momentum: α ∈ (0, 1].
        hess_momentum: β ∈ (0, 1] (ignored by the HVP solver).
        momentum_type: ``hessian_corrected`` (default), ``ema``, ``extrapolated`` or ``none``.
        transport_hessian: ``momentum`` (H_t) or ``sample`` (Ĥ_t) for ``hessian_corrected``.
        step_type: ``cubic`` or ``reg_newton`` (gradient-regularized Newton, convex problems).
        solver: ``exact`` (eigendecomposition; d ≤ ``max_dim_exact``) or ``hvp``.
        solver_kwargs: extra solver arguments (``rel_acc``, ``max_iters``, ``tol``, ...).
        max_dim_exact: largest d for which d×d Hessians are formed (training and evaluation).
        max_extrapolation_norm: clip ‖y_t − x_t‖ (``extrapolated`` only); None = no clipping.
        seed: seed of the HVP solver's random perturbation.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module | None = None,
        regularizer: nn.Module | None = None,
        M: float = 1.0,
        grad_momentum: float = 0.01,
        hess_momentum: float = 0.01,
        momentum_type: str = "hessian_corrected",
        transport_hessian: str = "momentum",
        step_type: str = "cubic",
        solver: str = "exact",
        solver_kwargs: dict[str, Any] | None = None,
        max_dim_exact: int = 2000,
        max_extrapolation_norm: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "loss", "regularizer"])
        self.automatic_optimization = False
        self.model, self.loss_fn, self.regularizer = model, loss, regularizer
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self._shapes = [params[n].shape for n in self._names]
        self._dtypes = [params[n].dtype for n in self._names]
        self.dim = sum(params[n].numel() for n in self._names)
        if self.dim == 0:
            raise ValueError("CubicNewtonModule: the model has no trainable parameters")
        self._val_sums: dict[str, Tensor] = {}
        # Build the optimizer once now so bad hyperparameters fail at construction, not at fit
        # time; its warnings come when configure_optimizers builds it again (not twice).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._make_optimizer()

    # ---------------------------------------------------------------- objective of the flat vector
    def _unflatten(self, x: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, shape, dtype in zip(self._names, self._shapes, self._dtypes, strict=True):
            n = shape.numel()
            out[name] = x[offset : offset + n].view(shape).to(dtype)
            offset += n
        return out

    def objective(self, x: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
        """f(x; batch) for the flat parameter vector x (mean over the batch, plus the regularizer)."""
        params = self._unflatten(x)
        if self.loss_fn is None:
            value = functional_call(self.model, params, tuple(batch))
        else:
            inputs, targets = batch
            value = self.loss_fn(functional_call(self.model, params, (inputs,)), targets)
        if self.regularizer is not None:
            value = value + self.regularizer(x)
        return value.to(torch.float64)

    def sample_hessian(self, x: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
        """∇²f(x; batch) as a d×d matrix: one reverse pass with create_graph, then d batched
        vector-Jacobian products (several times cheaper than ``torch.func.hessian`` for small d)."""
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.objective(xx, batch), xx, create_graph=True)
            eye = torch.eye(xx.numel(), dtype=xx.dtype, device=xx.device)
            (H,) = torch.autograd.grad(g, xx, eye, is_grads_batched=True)
        return H.detach()

    def sample_hvp(self, x: Tensor, batch: tuple[Tensor, ...]):
        """v ↦ ∇²f(x; batch) v by double backward through one retained gradient graph (cheaper per
        product than re-tracing ``torch.func.jvp(grad)`` for every solver iteration)."""
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.objective(xx, batch), xx, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            with torch.enable_grad():
                (Hv,) = torch.autograd.grad(g, xx, v.to(xx.dtype), retain_graph=True)
            return Hv.detach()

        return hvp

    def _make_optimizer(self) -> StochasticCubicNewton:
        hp = self.hparams
        return StochasticCubicNewton(
            [p for p in self.model.parameters() if p.requires_grad],
            M=hp.M,
            grad_momentum=hp.grad_momentum,
            hess_momentum=hp.hess_momentum,
            momentum_type=hp.momentum_type,
            transport_hessian=hp.transport_hessian,
            step_type=hp.step_type,
            solver=hp.solver,
            solver_kwargs=hp.solver_kwargs,
            max_dim_exact=hp.max_dim_exact,
            max_extrapolation_norm=hp.max_extrapolation_norm,
            seed=hp.seed,
        )

    def configure_optimizers(self) -> StochasticCubicNewton:
        return self._make_optimizer()

    def setup(self, stage: str) -> None:
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("CubicNewtonModule does not support FSDP (it needs the full flat x)")
        if self._trainer is not None:
            refuse_float64_on_mps(
                self.trainer.strategy.root_device, "CubicNewtonModule",
                "solves the cubic subproblem and keeps its momentum",
            )  # fmt: skip
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if precision not in ("32-true", "32", "64-true"):
            # 16-mixed: the step is written by hand, so the GradScaler never saw a scaled loss
            # and asserts; bf16 autocast would compute the gradient and Hessian of a float32
            # model in bf16, too coarse for a second-order step (float64 models are unaffected,
            # but nothing is gained either).
            raise ValueError(
                f"CubicNewtonModule: trainer.precision={precision!r} is not supported; use "
                "'32-true' (the default) or '64-true'"
            )
        data = getattr(self._trainer, "datamodule", None)
        features, inputs = getattr(data, "dim", None), getattr(self.model, "in_features", None)
        if isinstance(features, int) and isinstance(inputs, int) and features != inputs:
            raise ValueError(
                f"the model takes {inputs} input features (model.init_args.model.init_args.dim) "
                f"but the data has {features} (data.init_args.d; 30 for source: breast_cancer)"
            )

    # ---------------------------------------------------------------- distributed helpers
    def _mean(self, t: Tensor) -> Tensor:
        # Explicit average over ranks: DDP's hooks never see torch.func gradients.
        if self._trainer is None or self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t, reduce_op="mean")

    def _broadcast(self, h: Tensor) -> Tensor:
        # Every rank solves the same averaged problem; rank 0's step is broadcast anyway so that
        # platform-dependent eigh/HVP rounding can never let the replicas drift apart.
        if self._trainer is None or self.trainer.world_size == 1:
            return h
        torch.distributed.broadcast(h, src=0)
        return h

    # ---------------------------------------------------------------- training
    def training_step(self, batch: tuple[tuple[Tensor, ...], tuple[Tensor, ...]], batch_idx: int):
        batch_g, batch_h = batch
        opt = self.optimizers()
        inner: StochasticCubicNewton = opt.optimizer  # type: ignore[assignment]
        y, z = inner.evaluation_points()
        g_hat, loss = grad_and_value(self.objective)(y, batch_g)
        g_hat = self._mean(g_hat.detach())
        kwargs: dict[str, Any] = {}
        if self.hparams.solver == "exact":
            kwargs["hess"] = self._mean(self.sample_hessian(z, batch_h))
        else:
            sample_hvp = self.sample_hvp(z, batch_h)

            def hvp(v: Tensor) -> Tensor:
                return self._mean(sample_hvp(v))

            kwargs["hvp"] = hvp
        opt.step(grad=g_hat, broadcast=self._broadcast, **kwargs)
        # Logged values are only flushed every `log_every_n_steps`; skip the bookkeeping otherwise.
        if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self._log_step(inner, g_hat, loss)
        return None

    def _log_step(self, inner: StochasticCubicNewton, g_hat: Tensor, loss: Tensor) -> None:
        sol = inner.last
        assert sol is not None
        logs = {
            "train/loss": self._mean(loss.detach()),
            "train/grad_sample_norm": torch.linalg.vector_norm(g_hat),
            "train/momentum_norm": torch.linalg.vector_norm(inner.cubic_state["m"]),
            "train/step_norm": torch.linalg.vector_norm(sol.h),
            "train/model_value": sol.model_value,
            "train/solver_residual": sol.residual,
            "train/solver_iters": float(sol.iterations),
        }
        if sol.lambda_min == sol.lambda_min:  # not NaN: the exact solver computed it
            logs["train/lambda_min_H"] = sol.lambda_min
        if self.hparams.momentum_type == "extrapolated":
            logs["train/extrapolation_norm"] = inner.last_extrapolation_norm
        loss_value = logs.pop("train/loss")
        self.log_dict(logs, on_step=True, on_epoch=False)
        self.log("train/loss", loss_value, on_step=True, on_epoch=False, prog_bar=True)

    # ---------------------------------------------------------------- full-batch evaluation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        inner_x = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self._params()])
        with torch.inference_mode(False), torch.enable_grad():
            batch = _clone_tree(batch)
            x = inner_x.clone()
            count = torch.tensor(float(len(batch[0])), dtype=torch.float64, device=x.device)
            g, value = grad_and_value(self.objective)(x, batch)
            sums = {"count": count, "loss": value.detach() * count, "grad": g.detach() * count}
            if self.dim <= self.hparams.max_dim_exact:
                sums["hess"] = self.sample_hessian(x, batch) * count
        for key, val in sums.items():
            self._val_sums[key] = self._val_sums.get(key, 0) + val

    def on_validation_epoch_end(self) -> None:
        sums = self._val_sums
        if self._trainer is not None and self.trainer.world_size > 1:
            # A rank whose shard was empty (fewer rows than ranks) still joins every all-reduce.
            sums = sums or self._zero_val_sums()
            sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
        if not sums:
            return
        n = sums["count"]
        grad = sums["grad"] / n
        logs = {"val/loss": sums["loss"] / n, "val/grad_norm": torch.linalg.vector_norm(grad)}
        if "hess" in sums:
            H = sums["hess"] / n
            logs["val/lambda_min"] = torch.linalg.eigvalsh(0.5 * (H + H.T))[0]
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=False)
        self._val_sums = {}

    def _zero_val_sums(self) -> dict[str, Tensor]:
        """The keys, shapes and dtype ``validation_step`` accumulates, all zero."""
        zeros = partial(torch.zeros, dtype=torch.float64, device=self.device)
        sums = {"count": zeros(()), "loss": zeros(()), "grad": zeros(self.dim)}
        if self.dim <= self.hparams.max_dim_exact:
            sums["hess"] = zeros(self.dim, self.dim)
        return sums

    def _params(self) -> list[Tensor]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self._names]
