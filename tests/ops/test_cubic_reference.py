"""The NumPy reference used by the experiment follows StochasticCubicNewton step for step."""

import numpy as np
import pytest
import torch

from datamodules.cubic_problems import LogisticToyDataModule, logistic_oracles
from ops.cubic_reference import (
    cubic_step,
    logistic_grad,
    logistic_hess,
    logistic_value,
    run_reference,
)
from ops.cubic_subproblem import solve_cubic_exact
from optim.cubic_solvers import StochasticCubicNewton

STEPS = 30


def _optimizer_trajectory(dm, reg, **kw):
    x = torch.nn.Parameter(torch.zeros(dm.dim, dtype=torch.float64))
    opt = StochasticCubicNewton([x], **kw)
    out = []
    for batch_g, batch_h in dm.stream():
        y, z = opt.evaluation_points()
        g = logistic_oracles(y, *batch_g, 1e-2, reg)[1]
        H = logistic_oracles(z, *batch_h, 1e-2, reg)[2]
        opt.step(grad=g, hess=H)
        out.append(x.detach().numpy().copy())
        if len(out) == STEPS:
            return out


CASES = [
    ("nonconvex", dict(momentum_type="none")),
    ("nonconvex", dict(momentum_type="ema", grad_momentum=0.1, hess_momentum=0.2)),
    ("nonconvex", dict(momentum_type="extrapolated", grad_momentum=0.1, hess_momentum=0.2)),
    ("nonconvex", dict(momentum_type="hessian_corrected", grad_momentum=0.1, hess_momentum=0.2)),
    ("nonconvex", dict(momentum_type="hessian_corrected", transport_hessian="sample")),
    ("nonconvex", dict(momentum_type="hessian_corrected", grad_momentum=1e-3, momentum_decay=0.5)),
    ("l2", dict(momentum_type="hessian_corrected", grad_momentum=0.1, step_type="reg_newton")),
]


@pytest.mark.parametrize(("reg", "kw"), CASES)
def test_reference_matches_optimizer(reg, kw):
    dm = LogisticToyDataModule(n=300, d=10, w_scale=3.0, seed=2)
    expected = _optimizer_trajectory(dm, reg, **kw)
    got = []
    batches = [(ig.numpy(), ih.numpy()) for ig, ih in dm.step_indices(STEPS)]
    run_reference(
        dm.A.numpy(), dm.y.numpy(), batches, 1e-2, reg, callback=lambda t, x: got.append(x), **kw
    )
    for t, (a, b) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(a, b, atol=1e-9, rtol=0, err_msg=f"step {t + 1}")


@pytest.mark.parametrize("reg", ["nonconvex", "l2"])
def test_reference_oracles_match_torch_closed_forms(reg):
    dm = LogisticToyDataModule(n=40, d=6, seed=1)
    x = np.random.default_rng(0).normal(size=6)
    value, g, H = logistic_oracles(torch.from_numpy(x), dm.A, dm.y, 1e-2, reg)
    A, y = dm.A.numpy(), dm.y.numpy()
    np.testing.assert_allclose(logistic_grad(x, A, y, 1e-2, reg), g.numpy(), atol=1e-12)
    np.testing.assert_allclose(logistic_hess(x, A, y, 1e-2, reg), H.numpy(), atol=1e-12)
    assert logistic_value(x, A, y, 1e-2, reg) == pytest.approx(float(value), abs=1e-12)


def test_reference_cubic_step_matches_exact_solver():
    rng = np.random.default_rng(3)
    for _ in range(20):
        B = rng.normal(size=(8, 8))
        H, m = 0.5 * (B + B.T), rng.normal(size=8) * 10.0 ** rng.integers(-6, 2)
        ref = solve_cubic_exact(torch.from_numpy(m), torch.from_numpy(H), 0.7).h.numpy()
        np.testing.assert_allclose(cubic_step(m, H, 0.7), ref, atol=1e-10)


def test_full_transport_oracle_equals_sample_transport_on_full_batches():
    """The ``full`` diagnostic transports with the full-data Hessian: when every Hessian batch is
    the whole data set, Ĥ_t is that Hessian and both transports give the same iterates."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(40, 5))
    y = np.sign(rng.normal(size=40))
    every_row = np.arange(40)
    batches = [(rng.integers(0, 40, size=1), every_row) for _ in range(20)]
    kw = dict(lam=1e-2, reg="nonconvex", grad_momentum=0.1, hess_momentum=0.3)
    full = run_reference(A, y, batches, transport_hessian="full", **kw)
    np.testing.assert_allclose(full, run_reference(A, y, batches, transport_hessian="sample", **kw))
    assert not np.allclose(full, run_reference(A, y, batches, transport_hessian="momentum", **kw))
    with pytest.raises(ValueError, match="transport_hessian"):
        run_reference(A, y, batches, transport_hessian="exact", **kw)
