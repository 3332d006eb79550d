"""Pairwise-masked secure aggregation (spec section 7, SecAgg)."""

from __future__ import annotations

import pytest
import torch

from ops.secure_aggregation import (
    check_no_wrap,
    dequantize,
    error_bound,
    mask_update,
    pair_seed,
    pairwise_mask,
    quantize,
    secure_sum,
    unmask_sum,
)

F, M_BITS = 24, 40
M = 2**M_BITS


def test_masks_sum_to_zero_and_unmasked_sum_is_exact_integer_sum():
    parts = [0, 3, 5, 9]
    zeros = torch.zeros(1000, dtype=torch.int64)
    masked_zeros = [mask_update(zeros, c, parts, 7, 2, M_BITS) for c in parts]
    total = torch.zeros_like(zeros)
    for y in masked_zeros:
        total = torch.remainder(total + y, M)
    assert torch.equal(total, zeros)

    g = torch.Generator().manual_seed(0)
    updates = [0.2 * torch.randn(1000, generator=g) for _ in parts]
    encoded = [quantize(u, 1.0, F, M_BITS)[0] for u in updates]
    ys = [mask_update(e, c, parts, 7, 2, M_BITS) for e, c in zip(encoded, parts, strict=True)]
    int_sum = sum(torch.round(u.double() * 2**F).long() for u in updates)
    assert torch.equal(unmask_sum(ys, F, M_BITS), int_sum.double() / 2**F)


def test_secure_sum_within_quantization_error_and_negative_values_round_trip():
    g = torch.Generator().manual_seed(1)
    updates = [0.3 * torch.randn(50, 20, generator=g) for _ in range(3)]
    plain = sum(u.double().clamp(-1, 1) for u in updates)  # bound holds "plus clipping"
    secure = secure_sum(updates, [0, 1, 2], master_seed=1, round_index=0)
    assert float((secure - plain).abs().max()) <= error_bound(3, F) + 1e-12
    neg = torch.tensor([-0.5, -1e-3, -0.99])
    q, clipped = quantize(neg, 1.0, F, M_BITS)
    assert clipped == 0
    torch.testing.assert_close(dequantize(q, F, M_BITS), neg.double(), atol=2.0**-F, rtol=0)


def test_clipping_is_counted():
    q, clipped = quantize(torch.tensor([2.0, -3.0, 0.5]), 1.0, F, M_BITS)
    assert clipped == 2
    torch.testing.assert_close(dequantize(q, F, M_BITS), torch.tensor([1.0, -1.0, 0.5]).double())


def test_overflow_guard_raises():
    with pytest.raises(ValueError, match="overflow"):
        check_no_wrap(num_clients=3, clip_range=1.0, frac_bits=24, modulus_bits=26)
    check_no_wrap(num_clients=3, clip_range=1.0, frac_bits=24, modulus_bits=40)


def test_single_masked_vector_looks_uniform_and_uncorrelated():
    g = torch.Generator().manual_seed(2)
    u = 0.5 * torch.randn(20000, generator=g)
    e, _ = quantize(u, 1.0, F, M_BITS)
    y = mask_update(e, 0, [0, 1, 2], 11, 0, M_BITS)
    y_unit = y.double() / M
    assert abs(float(y_unit.mean()) - 0.5) < 0.01  # mean ~ M/2
    corr = torch.corrcoef(torch.stack([y_unit, u.double()]))[0, 1]
    assert abs(float(corr)) < 0.03


