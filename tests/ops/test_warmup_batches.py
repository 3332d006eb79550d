"""Batch plumbing of the noise-scale probe (ops/warmup_batches.py)."""

from __future__ import annotations

import pytest
import torch

from ops.warmup_batches import batch_size, flat_grad, split_halves, to_cpu


def test_split_halves_of_nested_batches() -> None:
    batch = {
        "input_ids": torch.arange(10).view(5, 2),
        "meta": "x",
        "pair": (torch.ones(5), [torch.zeros(5, 3)]),
    }
    assert batch_size(batch) == 5
    a, b = split_halves(batch)
    assert a["input_ids"].tolist() == [[0, 1], [2, 3]] and b["input_ids"].tolist() == [
        [4, 5],
        [6, 7],
    ]
    assert a["meta"] == "x" and a["pair"][1][0].shape == (2, 3)  # odd last sample dropped
    x, y = split_halves((torch.arange(4), torch.arange(4) * 2))
    assert x[1].tolist() == [0, 2] and y[0].tolist() == [2, 3]
    with pytest.raises(TypeError, match="batch dimension"):
        batch_size({"a": "text"})


def test_flat_grad_fills_unused_params_with_zeros() -> None:
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    g = flat_grad((used * torch.tensor([1.0, 2.0, 3.0])).sum(), [used, unused])
    assert g.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    assert used.grad is None  # .grad is untouched: training's accumulation is not disturbed
    assert to_cpu({"a": [torch.ones(1)]})["a"][0].device.type == "cpu"
