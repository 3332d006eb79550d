"""Momentum estimators: reductions and exactness on quadratics (spec §7)."""

import pytest
import torch

from ops.cubic_momentum import extrapolate, hessian_momentum, momentum_update
from ops.cubic_subproblem import solve_cubic_exact


def _quadratic(d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    A = 0.5 * (A + A.T)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    return A, b


def _run(kind, alpha, steps=15, M=2.0):
    """Momentum cubic Newton on a deterministic quadratic with exact H; returns (m_t, ∇f(x_t)) pairs."""
    A, b = _quadratic()
    x = torch.zeros(4, dtype=torch.float64)
    x_prev, m = x.clone(), None
    pairs = []
    for _ in range(steps):
        y = extrapolate(x, x_prev, alpha) if kind == "extrapolated" else x
        g = A @ y + b
        m = momentum_update(kind, m, g, alpha, H=A, dx=x - x_prev)
        pairs.append((m.clone(), A @ x + b))
        h = solve_cubic_exact(m, A, M).h
        x_prev, x = x, x + h
    return pairs


@pytest.mark.parametrize("kind", ["hessian_corrected", "extrapolated"])
def test_transported_momentum_is_exact_on_quadratics(kind):
    for m, grad in _run(kind, 0.1):
        assert torch.allclose(m, grad, rtol=1e-10, atol=1e-10)


def test_ema_is_not_exact_on_quadratics():
    errs = [float((m - grad).norm()) for m, grad in _run("ema", 0.1)]
    assert max(errs) > 1e-3


def test_constant_gradient_stream_gives_constant_momentum():
    g = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    for kind in ("ema", "extrapolated", "hessian_corrected"):
        m = None
        for _ in range(10):
            m = momentum_update(kind, m, g, 0.3, H=torch.zeros(3, 3), dx=torch.zeros(3))
            assert torch.allclose(m, g, rtol=0, atol=1e-15)


def test_alpha_one_is_plain_gradient_bitwise():
    g = torch.randn(5, dtype=torch.float64)
    m_prev = torch.randn(5, dtype=torch.float64)
    H = torch.randn(5, 5, dtype=torch.float64)
    for kind in ("ema", "extrapolated", "hessian_corrected", "none"):
        assert torch.equal(momentum_update(kind, m_prev, g, 1.0, H=H, dx=m_prev), g)
    H_hat = torch.randn(5, 5, dtype=torch.float64)
    assert torch.equal(hessian_momentum(H, H_hat, 1.0), H_hat)
    assert torch.equal(extrapolate(g, m_prev, 1.0), g)


def test_first_step_uses_sample_without_bias_correction():
    g = torch.randn(3)
    assert torch.equal(momentum_update("ema", None, g, 0.01), g)
    H_hat = torch.randn(3, 3)
    assert torch.equal(hessian_momentum(None, H_hat, 0.01), H_hat)


def test_hessian_momentum_formula_and_hvp_transport():
    H_prev, H_hat = torch.eye(2), 3 * torch.eye(2)
    assert torch.allclose(hessian_momentum(H_prev, H_hat, 0.25), 1.5 * torch.eye(2))
    m_prev, g, dx = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    H = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    by_matrix = momentum_update("hessian_corrected", m_prev, g, 0.5, H=H, dx=dx)
    by_hvp = momentum_update("hessian_corrected", m_prev, g, 0.5, H=lambda v: H @ v, dx=dx)
    assert torch.allclose(by_matrix, torch.tensor([1.5, 1.0]))
    assert torch.equal(by_matrix, by_hvp)


def test_extrapolate_formula():
    x, xp = torch.tensor([2.0]), torch.tensor([1.0])
    assert float(extrapolate(x, xp, 0.25)[0]) == pytest.approx(2.0 + 3.0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="momentum_type"):
        momentum_update("adam", None, torch.ones(1), 0.1)
    with pytest.raises(ValueError, match="grad_momentum"):
        momentum_update("ema", None, torch.ones(1), 0.0)
    with pytest.raises(ValueError, match="needs the Hessian"):
        momentum_update("hessian_corrected", torch.ones(1), torch.ones(1), 0.5)
