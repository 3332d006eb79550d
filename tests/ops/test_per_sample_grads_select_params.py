"""``select_params``: which parameters influence sees (requires_grad, include/exclude, ndim)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ops.per_sample_grads import select_params


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.body.weight.requires_grad_(False)  # frozen, though its name matches "weight"


def test_frozen_parameters_are_never_selected():
    """A frozen tensor whose name matches ``include`` has no gradient to attribute with."""
    params = select_params(_Net(), ["weight"])
    assert sorted(params) == ["head.weight"]


def test_exclude_drops_matching_names():
    """``exclude`` removes tensors that ``include`` matched (e.g. the head of a LoRA model)."""
    net = _Net()
    assert sorted(select_params(net, ["bias"])) == ["body.bias", "head.bias"]
    assert sorted(select_params(net, ["bias"], exclude=["head"])) == ["body.bias"]
    with pytest.raises(ValueError, match="no trainable parameter"):
        select_params(net, ["head"], exclude=["head"])


def test_three_dimensional_parameter_is_rejected_by_name():
    """Influence works on 1-D/2-D tensors only: a 3-D tensor must be refused up front."""
    net = _Net()
    net.cube = nn.Parameter(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"'cube' has shape \(2, 3, 4\)"):
        select_params(net, ["cube"])
    assert sorted(select_params(net, ["cube", "head"], exclude=["cube"])) == [
        "head.bias",
        "head.weight",
    ]
