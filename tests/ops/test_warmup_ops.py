"""Pins the update-geometry math of ops/warmup.py (spec §7)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ops.warmup import (
    adamw_white_noise_rms,
    angular_update,
    equilibrium_angle,
    lionar_target_angle,
    noise_scale,
    rrc,
    rrc_lr_factor,
    update_norms,
)


def _orthonormal_pair(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    u /= u.norm()
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    v -= (v @ u) * u
    return u, v / v.norm()


@pytest.mark.parametrize("theta", [1e-6, 1e-3, 0.5, 3.0])
def test_angle_of_known_rotation_recovered(theta: float) -> None:
    gen = torch.Generator().manual_seed(0)
    u, v = _orthonormal_pair(1000, gen)
    w_old = 3.0 * u
    w_new = 0.7 * (math.cos(theta) * u + math.sin(theta) * v)  # the norm change must not matter
    got = float(angular_update(w_old, w_new))
    assert got == pytest.approx(theta, rel=1e-9)


def test_angle_per_neuron_shape_and_values() -> None:
    gen = torch.Generator().manual_seed(1)
    thetas = torch.tensor([1e-4, 1e-2, 0.3, 1.0], dtype=torch.float64)
    old, new = [], []
    for th in thetas:
        u, v = _orthonormal_pair(64, gen)
        old.append(u)
        new.append(math.cos(th) * u + math.sin(th) * v)
    got = angular_update(torch.stack(old), torch.stack(new), per_neuron=True)
    assert got.shape == (4,)
    torch.testing.assert_close(got, thetas, rtol=1e-9, atol=0)


def test_angle_is_zero_for_zero_update_and_zero_vector() -> None:
    w = torch.randn(8, 16)
    assert float(angular_update(w, w.clone())) == 0.0
    assert float(angular_update(torch.zeros(5), torch.zeros(5))) == 0.0
    assert angular_update(w, w, per_neuron=True).eq(0).all()


def test_float32_weights_small_angle_precise() -> None:
    # Equilibrium angles are 1e-3..1e-2 rad: float32 arccos would return ~0 or noise here.
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4096, generator=gen)
    step = torch.randn(4096, generator=gen)
    step -= (step @ w) / (w @ w) * w
    step *= 1e-3 * w.norm() / step.norm()
    expected = math.atan(1e-3)
    assert float(angular_update(w, w + step)) == pytest.approx(expected, rel=1e-3)


def test_update_norms_recovers_direction() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    u = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    lr, wd = 1e-2, 0.1
    w_new = w - lr * (u + wd * w)
    dw, u_rms = update_norms(w, w_new, lr, wd, decoupled=True)
    assert dw == pytest.approx(float((w_new - w).norm()), rel=1e-12)
    assert u_rms == pytest.approx(float(u.norm()) / math.sqrt(u.numel()), rel=1e-9)
    _, coupled = update_norms(w, w - lr * u, lr, wd, decoupled=False)
    assert coupled == pytest.approx(float(u.norm()) / math.sqrt(u.numel()), rel=1e-9)
    assert math.isnan(update_norms(w, w, 0.0)[1])


def _adamw_direction_rms(steps: list[int], betas=(0.9, 0.95), c=20000, seed=0) -> dict[int, float]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(c, dtype=torch.float64))
    # ε = 1e-12 instead of 1e-8: the formula ignores ε, which bends sign(g) where |g| ~ ε.
    opt = torch.optim.AdamW([w], lr=1.0, betas=betas, eps=1e-12, weight_decay=0.0)
    out = {}
    for t in range(1, max(steps) + 1):
        w.grad = torch.randn(c, generator=gen, dtype=torch.float64)
        before = w.detach().clone()
        opt.step()
        if t in steps:
            out[t] = update_norms(before, w.detach(), lr=1.0)[1]
        if t == 1:
            sign_err = (before - w.detach() - w.grad.sign()).norm() / math.sqrt(c)
            assert float(sign_err) < 1e-6  # the first AdamW step is sign(g)
    return out


def test_adamw_white_noise_curve() -> None:
    measured = _adamw_direction_rms([1, 2, 5, 10, 40])
    for t, tol in [(1, 0.03), (2, 0.03), (5, 0.03), (10, 0.03), (40, 0.05)]:
        assert measured[t] == pytest.approx(adamw_white_noise_rms(t, 0.9), rel=tol), t


def test_adamw_first_step_over_steady_state_ratio() -> None:
    # Issue acceptance: ‖u_1‖ / ‖u_∞‖ = √((1+β₁)/(1−β₁)) under white-noise gradients.
    steps = list(range(200, 401, 20))
    measured = _adamw_direction_rms([1, *steps], seed=1)
    steady = sum(measured[t] for t in steps) / len(steps)
    assert adamw_white_noise_rms(1, 0.9) == pytest.approx(1.0, rel=1e-12)
    assert measured[1] / steady == pytest.approx(math.sqrt(1.9 / 0.1), rel=0.05)


def _scale_invariant_angles(opt_factory, steps: int, c: int = 4096, seed: int = 0) -> list[float]:
    """Run an optimizer on a scale-invariant toy: random gradients ⟂ w with norm ∝ 1/‖w‖."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(c, generator=gen, dtype=torch.float64))
    opt = opt_factory([w])
    angles = []
    for _ in range(steps):
        g = torch.randn(c, generator=gen, dtype=torch.float64)
        wd = w.detach()
        g -= (g @ wd) / (wd @ wd) * wd
        w.grad = g / wd.norm()
        before = wd.clone()
        opt.step()
        angles.append(float(angular_update(before, w.detach())))
    return angles


