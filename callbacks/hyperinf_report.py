"""Writing and logging of influence score tables (used by ``callbacks.hyperinf``)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import torch

from callbacks.direct_logging import lightning_log_step, log_scalars
from ops.influence_metrics import detection_curve, detection_rate, roc_auc

DETECTION_METRICS = ("auc", "detect_at_10", "detect_at_20")


def write_table(table: dict[str, torch.Tensor], out_dir: Path, fmt: str) -> Path:
    """Write the per-example table (``index``, ``sample_id``, ``score_<method>``, ...)."""
    import pandas as pd

    frame = pd.DataFrame({k: t.numpy() for k, t in table.items()})
    path = out_dir / f"influence.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def noise_metrics(table: dict[str, torch.Tensor], methods: list[str]) -> dict[str, float]:
    """ROC-AUC and recall at 10%/20% inspected of "high score = flipped label", per method."""
    mask = table["is_noisy"]
    if mask.all() or not mask.any():
        return {}
    metrics = {}
    for m in methods:
        s = table[f"score_{m}"]
        if not all_finite(s):
            # A ranking with NaNs in it is argsort's order of the NaNs, not a detection result.
            metrics.update({f"influence/{m}/{k}": math.nan for k in DETECTION_METRICS})
            continue
        metrics[f"influence/{m}/auc"] = roc_auc(s, mask)
        metrics[f"influence/{m}/detect_at_10"] = detection_rate(s, mask, 0.1)
        metrics[f"influence/{m}/detect_at_20"] = detection_rate(s, mask, 0.2)
    return metrics


def all_finite(scores: torch.Tensor) -> bool:
    """Whether every score is a number: a method's NaN or infinite scores rank nothing."""
    return bool(torch.isfinite(scores).all())


def warn_non_finite_scores(table: dict[str, torch.Tensor], methods: list[str]) -> None:
    """One warning per method whose scores are not all finite (a diverged preconditioner, e.g.
    LiSSA past its convergence condition, or a model whose loss overflowed)."""
    for m in methods:
        s = table[f"score_{m}"]
        bad = int((~torch.isfinite(s)).sum())
        if bad:
            warnings.warn(
                f"HyperINFCallback: {bad} of {s.numel()} {m} scores are not finite; its "
                "detection metrics are NaN and its histogram shows the finite ones only",
                stacklevel=2,
            )


def detection_curve_figure(table: dict[str, torch.Tensor], methods: list[str]):
    """Matplotlib figure: fraction of flipped labels found vs fraction of examples inspected
    (highest score first), one curve per method, with the random-inspection diagonal."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    mask = table["is_noisy"]
    inspected = torch.arange(1, mask.numel() + 1, dtype=torch.float64) / mask.numel()
    fig = Figure(figsize=(5.0, 4.0))
    ax = fig.add_subplot()
    for m in methods:
        scores = table[f"score_{m}"]
        if all_finite(scores):  # NaNs would rank in argsort's order
            ax.plot(inspected, detection_curve(scores, mask), label=m)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
    ax.set(xlabel="fraction of training set inspected", ylabel="fraction of flipped labels found")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _top_bottom_markdown(table: dict[str, torch.Tensor], method: str, k: int) -> str:
    s = table[f"score_{method}"]
    order = torch.argsort(s, descending=True)
    cols = ["index", *(["sample_id"] if "sample_id" in table else [])]
    cols += ["is_noisy"] if "is_noisy" in table else []

    def rows(sel: torch.Tensor) -> list[str]:
        return [
            "| "
            + " | ".join([*(str(table[c][i].item()) for c in cols), f"{s[i].item():.4g}"])
            + " |"
            for i in sel.tolist()
        ]

    head = "| " + " | ".join([*cols, "score"]) + " |\n|" + "---|" * (len(cols) + 1)
    top = "\n".join([head, *rows(order[:k])])
    bottom = "\n".join([head, *rows(order.flip(0)[:k])])
    return (
        f"**{method}: top {k} (most harmful)**\n\n{top}\n\n"
        f"**{method}: bottom {k} (most helpful)**\n\n{bottom}"
    )


def log_influence(
    trainer: L.Trainer,
    table: dict[str, torch.Tensor],
    methods: list[str],
    metrics: dict[str, float],
    top_k: int,
) -> None:
    """Log score statistics + ``metrics`` as scalars; histograms and top/bottom text if supported."""
    step = lightning_log_step(trainer)  # the last validation's step: the same weights
    scalars = dict(metrics)
    for m in methods:
        s = table[f"score_{m}"].double()
        scalars[f"influence/{m}/score_mean"] = float(s.mean())
        scalars[f"influence/{m}/score_std"] = float(s.std()) if s.numel() > 1 else 0.0
    has_both = "is_noisy" in table and 0 < int(table["is_noisy"].sum()) < len(table["is_noisy"])
    log_scalars(trainer, scalars, step)
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_histogram"):
            for m in methods:
                scores = table[f"score_{m}"]
                finite = scores[torch.isfinite(scores)]  # TensorBoard rejects NaN-only input
                if finite.numel():
                    experiment.add_histogram(f"influence/{m}/scores", finite, step)
            experiment.add_text(
                "influence/top_bottom", _top_bottom_markdown(table, methods[0], top_k), step
            )
        if has_both and hasattr(experiment, "add_figure"):
            figure = detection_curve_figure(table, methods)
            experiment.add_figure("influence/detection_curve", figure, step)
        logger.save()
