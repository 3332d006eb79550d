"""Schulz iteration: closed form, convergence bound, divergence of the legacy start (spec 7.1-7.3)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ops.schulz import SchulzDivergenceError, schulz_alpha, schulz_inverse


def _random_spd(d: int, n: int, seed: int, damping: float = 0.01) -> torch.Tensor:
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g.T @ g / n + damping * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("k", [0, 1, 3, 6])
@pytest.mark.parametrize("init", ["frobenius", "trace", "legacy"])
def test_closed_form_on_diagonal(k: int, init: str) -> None:
    # E_k = (I - alpha A)^(2^k)  =>  X_k = A^{-1} (I - (I - alpha A)^(2^k)) entrywise
    a = torch.tensor([3.0, 1.0, 0.25, 1e-2], dtype=torch.float64)
    A = torch.diag(a)
    X, info = schulz_inverse(A, init=init, max_iter=k, early_stop=False, accept_tol=math.inf)
    # the starts by hand: 1/||A||_F, 1/trace(A), the official fixed 5e-5
    alpha = {
        "frobenius": 1 / math.sqrt(9 + 1 + 0.0625 + 1e-4),
        "trace": 1 / 4.26,
        "legacy": 5e-5,
    }[init]
    assert schulz_alpha(A, init) == pytest.approx(alpha, rel=1e-15)
    # 1 - (1 - x)^N without cancellation: -expm1(N log1p(-x))
    expected = -torch.expm1(2**k * torch.log1p(-alpha * a)) / a
    assert info.iters == k
    torch.testing.assert_close(torch.diagonal(X), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(X - torch.diag(torch.diagonal(X)), torch.zeros_like(X))


@pytest.mark.parametrize("init", ["frobenius", "trace"])
def test_random_spd_converges_within_bound(init: str) -> None:
    A = _random_spd(64, 40, seed=0)
    X, info = schulz_inverse(A, init=init, max_iter=200, tol=1e-13)
    inv = torch.linalg.inv(A)
    rel = torch.linalg.matrix_norm(X - inv) / torch.linalg.matrix_norm(inv)
    assert rel <= 1e-10
    mu_min = float(torch.linalg.eigvalsh(A)[0])
    # k* ~ log2(1 / (alpha mu_min)) + log2(ln(1 / tol)), with 1/alpha = ||A||_F or trace(A)
    scale = float(torch.trace(A)) if init == "trace" else float(torch.linalg.matrix_norm(A))
    bound = math.ceil(math.log2(scale / mu_min)) + 7
    assert info.iters <= bound
    assert info.converged
    # monotone up to the step that may have triggered the stagnation stop at the float64 floor
    h = info.history[:-1]
    assert all(b <= a for a, b in itertools.pairwise(h))
    assert info.residual == min(info.history)


def test_residual_non_increasing_after_below_one_float32() -> None:
    A = _random_spd(128, 400, seed=1).float()
    _, info = schulz_inverse(A, init="frobenius", max_iter=60)
    below = [r for r in info.history if r < 1]
    assert below, info.history
    first = info.history.index(below[0])
    tail = info.history[first:]
    # the stagnation stop returns the best iterate; the recorded sequence is monotone up to the
    # single step that triggered the stop
    assert all(b <= a for a, b in itertools.pairwise(tail[:-1]))
    assert info.residual == min(info.history)
    assert info.converged


def test_legacy_start_diverges_and_frobenius_converges() -> None:
    A = torch.diag(torch.tensor([5e4, 1.0], dtype=torch.float64))
    with pytest.raises(SchulzDivergenceError, match="diverged"):
        schulz_inverse(A, init="legacy", max_iter=30)
    X, info = schulz_inverse(A, init="frobenius", max_iter=60, tol=1e-12)
    assert info.converged
    torch.testing.assert_close(X, torch.linalg.inv(A), rtol=1e-9, atol=1e-12)


def test_legacy_faithful_mode_warns_instead_of_raising() -> None:
    A = torch.diag(torch.tensor([5e4, 1.0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="diverged"):
        schulz_inverse(A, init="legacy", max_iter=5, early_stop=False, raise_on_divergence=False)


def test_not_converged_warns() -> None:
    A = _random_spd(32, 8, seed=2, damping=1e-4)
    with pytest.warns(RuntimeWarning, match="accept_tol"):
        _, info = schulz_inverse(A, init="frobenius", max_iter=3)
    assert not info.converged


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        schulz_inverse(torch.ones(2, 3))
    with pytest.raises(ValueError, match="init"):
        schulz_inverse(torch.eye(2), init="identity")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Schulz iteration did not reach")
def test_iters_counts_the_returned_iterate_after_a_stagnation_stop() -> None:
    # float32 at its floor: the stagnation stop evaluates one more iterate, rejects it and returns
    # the previous (best) one; iters must describe the returned iterate, not the rejected update
    g = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    A = g.T @ g / 16 + 0.01 * torch.eye(64)
    _, info = schulz_inverse(A, init="frobenius", max_iter=60)
    assert info.history[info.iters] == info.residual
    assert info.iters == len(info.history) - 2
    assert info.stop == "stagnation"


def test_stop_reason_tol_and_max_iter() -> None:
    A = _random_spd(16, 64, seed=3)
    _, info = schulz_inverse(A, init="frobenius", max_iter=200, tol=1e-10)
    assert info.stop == "tol" and info.iters == len(info.history) - 1
    _, info = schulz_inverse(A, init="frobenius", max_iter=2, accept_tol=math.inf)
    assert info.stop == "max_iter" and info.iters == 2


def test_divergence_message_names_the_init_actually_used() -> None:
    # the Frobenius start cannot diverge on an SPD matrix: the message must say A is not SPD,
    # not blame init='legacy'
    A = torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    with pytest.raises(SchulzDivergenceError) as err:
        schulz_inverse(A, init="frobenius", max_iter=30)
    assert "init='frobenius'" in str(err.value) and "not SPD" in str(err.value)
    assert "with init='legacy'" not in str(err.value)
    with pytest.raises(SchulzDivergenceError, match="with init='legacy'"):
        schulz_inverse(torch.diag(torch.tensor([5e4, 1.0], dtype=torch.float64)), init="legacy")


def test_residual_is_frobenius_norm_over_sqrt_d() -> None:
    # A = 2 I_4: ||A||_F = sqrt(4 * 2^2) = 4, so the frobenius start is alpha = 1/4 and
    # alpha mu = 1/2 for every eigenvalue. R_0 = I - A X_0 = I/2, ||R_0||_F = sqrt(4)/2 = 1, and
    # the residual ||R||_F / sqrt(d) = 1/2 = |1 - alpha mu|; then (1/2)^2 = 1/4 at k = 1.
    A = 2.0 * torch.eye(4, dtype=torch.float64)
    _, info = schulz_inverse(A, init="frobenius", max_iter=1, early_stop=False, accept_tol=math.inf)
    assert info.alpha == 0.25
    assert info.history == pytest.approx([0.5, 0.25], rel=1e-15)


def test_legacy_divergence_is_reported_at_the_first_residual_above_ten_times_the_start() -> None:
    # legacy alpha = 5e-5 on diag(5e4, 1): per eigen-direction e_k = (1 - alpha mu)^(2^k), i.e.
    # (-1.5)^(2^k) and (1 - 5e-5)^(2^k) ~ 1, rho_k = sqrt(e1^2 + e2^2) / sqrt(2):
    # rho_0 = sqrt((2.25 + 0.9999) / 2) ~ 1.27, so the guard is 10 rho_0 ~ 12.7;
    # rho_1 ~ 1.74, rho_2 ~ 3.65 (below), rho_3 ~ sqrt((1.5^16 + 1) / 2) ~ 18.1 (above): step 3.
    # (A 100 rho_0 ~ 127 guard would first trip at step 4, rho_4 ~ 1.5^16 / sqrt(2) ~ 464.)
    A = torch.diag(torch.tensor([5e4, 1.0], dtype=torch.float64))
    with pytest.raises(SchulzDivergenceError, match="diverged at step 3 "):
        schulz_inverse(A, init="legacy", max_iter=10)