def test_adamw_equilibrium_angle() -> None:
    lr, wd = 1e-2, 1.0
    angles = _scale_invariant_angles(
        lambda p: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.95), weight_decay=wd), 4000
    )
    measured = sum(angles[3000:]) / 1000
    expected = equilibrium_angle("adamw", lr, wd, (0.9, 0.95))
    assert expected == pytest.approx(math.sqrt(2 * lr * wd * 0.1 / 1.9))
    assert measured == pytest.approx(expected, rel=0.03)


@pytest.mark.slow
def test_lion_equilibrium_angle_small_lr_wd() -> None:
    from optim.lion import Lion

    lr, wd = 3e-4, 1.0
    angles = _scale_invariant_angles(
        lambda p: Lion(p, lr=lr, betas=(0.9, 0.99), weight_decay=wd), 40000
    )
    measured = sum(angles[30000:]) / 10000
    assert measured == pytest.approx(equilibrium_angle("lion", lr, wd, (0.9, 0.99)), rel=0.03)


def test_equilibrium_angle_kinds() -> None:
    assert equilibrium_angle("sgdm", 0.1, 5e-4, 0.9) == pytest.approx(
        math.sqrt(2 * 0.1 * 5e-4 / 1.9)
    )
    assert equilibrium_angle("lion", 1e-3, 0.1, (0.9, 0.99)) == lionar_target_angle(
        1e-3, 0.1, (0.9, 0.99)
    )
    # η_r ∝ √η: a linear LR warmup is a square-root warmup of the angle.
    assert lionar_target_angle(0.4, 0.1, (0.9, 0.99)) == pytest.approx(
        2 * lionar_target_angle(0.1, 0.1, (0.9, 0.99))
    )
    with pytest.raises(ValueError, match="kind='adam'"):
        equilibrium_angle("adam", 1e-3, 0.1, (0.9, 0.99))


def test_equilibrium_angles_match_hand_computed_values() -> None:
    # Spec §3.3 [REQ], written out by hand; η = 0.5, λ = 0.01 throughout, so √(2ηλ) = √0.01 = 0.1,
    # and √(π/2) = 1.2533141373155001.
    sqrt_half_pi = 1.2533141373155001
    # Lion/LionAR: η_r = √(π/2)·√(2ηλ)·√((1−β₁)² + β₁²(1−β₂)/(1+β₂)).
    # β = (0.5, 0.6): (1−β₁)² = 0.25, β₁²(1−β₂)/(1+β₂) = 0.25·0.4/1.6 = 0.0625,
    # √0.3125 = 0.5590169943749475 → η_r = 1.2533141373155001·0.1·0.5590169943749475.
    assert lionar_target_angle(0.5, 0.01, (0.5, 0.6)) == pytest.approx(0.0700623902049741)
    # β₁ = 0 isolates the √(π/2) factor: η_r = √(π/2)·0.1.
    assert lionar_target_angle(0.5, 0.01, (0.0, 0.6)) == pytest.approx(0.1 * sqrt_half_pi)
    # β₁ = 1 isolates the β₁² term: √(0 + 1·0.4/1.6) = 0.5 → η_r = √(π/2)·0.1·0.5.
    assert lionar_target_angle(0.5, 0.01, (1.0, 0.6)) == pytest.approx(0.05 * sqrt_half_pi)
    # The defaults η = λ = 0.1, β = (0.9, 0.99): √(2ηλ) = √0.02, (1−β₁)² = 0.01,
    # β₁²(1−β₂)/(1+β₂) = 0.81·0.01/1.99 = 0.004070351758793970, sum 0.014070351758793970
    # → η_r = 1.2533141373155001·√0.02·√0.014070351758793970 = 0.021024584114519684.
    assert lionar_target_angle(0.1, 0.1, (0.9, 0.99)) == pytest.approx(0.021024584114519684)
    assert equilibrium_angle("lion", 0.5, 0.01, (0.5, 0.6)) == pytest.approx(0.0700623902049741)
    # AdamW: √(2ηλ(1−β₁)/(1+β₁)); β₁ = 0.6: √(0.01·0.4/1.6) = √0.0025 = 0.05 (β₂ plays no part).
    assert equilibrium_angle("adamw", 0.5, 0.01, (0.6, 0.95)) == pytest.approx(0.05)
    assert equilibrium_angle("adamw", 0.5, 0.01, 0.6) == pytest.approx(0.05)
    # SGDM: √(2ηλ/(1+μ)); μ = 0.5625: √(0.01/1.5625) = √0.0064 = 0.08.
    assert equilibrium_angle("sgdm", 0.5, 0.01, 0.5625) == pytest.approx(0.08)


