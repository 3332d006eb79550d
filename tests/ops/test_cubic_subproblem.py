"""Cubic subproblem solvers: global optimality, closed forms, hard case, HVP agreement (spec §7)."""

import math

import pytest
import torch

from ops.cubic_subproblem import (
    cubic_model,
    cubic_model_grad,
    from_m3_convention,
    reg_newton_step,
    solve_cubic_exact,
    solve_cubic_hvp,
)


@pytest.fixture(autouse=True)
def _float64_default():
    # The spec's tolerances (1e-8 .. 1e-12) are float64 tolerances; restore the default afterwards.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _random_problem(d: int, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    H = scale * 0.5 * (A + A.T)  # indefinite with high probability
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    return g, H


def _phi(h, g, H, M):
    return float(cubic_model(h, g, H, M))


@pytest.mark.parametrize("d", [2, 5, 30])
@pytest.mark.parametrize("M", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_solver_global_optimality(d, M, seed):
    g, H = _random_problem(d, seed)
    sol = solve_cubic_exact(g, H, M)
    h = sol.h
    r = float(torch.linalg.vector_norm(h))
    A = H + 0.5 * M * r * torch.eye(d)
    assert float(torch.linalg.vector_norm(A @ h + g)) <= 1e-8
    assert float(torch.linalg.eigvalsh(A)[0]) >= -1e-8
    # A global-minimizer property: Φ(h*) ≤ −(M/12)‖h*‖³.
    assert _phi(h, g, H, M) <= -(M / 12.0) * r**3 + 1e-12
    # Local check against 2000 random perturbations of norm 1e-3.
    gen = torch.Generator().manual_seed(100 + seed)
    eps = torch.randn(2000, d, generator=gen)
    eps = 1e-3 * eps / eps.norm(dim=1, keepdim=True)
    hs = h + eps
    vals = hs @ g + 0.5 * ((hs @ H) * hs).sum(1) + (M / 6.0) * hs.norm(dim=1) ** 3
    assert float(vals.min()) >= _phi(h, g, H, M) - 1e-12
    assert sol.residual <= 1e-8 and not sol.hard_case
    assert sol.lambda_min == pytest.approx(float(torch.linalg.eigvalsh(H)[0]))


def test_closed_form_one_dimensional_zero_hessian():
    for gv, M in [(3.0, 2.0), (-0.5, 0.7), (1e-3, 10.0)]:
        h = solve_cubic_exact(torch.tensor([gv]), torch.zeros(1, 1), M).h
        expected = -math.copysign(math.sqrt(2 * abs(gv) / M), gv)
        assert float(h[0]) == pytest.approx(expected, rel=1e-10)


def test_tiny_M_recovers_newton_step():
    g, A = _random_problem(6, 3)
    H = A @ A.T + torch.eye(6)  # positive definite
    h = solve_cubic_exact(g, H, 1e-9).h
    newton = -torch.linalg.solve(H, g)
    assert torch.allclose(h, newton, rtol=1e-6, atol=1e-8)


def test_hard_case_and_continuity():
    H = torch.diag(torch.tensor([-1.0, 1.0]))
    M = 1.0
    sol = solve_cubic_exact(torch.zeros(2), H, M)
    assert sol.hard_case
    assert float(sol.h.norm()) == pytest.approx(2.0, rel=1e-12)
    assert abs(float(sol.h[1])) <= 1e-14  # parallel to e₁
    assert float(sol.model_value) == pytest.approx(-2.0 / (3.0 * M**2), rel=1e-12)
    r = float(sol.h.norm())
    assert float(torch.linalg.vector_norm((H + 0.5 * M * r * torch.eye(2)) @ sol.h)) <= 1e-8
    # Near-hard case: g = (1e-14, 1) stays close to the hard-case solution of g = (0, 1).
    g_hard = torch.tensor([0.0, 1.0])
    g_near = torch.tensor([1e-14, 1.0])
    h_hard = solve_cubic_exact(g_hard, H, M, hard_case_sign=-1.0).h
    h_near = solve_cubic_exact(g_near, H, M).h
    assert torch.allclose(h_hard, h_near, atol=1e-6)
    for g in (g_hard, g_near):
        sol = solve_cubic_exact(g, H, M)
        r = float(sol.h.norm())
        A = H + 0.5 * M * r * torch.eye(2)
        assert float(torch.linalg.vector_norm(A @ sol.h + g)) <= 1e-8
        assert float(torch.linalg.eigvalsh(A)[0]) >= -1e-8
    # Moving away from the hard case, the solution varies continuously.
    h_far = solve_cubic_exact(torch.tensor([1e-6, 1.0]), H, M).h
    assert torch.allclose(h_far, h_near, atol=1e-5)


def test_hard_case_random_rotation():
    # Random orthogonal basis; g orthogonal to the (negative) smallest eigenvector.
    d, M = 8, 2.0
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(5)))
    lam = torch.linspace(-3.0, 4.0, d)
    H = Q @ torch.diag(lam) @ Q.T
    g = Q[:, 1:] @ (0.01 * torch.ones(d - 1))
    sol = solve_cubic_exact(g, H, M)  # u₁ᵀg is ~1e-18 after rounding: hard or resolved near-hard
    r = float(sol.h.norm())
    A = H + 0.5 * M * r * torch.eye(d)
    assert float(torch.linalg.vector_norm(A @ sol.h + g)) <= 1e-8
    assert float(torch.linalg.eigvalsh(A)[0]) >= -1e-8
    assert r == pytest.approx(2 * 3.0 / M, rel=1e-8)


