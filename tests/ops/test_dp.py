"""Clipping, noise and accounting for DP in federated clients (spec section 7, DP)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ops.dp import (
    clip_per_sample,
    dp_noise,
    noise_multiplier_for_epsilon,
    output_perturbation_sigma,
    per_sample_gradients,
    poisson_sample,
    rdp_epsilon,
    weight_noise_delta,
)


def test_output_perturbation_sigma_reference_value():
    sigma = output_perturbation_sigma(epsilon=1, delta=1e-4, sample_rate=0.01, steps=100, c2=1.1)
    assert sigma == pytest.approx(0.3338, abs=1e-4)
    with pytest.raises(ValueError, match="epsilon"):
        output_perturbation_sigma(0.0, 1e-4, 0.01, 100)


def test_clip_per_sample_bounds_every_norm_and_keeps_small_ones():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 3, 4, generator=g) * 5, torch.randn(8, 7, generator=g) * 5]
    grads[0][0], grads[1][0] = 1e-3, 1e-3  # sample 0 is tiny: unchanged
    clipped = clip_per_sample(grads, 1.0)
    norms = torch.sqrt(sum(c.flatten(1).pow(2).sum(1) for c in clipped))
    assert bool((norms <= 1.0 + 1e-5).all())
    torch.testing.assert_close(clipped[0][0], grads[0][0])


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    return model, x, y


def test_sigma0_infinite_clip_without_poisson_is_plain_sgd():
    model, x, y = _model_and_data()
    params = list(model.parameters())
    per = per_sample_gradients(
        lambda i: nn.functional.mse_loss(model(x[i : i + 1]), y[i : i + 1]), params, 6
    )
    summed = [g.sum(0) for g in clip_per_sample(per, float("inf"))]
    noisy = dp_noise(summed, 0.0, 1.0, 6, torch.Generator())
    loss = nn.functional.mse_loss(model(x), y)
    plain = torch.autograd.grad(loss, params)
    for a, b in zip(noisy, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_poisson_sample_rate():
    idx = poisson_sample(20000, 0.1, torch.Generator().manual_seed(0))
    assert abs(idx.numel() / 20000 - 0.1) < 0.01


def test_epsilon_monotone_and_equals_opacus():
    opacus = pytest.importorskip("opacus")
    e1 = rdp_epsilon(sigma=1.0, sample_rate=0.05, steps=100, delta=1e-4)
    assert e1 < float("inf")
    assert rdp_epsilon(2.0, 0.05, 100, 1e-4) < e1 < rdp_epsilon(1.0, 0.05, 400, 1e-4)
    acc = opacus.accountants.RDPAccountant()
    for _ in range(100):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
    assert acc.get_epsilon(1e-4) == pytest.approx(e1, rel=1e-9)
    sigma = noise_multiplier_for_epsilon(e1, 1e-4, 0.05, 100)
    assert sigma == pytest.approx(1.0, abs=0.02)


def test_weight_noise_is_low_rank_and_zero_without_noise():
    g = torch.Generator().manual_seed(0)
    assert torch.count_nonzero(weight_noise_delta(8, 6, 2, 0.5, 0.0, g)) == 0
    delta = weight_noise_delta(8, 6, 2, 0.5, 0.05, g)
    assert torch.linalg.matrix_rank(delta) <= 2
