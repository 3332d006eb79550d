"""Clipping, noise and accounting for DP in federated clients (spec section 7, DP)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ops.dp import (
    add_output_perturbation,
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


def test_clip_per_sample_scales_large_norms_to_exactly_c_and_keeps_small_ones():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 3, 4, generator=g) * 5, torch.randn(8, 7, generator=g) * 5]
    grads[0][0], grads[1][0] = 1e-3, 1e-3  # sample 0 is tiny: unchanged
    grads[0][1], grads[1][1] = 0.2, 0.0  # sample 1: norm sqrt(12 * 0.04) = 0.69 < C, unchanged
    clip = 1.0
    norms_in = torch.sqrt(sum(x.double().flatten(1).pow(2).sum(1) for x in grads))
    big = norms_in > clip
    assert int(big.sum()) == 6  # samples 2..7: ~5 * sqrt(19) ~ 22 >> C
    clipped = clip_per_sample(grads, clip)
    norms = torch.sqrt(sum(c.double().flatten(1).pow(2).sum(1) for c in clipped))
    # A sample above C is scaled by C / ||g||: its norm becomes exactly C ...
    torch.testing.assert_close(norms[big], torch.full_like(norms[big], clip), rtol=1e-6, atol=0)
    # ... and its direction is kept: clip(g) * ||g|| / C == g.
    for c, x in zip(clipped, grads, strict=True):
        scale = (norms_in[big] / clip).view(-1, *([1] * (x.dim() - 1)))
        torch.testing.assert_close(c[big].double() * scale, x[big].double(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(c[~big], x[~big], rtol=0, atol=0)  # norm <= C: untouched


def test_dp_noise_adds_gaussian_noise_of_std_sigma_c_over_b():
    """``dp_noise`` returns ``(s + N(0, sigma^2 C^2 I)) / B``: the output minus ``s / B`` has mean
    0 and std ``sigma * C / B`` (the learning rate does not enter: the optimizer applies it)."""
    sigma, clip, batch = 1.5, 0.4, 8.0
    expected_std = sigma * clip / batch  # 1.5 * 0.4 / 8 = 0.075
    summed = [torch.full((200_000,), 3.0), torch.zeros(400, 500)]
    out = dp_noise(summed, sigma, clip, batch, torch.Generator().manual_seed(0))
    noises = []
    for s, o in zip(summed, out, strict=True):
        assert o.shape == s.shape
        noise = (o.double() - s.double() / batch).flatten()  # s / B: the clipped-sum mean
        n = noise.numel()
        # Standard errors of the mean and of the std of n iid N(0, std^2) draws:
        # std / sqrt(n) and std / sqrt(2 (n - 1)); allow 5 of them.
        assert abs(float(noise.mean())) <= 5 * expected_std / math.sqrt(n)
        assert abs(float(noise.std()) - expected_std) <= 5 * expected_std / math.sqrt(2 * (n - 1))
        noises.append(noise)
    # Fresh noise per tensor: the two draws are uncorrelated (standard error 1 / sqrt(n)).
    corr = torch.corrcoef(torch.stack(noises))[0, 1]
    assert abs(float(corr)) <= 5 / math.sqrt(200_000)


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


def _eps_from_rdp(orders, rdp, delta):
    """RDP -> (epsilon, delta)-DP as Opacus 1.6 converts it (Balle et al. 2020, Theorem 21):
    ``min_a rdp(a) + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1)``."""
    return min(
        r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a, r in zip(orders, rdp, strict=True)
    )


# Opacus' default RDP orders (RDPAccountant.DEFAULT_ALPHAS): 1.1, 1.2, ..., 10.9, 12, ..., 63.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def test_rdp_epsilon_of_the_plain_gaussian_mechanism_matches_the_closed_form():
    """q = 1 (no subsampling): the Gaussian mechanism of noise multiplier sigma has RDP
    ``a / (2 sigma^2)`` at order a (Mironov 2017, Prop. 7); T steps compose to ``T a / (2 sigma^2)``."""
    pytest.importorskip("opacus")
    sigma, steps, delta = 5.0, 10, 1e-5
    expected = _eps_from_rdp(ORDERS, [steps * a / (2 * sigma**2) for a in ORDERS], delta)
    assert expected == pytest.approx(2.8137, abs=1e-4)  # optimum at order a = 7.9
    assert rdp_epsilon(sigma, 1.0, steps, delta) == pytest.approx(expected, rel=1e-9)


def _log_a_int(q: float, sigma: float, a: int) -> float:
    """``log A_a`` of the Poisson-subsampled Gaussian at integer order a (Mironov, Talwar, Zhang
    2019, Sec. 3.3): ``A_a = sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2))``."""
    terms = [
        math.log(math.comb(a, k)) + (a - k) * math.log1p(-q) + k * math.log(q)
        + (k * k - k) / (2 * sigma**2)
        for k in range(a + 1)
    ]  # fmt: skip
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def test_rdp_epsilon_of_the_subsampled_gaussian_matches_the_integer_order_formula():
    """q < 1: RDP at integer order a is ``T log(A_a) / (a - 1)``. For sigma 1.5, q 0.01, 1000
    steps and delta 1e-5 the best order is a = 17, inside the integer part (12..63) of Opacus'
    orders, so the minimum over integer orders is Opacus' epsilon."""
    pytest.importorskip("opacus")
    sigma, q, steps, delta = 1.5, 0.01, 1000, 1e-5
    orders = list(range(2, 64))
    rdp = [steps * _log_a_int(q, sigma, a) / (a - 1) for a in orders]
    expected = _eps_from_rdp(orders, rdp, delta)
    assert expected == pytest.approx(1.01295, abs=1e-5)
    assert rdp_epsilon(sigma, q, steps, delta) == pytest.approx(expected, rel=1e-9)


