"""Influence math pinned against dense formulas (spec section 7, items 4-11)."""

from __future__ import annotations

import pytest
import torch

from ops.influence import (
    fim,
    gfim,
    influence_scores,
    lissa_scale,
    orient_grad,
    precondition_datainf,
    precondition_exact_fim,
    precondition_exact_gfim,
    precondition_exact_hessian,
    precondition_grad_dot,
    precondition_hyperinf,
    precondition_lissa,
    precondition_lissa_code_faithful,
    relative_damping,
)
from ops.influence_metrics import detection_rate, roc_auc

D64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gfim_kronecker_equals_dense_score() -> None:
    # (I_r (x) G + lambda I)^{-1} vec(v) . vec(g_i) with row-major vec == fast path (spec 7.4)
    r, d, n, lam = 3, 5, 7, 0.3
    g = torch.randn(n, r, d, generator=_gen(0), dtype=D64)
    v = torch.randn(r, d, generator=_gen(1), dtype=D64)
    G = gfim(g)
    dense = torch.kron(torch.eye(r, dtype=D64), G) + lam * torch.eye(r * d, dtype=D64)
    expected = -(g.reshape(n, -1) @ torch.linalg.solve(dense, v.reshape(-1)))
    h = precondition_exact_gfim(v, G, lam)
    torch.testing.assert_close(influence_scores({"w": h}, {"w": g}), expected)
    h2, info = precondition_hyperinf(v, G, lam, tol=1e-13, max_iter=100)
    assert info.converged
    torch.testing.assert_close(influence_scores({"w": h2}, {"w": g}), expected)
    # G sums over the r rows: G = (1/n) sum_i g_i^T g_i
    torch.testing.assert_close(G, torch.einsum("nri,nrj->ij", g, g) / n)


@pytest.mark.parametrize("r", [1, 4, 16])
def test_orientation_lora_b_and_rank_independent_gfim(r: int) -> None:
    """lora_B (d_out, r) is transposed to (r, d_out); lora_A and 1-D tensors keep their values."""
    d_out, d_in, n = 12, 7, 5
    gb = torch.randn(n, d_out, r, generator=_gen(r))  # raw lora_B grads (d_out, r)
    ob = orient_grad("base.layer.lora_B.default.weight", gb, batched=True)
    assert ob.shape == (n, r, d_out)
    # Orientation is a transpose, element by element: ob[s, j, i] == gb[s, i, j] (a reshape to the
    # same shape scrambles the entries as soon as r > 1).
    for s in range(n):
        for i in range(d_out):
            for j in range(r):
                assert ob[s, j, i] == gb[s, i, j]
    # Unbatched: the same transpose of a single (d_out, r) gradient.
    one = orient_grad("base.layer.lora_B.default.weight", gb[2])
    assert torch.equal(one, torch.stack([gb[2][:, j] for j in range(r)]))
    # GFIM of oriented B grads: (1/n) sum_s ob_s^T ob_s = (1/n) sum_s B_s B_s^T, a d_out x d_out
    # matrix whatever the rank r; entry (i, k) = (1/n) sum_{s, j} gb[s, i, j] gb[s, k, j].
    expected_gb = torch.zeros(d_out, d_out)
    for s in range(n):
        expected_gb += gb[s] @ gb[s].T
    torch.testing.assert_close(gfim(ob), expected_gb / n)
    ga = torch.randn(n, r, d_in, generator=_gen(r + 1))
    oa = orient_grad("base.layer.lora_A.default.weight", ga, batched=True)
    # lora_A is already (r, d_in): kept as is; its GFIM is (1/n) sum_s A_s^T A_s (d_in x d_in).
    assert torch.equal(oa, ga)
    expected_ga = torch.zeros(d_in, d_in)
    for s in range(n):
        expected_ga += ga[s].T @ ga[s]
    torch.testing.assert_close(gfim(oa), expected_ga / n)
    bias = torch.arange(3.0)
    assert torch.equal(
        orient_grad("head.bias", bias.expand(n, 3), batched=True)[:, 0], bias.expand(n, 3)
    )
    assert orient_grad("head.bias", torch.zeros(n, 3), batched=True).shape == (n, 1, 3)
    assert torch.equal(orient_grad("head.bias", bias), bias.view(1, 3))
    with pytest.raises(ValueError, match=r"conv\.weight"):
        orient_grad("conv.weight", torch.zeros(2, 3, 4))


