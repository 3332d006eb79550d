"""FedAvg aggregation, server optimizers and functional LoRA adapters (spec section 7)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ops.federated import (
    apply_server_update,
    factor_mean,
    fedadam,
    flatten_tensors,
    lora_delta,
    merged_delta_mean,
    normalize_weights,
    weighted_sum,
)
from ops.federated_lora import LoraAdapter


def _factors(seed: int, r: int = 3, d_in: int = 5, d_out: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)


def test_merged_delta_mean_equals_mean_of_merged_models():
    theta = torch.randn(4, 5)
    clients = [_factors(s) for s in range(3)]
    n = [70.0, 141.0, 293.0]
    agg = merged_delta_mean([a for a, _ in clients], [b for _, b in clients], 0.5, n)
    merged = [theta + 0.5 * b @ a for a, b in clients]
    mean_model = sum(w * m for w, m in zip(normalize_weights(n).tolist(), merged, strict=True))
    torch.testing.assert_close(theta + agg, mean_model, atol=1e-6, rtol=0)


def test_identical_clients_aggregate_to_their_delta():
    a, b = _factors(0)
    agg = merged_delta_mean([a, a, a], [b, b, b], 2.0, [1.0, 5.0, 3.0])
    torch.testing.assert_close(agg, lora_delta(a, b, 2.0), atol=1e-6, rtol=0)


def test_weights_normalized_and_zero_weight_ignored():
    w = normalize_weights([2.0, 6.0, 0.0])
    assert torch.allclose(w, torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    u = [torch.ones(3), 3 * torch.ones(3), torch.full((3,), float("nan"))]
    torch.testing.assert_close(weighted_sum(u, [2.0, 6.0, 0.0]), torch.full((3,), 2.5))
    with pytest.raises(ValueError, match=">= 0"):
        normalize_weights([1.0, -1.0])
    with pytest.raises(ValueError, match="sum to"):
        normalize_weights([0.0, 0.0])


def test_factor_mean_equals_merged_mean_with_shared_a_and_differs_otherwise():
    a, _ = _factors(0)
    bs = [_factors(s)[1] for s in (1, 2)]
    a_bar, b_bar = factor_mean([a, a], bs, [1.0, 3.0])
    torch.testing.assert_close(
        lora_delta(a_bar, b_bar, 0.5), merged_delta_mean([a, a], bs, 0.5, [1.0, 3.0])
    )
    # Hand-made 2-client case: A1 = e1, B1 = e1 / A2 = e2, B2 = e2 (rank 1, 2x2).
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])
    products = merged_delta_mean([a1, a2], [b1, b2], 1.0, [1.0, 1.0])
    fa, fb = factor_mean([a1, a2], [b1, b2], [1.0, 1.0])
    torch.testing.assert_close(products, 0.5 * torch.eye(2))
    torch.testing.assert_close(lora_delta(fa, fb, 1.0), torch.full((2, 2), 0.25))


def test_sgd_lr1_on_pseudo_gradient_is_fedavg_bit_for_bit():
    theta = torch.randn(7, 3)
    p = nn.Parameter(theta.clone())
    deltas = [torch.randn(7, 3) for _ in range(3)]
    agg = weighted_sum(deltas, [1.0, 2.0, 3.0])
    apply_server_update([p], [agg], torch.optim.SGD([p], lr=1.0))
    assert torch.equal(p.data, theta - (-agg))


def test_fedadam_first_step_closed_form():
    p = nn.Parameter(torch.zeros(5))
    agg = torch.tensor([1e-3, -2e-2, 0.5, 0.0, -3.0])
    opt = fedadam([p], lr=0.1)
    apply_server_update([p], [agg], opt)
    g = -agg
    # Adam step 1 with bias correction: m_hat = g, v_hat = g^2 -> -lr * g / (|g| + eps).
    torch.testing.assert_close(p.data, -0.1 * g / (g.abs() + 1e-3), atol=1e-7, rtol=1e-6)


class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 6)
        self.down_proj = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.q_proj(x)))


def test_fresh_lora_leaves_outputs_unchanged_and_merge_matches_hooks():
    torch.manual_seed(0)
    model, x = _TwoLinear(), torch.randn(3, 6)
    adapter = LoraAdapter(model, ["q_proj", "down_proj"], rank=2, alpha=1.0)
    factors = adapter.fresh_factors(torch.Generator().manual_seed(1))
    before = model(x)
    with adapter.attached(factors):
        assert torch.equal(model(x), before)  # B = 0
        for k in factors:
            if k.endswith("lora_B"):
                factors[k].data.normal_()
        hooked = model(x)
    assert torch.equal(model(x), before)  # detached again
    adapter.merge_into(model, factors)
    torch.testing.assert_close(model(x), hooked, atol=1e-6, rtol=1e-5)
    bound = 1 / math.sqrt(6)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(factors["q_proj.lora_A"].detach().abs().max()) <= bound


def test_lora_adapter_matches_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model, x = _TwoLinear(), torch.randn(3, 6)
    adapter = LoraAdapter(model, ["q_proj", "down_proj"], rank=2, alpha=4.0)
    factors = adapter.fresh_factors(torch.Generator().manual_seed(1))
    for v in factors.values():
        v.data.normal_()
    with adapter.attached(factors):
        ours = model(x)
    cfg = peft.LoraConfig(r=2, lora_alpha=4.0, target_modules=["q_proj", "down_proj"])
    wrapped = peft.get_peft_model(model, cfg)
    peft.set_peft_model_state_dict(wrapped, adapter.peft_state_dict(factors))
    torch.testing.assert_close(wrapped(x), ours, atol=1e-6, rtol=1e-5)


def test_lora_targets_error_names_available_layers():
    with pytest.raises(ValueError, match="down_proj"):
        LoraAdapter(_TwoLinear(), ["v_proj"])


def test_lora_targets_name_conv1d_layers_and_warn_on_names_that_match_nothing():
    import pytest

    from modules.hf_models import build_causal_lm
    from ops.federated_lora import DEFAULT_TARGETS, find_lora_targets

    gpt2 = build_causal_lm("tiny-gpt2", vocab_size=64)
    conv1d = r"projections \['c_attn', 'c_fc', 'c_proj'\] are GPT-2-style Conv1D"
    with pytest.raises(ValueError, match=conv1d):
        find_lora_targets(gpt2, ["c_attn", "c_proj"])
    with pytest.raises(ValueError, match=conv1d):  # also with the default (Llama) names
        find_lora_targets(gpt2, DEFAULT_TARGETS)
    llama = build_causal_lm("micro-llama", vocab_size=64)
    # Phi-3 style names next to Llama ones: the fused projections do not exist here
    with pytest.warns(UserWarning, match=r"\['qkv_proj'\] match no nn.Linear"):
        targets = find_lora_targets(llama, ["qkv_proj", "o_proj"])
    assert targets and all(name.endswith("o_proj") for name in targets)


def test_flatten_into_a_preallocated_buffer_equals_concatenation():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2).double()]
    concatenated = flatten_tensors(tensors)
    assert torch.equal(flatten_tensors(iter(tensors), numel=25), concatenated)
    with pytest.raises(ValueError, match="more than numel=24"):
        flatten_tensors(tensors, numel=24)
    with pytest.raises(ValueError, match="25 entries, not numel=26"):
        flatten_tensors(tensors, numel=26)