def test_pair_seed_is_shared_by_both_clients_input_checked_and_depends_on_every_id():
    # Symmetric: pair_seed is defined on the unordered pair (i < j), and both ends of the pair
    # expand the same seed: with participants {2, 5} and zero inputs, client 2 uploads +m_25 and
    # client 5 (whatever the participant order) uploads -m_25 mod M, m_25 = mask(seed(2, 5)).
    zeros = torch.zeros(64, dtype=torch.int64)
    m25 = pairwise_mask(pair_seed(4, 1, 2, 5), 64, M_BITS)
    assert torch.equal(mask_update(zeros, 2, [2, 5], 4, 1, M_BITS), m25)
    assert torch.equal(mask_update(zeros, 5, [5, 2], 4, 1, M_BITS), torch.remainder(-m25, M))
    with pytest.raises(ValueError, match="i < j"):
        pair_seed(0, 1, 5, 2)
    # Every input enters the seed: master seed, round, i and j (and they are not interchangeable).
    base = pair_seed(0, 1, 2, 5)
    variants = [pair_seed(1, 1, 2, 5), pair_seed(0, 2, 2, 5), pair_seed(0, 1, 3, 5),
                pair_seed(0, 1, 2, 6), pair_seed(1, 0, 2, 5), pair_seed(0, 1, 1, 5)]  # fmt: skip
    assert len({base, *variants}) == 1 + len(variants)
    assert pair_seed(0, 1, 2, 5) == base and 0 <= base < 2**63  # deterministic, 63-bit
    m = pairwise_mask(3, 100, M_BITS)
    assert int(m.min()) >= 0 and int(m.max()) < M


def test_stochastic_rounding_error_bound_is_a_full_grid_step():
    g = torch.Generator().manual_seed(3)
    updates = [0.3 * torch.randn(2000, generator=g) for _ in range(3)]
    encoded = [
        quantize(u, 1.0, F, M_BITS, stochastic_rounding=True, generator=g)[0] for u in updates
    ]
    plain = sum(u.double().clamp(-1, 1) for u in updates)
    err = (dequantize(sum(encoded), F, M_BITS) - plain).abs().max()
    assert float(err) <= error_bound(3, F, stochastic_rounding=True) + 1e-12
    assert float(err) > error_bound(3, F)  # the round-to-nearest bound would not hold


def test_no_wrap_guard_is_strict_at_half_the_modulus():
    # 2 clients x R = 1 x 2^24 = 2^25 = M/2 at m = 26: two clients at +R sum to exactly M/2,
    # which the signed decoding reads as -M/2, so +2.0 comes back as -2.0; it must be refused.
    q, _ = quantize(torch.tensor([1.0]), 1.0, 24, 26)
    assert float(dequantize(q + q, 24, 26)[0]) == -2.0
    with pytest.raises(ValueError, match="overflow"):
        check_no_wrap(num_clients=2, clip_range=1.0, frac_bits=24, modulus_bits=26)
    check_no_wrap(num_clients=2, clip_range=1.0, frac_bits=24, modulus_bits=27)


def test_stochastic_rounding_is_unbiased():
    # x = 0.25 quantum: scaled = 0.25 exactly, floor = 0, so each entry rounds up to 1 with
    # probability frac = 0.25 (unbiased: E[q] = scaled). A biased rule (round up when u > frac)
    # would give E[q] = 0.75. Binomial std of the mean: sqrt(.25 * .75 / 20000) ~ 0.0031, so a
    # tolerance of 0.02 (~6.5 std) is safe yet far from 0.75.
    n = 20000
    g = torch.Generator().manual_seed(4)
    x = torch.full((n,), 0.25 * 2.0**-F, dtype=torch.float64)
    q, clipped = quantize(x, 1.0, F, M_BITS, stochastic_rounding=True, generator=g)
    assert clipped == 0
    assert set(q.unique().tolist()) <= {0, 1}
    assert abs(float(q.double().mean()) - 0.25) < 0.02


def test_value_exactly_at_clip_range_is_not_counted_as_clipped():
    # clip(x, -R, R) leaves |x| == R unchanged, so only |x| > R counts as clipped (here: 1.5).
    q, clipped = quantize(torch.tensor([1.0, -1.0, 1.5, 0.5]), 1.0, F, M_BITS)
    assert clipped == 1
    torch.testing.assert_close(
        dequantize(q, F, M_BITS), torch.tensor([1.0, -1.0, 1.0, 0.5], dtype=torch.float64)
    )
