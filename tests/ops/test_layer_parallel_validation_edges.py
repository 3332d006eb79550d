"""Edge cases of the LP plan and fusion helpers (``ops.layer_parallel``): refused inputs that
the other tests reach only through ``from_range``, the warning rule, and ``rms_normalize``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ops.layer_parallel import (
    LayerParallelPlan,
    count_allreduces,
    fuse_mlp,
    lowest_influence_layers,
    post_norm_gains,
    rms_normalize,
)


def test_pairs_given_directly_must_be_non_negative_integers():
    """A pair built by hand (not via ``from_range``) is validated too; ``True`` is not a layer
    index although ``True + 1 == 2``."""
    with pytest.raises(ValueError, match=">= 0"):
        LayerParallelPlan(((-1, 0),))
    with pytest.raises(ValueError, match="two integer layer indices"):
        LayerParallelPlan(((True, 2),))


def test_parse_refuses_unknown_range_keys():
    """A typo next to the right keys (``stop``) must not be dropped silently."""
    with pytest.raises(ValueError, match="keys 'start' and 'end'"):
        LayerParallelPlan.parse({"start": 2, "end": 4, "stop": 6})


def test_only_layer_zero_and_the_last_layer_warn():
    """Pairing a middle layer (1, 2) of 8 is the recommended case: no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerParallelPlan(((1, 2),)).validate(8)
        LayerParallelPlan(((5, 6),)).validate(8)


def test_count_allreduces_refuses_a_plan_outside_the_model():
    """(6, 7), (8, 9) does not fit 8 layers: no all-reduce count for it."""
    with pytest.raises(ValueError, match="out of range"):
        count_allreduces(LayerParallelPlan.from_range(6, 10), 8)


def test_rank_mixed_refuses_an_odd_intermediate_size():
    """Two-way TP splits the hidden units in halves: an odd size has no halves."""
    g = torch.ones(4)
    with pytest.raises(ValueError, match="even intermediate size, got 5"):
        post_norm_gains(g, g, 5, "rank_mixed")


def test_fuse_mlp_refuses_members_of_different_widths():
    member = lambda inter: {  # noqa: E731
        "gate": torch.ones(inter, 4), "up": torch.ones(inter, 4), "down": torch.ones(4, inter),
        "gain": torch.ones(4),
    }  # fmt: skip
    with pytest.raises(ValueError, match="different MLP intermediate sizes"):
        fuse_mlp(member(6), member(8))


def test_lowest_influence_can_pick_every_candidate():
    """k equal to the number of candidates (all but layer 0) is allowed; one more is not."""
    assert lowest_influence_layers([0.3, 0.1, 0.2], 2) == [1, 2]
    with pytest.raises(ValueError, match="cannot pick 3 layers out of 2"):
        lowest_influence_layers([0.3, 0.1, 0.2], 3)


def test_rms_normalize_by_hand():
    """n(x) = x / sqrt(mean(x^2) + eps): [3, 4] with eps 0.5 -> [3, 4] / sqrt(12.5 + 0.5)."""
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    expected = torch.tensor([[3.0, 4.0]], dtype=torch.float64) / math.sqrt(13.0)
    torch.testing.assert_close(rms_normalize(x, 0.5), expected, rtol=1e-7, atol=0)


def test_rms_normalize_squares_in_float32():
    """[300, 400] in float16: the squares (9e4, 1.6e5) overflow float16 (max 65504), so the
    norm must be taken in float32 like LlamaRMSNorm; the result is cast back to float16."""
    x = torch.tensor([300.0, 400.0], dtype=torch.float16)
    out = rms_normalize(x, 1e-6)
    assert out.dtype == torch.float16
    rms = math.sqrt((300.0**2 + 400.0**2) / 2)
    expected = torch.tensor([300.0 / rms, 400.0 / rms], dtype=torch.float16)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=0)
