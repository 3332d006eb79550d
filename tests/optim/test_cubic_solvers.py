"""StochasticCubicNewton: HVP-mode momentum (the exact mode is pinned by test_cubic_reference)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from optim.cubic_solvers import StochasticCubicNewton


def test_hvp_mode_hessian_corrected_momentum_is_exact_on_a_quadratic():
    # Spec section 7: on a deterministic quadratic with the exact Hessian, hessian_corrected
    # gives m_t = grad f(x_t) at every t, however inexact the steps (here the HVP solver's).
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    A = 0.5 * (B + B.T)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    x = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HVP mode warns that it transports with the sample
        opt = StochasticCubicNewton(
            [x], M=2.0, grad_momentum=0.1, momentum_type="hessian_corrected", solver="hvp"
        )
    for _ in range(6):
        y, _ = opt.evaluation_points()
        opt.step(grad=A @ y + b, hvp=lambda v: A @ v)
        state = opt.cubic_state
        assert torch.allclose(state["m"], A @ state["x_prev"] + b, atol=1e-10)
    assert float((x.detach() - state["x_prev"]).norm()) > 1e-3  # the steps really moved x


def test_extrapolated_points_are_clipped_to_max_extrapolation_norm():
    # One cubic step with g = (1, 1), H = I, M = 1: (1 + r/2)h = −g, r = ‖h‖, so
    # r² / 2 + r − √2 = 0, r = √(1 + 2√2) − 1. The extrapolated points lie (1 − α)/α = 9 steps
    # ahead (spec §3, step 1): 9r ≈ 8.6 unclipped, cut to the cap 0.5 along −(1, 1)/√2.
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = StochasticCubicNewton(
        [x], M=1.0, grad_momentum=0.1, hess_momentum=0.1, momentum_type="extrapolated",
        max_extrapolation_norm=0.5,
    )  # fmt: skip
    g, H = torch.ones(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    opt.evaluation_points()
    opt.step(grad=g, hess=H)
    r = math.sqrt(1 + 2 * math.sqrt(2)) - 1
    x_now = x.detach().clone()
    torch.testing.assert_close(x_now, torch.full((2,), -r / math.sqrt(2), dtype=torch.float64))
    y, z = opt.evaluation_points()
    expected = x_now - 0.5 / math.sqrt(2)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(z, expected)
    assert opt.last_extrapolation_norm == pytest.approx(9 * r)  # logged before clipping


def test_momentum_decay_schedules_both_coefficients_with_their_own_floors():
    # α_t = max(α, (t+1)^−p) and β_t = max(β, (t+1)^−p): at t = 3 with p = 1 the decay is ¼,
    # above β = 0.01 and below α = 0.5.
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = StochasticCubicNewton(
        [x], grad_momentum=0.5, hess_momentum=0.01, momentum_type="ema", momentum_decay=1.0
    )
    assert opt.coefficients() == (1.0, 1.0)  # t = 0: (0 + 1)^−1
    for _ in range(3):
        opt.step(grad=torch.ones(2, dtype=torch.float64), hess=torch.eye(2, dtype=torch.float64))
    assert opt.coefficients() == (0.5, 0.25)