def test_zero_gradient_convex_returns_zero():
    sol = solve_cubic_exact(torch.zeros(3), torch.eye(3), 1.0)
    assert torch.equal(sol.h, torch.zeros(3))


def test_float32_input_solved_in_float64_and_cast_back():
    g, H = _random_problem(5, 7)
    sol32 = solve_cubic_exact(g.float(), H.float(), 1.0)
    assert sol32.h.dtype == torch.float32
    sol64 = solve_cubic_exact(g.float().double(), H.float().double(), 1.0)
    assert torch.equal(sol32.h, sol64.h.float())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="M must be a positive"):
        solve_cubic_exact(torch.ones(2), torch.eye(2), 0.0)
    with pytest.raises(ValueError, match="H must have shape"):
        solve_cubic_exact(torch.ones(2), torch.eye(3), 1.0)


def test_hvp_solver_matches_exact_on_random_50d_problems():
    for seed in range(20):
        g, H = _random_problem(50, 1000 + seed, scale=0.2)
        exact = solve_cubic_exact(g, H, 1.0).h
        gen = torch.Generator().manual_seed(seed)
        sol = solve_cubic_hvp(
            g, lambda v, H=H: H @ v, 1.0, rel_acc=1e-8, max_iters=20000, generator=gen
        )
        rel = float((sol.h - exact).norm() / exact.norm())
        assert rel <= 1e-3, (seed, rel, sol.iterations)


def test_hvp_solver_escapes_saddle_with_zero_gradient():
    H = torch.diag(torch.tensor([-1.0, 1.0]))
    sol = solve_cubic_hvp(
        torch.zeros(2), lambda v: H @ v, 1.0, rel_acc=1e-10, max_iters=5000, generator=None
    )
    assert float(sol.h.norm()) == pytest.approx(2.0, rel=1e-4)
    assert float(sol.model_value) == pytest.approx(-2.0 / 3.0, rel=1e-4)


def _solve_m3_reference(g, H, M3):
    """Minimizer of <g,h> + ½<Hh,h> + (M3/3)‖h‖³ (opt_methods convention), by the optimality condition
    (H + M3 r I) h = −g, r = ‖h‖, bisected independently of the project solver."""
    lam, U = torch.linalg.eigh(H)
    m = U.T @ g
    lo, hi = max(0.0, -float(lam[0]) / M3) + 1e-12, 1e3
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        if float((m / (lam + M3 * mid)).norm()) > mid:
            lo = mid
        else:
            hi = mid
    return -(U @ (m / (lam + M3 * hi)))


def test_from_m3_convention_round_trip():
    assert from_m3_convention(0.5) == 1.0
    for seed in range(3):
        g, H = _random_problem(10, 50 + seed)
        M3 = 0.8
        ours = solve_cubic_exact(g, H, from_m3_convention(M3)).h
        ref = _solve_m3_reference(g, H, M3)
        assert torch.allclose(ours, ref, atol=1e-8)