def test_rrc_identical_vs_independent_per_sample_gradients() -> None:
    # Spec §3.5 step 1: a normalized step built from B identical per-sample gradients changes the
    # layer's outputs √B times more than one built from B independent ones.
    d_in, d_out, b = 1024, 64, 64
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)

    def fixed_norm(step: torch.Tensor) -> torch.Tensor:
        return step * (1e-2 * w.norm() / step.norm())

    x_ind = torch.randn(b, d_in, generator=gen, dtype=torch.float64)
    err_ind = torch.randn(b, d_out, generator=gen, dtype=torch.float64)
    step_ind = fixed_norm(err_ind.T @ x_ind)  # Σ_b δ_b x_bᵀ
    x_same = x_ind[:1].expand(b, d_in)
    step_same = fixed_norm(err_ind[:1].T @ x_ind[:1])  # one sample repeated B times
    ratio = rrc(x_same, w, w - step_same) / rrc(x_ind, w, w - step_ind)
    assert 0.8 * math.sqrt(b) <= ratio <= 1.25 * math.sqrt(b)
    # RRC is linear in the step scale.
    assert rrc(x_ind, w, w - 3 * step_ind) == pytest.approx(3 * rrc(x_ind, w, w - step_ind))
    with pytest.raises(ValueError, match="fan_in"):
        rrc(torch.randn(4, 7), w, w)


def test_noise_scale_estimates_true_b_noise() -> None:
    c, b, sigma, draws = 500, 32, 0.5, 200
    gen = torch.Generator().manual_seed(0)
    g_true = torch.randn(c, generator=gen, dtype=torch.float64) * 0.05
    g2_sum = tr_sum = 0.0
    for _ in range(draws):
        per_sample = g_true + sigma * torch.randn(b, c, generator=gen, dtype=torch.float64)
        g2, tr = noise_scale(per_sample[: b // 2].mean(0), per_sample[b // 2 :].mean(0), b)
        g2_sum, tr_sum = g2_sum + g2, tr_sum + tr
    true_b_noise = sigma**2 * c / float(g_true @ g_true)
    assert (tr_sum / g2_sum) == pytest.approx(true_b_noise, rel=0.10)
    assert tr_sum / draws == pytest.approx(sigma**2 * c, rel=0.05)


def test_rrc_lr_factor_limits_and_monotone() -> None:
    b = 32
    assert rrc_lr_factor(0.0, b) == 1.0
    assert rrc_lr_factor(1e12, b) == pytest.approx(1 / math.sqrt(b), rel=1e-6)
    assert rrc_lr_factor(math.inf, b) == pytest.approx(1 / math.sqrt(b))
    values = [rrc_lr_factor(phi, b) for phi in torch.logspace(-6, 6, 50).tolist()]
    assert all(a >= c for a, c in itertools.pairwise(values))
    with pytest.raises(ValueError, match="batch_size"):
        rrc_lr_factor(0.1, 0)


def test_blockwise_float64_accumulation_matches_one_block(monkeypatch) -> None:
    import ops.warmup as W

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(37, 23, generator=gen)
    b = a + 1e-3 * torch.randn(37, 23, generator=gen)
    x = torch.randn(11, 23, generator=gen)

    def everything() -> list[float]:
        return [
            float(W.angular_update(a, b)),
            *W.angular_update(a, b, per_neuron=True).tolist(),
            *W.update_norms(a, b, lr=0.1, weight_decay=0.1),
            W.rrc(x, a, b),
            W.squared_norm(a),
            *W.noise_scale(a, b, batch_size=8),
        ]

    one_block = everything()
    monkeypatch.setattr(W, "FLOAT64_BLOCK", 50)  # many blocks, rows split across them
    assert everything() == pytest.approx(one_block, rel=1e-12)


def test_rrc_lr_factor_holds_the_rrc_at_its_noise_floor() -> None:
    # Spec §3.5: RRC² ∝ ρ²(φ + 1/B²)/(φ + 1/B); ρ keeps it at the φ → 0 value 1/B for every φ.
    # At Bφ = 1: ρ = √((1 + 1)/(1 + B)) = √(2/65) for B = 64.
    b = 64
    assert rrc_lr_factor(1 / b, b) == pytest.approx(math.sqrt(2 / 65), rel=1e-12)
    for phi in (1e-4, 1e-2, 0.3, 5.0, 1e3):
        rho = rrc_lr_factor(phi, b)
        assert rho**2 * (phi + 1 / b**2) / (phi + 1 / b) == pytest.approx(1 / b, rel=1e-12)