def test_relative_damping_is_tenth_of_mean_square() -> None:
    g = torch.randn(9, 4, 6, generator=_gen(3), dtype=D64)
    S = g.pow(2).flatten(1).mean(1).sum()
    assert relative_damping(S, 9, 10.0) == pytest.approx(0.1 * float(g.pow(2).mean()), rel=1e-12)


def test_datainf_equals_average_of_inverses_and_exact_fim_at_n1() -> None:
    n, r, d, lam = 6, 2, 4, 0.05
    g = torch.randn(n, r, d, generator=_gen(4), dtype=D64)
    v = torch.randn(r, d, generator=_gen(5), dtype=D64)
    gh = g.reshape(n, -1)
    eye = torch.eye(r * d, dtype=D64)
    dense = sum(torch.linalg.solve(lam * eye + torch.outer(x, x), v.reshape(-1)) for x in gh) / n
    torch.testing.assert_close(precondition_datainf(v, g, lam).reshape(-1), dense)
    one = g[:1]
    torch.testing.assert_close(
        precondition_datainf(v, one, lam), precondition_exact_fim(v, lam, grads=one)
    )


def test_lissa_converges_to_damped_inverse_and_faithful_to_minus_damping() -> None:
    p, lam = 6, 0.2
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=_gen(6), dtype=D64))
    # spectrum inside (lambda, lambda + 2) so the code-faithful recursion converges too
    F = Q @ torch.diag(torch.linspace(lam + 0.1, lam + 1.8, p, dtype=D64)) @ Q.T
    v = torch.randn(1, p, generator=_gen(7), dtype=D64)
    eye = torch.eye(p, dtype=D64)
    x = precondition_lissa(v, F, lam, iters=2000, scale="trace")
    torch.testing.assert_close(x.reshape(-1), torch.linalg.solve(F + lam * eye, v.reshape(-1)))
    y = precondition_lissa_code_faithful(v, F, lam, iters=2000)
    torch.testing.assert_close(y.reshape(-1), torch.linalg.solve(F - lam * eye, v.reshape(-1)))


def test_lissa_on_a_hessian_converges_to_exact_hessian_inverse() -> None:
    # lissa_hessian is the lissa recursion on a Hessian block: on an SPD block with the spectrum
    # inside (0, 2s) it converges to exact_hessian's (H + lambda I)^{-1} v
    p, lam = 8, 1e-2
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=_gen(20), dtype=D64))
    H = Q @ torch.diag(torch.linspace(0.05, 3.0, p, dtype=D64)) @ Q.T
    v = torch.randn(2, p // 2, generator=_gen(21), dtype=D64)
    exact = precondition_exact_hessian(v, H, lam)
    dense = torch.linalg.solve(H + lam * torch.eye(p, dtype=D64), v.reshape(-1))
    torch.testing.assert_close(exact.reshape(-1), dense)
    # s = 5 > mu_max / 2; contraction 1 - (0.05 + lam)/5 per step, 3000 steps: ~1e-16
    torch.testing.assert_close(precondition_lissa(v, H, lam, iters=3000, scale=5.0), exact)


def test_exact_hessian_solves_an_indefinite_damped_hessian() -> None:
    # a non-convex loss has negative curvature: H + lambda I is indefinite, Cholesky (the Fisher
    # path) would fail, the LU solve of exact_hessian does not
    p, lam = 6, 1e-3
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=_gen(22), dtype=D64))
    H = Q @ torch.diag(torch.tensor([-0.5, -0.1, 0.2, 0.4, 1.0, 2.0], dtype=D64)) @ Q.T
    v = torch.randn(1, p, generator=_gen(23), dtype=D64)
    with pytest.raises(torch.linalg.LinAlgError):
        precondition_exact_fim(v, lam, F=H)
    x = precondition_exact_hessian(v, H, lam)
    torch.testing.assert_close((H + lam * torch.eye(p, dtype=D64)) @ x.reshape(-1), v.reshape(-1))


def test_exact_fim_woodbury_equals_dense() -> None:
    n, r, d, lam = 5, 3, 4, 0.1  # n < r d: Woodbury path
    g = torch.randn(n, r, d, generator=_gen(8), dtype=D64)
    v = torch.randn(r, d, generator=_gen(9), dtype=D64)
    dense = torch.linalg.solve(fim(g) + lam * torch.eye(r * d, dtype=D64), v.reshape(-1))
    torch.testing.assert_close(precondition_exact_fim(v, lam, grads=g).reshape(-1), dense)
    torch.testing.assert_close(precondition_exact_fim(v, lam, F=fim(g)).reshape(-1), dense)