def test_rdp_epsilon_is_monotone_and_noise_multiplier_search_inverts_it():
    pytest.importorskip("opacus")
    e1 = rdp_epsilon(sigma=1.0, sample_rate=0.05, steps=100, delta=1e-4)
    assert e1 < float("inf")
    assert rdp_epsilon(2.0, 0.05, 100, 1e-4) < e1 < rdp_epsilon(1.0, 0.05, 400, 1e-4)
    assert rdp_epsilon(1.0, 0.02, 100, 1e-4) < e1 < rdp_epsilon(1.0, 0.05, 100, 1e-5)
    sigma = noise_multiplier_for_epsilon(e1, 1e-4, 0.05, 100)
    assert sigma == pytest.approx(1.0, abs=0.02)  # Opacus' search tolerance is 0.01 in epsilon


def test_weight_noise_is_low_rank_zero_without_noise_and_of_the_predicted_size():
    g = torch.Generator().manual_seed(0)
    assert torch.count_nonzero(weight_noise_delta(8, 6, 2, 0.5, 0.0, g)) == 0
    delta = weight_noise_delta(8, 6, 2, 0.5, 0.05, g)
    assert torch.linalg.matrix_rank(delta) <= 2
    # Magnitude: an entry is s * sum_{k<r} N_B[o, k] (A[k, i] + N_A[k, i]) with N_B, N_A ~
    # N(0, sigma^2) and A ~ Kaiming-uniform(a = sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), variance
    # 1 / (3 in). N_B is independent of A + N_A, so E[delta^2] = s^2 r sigma^2 (1/(3 in) + sigma^2).
    fan_in, fan_out, rank, scale, sigma, draws = 16, 8, 2, 0.5, 0.3, 4000
    expected = scale**2 * rank * sigma**2 * (1 / (3 * fan_in) + sigma**2)  # = 0.0049875
    per_draw = torch.stack(
        [weight_noise_delta(fan_in, fan_out, rank, scale, sigma, g).double().pow(2).mean()
         for _ in range(draws)]
    )  # fmt: skip
    # Entries of one draw are correlated; the draws are iid, so the standard error of the mean
    # of per-draw mean squares is their std / sqrt(draws). Allow 5 of them (~3.5% here).
    stderr = float(per_draw.std()) / math.sqrt(draws)
    assert abs(float(per_draw.mean()) - expected) <= 5 * stderr
    assert 5 * stderr < 0.1 * expected  # tight enough to see a wrong scale or sigma


def test_output_perturbation_std_is_lr_sigma_c():
    # Spec / official src/dp.py: every tensor gets N(0, (lr * sigma * C)^2) in place, so with
    # lr = 0.1, sigma = 2, C = 0.5 the std is 0.1 * 2 * 0.5 = 0.1 (sigma * C alone would be 1.0).
    # The sample std of n = 200000 draws has std ~ 0.1 / sqrt(2n) ~ 1.6e-4; tolerance 2e-3.
    tensors = [torch.zeros(200000, dtype=torch.float64), torch.zeros(10, 10, dtype=torch.float64)]
    add_output_perturbation(
        tensors, lr=0.1, sigma=2.0, clip_norm=0.5, generator=torch.Generator().manual_seed(0)
    )
    big = tensors[0]
    assert float(big.std()) == pytest.approx(0.1, abs=2e-3)
    assert abs(float(big.mean())) < 5 * 0.1 / math.sqrt(big.numel())
    assert float(tensors[1].abs().sum()) > 0  # every tensor is perturbed, in place


def test_clip_per_sample_refuses_no_tensors():
    with pytest.raises(ValueError, match="no gradient tensors"):
        clip_per_sample([], 1.0)
