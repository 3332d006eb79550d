"""Pin the layer-parallelism math: plans, all-reduce counts, norm folding, fusion, Block Influence."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from ops.layer_parallel import (
    LayerParallelPlan,
    admissible_ranges,
    block_influence,
    count_allreduces,
    fold_norm_into_linear,
    fuse_attention,
    fuse_mlp,
    ideal_speedup,
    lowest_influence_layers,
    post_norm_gains,
    rms_normalize,
)


def test_range_plan_pairs_and_depth():
    plan = LayerParallelPlan.from_range(2, 6)
    assert plan.pairs == ((2, 3), (4, 5))
    assert plan.delta == 4
    assert plan.layers == (2, 3, 4, 5)
    assert plan.effective_depth(8) == 6  # L - Delta / 2
    assert LayerParallelPlan().effective_depth(8) == 8


@pytest.mark.parametrize(
    ("start", "end", "match"),
    [(2, 5, "odd length"), (-1, 1, ">= 0"), (4, 2, "is empty"), (2, 2, "is empty")],
)
def test_invalid_ranges_raise(start, end, match):
    with pytest.raises(ValueError, match=match):
        LayerParallelPlan.from_range(start, end)


def test_invalid_pairs_raise():
    with pytest.raises(ValueError, match="consecutive"):
        LayerParallelPlan(((2, 4),))
    with pytest.raises(ValueError, match="overlaps"):
        LayerParallelPlan(((2, 3), (3, 4)))
    with pytest.raises(ValueError, match="out of range"):
        LayerParallelPlan.from_range(6, 10).validate(8)
    with pytest.raises(ValueError, match="out of range"):  # j == L: the first invalid index
        LayerParallelPlan(((7, 8),)).validate(8)
    with pytest.raises(ValueError, match="keys 'start' and 'end'"):
        LayerParallelPlan.parse({"start": 2, "stop": 4})


def test_parse_forms_agree():
    expected = LayerParallelPlan(((2, 3), (4, 5)))
    assert LayerParallelPlan.parse({"start": 2, "end": 6}) == expected
    assert LayerParallelPlan.parse([[4, 5], [2, 3]]) == expected  # sorted
    assert LayerParallelPlan.parse([{"start": 2, "end": 4}, {"start": 4, "end": 6}]) == expected
    assert LayerParallelPlan.parse(None) == LayerParallelPlan.parse([]) == LayerParallelPlan()
    assert expected.to_list() == [[2, 3], [4, 5]]


def test_first_and_last_layer_warn():
    with pytest.warns(UserWarning, match="layer 0"):
        LayerParallelPlan.from_range(0, 2).validate(8)
    with pytest.warns(UserWarning, match="last layer"):
        LayerParallelPlan.from_range(6, 8).validate(8)


def test_count_allreduces_and_ideal_speedup():
    assert count_allreduces(LayerParallelPlan(), 16) == 32
    assert count_allreduces(LayerParallelPlan.from_range(4, 12), 16) == 2 * 16 - 8
    assert ideal_speedup(16, 8) == pytest.approx(16 / 12)


def test_fold_rmsnorm_into_linear():
    torch.manual_seed(0)
    # float64: the identity is exact; fp32 rounding of ~10-sized logits alone is ~1e-6.
    dt = torch.float64
    x, w, b = torch.randn(5, 16, dtype=dt), torch.randn(7, 16, dtype=dt), torch.randn(7, dtype=dt)
    g = torch.rand(16, dtype=dt) + 0.5
    eps = 1e-6
    expected = F.linear(g * rms_normalize(x, eps), w, b)
    wf, bf = fold_norm_into_linear(w, b, g)
    torch.testing.assert_close(F.linear(rms_normalize(x, eps), wf, bf), expected, atol=1e-6, rtol=0)


def test_fold_layernorm_with_bias_into_linear():
    torch.manual_seed(1)
    dt = torch.float64
    x, w, b = torch.randn(5, 16, dtype=dt), torch.randn(7, 16, dtype=dt), torch.randn(7, dtype=dt)
    ln = torch.nn.LayerNorm(16, dtype=dt)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    expected = F.linear(ln(x), w, b)
    n = F.layer_norm(x, (16,), eps=ln.eps)
    wf, bf = fold_norm_into_linear(w, b, ln.weight, ln.bias)
    torch.testing.assert_close(F.linear(n, wf, bf), expected, atol=1e-6, rtol=0)
    wf, bf = fold_norm_into_linear(w, None, ln.weight, ln.bias)  # no linear bias: the shift alone
    torch.testing.assert_close(F.linear(n, wf, bf), F.linear(ln(x), w), atol=1e-6, rtol=0)


def test_post_norm_gains_modes():
    gi, gj = torch.full((4,), 2.0), torch.full((4,), 4.0)
    a, b = post_norm_gains(gi, gj, 6, "per_member")
    assert torch.equal(a, gi.expand(6, 4)) and torch.equal(b, gj.expand(6, 4))
    a, b = post_norm_gains(gi, gj, 6, "averaged")
    assert torch.equal(a, torch.full((6, 4), 3.0)) and torch.equal(a, b)
    a, b = post_norm_gains(gi, gj, 6, "rank_mixed")
    assert torch.equal(a[:3], gi.expand(3, 4)) and torch.equal(a[3:], gj.expand(3, 4))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="post_norm_mode"):
        post_norm_gains(gi, gj, 6, "mixed")


def _member(d: int, heads: int, kv: int, hd: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {
        "q": r(heads * hd, d),
        "k": r(kv * hd, d),
        "v": r(kv * hd, d),
        "o": r(d, heads * hd),
        "q_bias": r(heads * hd),
        "o_bias": r(d),
        "gain": r(d).abs() + 0.5,
    }


def test_fuse_attention_is_member_major_and_sums_outputs():
    d, heads, kv, hd = 16, 4, 2, 4
    mi, mj = _member(d, heads, kv, hd, 0), _member(d, heads, kv, hd, 1)
    fused = fuse_attention(mi, mj)
    u = torch.randn(3, d)
    q, k, v = F.linear(u, fused["qkv"], fused["qkv_bias"]).split(
        [2 * heads * hd, 2 * kv * hd, 2 * kv * hd], dim=-1
    )
    for m, sl_q, sl_kv in ((mi, slice(0, heads * hd), slice(0, kv * hd)),
                           (mj, slice(heads * hd, None), slice(kv * hd, None))):  # fmt: skip
        torch.testing.assert_close(q[:, sl_q], F.linear(m["gain"] * u, m["q"], m["q_bias"]))
        torch.testing.assert_close(k[:, sl_kv], F.linear(m["gain"] * u, m["k"]))
        torch.testing.assert_close(v[:, sl_kv], F.linear(m["gain"] * u, m["v"]))
    a = torch.randn(3, 2 * heads * hd)
    expected = F.linear(a[:, : heads * hd], mi["o"], mi["o_bias"]) + F.linear(
        a[:, heads * hd :], mj["o"], mj["o_bias"]
    )
    torch.testing.assert_close(F.linear(a, fused["o"], fused["o_bias"]), expected)


def test_fuse_mlp_equals_sum_of_mlps():
    torch.manual_seed(2)
    d, inter = 16, 12
    members = [
        {"gate": torch.randn(inter, d), "up": torch.randn(inter, d), "down": torch.randn(d, inter),
         "gain": torch.rand(d) + 0.5}
        for _ in range(2)
    ]  # fmt: skip
    fused = fuse_mlp(*members)
    u = torch.randn(5, d)
    gate, up = F.linear(u, fused["gate_up"]).chunk(2, dim=-1)
    got = F.linear(F.silu(gate) * up, fused["down"])
    expected = sum(
        F.linear(F.silu(F.linear(m["gain"] * u, m["gate"])) * F.linear(m["gain"] * u, m["up"]),
                 m["down"])
        for m in members
    )  # fmt: skip
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert fused["gate_up_bias"] is None and fused["down_bias"] is None


def test_block_influence():
    x = torch.randn(2, 5, 8)
    assert block_influence(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert block_influence(x, -x).item() == pytest.approx(2.0, abs=1e-6)
    y = x.clone()
    y[:, 0] = -x[:, 0]
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 1:] = True
    assert block_influence(x, y, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_plan_helpers():
    plans = admissible_ranges(8, 4)
    assert [p.pairs[0][0] for p in plans] == [1, 2, 3, 4]  # never layer 0
    assert lowest_influence_layers([0.01, 0.5, 0.2, 0.1, 0.3], 2) == [2, 3]
    with pytest.raises(ValueError, match="even"):
        admissible_ranges(8, 3)


def test_admissible_ranges_need_delta_below_num_layers():
    # Layer 0 is never paired, so a range of delta layers fits in layers 1..L-1 only if
    # delta <= L - 1: with L = 5, delta = 4 leaves exactly [1, 5); with L = 4 there is none, and
    # that must be an error rather than an empty list.
    (plan,) = admissible_ranges(5, 4)
    assert plan.pairs == ((1, 2), (3, 4))
    with pytest.raises(ValueError, match="below num_layers=4"):
        admissible_ranges(4, 4)
