"""HyperINF influence scores of the training examples, computed at the end of fit or validate.

The callback scores every training example of ``trainer.datamodule`` by its influence on the mean
validation loss (``ops.influence``; ``> 0`` = harmful) with the trainable parameters selected by
``include``/``exclude`` (LoRA ``A``/``B`` and a head by default), for several methods side by side.
It writes ``influence.csv`` (or ``.parquet``) and ``influence_summary.json`` to
``<log_dir>/influence``, logs score statistics, a histogram per method and the top/bottom examples
to the logger, and, if the flipped labels are known (datamodule ``noisy_mask`` or
``noise_index_path``), the detection ROC-AUC, recall at 10%/20% inspected and an image of the
detection curves.

DDP: every rank scores its own shard (``rank::world_size``, no padding), the curvature statistics
are all-reduced, and the scores are gathered on rank 0, which writes the files.

Timing: the ``fit_end`` trigger runs in ``on_train_end``, before Lightning's strategy teardown
moves the model to the CPU (``on_fit_end`` comes after it), so the scores are computed on the
training device. The inputs (``loss_fn``, ``include``/``exclude``, ``noise_index_path``, the
datasets) are checked in ``on_fit_start``/``on_validation_start`` on every rank, before any work.

The LightningModule must provide ``per_sample_loss(batch) -> Tensor[B]`` (or set ``loss_fn``).
The datasets come from the datamodule's ``train_dataset``/``val_dataset`` attributes, or else
from its own train/val dataloaders (dataset + ``collate_fn``, re-read in order, unshuffled).
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from callbacks.hyperinf_report import (
    log_influence,
    noise_metrics,
    warn_non_finite_scores,
    write_table,
)
from callbacks.json_values import strict_json
from callbacks.metrics_file import log_dir_of, skipped_in_fast_dev_run
from modules.eval_mode import eval_mode
from modules.precision import refuse_float64_on_mps
from ops.influence import FLOAT64_METHODS
from ops.influence_config import DampingConfig, GradConfig, LissaConfig, SchulzConfig
from ops.influence_engine import InfluenceEngine, InfluenceResult
from ops.per_sample_grads import per_sample_grads, select_params


class _Indexed(Dataset):
    """Yields ``(position, item)`` for the positions of one shard."""

    def __init__(self, dataset: Dataset, positions: list[int]):
        self.dataset, self.positions = dataset, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return self.positions[i], self.dataset[self.positions[i]]


@contextmanager
def on_device(module: L.LightningModule, device: torch.device) -> Iterator[None]:
    """Run with ``module`` on ``device`` and move it back afterwards (no-op if already there).

    After ``trainer.fit`` the strategy teardown has moved the model to the CPU; without this a
    later :meth:`HyperINFCallback.compute` would silently run there (and NCCL cannot reduce CPU
    tensors).
    """
    before = module.device
    moved = before != device
    if moved:
        module.to(device)
    try:
        yield
    finally:
        if moved:
            module.to(before)


def read_noise_index(path: Path) -> torch.Tensor:
    """Dataset positions of flipped labels from a ``.json`` list, ``.pt`` tensor or text file."""
    if not path.exists():
        raise FileNotFoundError(f"noise_index_path={str(path)!r} does not exist")
    if path.suffix == ".json":
        return torch.tensor(json.loads(path.read_text()), dtype=torch.long)
    if path.suffix == ".pt":
        return (
            torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True))
            .long()
            .flatten()
        )
    return torch.tensor([int(s) for s in path.read_text().split()], dtype=torch.long)


def noise_mask_from_index(index: torch.Tensor, n: int, path: Path) -> torch.Tensor:
    """Boolean mask of length ``n`` from positions; out-of-range positions name the culprit."""
    if index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= n:
            bad = low if low < 0 else high
            raise ValueError(
                f"noise_index_path={str(path)!r}: indices must lie in [0, {n}) (the training "
                f"set size), got {bad}"
            )
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    return mask


def merge_parts(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate the per-rank tables gathered on rank 0.

    The keys are the union over ranks: a rank with an empty shard has no ``sample_id`` (it saw
    no item to read one from), and only such an empty part may lack a column.
    """
    keys = list(dict.fromkeys(k for p in parts for k in p))
    for p in parts:
        missing = [k for k in keys if k not in p]
        if missing and p["index"].numel():
            raise ValueError(
                f"HyperINFCallback: a rank with {p['index'].numel()} examples has no {missing} "
                "column; every rank's dataset items must carry the same keys"
            )
    return {k: torch.cat([p[k] for p in parts if k in p]) for k in keys}