def test_hyperinf_reduces_to_grad_dot_with_zero_curvature() -> None:
    d = 8
    v = torch.randn(2, d, generator=_gen(10), dtype=D64)
    g = torch.randn(4, 2, d, generator=_gen(11), dtype=D64)
    h, _ = precondition_hyperinf(v, torch.zeros(d, d, dtype=D64), 1.0, tol=1e-14)
    torch.testing.assert_close(
        influence_scores({"w": h}, {"w": g}),
        influence_scores({"w": precondition_grad_dot(v)}, {"w": g}),
    )


def test_sign_matches_finite_difference_upweighting_ridge() -> None:
    # L(theta) = (1/n) sum_i w_i (x_i theta - y_i)^2 / 2 + (c/2)||theta||^2. Up-weighting z_i by
    # (1 + eps): dL_val/deps = -(1/n) grad L_val^T H^{-1} grad l_i, so IF_i = n dL_val/deps.
    n, d, c = 30, 5, 0.1
    X = torch.randn(n, d, generator=_gen(12), dtype=D64)
    y = X @ torch.randn(d, generator=_gen(13), dtype=D64) + 0.3 * torch.randn(
        n, generator=_gen(14), dtype=D64
    )
    Xv = torch.randn(10, d, generator=_gen(15), dtype=D64)
    yv = torch.randn(10, generator=_gen(16), dtype=D64)

    def fit(w: torch.Tensor) -> torch.Tensor:
        H = (X.T * w) @ X / n + c * torch.eye(d, dtype=D64)
        return torch.linalg.solve(H, (X.T * w) @ y / n)

    def val_loss(theta: torch.Tensor) -> torch.Tensor:
        return ((Xv @ theta - yv) ** 2 / 2).mean()

    theta = fit(torch.ones(n, dtype=D64))
    H = X.T @ X / n + c * torch.eye(d, dtype=D64)
    grads = (X * (X @ theta - y).unsqueeze(1)).unsqueeze(1)  # (n, 1, d)
    v = (Xv.T @ (Xv @ theta - yv) / 10).unsqueeze(0)
    h = torch.linalg.solve(H, v.reshape(-1)).unsqueeze(0)  # H symmetric: v H^{-1}
    scores = influence_scores({"theta": h}, {"theta": grads})
    eps = 1e-6
    for i in (0, 7, 21):
        w = torch.ones(n, dtype=D64)
        w[i] += eps
        up = val_loss(fit(w))
        w[i] -= 2 * eps
        fd = (up - val_loss(fit(w))) / (2 * eps)
        assert float(scores[i]) == pytest.approx(n * float(fd), rel=1e-2)


def test_roc_auc_and_detection_rate() -> None:
    scores = torch.tensor([0.9, 0.8, 0.1, 0.4, 0.4, 0.2])
    noisy = torch.tensor([True, False, False, True, False, False])
    # pairs (pos, neg): 0.9 beats all 4; 0.4 beats 0.1, 0.2, ties 0.4 (1/2), loses to 0.8
    assert roc_auc(scores, noisy) == pytest.approx((4 + 2.5) / 8)
    assert detection_rate(scores, noisy, 2 / 6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(scores, torch.zeros(6, dtype=torch.bool))


def test_detection_rate_rounds_the_top_fraction_to_the_nearest_count() -> None:
    # k = round(fraction * n): 0.29 * 10 = 2.9 -> k = 3 (truncation would give 2). Scores rank
    # the examples in index order; the positives are indices 2 (3rd) and 9 (last), so the top 3
    # hold one of the two positives: recall 1/2 (with k = 2 it would be 0).
    scores = torch.arange(10, 0, -1, dtype=torch.float64)
    positive = torch.zeros(10, dtype=torch.bool)
    positive[[2, 9]] = True
    assert detection_rate(scores, positive, 0.29) == 0.5


def test_lissa_trace_scale_is_trace_plus_damping() -> None:
    # Spec 3.5 / docstring: the default LiSSA scale is s = trace(F) + lambda, which bounds the
    # largest eigenvalue of F + lambda I: trace(diag(1, 2)) + 0.5 = 3.5.
    F = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert lissa_scale(F, 0.5, "trace") == 3.5


def test_influence_scores_refuse_no_tensors():
    with pytest.raises(ValueError, match="no tensors"):
        influence_scores({}, {})