def test_reg_newton_step_solves_regularized_system():
    g, A = _random_problem(12, 9)
    H = A @ A.T
    M = 3.0
    sol = reg_newton_step(g, H, M)
    lam = math.sqrt(M * float(g.norm()))
    assert float(torch.linalg.vector_norm((H + lam * torch.eye(12)) @ sol.h + g)) <= 1e-10


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_raise_instead_of_hanging(bad):
    from ops.cubic_reference import cubic_step

    g, H = torch.tensor([bad, 1.0]), torch.eye(2)
    with pytest.raises(ValueError, match="non-finite"):
        solve_cubic_exact(g, H, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        solve_cubic_exact(torch.ones(2), torch.tensor([[bad, 0.0], [0.0, 1.0]]), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        solve_cubic_hvp(g, lambda v: v, 1.0)
    with pytest.raises(ValueError, match="non-finite Hessian-vector products"):
        solve_cubic_hvp(torch.ones(2), lambda v: v * bad, 1.0, L=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        reg_newton_step(g, H, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        cubic_step(g.numpy(), H.numpy(), 1.0)


def test_zero_gradient_with_a_flat_or_singular_model_gives_a_finite_step():
    zero = torch.zeros(3)
    hvp = solve_cubic_hvp(zero, lambda v: torch.zeros_like(v), 1.0)  # L = 0 and g = 0
    assert torch.isfinite(hvp.h).all() and float(hvp.h.norm()) < 1e-2
    step = reg_newton_step(zero, torch.zeros(3, 3), 1.0)  # λ = √(M‖g‖) = 0, H singular
    assert torch.equal(step.h, zero)


@pytest.mark.parametrize(
    ("diag", "g"), [((2.0, 5.0, 7.0), (3.0, 0.0, 0.0)), ((-1.0, 5.0), (0.5, 0.0))]
)
def test_hvp_cauchy_point_is_the_minimizer_when_g_is_the_lowest_eigenvector(diag, g):
    # Spec HVP step 4: h0 = -r_c g/|g|, r_c = (-kappa + sqrt(kappa^2 + 2M|g|))/M. With g along the
    # lowest eigenvector the global minimizer lies on -g, so h0 is exact; max_iters=0 returns h0.
    H, g = torch.diag(torch.tensor(diag)), torch.tensor(g)
    sol = solve_cubic_hvp(g, lambda v: H @ v, 1.0, L=10.0, max_iters=0, perturb=0.0)
    assert torch.allclose(sol.h, solve_cubic_exact(g, H, 1.0).h, atol=1e-12)


def test_hvp_gradient_step_uses_the_spec_step_size():
    # Spec HVP steps 2 and 5: eta = 1/(4(L + M R/2)), R = (L + sqrt(L^2 + 2M|g|))/M. A larger
    # eta still converges on the other tests; one step from the Cauchy point pins it.
    H = torch.tensor([[1.0, 0.5], [0.5, -2.0]])
    g = torch.tensor([1.0, 2.0])
    M, L = 1.5, 3.0
    sol = solve_cubic_hvp(g, lambda v: H @ v, M, L=L, max_iters=1, rel_acc=1e-14, perturb=0.0)
    gn = float(g.norm())
    kappa = float(g @ H @ g) / gn**2
    h0 = -((-kappa + math.sqrt(kappa**2 + 2 * M * gn)) / M) * g / gn
    R = (L + math.sqrt(L**2 + 2 * M * gn)) / M
    eta = 1.0 / (4.0 * (L + 0.5 * M * R))
    expected = h0 - eta * cubic_model_grad(h0, g, H, M)
    assert torch.allclose(sol.h, expected, atol=1e-14)


def _indefinite_problem(d=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return torch.randn(d, generator=gen, dtype=torch.float64), (A + A.T) / 2


@pytest.mark.parametrize("M", [1e-308, 5e-324])
def test_a_vanishing_M_raises_instead_of_hanging(M):
    # −2λ₁/M (and ‖H‖/M) overflow float64: the root bracket became NaN and its doubling loop
    # never ended (100 % CPU, SIGTERM ignored). Now the error names M.
    from ops.cubic_reference import cubic_step

    g, H = _indefinite_problem()
    with pytest.raises(ValueError, match=f"overflows float64 \\(M={M:g}"):
        solve_cubic_exact(g, H, M)
    with pytest.raises(ValueError, match="overflows float64"):
        cubic_step(g.numpy(), H.numpy(), M)
    with pytest.raises(ValueError, match=f"R on ‖h‖ overflows float64 \\(M={M:g}"):
        solve_cubic_hvp(g, lambda v: H @ v, M, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("M", [1e-200, 1e-300])
def test_a_tiny_M_is_solved_without_overflow(M):
    # ‖h‖ ~ 1e200: Python's float power raised a bare OverflowError (1/r**2), and the squared
    # norms of the secular equation overflowed into a wrong step. The optimality conditions
    # (H + (M r/2) I) h = −g and H + (M r/2) I ⪰ 0 hold relative to the size of the terms.
    g, H = _indefinite_problem()
    h = solve_cubic_exact(g, H, M).h
    r = float(torch.linalg.vector_norm(h))
    shift = 0.5 * M * r
    residual = torch.linalg.vector_norm(H @ h + shift * h + g)
    assert float(residual) <= 1e-8 * shift * r
    lam = torch.linalg.eigvalsh(H)
    assert float(lam[0]) + shift >= -1e-12 * float(lam.abs().max())


@pytest.mark.parametrize("g0", [1e150, 0.0])  # ordinary and hard case
def test_a_huge_hessian_is_solved_without_overflow(g0):
    # ‖H‖ ~ 1e160 (a diverging run): r ≥ r_lo = 2e160, whose square overflows float64.
    H = torch.diag(torch.tensor([-1e160, 2e160], dtype=torch.float64))
    g = torch.tensor([g0, 1.0], dtype=torch.float64)
    step = solve_cubic_exact(g, H, 1.0)
    scaled = step.h / 1e160  # torch's norm of h itself overflows
    r = 1e160 * float(torch.linalg.vector_norm(scaled))
    assert step.hard_case == (g0 == 0.0)
    assert 2e160 <= r <= 2e160 * (1 + 1e-9)
    # (H + (M r/2) I) h = −g, divided through by 1e320 (H h alone overflows)
    residual = (H / 1e160) @ scaled + 0.5 * (r / 1e160) * scaled + g / 1e320
    assert float(torch.linalg.vector_norm(residual)) <= 1e-8 * 4.0


def test_only_the_symmetric_part_of_the_hessian_counts():
    # ½⟨Ah, h⟩ = ½⟨((A + Aᵀ)/2)h, h⟩: the cubic model, hence its minimizer, sees only the
    # symmetric part. eigh reads one triangle, so an unsymmetrised estimate (float32 autograd
    # rounding, a user's Hessian) would be solved as a different matrix.
    A = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    g = torch.tensor([1.0, 0.5])
    h = solve_cubic_exact(g, A, 1.0).h
    torch.testing.assert_close(h, solve_cubic_exact(g, 0.5 * (A + A.T), 1.0).h, rtol=0, atol=1e-12)
    assert float(h.norm()) > 0


def test_hvp_solver_finds_the_global_minimizer_in_the_hard_case():
    # g = e₂ is orthogonal to the negative-curvature direction e₁ of H = diag(−1, 1). Gradient
    # descent from the Cauchy point stays on the e₂ axis (local minimum s = 1 − √3,
    # Φ = −0.5294); the perturbation σq of the spec (HVP solver, step 3) lets it leave. The
    # global minimizer (spec §3, hard case, M = 1): r = 2, h = (±√3.75, −½), so
    # Φ = −½ + ½(−3.75 + ¼) + 8/6 = −11/12.
    H = torch.diag(torch.tensor([-1.0, 1.0]))
    sol = solve_cubic_hvp(
        torch.tensor([0.0, 1.0]), lambda v: H @ v, 1.0, rel_acc=1e-10, max_iters=20000,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert float(sol.model_value) == pytest.approx(-11 / 12, rel=1e-6)
    assert abs(float(sol.h[0])) == pytest.approx(math.sqrt(3.75), rel=1e-5)
