"""StochasticCubicNewton: HVP-mode momentum (the exact mode is pinned by test_cubic_reference)."""

from __future__ import annotations

import warnings

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
