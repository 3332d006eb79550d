"""``LoraAdapter`` details the peft comparison does not reach: the rank check, dropout only
in training mode, the factor check on attach, ``merged_numel`` and snapshot semantics of
``peft_state_dict``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ops.federated_lora import LoraAdapter


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(3, 5)
        self.down_proj = nn.Linear(5, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.q_proj(x))


def _factors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    factors = adapter.fresh_factors(torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    for v in factors.values():
        v.data.copy_(torch.randn(v.shape, generator=gen))
    return factors


def test_rank_zero_is_refused():
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        LoraAdapter(_Net(), ["q_proj"], rank=0)


def test_dropout_applies_in_training_mode_only():
    """With dropout p = 1 the adapter input is all zeros while training, so only W x remains;
    in eval mode dropout is off and the output is W x + (alpha / r) B A x, by hand."""
    net = _Net()
    adapter = LoraAdapter(net, ["q_proj"], rank=2, alpha=3.0, dropout=1.0)
    factors = _factors(adapter)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    a, b = factors["q_proj.lora_A"].detach(), factors["q_proj.lora_B"].detach()
    with torch.no_grad():
        base_q = net.q_proj(x)
        expected_eval = net.down_proj(base_q + 1.5 * x @ a.T @ b.T)
        base = net(x)
        with adapter.attached(factors):
            net.train()
            trained = net(x)
            net.eval()
            evaluated = net(x)
    torch.testing.assert_close(trained, base)
    torch.testing.assert_close(evaluated, expected_eval)


def test_attaching_incomplete_factors_is_refused():
    adapter = LoraAdapter(_Net(), ["q_proj", "down_proj"], rank=2)
    factors = _factors(adapter)
    del factors["down_proj.lora_B"]
    with (
        pytest.raises(KeyError, match=r"missing for \['down_proj\.lora_B'\]"),
        adapter.attached(factors),
    ):
        pass


def test_merged_numel_is_the_size_of_the_target_weights():
    """q_proj 5 x 3 and down_proj 2 x 5: 15 + 10 entries, as many as the merged deltas hold."""
    adapter = LoraAdapter(_Net(), ["q_proj", "down_proj"], rank=2)
    assert adapter.merged_numel() == 25
    assert sum(d.numel() for d in adapter.merged_deltas(_factors(adapter)).values()) == 25


def test_peft_state_dict_is_a_snapshot():
    """The exported factors must not follow later training steps of the live factors."""
    adapter = LoraAdapter(_Net(), ["q_proj"], rank=2)
    factors = _factors(adapter)
    exported = adapter.peft_state_dict(factors)
    before = {k: v.clone() for k, v in exported.items()}
    with torch.no_grad():
        for v in factors.values():
            v.add_(1.0)
    assert sorted(exported) == [
        "base_model.model.q_proj.lora_A.weight",
        "base_model.model.q_proj.lora_B.weight",
    ]
    for k, v in exported.items():
        assert torch.equal(v, before[k]), k
