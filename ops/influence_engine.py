"""Influence engine: gradient passes, curvature, preconditioning and scores (spec 3.6).

Passes over the data (no Lightning involved; ``reduce_sum`` makes it data-parallel):

1. validation: ``v_l = (1/m) sum_j g_jl``;
2. training: ``G_l = (1/n) sum_i g_il^T g_il``, ``S_l = sum_i mean(g_il^2)``, ``n`` (plus the dense
   flattened Fisher only if ``lissa``/``exact_fim`` are requested, or for ``exact_fim`` alone on
   a tensor with ``r d > grads.fim_max_dim`` the gathered ``n x r d`` gradient matrix of its
   Woodbury solve, and the Hessian blocks of the mean training loss only if
   ``exact_hessian``/``lissa_hessian`` are); oriented gradients are cached on CPU while they fit
   the budget;
3. (``datainf`` only) training again for ``sum_i (v - c_i g_i)``, which needs ``lambda_l`` first;
4. scores ``IF_i = - sum_l <h_l, g_il>`` from the cache, or from recomputed gradients (streaming).

Streaming memory: ``sum_l (d_l^2 + 2 r_l d_l)`` floats per method plus one gradient batch,
independent of the number of training examples ``n``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ops.influence import (
    METHODS,
    datainf_terms,
    influence_scores,
    orient_grad,
    precondition_exact_fim,
    precondition_exact_gfim,
    precondition_exact_hessian,
    precondition_grad_dot,
    precondition_hyperinf,
    precondition_lissa,
    precondition_lissa_code_faithful,
    relative_damping,
)
from ops.influence_config import (
    CODE_FAITHFUL_PRESETS,
    DampingConfig,
    GradConfig,
    LissaConfig,
    SchulzConfig,
)
from ops.per_sample_grads import loss_hessian_blocks, per_sample_grads

Batches = Callable[[], Iterable[tuple[torch.Tensor, Any]]]
"""A callable returning a fresh iterator of ``(dataset_index LongTensor[B], batch)``."""

PRESET_METHODS = tuple(f"hyperinf_{p}" for p in CODE_FAITHFUL_PRESETS)


@dataclass
class InfluenceStats:
    """Reduced statistics of the gradient passes (all ranks summed)."""

    v: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    lambdas: dict[str, float]
    n: int
    m: int
    F: dict[str, torch.Tensor] = field(default_factory=dict)
    H: dict[str, torch.Tensor] = field(default_factory=dict)
    # ``exact_fim`` tensors too large for a dense Fisher: the (n, r d) training-gradient matrix,
    # rows in dataset order, gathered from all ranks (solved by Woodbury, spec 3.5).
    grad_rows: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class InfluenceResult:
    """Scores of this process's training examples.

    Attributes:
        index: ``(n_local,)`` dataset indices.
        scores: method -> ``(n_local,)`` scores, aligned with ``index`` (``> 0`` = harmful).
        lambdas: tensor name -> damping ``lambda_l``.
        residuals: method -> tensor name -> final Schulz residual (Schulz methods only).
        runtime_s: method -> seconds (shared gradient passes included).
        cached: whether the score pass reused cached gradients.
        stats: the reduced statistics (for diagnostics and side-by-side experiments).
    """

    index: torch.Tensor
    scores: dict[str, torch.Tensor]
    lambdas: dict[str, float]
    residuals: dict[str, dict[str, float]]
    runtime_s: dict[str, float]
    cached: bool
    stats: InfluenceStats | None = None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def check_damping(damping: DampingConfig) -> None:
    """Reject damping values that make the curvature singular or indefinite (NaN or garbage
    scores, or a Schulz divergence far from the cause), naming the offending key."""
    if damping.mode not in ("relative", "fixed"):
        raise ValueError(f"damping.mode={damping.mode!r}: expected 'relative' or 'fixed'")
    if not (math.isfinite(damping.lambda_const) and damping.lambda_const > 0):
        raise ValueError(
            f"damping.lambda_const={damping.lambda_const!r} must be a finite number > 0 "
            "(lambda_l = mean(g^2) / lambda_const; 10 in the official code)"
        )
    if damping.mode == "fixed":
        if damping.value is None:
            raise ValueError("damping.mode='fixed' needs damping.value (a number > 0)")
        if not (math.isfinite(damping.value) and damping.value > 0):
            raise ValueError(
                f"damping.value={damping.value!r} must be a finite number > 0: the damped "
                "curvature must be positive definite"
            )
    if not (math.isfinite(damping.extra) and damping.extra >= 0):
        raise ValueError(f"damping.extra={damping.extra!r} must be a finite number >= 0")


class InfluenceEngine:
    """Computes influence scores of training examples on a validation set for several methods.

    Args:
        methods: any of ``ops.influence.METHODS`` plus ``hyperinf_<preset>`` for a code-faithful
            preset (``mislabel``, ``llm_selection``, ``vlm_selection``).
        damping: :class:`DampingConfig`.
        schulz: :class:`SchulzConfig` of ``hyperinf``.
        lissa: :class:`LissaConfig`.
        grads: :class:`GradConfig`.
        code_faithful_preset: run ``hyperinf`` itself with this preset.
        reduce_sum: all-reduce (sum) for data-parallel runs; identity on one process.
    """

    def __init__(
        self,
        methods: Iterable[str] = ("hyperinf", "datainf", "grad_dot"),
        damping: DampingConfig | None = None,
        schulz: SchulzConfig | None = None,
        lissa: LissaConfig | None = None,
        grads: GradConfig | None = None,
        code_faithful_preset: str | None = None,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.methods = list(methods)
        for m in self.methods:
            if m not in METHODS and m not in PRESET_METHODS:
                raise ValueError(
                    f"unknown influence method {m!r}; expected one of "
                    f"{list(METHODS) + list(PRESET_METHODS)}"
                )
        if not self.methods:
            raise ValueError("influence: methods must not be empty")
        if code_faithful_preset is not None and code_faithful_preset not in CODE_FAITHFUL_PRESETS:
            raise ValueError(
                f"code_faithful_preset={code_faithful_preset!r}: expected one of "
                f"{list(CODE_FAITHFUL_PRESETS)} or null"
            )
        self.damping = damping or DampingConfig()
        check_damping(self.damping)
        if code_faithful_preset is not None and self.damping.extra != 0.0:
            warnings.warn(
                f"code_faithful_preset={code_faithful_preset!r} replaces damping.extra="
                f"{self.damping.extra:g} by the preset's "
                f"{CODE_FAITHFUL_PRESETS[code_faithful_preset]['extra']:g} for hyperinf and "
                "exact_gfim",
                stacklevel=2,
            )
        self.schulz = schulz or SchulzConfig()
        self.lissa = lissa or LissaConfig()
        self.grads = grads or GradConfig()
        self.preset = code_faithful_preset
        self.reduce_sum = reduce_sum or _identity
        self.dtype = getattr(torch, self.grads.dtype)

    # -- passes ----------------------------------------------------------------------------
    def _grad_batches(
        self, module, params, loss_fn, batches: Batches, hessian: bool = False
    ) -> Iterator:
        """Yield ``(index, oriented grads)``, plus the batch's Hessian blocks if ``hessian``."""
        for index, batch in batches():
            g = per_sample_grads(module, params, loss_fn, batch, mode=self.grads.mode)
            g = {n: t.to(self.dtype) for n, t in g.items()}
            if hessian:
                H = loss_hessian_blocks(module, params, loss_fn, batch)
                yield index, g, {n: t.to(self.dtype) for n, t in H.items()}
            else:
                yield index, g

    def run(
        self,
        module: nn.Module,
        params: dict[str, nn.Parameter],
        loss_fn: Callable[[Any], torch.Tensor],
        train_batches: Batches,
        val_batches: Batches,
    ) -> InfluenceResult:
        """Run all passes and return this process's scores (see module docstring)."""
        with torch.inference_mode(False), torch.enable_grad():
            return self._run(module, params, loss_fn, train_batches, val_batches)

    def _run(self, module, params, loss_fn, train_batches, val_batches) -> InfluenceResult:
        t0 = time.perf_counter()
        grads_of = lambda b: self._grad_batches(module, params, loss_fn, b)  # noqa: E731

        device = next(iter(params.values())).device  # NCCL reduces only device tensors
        # zero accumulators from the oriented shapes, so a rank with an empty shard still reduces
        zeros = {
            n: torch.zeros(orient_grad(n, p).shape, dtype=self.dtype, device=p.device)
            for n, p in params.items()
        }

        # pass 1: mean validation gradient
        v_sum = {n: z.clone() for n, z in zeros.items()}
        m = 0
        for _, g in grads_of(val_batches):
            for n, t in g.items():
                v_sum[n] += t.sum(0)
            m += next(iter(g.values())).shape[0]
        m_total = int(self.reduce_sum(torch.tensor(float(m), device=device)))
        if m_total == 0:
            raise ValueError("influence: the validation set is empty")
        v = {n: self.reduce_sum(t) / m_total for n, t in v_sum.items()}

        # pass 2: curvature statistics (+ gradient cache)
        need_lissa_F = any(x in self.methods for x in ("lissa", "lissa_code_faithful"))
        need_F = need_lissa_F or "exact_fim" in self.methods
        need_H = any(x in self.methods for x in ("lissa_hessian", "exact_hessian"))
        # exact_fim alone on a tensor too large for a dense Fisher keeps its gradient rows
        # instead and solves by Woodbury; that needs n < r d, enforced by the same budget.
        # (a list in parameter order: every rank must reduce the tensors in the same order, and a
        # set's string order differs between processes)
        woodbury = [
            n
            for n, z in zeros.items()
            if need_F and not need_lissa_F and z.numel() > self.grads.fim_max_dim
        ]
        G_sum = {n: z.new_zeros(z.shape[1], z.shape[1]) for n, z in zeros.items()}
        S_sum = {n: z.new_zeros(()) for n, z in zeros.items()}
        F_sum: dict[str, torch.Tensor] = {}
        H_sum: dict[str, torch.Tensor] = {}
        rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in woodbury}
        over_budget: set[str] = set()
        for flag, acc in ((need_F, F_sum), (need_H, H_sum)):
            if not flag:
                continue
            for n, z in zeros.items():
                if acc is F_sum and n in woodbury:
                    continue
                if z.numel() > self.grads.fim_max_dim:
                    raise ValueError(
                        f"tensor {n!r}: flattened size {z.numel()} > grads.fim_max_dim="
                        f"{self.grads.fim_max_dim}; lissa (and the _hessian methods) need a "
                        "dense (r d) x (r d) curvature"
                    )
                acc[n] = z.new_zeros(z.numel(), z.numel())
        cache: list | None = [] if self.grads.cache in ("auto", "always") else None
        cache_bytes, n_local = 0, 0
        for index, g, *hess in self._grad_batches(
            module, params, loss_fn, train_batches, hessian=need_H
        ):
            for n, t in g.items():
                G_sum[n] += torch.einsum("bri,brj->ij", t, t)
                S_sum[n] += t.pow(2).flatten(1).mean(1).sum()
                if n in rows:
                    # Past the budget on this rank means past it overall: stop keeping rows,
                    # but raise only after the reduce below, on every rank at once.
                    if n not in over_budget:
                        rows[n].append((index, t.flatten(1).cpu()))
                        if self._rows_over_budget(rows[n]):
                            over_budget.add(n)
                elif need_F:
                    flat = t.flatten(1)
                    F_sum[n] += flat.T @ flat
                if need_H:
                    H_sum[n] += hess[0][n]
            n_local += index.numel()
            if cache is not None:
                cache_bytes += sum(t.numel() * t.element_size() for t in g.values())
                if self.grads.cache == "auto" and cache_bytes > self.grads.cache_limit_bytes:
                    cache = None  # over budget: stream (recompute in the score pass)
                else:
                    cache.append((index, {n: t.cpu() for n, t in g.items()}))
        n_total = int(self.reduce_sum(torch.tensor(float(n_local), device=device)))
        if n_total == 0:
            raise ValueError("influence: the training set is empty")
        G = {n: self.reduce_sum(t) / n_total for n, t in G_sum.items()}
        F = {n: self.reduce_sum(t) / n_total for n, t in F_sum.items()}
        H = {n: self.reduce_sum(t) / n_total for n, t in H_sum.items()}  # of the mean loss
        if self.damping.mode == "relative":
            lambdas = {
                n: relative_damping(self.reduce_sum(t), n_total, self.damping.lambda_const)
                for n, t in S_sum.items()
            }
        else:
            lambdas = {n: float(self.damping.value) for n in G}
        for n in woodbury:  # the same decision on every rank: it depends on n_total only
            self._check_woodbury_budget(n, n_total, zeros[n].numel())
        grad_rows = {
            n: self._gather_rows(n, r, n_total, zeros[n]).to(device) for n, r in rows.items()
        }
        stats = InfluenceStats(
            v=v, G=G, lambdas=lambdas, n=n_total, m=m_total, F=F, H=H, grad_rows=grad_rows
        )
        t_shared = time.perf_counter() - t0

        def train_grads() -> Iterable:
            return cache if cache is not None else grads_of(train_batches)

        # preconditioning per method
        h: dict[str, dict[str, torch.Tensor]] = {}
        residuals: dict[str, dict[str, float]] = {}
        runtime: dict[str, float] = {}
        # A tensor whose gradients are all zero (e.g. LoRA A while B is still zero at init) has
        # G = 0 and lambda = 0: it contributes nothing to any score, so it is left out.
        dead = [n for n in v if lambdas[n] == 0.0 and float(G[n].abs().max()) == 0.0]
        if dead:
            warnings.warn(
                f"influence: zero gradients for {dead}; they do not contribute", stacklevel=3
            )
        live = InfluenceStats(
            v={n: t for n, t in v.items() if n not in dead},
            G={n: t for n, t in G.items() if n not in dead},
            lambdas={n: x for n, x in lambdas.items() if n not in dead},
            n=n_total,
            m=m_total,
            F={n: t for n, t in F.items() if n not in dead},
            H={n: t for n, t in H.items() if n not in dead},
            grad_rows={n: t for n, t in grad_rows.items() if n not in dead},
        )
        for method in self.methods:
            t1 = time.perf_counter()
            h[method], res = self._precondition(method, live, train_grads)
            h[method].update({n: torch.zeros_like(v[n]) for n in dead})
            if res:
                residuals[method] = res
            runtime[method] = t_shared + time.perf_counter() - t1

        # final pass: scores
        t2 = time.perf_counter()
        idx, out = [], {mth: [] for mth in self.methods}
        for index, g in train_grads():
            idx.append(index.cpu())
            for method in self.methods:
                g_dev = {n: t.to(h[method][n].device) for n, t in g.items()}
                out[method].append(influence_scores(h[method], g_dev).cpu())
        t_score = time.perf_counter() - t2
        runtime = {k: t + t_score / len(self.methods) for k, t in runtime.items()}
        return InfluenceResult(
            index=torch.cat(idx) if idx else torch.empty(0, dtype=torch.long),
            scores={k: torch.cat(s) if s else torch.empty(0) for k, s in out.items()},
            lambdas=lambdas,
            residuals=residuals,
            runtime_s=runtime,
            cached=cache is not None,
            stats=stats,
        )

    def _rows_over_budget(self, rows: list) -> bool:
        n_rows = sum(index.numel() for index, _ in rows)
        return n_rows * rows[0][1].shape[1] > self.grads.fim_max_dim**2

    def _check_woodbury_budget(self, name: str, n_total: int, width: int) -> None:
        if n_total * width > self.grads.fim_max_dim**2:
            raise ValueError(
                f"tensor {name!r}: exact_fim's Woodbury form needs the ({n_total}, {width}) "
                f"training-gradient matrix, more than the grads.fim_max_dim**2 = "
                f"{self.grads.fim_max_dim**2} values a dense Fisher may use; raise "
                "grads.fim_max_dim or restrict the tensors (include/exclude)"
            )

    def _gather_rows(self, name: str, rows: list, n_total: int, zero: torch.Tensor) -> torch.Tensor:
        """All ranks' gradient rows of one tensor, row i = dataset index i, via ``reduce_sum``
        (each rank fills its own rows of a zero matrix; shards are disjoint)."""
        full = zero.new_zeros(n_total, zero.numel())
        count = zero.new_zeros(n_total)
        for index, flat in rows:
            index = index.to(full.device)
            inside = (index >= 0) & (index < n_total)  # the rest shows as missing rows below
            full[index[inside]] = flat[inside.cpu()].to(full)
            count.index_add_(0, index[inside], torch.ones_like(count[: int(inside.sum())]))
        full, count = self.reduce_sum(full), self.reduce_sum(count)
        if not bool((count == 1).all()):  # decided after the reduce: every rank raises alike
            raise ValueError(
                f"tensor {name!r}: exact_fim's Woodbury form places the training-gradient rows "
                f"by dataset index, and needs every index in [0, {n_total}) exactly once across "
                "ranks"
            )
        return full

    # -- methods ---------------------------------------------------------------------------
    def extra_damping(self) -> float:
        """``delta`` of ``hyperinf`` and of its exact target ``exact_gfim``: the preset's value
        when ``hyperinf`` runs with a code-faithful preset, else ``damping.extra``. Sharing it
        keeps the ``hyperinf`` vs ``exact_gfim`` comparison about the Schulz error alone."""
        if self.preset is not None:
            return float(CODE_FAITHFUL_PRESETS[self.preset]["extra"])
        return self.damping.extra

    def _precondition(self, method: str, stats: InfluenceStats, train_grads):
        v, G, lam = stats.v, stats.G, stats.lambdas
        delta = self.extra_damping()
        if method == "hyperinf" or method in PRESET_METHODS:
            preset = self.preset if method == "hyperinf" else method[len("hyperinf_") :]
            cfg = dataclasses.asdict(self.schulz)
            if preset is not None:
                p = CODE_FAITHFUL_PRESETS[preset]
                delta = p["extra"]
                cfg.update(init=p["init"], max_iter=p["max_iter"], early_stop=False)
                faithful = True
            else:
                faithful = False
            out, res = {}, {}
            for n in v:
                out[n], info = precondition_hyperinf(
                    v[n], G[n], lam[n] + delta, raise_on_divergence=not faithful, **cfg
                )
                res[n] = info.residual
            return out, res
        if method == "exact_gfim":
            return {n: precondition_exact_gfim(v[n], G[n], lam[n] + delta) for n in v}, {}
        if method == "grad_dot":
            return {n: precondition_grad_dot(v[n]) for n in v}, {}
        if method == "lissa":
            return {
                n: precondition_lissa(v[n], stats.F[n], lam[n], self.lissa.iters, self.lissa.scale)
                for n in v
            }, {}
        if method == "lissa_code_faithful":
            return {
                n: precondition_lissa_code_faithful(
                    v[n], stats.F[n], lam[n], self.lissa.code_faithful_iters
                )
                for n in v
            }, {}
        if method == "exact_fim":
            return {
                n: precondition_exact_fim(v[n], lam[n], F=stats.F[n])
                if n in stats.F
                else precondition_exact_fim(v[n], lam[n], grads=stats.grad_rows[n])
                for n in v
            }, {}
        if method == "exact_hessian":
            return {n: precondition_exact_hessian(v[n], stats.H[n], lam[n]) for n in v}, {}
        if method == "lissa_hessian":
            return {
                n: precondition_lissa(v[n], stats.H[n], lam[n], self.lissa.iters, self.lissa.scale)
                for n in v
            }, {}
        if method == "datainf":
            acc = {n: torch.zeros_like(t) for n, t in v.items()}
            for _, g in train_grads():
                for n, t in g.items():
                    if n not in acc:
                        continue
                    acc[n] += datainf_terms(v[n].to(t.device), t, lam[n]).to(acc[n].device)
            return {n: self.reduce_sum(acc[n]) / (stats.n * lam[n]) for n in v}, {}
        raise ValueError(f"unknown influence method {method!r}")
