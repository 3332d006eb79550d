"""Mislabeled-data detection metrics for influence scores (higher score = more suspicious)."""

from __future__ import annotations

import torch


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC-AUC of ranking ``positive`` examples above the others by ``scores`` (ties count 1/2).

    Computed from average ranks (Mann-Whitney U), so it is exact for tied scores.

    Args:
        scores: ``(n,)`` scores, high means "flagged".
        positive: ``(n,)`` bool mask of the true positives (e.g. flipped labels).
    """
    scores = scores.double().flatten()
    positive = positive.bool().flatten()
    n_pos, n = int(positive.sum()), scores.numel()
    if n_pos == 0 or n_pos == n:
        raise ValueError(f"roc_auc needs both classes, got {n_pos} positives out of {n}")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty(n, dtype=torch.float64)
    # average rank (1-based) of each run of equal scores
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * (n - n_pos)))


def detection_curve(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Fraction of positives found after inspecting the top ``k`` scores, for ``k = 1..n``."""
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    hits = positive.flatten()[order].double().cumsum(0)
    return hits / max(int(positive.sum()), 1)


def detection_rate(scores: torch.Tensor, positive: torch.Tensor, fraction: float) -> float:
    """Recall of positives among the top ``fraction`` of examples by score."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"detection_rate: fraction={fraction} must be in (0, 1]")
    k = max(1, round(fraction * scores.numel()))
    return float(detection_curve(scores, positive)[k - 1])
