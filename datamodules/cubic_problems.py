"""Validation problems for stochastic cubic Newton (spec §6) and their data streams.

Problems are ordinary ``nn.Module`` pieces the ``CubicNewtonModule`` combines as
f(x) = mean_i loss(model(a_i; x), y_i) + regularizer(x):

* non-convex logistic regression: :class:`LinearModel` + :class:`LogisticLoss` +
  :class:`NonconvexRegularizer` (λ Σⱼ xⱼ²/(1+xⱼ²));
* convex ridge logistic regression: the same with :class:`L2Regularizer` ((λ/2)‖x‖²);
* the strict saddle f(x) = ¼x₁⁴ − ½x₁² + ½x₂² with additive gradient noise: :class:`SaddleFunction`
  (no loss: the model's output is the objective).

The data modules yield one pair ``(batch_g, batch_h)`` per optimizer step: independent samples for the
gradient and the Hessian (spec §3, step 2). Each step's samples come from a generator seeded by
(seed, rank, step), so a run resumed from a checkpoint at step t draws exactly what an uninterrupted
run draws, whatever the loader prefetched before the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


# ----------------------------------------------------------------------------- problem pieces
class LinearModel(nn.Module):
    """z = A x (+ b): the linear predictor of logistic regression, initialised at x₀ = 0.

    Args:
        dim: number of features d.
        bias: add an intercept.
        dtype: ``float64`` (default; the spec's tolerances are float64 ones) or ``float32``.
    """

    def __init__(self, dim: int, bias: bool = False, dtype: str = "float64") -> None:
        super().__init__()
        self.in_features = dim  # checked against the data's feature count at setup
        self.weight = nn.Parameter(torch.zeros(dim, dtype=_dtype(dtype)))
        self.bias = nn.Parameter(torch.zeros((), dtype=_dtype(dtype))) if bias else None

    def forward(self, a: Tensor) -> Tensor:
        z = a @ self.weight
        return z + self.bias if self.bias is not None else z


class MLPClassifier(nn.Module):
    """A one-hidden-layer tanh network giving one logit per row: a non-convex model for the HVP solver.

    Args:
        dim: input features.
        hidden: hidden width.
        seed: initialisation seed (independent of the global seed, so configs are reproducible).
        dtype: ``float64`` (default) or ``float32``.
    """

    def __init__(self, dim: int, hidden: int = 16, seed: int = 0, dtype: str = "float64") -> None:
        super().__init__()
        self.in_features = dim  # checked against the data's feature count at setup
        gen = torch.Generator().manual_seed(seed)
        dt = _dtype(dtype)
        self.w1 = nn.Parameter(torch.randn(hidden, dim, generator=gen, dtype=dt) / dim**0.5)
        self.b1 = nn.Parameter(torch.zeros(hidden, dtype=dt))
        self.w2 = nn.Parameter(torch.randn(hidden, generator=gen, dtype=dt) / hidden**0.5)

    def forward(self, a: Tensor) -> Tensor:
        return torch.tanh(a.to(self.w1.dtype) @ self.w1.T + self.b1) @ self.w2


class LogisticLoss(nn.Module):
    """mean log(1 + exp(−y z)) for labels y ∈ {−1, +1}."""

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return nn.functional.softplus(-y * z).mean()


class NonconvexRegularizer(nn.Module):
    """λ Σⱼ xⱼ²/(1 + xⱼ²), the non-convex regularizer of spec §6A.

    Args:
        lam: regularization strength λ.
    """

    def __init__(self, lam: float = 1e-2) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, x: Tensor) -> Tensor:
        sq = x * x
        return self.lam * (sq / (1.0 + sq)).sum()


class L2Regularizer(nn.Module):
    """(λ/2)‖x‖², the ridge term of spec §6C.

    Args:
        lam: regularization strength λ.
    """

    def __init__(self, lam: float = 1e-2) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * self.lam * (x * x).sum()


class SaddleFunction(nn.Module):
    """f_ξ(x) = ¼x₁⁴ − ½x₁² + ½x₂² + <ξ, x>: exact Hessian, gradient noise ξ (spec §6B).

    x = 0 is a strict saddle (∇²f = diag(−1, 1)); the minima are x = (±1, 0) with ∇²f = diag(2, 1).
    ``forward(noise)`` takes a (B, 2) batch of noise vectors and returns the mean of f_ξ over it.

    Args:
        init: starting point x₀ (default the saddle (0, 0)).
    """

    def __init__(self, init: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(init, dtype=torch.float64))

    def forward(self, noise: Tensor) -> Tensor:
        x1, x2 = self.x[0], self.x[1]
        f = 0.25 * x1**4 - 0.5 * x1**2 + 0.5 * x2**2
        return f + noise.mean(0) @ self.x


def logistic_oracles(
    x: Tensor, A: Tensor, y: Tensor, lam: float, regularizer: str = "nonconvex"
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form value, gradient and Hessian of mean log(1+exp(−y aᵀx)) + regularizer(x).

    With s = σ(−y aᵀx): ∇ = −Aᵀ(y s)/b + r'(x), ∇² = Aᵀ diag(s(1−s)) A / b + diag(r''(x)), where
    r = λ Σ x²/(1+x²) (``nonconvex``: r' = 2λx/(1+x²)², r'' = 2λ(1−3x²)/(1+x²)³) or (λ/2)‖x‖² (``l2``).
    Used by tests (against ``torch.func``) and by the fast experiment loop.
    """
    b = A.shape[0]
    z = A @ x
    s = torch.sigmoid(-y * z)
    value = nn.functional.softplus(-y * z).mean()
    grad = -(A.T @ (y * s)) / b
    hess = (A.T * (s * (1.0 - s))) @ A / b
    if regularizer == "nonconvex":
        q = 1.0 + x * x
        value = value + lam * (x * x / q).sum()
        grad = grad + 2.0 * lam * x / q**2
        hess = hess + torch.diag(2.0 * lam * (1.0 - 3.0 * x * x) / q**3)
    elif regularizer == "l2":
        value = value + 0.5 * lam * (x * x).sum()
        grad = grad + lam * x
        hess = hess + lam * torch.eye(x.numel(), dtype=x.dtype, device=x.device)
    else:
        raise ValueError(f"regularizer must be 'nonconvex' or 'l2', got {regularizer!r}")
    return value, grad, hess


def saddle_oracles(x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form value, gradient (x₁³ − x₁, x₂) + mean ξ and Hessian diag(3x₁² − 1, 1) of the saddle."""
    xi = noise.mean(0)
    value = 0.25 * x[0] ** 4 - 0.5 * x[0] ** 2 + 0.5 * x[1] ** 2 + xi @ x
    grad = torch.stack([x[0] ** 3 - x[0], x[1]]) + xi
    hess = torch.diag(torch.stack([3.0 * x[0] ** 2 - 1.0, torch.ones_like(x[0])]))
    return value, grad, hess


# ----------------------------------------------------------------------------- data
def make_logistic_data(
    n: int = 2000,
    d: int = 30,
    w_scale: float = 3.0,
    label_noise: float = 0.3,
    seed: int = 0,
    source: str = "synthetic",
) -> tuple[Tensor, Tensor]:
    """Features A (n, d) with unit-norm rows and labels y ∈ {−1, +1} (float64).

    ``synthetic`` (spec §6): a_i ~ N(0, I) normalised, y_i = sign(a_iᵀw* + label_noise·ε), w* ~ w_scale·N(0, I).
    ``breast_cancer``: scikit-learn's bundled Wisconsin data (569 × 30), standardised, rows normalised;
    ``n``, ``d``, ``w_scale``, ``label_noise`` are ignored.
    """
    if source == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        X, t = load_breast_cancer(return_X_y=True)
        A = torch.as_tensor((X - X.mean(0)) / X.std(0), dtype=torch.float64)
        A = A / A.norm(dim=1, keepdim=True)
        y = torch.as_tensor(2.0 * t - 1.0, dtype=torch.float64)
    elif source == "synthetic":
        if n < 1 or d < 1:
            raise ValueError(f"synthetic logistic data needs n >= 1 and d >= 1, got n={n}, d={d}")
        gen = torch.Generator().manual_seed(seed)
        A = torch.randn(n, d, generator=gen, dtype=torch.float64)
        w_star = w_scale * torch.randn(d, generator=gen, dtype=torch.float64)
        eps = torch.randn(n, generator=gen, dtype=torch.float64)
        A = A / A.norm(dim=1, keepdim=True)
        y = torch.sign(A @ w_star + label_noise * eps)
        y[y == 0] = 1.0
    else:
        raise ValueError(f"source must be 'synthetic' or 'breast_cancer', got {source!r}")
    return A, y


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A generator determined by (seed, rank, step) only: the sampler state needs no checkpointing."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] % (2**63 - 1)))


class PairStream(IterableDataset):
    """Infinite stream of (batch_g, batch_h), one pair per optimizer step, starting at ``start_step``.

    ``start_step`` may be a function (the trainer's live ``global_step``), read each time an
    iterator starts: every epoch then continues the stream where the last one stopped.

    Args:
        draw: (generator, batch size) ↦ batch tuple.
        batch_size_grad: b_g.
        batch_size_hess: b_H.
        independent_hessian_batch: draw ξ'_t independently of ξ_t; otherwise reuse ξ_t's first b_H rows.
        seed: base seed; rank: data-parallel rank; start_step: first step index, or a function
            returning it.
    """

    def __init__(
        self,
        draw: Callable[[torch.Generator, int], tuple[Tensor, ...]],
        batch_size_grad: int,
        batch_size_hess: int,
        independent_hessian_batch: bool,
        seed: int,
        rank: int = 0,
        start_step: int | Callable[[], int] = 0,
    ) -> None:
        self.draw, self.bg, self.bh = draw, batch_size_grad, batch_size_hess
        self.independent, self.seed, self.rank, self.start_step = (
            independent_hessian_batch,
            seed,
            rank,
            start_step,
        )

    def __iter__(self) -> Iterator[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:
        step = self.start_step() if callable(self.start_step) else self.start_step
        while True:
            gen = step_generator(self.seed, self.rank, step)
            batch_g = self.draw(gen, self.bg)
            if self.independent:
                batch_h = self.draw(gen, self.bh)
            else:
                batch_h = tuple(t[: self.bh] for t in batch_g)
            yield batch_g, batch_h
            step += 1


def _check_bounded(trainer: L.Trainer) -> None:
    """Refuse a fit the endless stream would never end: no epoch has an end of its own."""
    epochs_end = isinstance(trainer.limit_train_batches, int) and trainer.max_epochs not in (
        None,
        -1,
    )
    timed = any(isinstance(c, Timer) for c in trainer.callbacks)
    if trainer.max_steps == -1 and not epochs_end and not timed:
        raise ValueError(
            "cubic Newton problems draw an endless stream of samples (one pair per step): "
            "bound the run with trainer.max_steps (or an integer trainer.limit_train_batches "
            "per epoch with trainer.max_epochs, or trainer.max_time)"
        )


class _RowShard(IterableDataset):
    """Rows ``rank::world`` of the full data, in batches of ``batch_size`` (all rows if None).

    With fewer rows than ranks (the 1-row saddle problem on 2 ranks) the last ranks get no
    batch; ``CubicNewtonModule`` then adds zeros to the epoch-end sums, so no rank skips them.
    """

    def __init__(
        self, data: tuple[Tensor, ...], batch_size: int | None, rank: int, world: int
    ) -> None:
        n = len(data[0])
        if n == 0:
            raise ValueError("full-batch validation data has no rows")
        self.data, self.rank, self.world = data, rank, world
        self.batch_size = batch_size or n

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        rows = torch.arange(self.rank, len(self.data[0]), self.world)
        for start in range(0, len(rows), self.batch_size):
            idx = rows[start : start + self.batch_size]
            yield tuple(t[idx] for t in self.data)


class _PairDataModule(L.LightningDataModule):
    """Shared plumbing: a step-indexed training stream and a full-data validation loader."""

    def __init__(
        self,
        batch_size_grad: int,
        batch_size_hess: int,
        independent_hessian_batch: bool,
        seed: int,
        val_batch_size: int | None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size_grad", batch_size_grad),
            ("batch_size_hess", batch_size_hess),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not independent_hessian_batch and batch_size_hess > batch_size_grad:
            raise ValueError(
                "independent_hessian_batch=false reuses the gradient batch, so batch_size_hess "
                f"({batch_size_hess}) must be <= batch_size_grad ({batch_size_grad})"
            )
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(
                f"val_batch_size must be >= 1 or null (one chunk), got {val_batch_size}"
            )
        self.batch_size_grad, self.batch_size_hess = batch_size_grad, batch_size_hess
        self.independent_hessian_batch, self.seed = independent_hessian_batch, seed
        self.val_batch_size = val_batch_size

    def _draw(self, gen: torch.Generator, b: int) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _full_data(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def stream(self, rank: int = 0, start_step: int | Callable[[], int] = 0) -> PairStream:
        """The (batch_g, batch_h) stream of ``rank`` from step ``start_step`` on."""
        return PairStream(
            self._draw,
            self.batch_size_grad,
            self.batch_size_hess,
            self.independent_hessian_batch,
            self.seed,
            rank,
            start_step,
        )

    def train_dataloader(self) -> DataLoader:
        # Each epoch's iterator starts at the live global_step (restored before the loader is
        # built when resuming), so a run continues the stream exactly like a straight one.
        trainer = self.trainer
        if trainer is None:
            return DataLoader(self.stream(), batch_size=None, num_workers=0)
        _check_bounded(trainer)
        stream = self.stream(trainer.global_rank, lambda: trainer.global_step)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        # Each rank takes rows rank, rank + world, ... itself: Lightning's DistributedSampler would
        # pad the data to a multiple of the world size and count the padded rows twice in the
        # module's summed full-batch gradient and loss.
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(
            _RowShard(self._full_data(), self.val_batch_size, rank, world), batch_size=None
        )


class LogisticToyDataModule(_PairDataModule):
    """Logistic-regression data (spec §6), sampled with replacement, b_g and b_H rows per step.

    Args:
        n: number of samples (synthetic source).
        d: number of features (synthetic source).
        w_scale: scale of the teacher w* (3 for the non-convex experiment, 1 for the convex one).
        label_noise: std of the noise added to the teacher margin before taking the sign.
        batch_size_grad: b_g, samples per stochastic gradient.
        batch_size_hess: b_H, samples per stochastic Hessian.
        independent_hessian_batch: independent gradient and Hessian samples (default, our choice).
        seed: sampling seed (and data seed unless ``data_seed`` is given).
        data_seed: seed of the synthetic data draw (teacher, features, label noise); None = ``seed``.
        source: ``synthetic`` or ``breast_cancer`` (scikit-learn's bundled data).
        val_batch_size: chunk size for the full-batch evaluation (None: one chunk).
        full_batch: every step uses the whole data set for both ĝ and Ĥ (deterministic cubic Newton;
            the batch sizes are then ignored).
    """

    def __init__(
        self,
        n: int = 2000,
        d: int = 30,
        w_scale: float = 3.0,
        label_noise: float = 0.3,
        batch_size_grad: int = 1,
        batch_size_hess: int = 1,
        independent_hessian_batch: bool = True,
        seed: int = 0,
        source: str = "synthetic",
        val_batch_size: int | None = None,
        full_batch: bool = False,
        data_seed: int | None = None,
    ) -> None:
        super().__init__(
            batch_size_grad, batch_size_hess, independent_hessian_batch, seed, val_batch_size
        )
        data_seed = seed if data_seed is None else data_seed
        self.A, self.y = make_logistic_data(n, d, w_scale, label_noise, data_seed, source)
        self.full_batch = full_batch

    @property
    def dim(self) -> int:
        return self.A.shape[1]

    def _indices(self, gen: torch.Generator, b: int) -> Tensor:
        if self.full_batch:
            return torch.arange(self.A.shape[0])
        return torch.randint(0, self.A.shape[0], (b,), generator=gen)

    def _draw(self, gen: torch.Generator, b: int) -> tuple[Tensor, Tensor]:
        idx = self._indices(gen, b)
        return self.A[idx], self.y[idx]

    def step_indices(self, steps: int, rank: int = 0) -> list[tuple[Tensor, Tensor]]:
        """Row indices (ξ_t, ξ'_t) of the first ``steps`` pairs of :meth:`stream` (for fast loops)."""
        out = []
        for step in range(steps):
            gen = step_generator(self.seed, rank, step)
            ig = self._indices(gen, self.batch_size_grad)
            ih = (
                self._indices(gen, self.batch_size_hess) if self.independent_hessian_batch else None
            )
            out.append((ig, ig[: self.batch_size_hess] if ih is None else ih))
        return out

    def _full_data(self) -> tuple[Tensor, Tensor]:
        return self.A, self.y


class SaddleNoiseDataModule(_PairDataModule):
    """Gradient-noise stream for :class:`SaddleFunction`: ξ ~ N(0, noise² I) in ℝ².

    Validation uses ξ = 0, i.e. the exact objective.

    Args:
        noise: standard deviation of the gradient noise.
        batch_size_grad: noise vectors averaged per stochastic gradient.
        batch_size_hess: noise vectors per Hessian sample (the Hessian does not depend on them).
        seed: sampling seed.
    """

    def __init__(
        self,
        noise: float = 0.01,
        batch_size_grad: int = 1,
        batch_size_hess: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size_grad, batch_size_hess, True, seed, None)
        self.noise = noise

    def _draw(self, gen: torch.Generator, b: int) -> tuple[Tensor]:
        return (self.noise * torch.randn(b, 2, generator=gen, dtype=torch.float64),)

    def _full_data(self) -> tuple[Tensor]:
        return (torch.zeros(1, 2, dtype=torch.float64),)