class HyperINFCallback(L.Callback):
    """Influence of every training example on the validation loss (HyperINF + baselines).

    Args:
        methods: methods to run, side by side; the first is primary (its top/bottom examples are
            logged). Any of ``hyperinf``, ``exact_gfim``, ``datainf``, ``lissa``,
            ``lissa_code_faithful``, ``exact_fim``, ``grad_dot``, ``hyperinf_mislabel``,
            ``hyperinf_llm_selection``, ``hyperinf_vlm_selection``; and ``exact_hessian``,
            ``lissa_hessian``: the true-Hessian (Koh & Liang) curvature instead of the Fisher,
            for cross-checks with libraries such as dattri (not HyperINF's GFIM).
        include: substrings of the names of the trainable parameters to use.
        exclude: substrings of parameter names to leave out.
        damping: damping of the curvature (relative DataInf heuristic by default).
        schulz: Schulz iteration settings of ``hyperinf``.
        lissa: LiSSA baseline settings.
        grads: per-sample gradient settings (``vmap``/``loop``, batch size, cache, dtype).
        code_faithful_preset: run ``hyperinf`` with an official preset (``mislabel``,
            ``llm_selection``, ``vlm_selection``: fixed start ``5e-5``, 30/15 iterations).
        run_on: ``fit_end`` (at the end of ``trainer.fit``: ``on_train_end``, before the
            strategy teardown), ``validate`` (after ``trainer.validate``),
            ``fit_end_or_validate`` (both) or ``manual`` (call :meth:`compute`).
        output_dir: where to write the files (default ``<log_dir>/influence``).
        output_format: ``csv`` or ``parquet`` for the score table.
        noise_index_path: file listing the dataset positions of flipped labels (``.json`` list,
            ``.pt`` tensor or one integer per line); default: the datamodule's ``noisy_mask``.
        train_dataset_attr: datamodule attribute holding the training dataset.
        val_dataset_attr: datamodule attribute holding the validation dataset.
        top_k: number of top and bottom examples logged as text.
        loss_fn: import path of ``fn(pl_module, batch) -> Tensor[B]`` used instead of
            ``pl_module.per_sample_loss``, e.g. ``ops.per_sample_grads.causal_lm_per_sample_loss``
            for ``modules.causal_lm.CausalLMModule``.
    """

    def __init__(
        self,
        methods: list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        damping: DampingConfig | None = None,
        schulz: SchulzConfig | None = None,
        lissa: LissaConfig | None = None,
        grads: GradConfig | None = None,
        code_faithful_preset: Literal["mislabel", "llm_selection", "vlm_selection"] | None = None,
        run_on: Literal["fit_end", "validate", "fit_end_or_validate", "manual"] = (
            "fit_end_or_validate"
        ),
        output_dir: str | None = None,
        output_format: Literal["csv", "parquet"] = "csv",
        noise_index_path: str | None = None,
        train_dataset_attr: str = "train_dataset",
        val_dataset_attr: str = "val_dataset",
        top_k: int = 10,
        loss_fn: str | None = None,
    ):
        super().__init__()
        self.methods = list(methods or ["hyperinf", "datainf", "grad_dot"])
        self.include = list(include or ["lora_A", "lora_B"])
        self.exclude = list(exclude or [])
        self.damping, self.schulz = damping or DampingConfig(), schulz or SchulzConfig()
        self.lissa, self.grads = lissa or LissaConfig(), grads or GradConfig()
        self.preset = code_faithful_preset
        if run_on not in ("fit_end", "validate", "fit_end_or_validate", "manual"):
            raise ValueError(f"HyperINFCallback run_on={run_on!r} is not a known trigger")
        if output_format not in ("csv", "parquet"):
            raise ValueError(f"HyperINFCallback output_format={output_format!r}: csv or parquet")
        if top_k < 0:
            raise ValueError(f"HyperINFCallback top_k={top_k} must be >= 0")
        self.run_on, self.output_dir, self.output_format = run_on, output_dir, output_format
        self.noise_index_path = noise_index_path
        self.train_attr, self.val_attr, self.top_k = train_dataset_attr, val_dataset_attr, top_k
        self.loss_fn = loss_fn
        # validate the method names and configs now, not after training
        InfluenceEngine(
            self.methods, self.damping, self.schulz, self.lissa, self.grads, self.preset
        )
        self.result: InfluenceResult | None = None
        self.table: dict[str, torch.Tensor] | None = None
        self.last_output: str | None = None
        self._fit_computed = False

    # -- hooks -----------------------------------------------------------------------------
    def _on_fit(self) -> bool:
        return self.run_on in ("fit_end", "fit_end_or_validate")

    def _on_validate(self, trainer: L.Trainer) -> bool:
        standalone = trainer.state.fn == TrainerFn.VALIDATING  # not fit's validation loops
        return standalone and self.run_on in ("validate", "fit_end_or_validate")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_computed = False
        if self._on_fit():
            # every rank, before any training step
            self.check_gradient_mode(trainer, pl_module, *self.check_inputs(trainer, pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before strategy.teardown() moves the model to the CPU (it runs before on_fit_end)
        if self._on_fit():
            self.compute(trainer, pl_module)
            self._fit_computed = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The fit loop skips on_train_end when there is nothing to train (max_steps=0,
        # limit_train_batches=0, a finished run resumed): score here; compute() moves the
        # model back to the strategy's device.
        if self._on_fit() and not self._fit_computed:
            self.compute(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._on_validate(trainer):
            self.check_gradient_mode(trainer, pl_module, *self.check_inputs(trainer, pl_module))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._on_validate(trainer):
            self.compute(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"methods": self.methods, "last_output": self.last_output}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_output = state_dict.get("last_output")

    # -- work ------------------------------------------------------------------------------
    def _source(self, trainer: L.Trainer, which: str) -> tuple[Dataset, Any]:
        """The ``(dataset, collate_fn)`` of the training or validation split.

        The datamodule attribute ``<which>_dataset_attr`` wins (with ``default_collate``);
        otherwise the dataset and ``collate_fn`` of its own ``<which>_dataloader()`` are reused
        (its sampler is not: every example is scored exactly once, in order).
        """
        dm = trainer.datamodule
        if dm is None:
            raise ValueError("HyperINFCallback needs a LightningDataModule (trainer.datamodule)")
        attr = self.train_attr if which == "train" else self.val_attr
        ds = getattr(dm, attr, None)
        if ds is None:
            dm.setup("fit")
            ds = getattr(dm, attr, None)
        if ds is not None:
            return ds, default_collate
        make = getattr(dm, f"{which}_dataloader", None)
        loader = make() if callable(make) else None
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"HyperINFCallback: {type(dm).__name__} has neither a `{attr}` attribute nor a "
                f"single DataLoader from {which}_dataloader(); set {which}_dataset_attr"
            )
        return loader.dataset, loader.collate_fn

    def _batches(self, trainer: L.Trainer, pl_module: L.LightningModule, source, ids: dict):
        ds, collate = source
        rank, world = trainer.global_rank, trainer.world_size
        positions = list(range(rank, len(ds), world))  # no padding, unlike DistributedSampler

        def collate_indexed(rows: list[tuple[int, Any]]):
            return torch.tensor([r[0] for r in rows]), collate([r[1] for r in rows])

        def iterate():
            loader = DataLoader(
                _Indexed(ds, positions),
                batch_size=self.grads.batch_size,
                shuffle=False,
                collate_fn=collate_indexed,
            )
            for index, item in loader:
                if isinstance(item, dict):
                    if "sample_id" in item:
                        ids.update(zip(index.tolist(), item["sample_id"].tolist(), strict=True))
                    item = {k: t for k, t in item.items() if isinstance(t, torch.Tensor)}
                # As for training batches: under *-true precision the float inputs take the
                # weights' dtype (a float32 batch into a bf16 model failed at the end of fit).
                item = trainer.precision_plugin.convert_input(item)
                yield index, move_data_to_device(item, pl_module.device)

        return iterate

    def check_inputs(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """Raise on a bad strategy, ``loss_fn``, ``include``/``exclude``, dataset or
        ``noise_index_path`` now, on every rank, rather than after training and scoring.

        Returns ``(loss_fn, params, train_source, val_source)`` for :meth:`compute`.
        """
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name:
            raise RuntimeError(
                f"HyperINFCallback does not support {name}: sharded parameters make per-sample "
                "gradients incomplete; use DDP or a single device"
            )
        float64 = [m for m in self.methods if m in FLOAT64_METHODS]
        if self.grads.dtype == "float64":
            float64.append("grads.dtype: float64")
        if float64:
            refuse_float64_on_mps(
                trainer.strategy.root_device, "HyperINFCallback", f"computes {float64}"
            )
        loss_fn = self._loss_fn(pl_module)
        params = select_params(pl_module, self.include, self.exclude)
        train_src, val_src = self._source(trainer, "train"), self._source(trainer, "val")
        for which, (dataset, _) in (("training", train_src), ("validation", val_src)):
            if len(dataset) == 0:
                raise ValueError(f"HyperINFCallback: the {which} set to score against is empty")
        if self.noise_index_path is not None:
            path = Path(self.noise_index_path)
            noise_mask_from_index(read_noise_index(path), len(train_src[0]), path)
        return loss_fn, params, train_src, val_src

    def check_gradient_mode(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss_fn, params, train_src, _
    ) -> None:
        """Per-sample gradients of one training example with ``grads.mode: vmap``, now rather
        than after training: ``torch.func.vmap`` refuses models with data-dependent control
        flow (e.g. GPT-2's pad-token check when a batch has no attention mask)."""
        if self.grads.mode != "vmap":
            return
        ds, collate = train_src
        batch = collate([ds[0]])
        if isinstance(batch, dict):
            batch = {k: t for k, t in batch.items() if isinstance(t, torch.Tensor)}
        batch = move_data_to_device(trainer.precision_plugin.convert_input(batch), pl_module.device)
        with eval_mode(pl_module):
            try:
                per_sample_grads(pl_module, params, loss_fn, batch, mode="vmap")
            except Exception as vmap_error:
                try:  # a vmap limitation only if the one-example-at-a-time path works
                    per_sample_grads(pl_module, params, loss_fn, batch, mode="loop")
                except Exception:
                    raise vmap_error from None
                first_line = str(vmap_error).splitlines()[0] if str(vmap_error) else ""
                raise RuntimeError(
                    f"HyperINFCallback: torch.func.vmap cannot take per-sample gradients of "
                    f"{type(pl_module).__name__} ({type(vmap_error).__name__}: {first_line[:200]}); "
                    "set grads.mode: loop (the same gradients, one example at a time)"
                ) from vmap_error

    def compute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> InfluenceResult:
        """Score the training set now; returns this rank's result (rank 0 also writes files)."""
        loss_fn, params, train_src, val_src = self.check_inputs(trainer, pl_module)

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            if trainer.world_size == 1:
                return t
            return trainer.strategy.reduce(t.clone(), reduce_op="sum")

        engine = InfluenceEngine(
            self.methods,
            self.damping,
            self.schulz,
            self.lissa,
            self.grads,
            self.preset,
            reduce_sum=reduce_sum,
        )
        ids: dict[int, int] = {}
        # eval: no dropout, deterministic per-sample gradients; the strategy's device, also
        # when called after the teardown of fit moved the model to the CPU
        with on_device(pl_module, trainer.strategy.root_device), eval_mode(pl_module):
            result = engine.run(
                pl_module,
                params,
                loss_fn,
                self._batches(trainer, pl_module, train_src, ids),
                self._batches(trainer, pl_module, val_src, {}),
            )
        self.result = result
        table = self._gather(trainer, result, ids)
        try:
            if trainer.is_global_zero:
                self._report(trainer, table, result)
        finally:
            # the other ranks must not wait forever for a rank 0 that failed while reporting
            trainer.strategy.barrier("hyperinf")
        return result

    def _loss_fn(self, pl_module: L.LightningModule):
        if self.loss_fn is not None:
            module_name, _, attr = self.loss_fn.rpartition(".")
            try:
                fn = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError, ValueError) as err:
                raise ValueError(f"HyperINFCallback loss_fn={self.loss_fn!r}: {err}") from err
            return lambda batch: fn(pl_module, batch)
        if not callable(getattr(pl_module, "per_sample_loss", None)):
            raise TypeError(
                f"{type(pl_module).__name__} has no per_sample_loss(batch) -> Tensor[B]; "
                "HyperINFCallback needs it, or set loss_fn (e.g. "
                "ops.per_sample_grads.causal_lm_per_sample_loss)"
            )
        return pl_module.per_sample_loss

    def _gather(self, trainer: L.Trainer, result: InfluenceResult, ids: dict[int, int]):
        local = {"index": result.index, **{f"score_{m}": s for m, s in result.scores.items()}}
        if ids:
            local["sample_id"] = torch.tensor([ids[i] for i in result.index.tolist()])
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            local = merge_parts(parts)
        order = torch.argsort(local["index"])
        return {k: t[order] for k, t in local.items()}

    def _noise_mask(self, trainer: L.Trainer, n: int) -> torch.Tensor | None:
        if self.noise_index_path is not None:
            path = Path(self.noise_index_path)
            return noise_mask_from_index(read_noise_index(path), n, path)
        mask = getattr(trainer.datamodule, "noisy_mask", None)
        return None if mask is None else torch.as_tensor(mask).bool()

    def _report(self, trainer: L.Trainer, table: dict, result: InfluenceResult) -> None:
        # log_dir_of, not trainer.log_dir: that broadcasts from rank 0, which would wait there
        # alone (a hang under DDP) since only rank 0 reports.
        self.table = table
        if not self.output_dir and skipped_in_fast_dev_run(trainer, "the influence report"):
            return
        out = Path(self.output_dir) if self.output_dir else log_dir_of(trainer) / "influence"
        out.mkdir(parents=True, exist_ok=True)
        n_total = result.stats.n if result.stats is not None else table["index"].numel()
        # the scores are on disk before anything else can fail (e.g. the noise file)
        path = write_table(table, out, self.output_format)
        mask = self._noise_mask(trainer, n_total)
        if mask is not None:
            table["is_noisy"] = mask[table["index"]]
            path = write_table(table, out, self.output_format)
        warn_non_finite_scores(table, self.methods)
        metrics = noise_metrics(table, self.methods) if mask is not None else {}
        for m in self.methods:
            metrics[f"influence/{m}/runtime_s"] = result.runtime_s[m]
            if m in result.residuals:
                metrics[f"influence/{m}/schulz_residual_max"] = max(result.residuals[m].values())
        summary = {
            "n_train": n_total,
            "methods": self.methods,
            "lambdas": result.lambdas,
            "residuals": result.residuals,
            "runtime_s": result.runtime_s,
            "metrics": metrics,
            "cached_gradients": result.cached,
            "config": {
                "include": self.include,
                "exclude": self.exclude,
                "damping": asdict(self.damping),
                "schulz": asdict(self.schulz),
                "lissa": asdict(self.lissa),
                "grads": asdict(self.grads),
                "code_faithful_preset": self.preset,
            },
            "table": str(path),
        }
        (out / "influence_summary.json").write_text(strict_json(summary, indent=2))
        self.last_output = str(path)
        if trainer.logger is not None:
            log_influence(trainer, table, self.methods, metrics, self.top_k)
        elif metrics:
            warnings.warn("HyperINFCallback: no logger, metrics only in the summary", stacklevel=2)
