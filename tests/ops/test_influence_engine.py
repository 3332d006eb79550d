"""Influence engine on a real peft LoRA model: vmap vs loop, streaming vs cached (spec 7.12)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import spearmanr

from modules.sequence_classifier import LoRAClassifier
from ops.influence import METHODS, gfim, influence_scores, precondition_exact_gfim
from ops.influence_config import DampingConfig, GradConfig, LissaConfig, SchulzConfig
from ops.influence_engine import InfluenceEngine
from ops.per_sample_grads import (
    causal_lm_per_sample_loss,
    loss_hessian_blocks,
    per_sample_grads,
    select_params,
)

INCLUDE = ["lora_A", "lora_B", "head.weight"]


# One intra-op thread (tests/conftest.py): threads oversubscribe a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(dtype: torch.dtype = torch.float64, n: int = 40, m: int = 12):
    gen = torch.Generator().manual_seed(0)
    model = LoRAClassifier(in_features=6, hidden_size=10, num_classes=3, lora_r=2, init_seed=0)
    # make lora_B non-zero so every tensor has a non-trivial gradient
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=gen)
    model = model.to(dtype).eval()
    x = torch.randn(n + m, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n + m,), generator=gen)
    train = {"x": x[:n], "y": y[:n]}
    val = {"x": x[n:], "y": y[n:]}
    return model, train, val


def _batches(data: dict[str, torch.Tensor], bs: int):
    def it():
        n = data["y"].numel()
        for i in range(0, n, bs):
            idx = torch.arange(i, min(i + bs, n))
            yield idx, {k: t[idx] for k, t in data.items()}

    return it


def test_select_params_orientation_and_errors() -> None:
    model, _, _ = _setup()
    params = select_params(model, INCLUDE)
    assert len(params) == 3
    with pytest.raises(ValueError, match="no trainable parameter"):
        select_params(model, ["does_not_exist"])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n not in params for n in frozen)


def test_vmap_equals_loop() -> None:
    model, train, _ = _setup(torch.float32)
    params = select_params(model, INCLUDE)
    a = per_sample_grads(model, params, model.per_sample_loss, train, mode="vmap")
    b = per_sample_grads(model, params, model.per_sample_loss, train, mode="loop")
    for name in params:
        assert a[name].shape[0] == 40 and a[name].ndim == 3
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    lora_b = next(n for n in params if "lora_B" in n)
    assert a[lora_b].shape == (40, 2, 10)  # (d_out, r) transposed to (r, d_out)


def test_streaming_equals_cached_all_methods() -> None:
    model, train, val = _setup()
    params = select_params(model, INCLUDE)
    runs = {}
    for cache in ("always", "never"):
        engine = InfluenceEngine(
            methods=METHODS, grads=GradConfig(cache=cache, dtype="float64", batch_size=8)
        )
        runs[cache] = engine.run(
            model, params, model.per_sample_loss, _batches(train, 7), _batches(val, 5)
        )
    assert runs["always"].cached and not runs["never"].cached
    for method in METHODS:
        torch.testing.assert_close(
            runs["always"].scores[method], runs["never"].scores[method], rtol=0, atol=0
        )
    torch.testing.assert_close(runs["always"].index, torch.arange(40))


def test_auto_cache_falls_back_to_streaming_over_budget() -> None:
    model, train, val = _setup()
    params = select_params(model, INCLUDE)
    engine = InfluenceEngine(
        methods=["hyperinf"],
        grads=GradConfig(cache="auto", cache_limit_bytes=1000, dtype="float64"),
    )
    res = engine.run(model, params, model.per_sample_loss, _batches(train, 8), _batches(val, 8))
    assert not res.cached and res.scores["hyperinf"].shape == (40,)


def test_engine_hyperinf_matches_exact_and_batching_invariant() -> None:
    model, train, val = _setup()
    params = select_params(model, INCLUDE)
    engine = InfluenceEngine(
        methods=["hyperinf", "exact_gfim", "grad_dot"], grads=GradConfig(dtype="float64")
    )
    r1 = engine.run(model, params, model.per_sample_loss, _batches(train, 40), _batches(val, 12))
    r2 = engine.run(model, params, model.per_sample_loss, _batches(train, 3), _batches(val, 5))
    torch.testing.assert_close(r1.scores["hyperinf"], r1.scores["exact_gfim"], rtol=1e-6, atol=1e-9)
    for m in r1.scores:
        torch.testing.assert_close(r1.scores[m], r2.scores[m])
    assert spearmanr(r1.scores["hyperinf"], r1.scores["grad_dot"])[0] < 0.9999
    # relative damping: lambda_l = 0.1 * mean over samples and entries of g^2
    g = per_sample_grads(model, params, model.per_sample_loss, train)
    for name, lam in r1.lambdas.items():
        assert lam == pytest.approx(0.1 * float(g[name].pow(2).mean()), rel=1e-10)


def test_loss_hessian_blocks_equal_autograd_hessian_in_oriented_coordinates() -> None:
    model, train, _ = _setup()
    params = select_params(model, INCLUDE)
    H = loss_hessian_blocks(model, params, model.per_sample_loss, train)
    for name, p in params.items():

        def loss(w: torch.Tensor, name: str = name) -> torch.Tensor:
            logits = torch.func.functional_call(model, {name: w}, (train["x"],))
            return torch.nn.functional.cross_entropy(logits, train["y"], reduction="sum")

        ref = torch.autograd.functional.hessian(loss, p.detach())  # (*shape, *shape)
        if "lora_B" in name:  # oriented coordinates: (d_out, r) -> (r, d_out) on both sides
            ref = ref.permute(1, 0, 3, 2)
        k = p.numel()
        torch.testing.assert_close(H[name], ref.reshape(k, k), rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_engine_exact_hessian_is_the_koh_liang_influence_on_ridge() -> None:
    # Squared loss l_i = (x_i w - y_i)^2 / 2 with a fixed damping c: the damped Hessian of the
    # mean loss is X^T X / n + c I, i.e. the Hessian of the ridge objective, whose exact
    # up-weighting derivative is IF_i = - v^T H^{-1} g_i (test_influence.py pins it by finite
    # differences). The empirical Fisher (1/n) sum_i r_i^2 x_i x_i^T is a different matrix.
    n, d, c = 30, 5, 0.1
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(n + 10, d, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(d, generator=gen, dtype=torch.float64)
    y = y + 0.3 * torch.randn(n + 10, generator=gen, dtype=torch.float64)
    lin = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        A = X[:n].T @ X[:n] / n + c * torch.eye(d, dtype=torch.float64)
        lin.weight.copy_(torch.linalg.solve(A, X[:n].T @ y[:n] / n).unsqueeze(0))

    def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return (lin(b["x"]).squeeze(-1) - b["y"]) ** 2 / 2

    train = {"x": X[:n], "y": y[:n]}
    val = {"x": X[n:], "y": y[n:]}
    engine = InfluenceEngine(
        methods=["exact_hessian", "lissa_hessian", "exact_fim"],
        damping=DampingConfig(mode="fixed", value=c),
        lissa=LissaConfig(iters=2000, scale="trace"),
        grads=GradConfig(dtype="float64"),
    )
    res = engine.run(
        lin, dict(lin.named_parameters()), loss_fn, _batches(train, 7), _batches(val, 4)
    )
    w = lin.weight.detach().reshape(-1)
    g = X[:n] * (X[:n] @ w - y[:n]).unsqueeze(1)
    v = (X[n:] * (X[n:] @ w - y[n:]).unsqueeze(1)).mean(0)
    expected = -g @ torch.linalg.solve(A, v)
    torch.testing.assert_close(res.stats.H["weight"], X[:n].T @ X[:n] / n)
    torch.testing.assert_close(res.scores["exact_hessian"], expected)
    torch.testing.assert_close(res.scores["lissa_hessian"], expected)
    assert not torch.allclose(res.scores["exact_fim"], expected, rtol=1e-2)


def test_engine_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="unknown influence method 'tracin'"):
        InfluenceEngine(methods=["tracin"])
    with pytest.raises(ValueError, match=r"damping\.value"):
        InfluenceEngine(damping=DampingConfig(mode="fixed"))
    with pytest.raises(ValueError, match="code_faithful_preset"):
        InfluenceEngine(code_faithful_preset="fast")
    model, train, val = _setup()
    params = select_params(model, INCLUDE)
    engine = InfluenceEngine(methods=["lissa"], grads=GradConfig(fim_max_dim=10))
    with pytest.raises(ValueError, match=r"lissa .* need a dense"):
        engine.run(model, params, model.per_sample_loss, _batches(train, 8), _batches(val, 8))
    # exact_fim falls back to Woodbury only while n (40) x r d fits fim_max_dim**2
    engine = InfluenceEngine(methods=["exact_fim"], grads=GradConfig(fim_max_dim=10))
    with pytest.raises(ValueError, match=r"Woodbury form needs the \(40, 12\)"):
        engine.run(model, params, model.per_sample_loss, _batches(train, 8), _batches(val, 8))


def test_exact_fim_woodbury_path_equals_dense_fisher() -> None:
    # n = 12 < r d for lora_B (20) and head.weight (30): with fim_max_dim = 19 those two are
    # solved by Woodbury on the gathered gradient rows (12 x 30 <= 19**2), lora_A (12) densely.
    model, train, val = _setup(n=12)
    params = select_params(model, INCLUDE)

    def run(fim_max_dim: int):
        engine = InfluenceEngine(
            methods=["exact_fim"], grads=GradConfig(dtype="float64", fim_max_dim=fim_max_dim)
        )
        return engine.run(
            model, params, model.per_sample_loss, _batches(train, 5), _batches(val, 4)
        )

    dense, woodbury = run(8192), run(19)
    lora_a, lora_b = (next(n for n in params if key in n) for key in ("lora_A", "lora_B"))
    assert set(woodbury.stats.grad_rows) == {lora_b, "head.weight"}
    assert set(woodbury.stats.F) == {lora_a}
    assert woodbury.stats.grad_rows["head.weight"].shape == (12, 30)
    torch.testing.assert_close(woodbury.scores["exact_fim"], dense.scores["exact_fim"])
    # rows are placed by dataset index, so indices must be 0..n-1, each once
    shifted = lambda: ((index + 5, batch) for index, batch in _batches(train, 5)())  # noqa: E731
    engine = InfluenceEngine(methods=["exact_fim"], grads=GradConfig(fim_max_dim=19))
    with pytest.raises(ValueError, match=r"every index in \[0, 12\) exactly once"):
        engine.run(model, params, model.per_sample_loss, shifted, _batches(val, 4))


@pytest.mark.parametrize(
    ("damping", "key"),
    [
        (DampingConfig(lambda_const=0.0), "damping.lambda_const"),
        (DampingConfig(lambda_const=-10.0), "damping.lambda_const"),
        (DampingConfig(mode="fixed", value=0.0), "damping.value"),
        (DampingConfig(mode="fixed", value=-1e-3), "damping.value"),
        (DampingConfig(extra=-1e-3), "damping.extra"),
        (DampingConfig(mode="absolute"), "damping.mode"),  # type: ignore[arg-type]
    ],
)
def test_engine_rejects_non_positive_damping(damping: DampingConfig, key: str) -> None:
    # value=0 gave NaN DataInf scores, lambda_const<0 garbage scores or a misleading Schulz error
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        InfluenceEngine(methods=["hyperinf", "datainf"], damping=damping)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: GradConfig(batch_size=0), "grads.batch_size=0"),
        (lambda: GradConfig(fim_max_dim=0), "grads.fim_max_dim=0"),
        (lambda: GradConfig(cache_limit_bytes=-1), "grads.cache_limit_bytes=-1"),
        (lambda: SchulzConfig(max_iter=-5), "schulz.max_iter=-5"),
        (lambda: SchulzConfig(tol=-1e-6), "schulz.tol=-1e-06"),
        (lambda: LissaConfig(iters=0), "lissa.iters=0"),
        (lambda: LissaConfig(code_faithful_iters=0), "lissa.code_faithful_iters=0"),
        (lambda: LissaConfig(scale=0.0), "lissa.scale=0.0"),
    ],
)
def test_setting_groups_reject_out_of_range_values_when_built(make, key: str) -> None:
    # they used to fail only in the scoring pass, i.e. after a whole training run
    with pytest.raises(ValueError, match=re.escape(key)):
        make()


def test_exact_gfim_uses_the_preset_damping_of_hyperinf() -> None:
    # with code_faithful_preset='mislabel' hyperinf inverts G + lambda I + 1e-3 I; its exact
    # target must invert the same matrix, or the gap looks like Schulz error
    model, train, val = _setup()
    params = select_params(model, INCLUDE)

    def scores(**kw) -> torch.Tensor:
        engine = InfluenceEngine(["exact_gfim"], grads=GradConfig(dtype="float64"), **kw)
        res = engine.run(model, params, model.per_sample_loss, _batches(train, 8), _batches(val, 8))
        return res.scores["exact_gfim"]

    preset = scores(code_faithful_preset="mislabel")
    torch.testing.assert_close(preset, scores(damping=DampingConfig(extra=1e-3)))
    assert not torch.allclose(preset, scores(), rtol=1e-6)
    with pytest.warns(UserWarning, match=r"replaces damping\.extra"):
        InfluenceEngine(["hyperinf"], DampingConfig(extra=0.5), code_faithful_preset="mislabel")


def test_engine_gfim_is_the_per_sample_mean_and_hyperinf_adds_the_preset_damping() -> None:
    # The other engine tests compare hyperinf with exact_gfim, which share the engine's G and
    # damping: cross-sample products in G or a lost preset +1e-3 would pass them unnoticed.
    model, train, val = _setup()
    params = select_params(model, INCLUDE)
    g = per_sample_grads(model, params, model.per_sample_loss, train)
    engine = InfluenceEngine(
        ["hyperinf"], grads=GradConfig(dtype="float64"), code_faithful_preset="mislabel"
    )
    res = engine.run(model, params, model.per_sample_loss, _batches(train, 7), _batches(val, 5))
    for name in params:
        torch.testing.assert_close(res.stats.G[name], gfim(g[name]))
    preconditioned = {
        name: precondition_exact_gfim(res.stats.v[name], gfim(g[name]), res.lambdas[name] + 1e-3)
        for name in params
    }
    expected = influence_scores(preconditioned, g)
    torch.testing.assert_close(res.scores["hyperinf"], expected, rtol=1e-5, atol=1e-9)


class _TokenLM(torch.nn.Module):
    """Position-wise toy LM (no attention): padding cannot change the real tokens' logits."""

    def __init__(self, vocab: int = 11, width: int = 6):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


def test_causal_lm_loss_without_labels_ignores_padding() -> None:
    lm = _TokenLM()
    short = torch.tensor([[3, 5, 7, 2]])
    alone = causal_lm_per_sample_loss(lm, {"input_ids": short})
    # right-padded with token 0 next to an unpadded sequence, as a collator would batch them
    batch = {
        "input_ids": torch.tensor([[3, 5, 7, 2, 0, 0], [4, 1, 9, 9, 2, 6]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
    }
    padded = causal_lm_per_sample_loss(lm, batch)
    torch.testing.assert_close(padded[0], alone[0])  # before: the two pads were targets too
    # per-sample gradients (vmap over examples of one) see the same masked targets
    params = dict(lm.named_parameters())
    loss_fn = lambda b: causal_lm_per_sample_loss(lm, b)  # noqa: E731
    g_batch = per_sample_grads(lm, params, loss_fn, batch)
    g_alone = per_sample_grads(lm, params, loss_fn, {"input_ids": short})
    for name in params:
        torch.testing.assert_close(g_batch[name][0], g_alone[name][0])
    # explicit labels still win
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.testing.assert_close(causal_lm_per_sample_loss(lm, {**batch, "labels": labels}), padded)


@pytest.mark.parametrize("symmetrize", [True, False])
def test_schulz_symmetrize_setting_reaches_the_solver(monkeypatch, symmetrize: bool) -> None:
    import ops.influence as influence

    seen, solve = [], influence.schulz_inverse

    def recording_solve(A, **kwargs):
        seen.append(kwargs["symmetrize"])
        return solve(A, **kwargs)

    monkeypatch.setattr(influence, "schulz_inverse", recording_solve)
    model, train, val = _setup(n=12)
    engine = InfluenceEngine(methods=["hyperinf"], schulz=SchulzConfig(symmetrize=symmetrize))
    params = select_params(model, INCLUDE)
    engine.run(model, params, model.per_sample_loss, _batches(train, 6), _batches(val, 6))
    assert seen == [symmetrize] * len(params)


def test_engine_datainf_is_the_dense_average_of_damped_rank_one_inverses() -> None:
    # Spec (hyperinf.md, check 7): DataInf equals the dense average
    # (1/n) sum_i (lambda I + gh_i gh_i^T)^{-1} vh; solved here directly (no Sherman-Morrison),
    # on the engine's own v and lambda, with the gradients streamed in batches of 7.
    model, train, val = _setup()
    params = select_params(model, INCLUDE)
    g = per_sample_grads(model, params, model.per_sample_loss, train)
    engine = InfluenceEngine(["datainf"], grads=GradConfig(dtype="float64"))
    res = engine.run(model, params, model.per_sample_loss, _batches(train, 7), _batches(val, 5))
    preconditioned = {}
    for name in params:
        gh = g[name].reshape(40, -1)
        vh = res.stats.v[name].reshape(-1)
        eye = torch.eye(gh.shape[1], dtype=torch.float64)
        lam = res.lambdas[name]
        h = sum(torch.linalg.solve(lam * eye + torch.outer(gi, gi), vh) for gi in gh) / 40
        preconditioned[name] = h.reshape(res.stats.v[name].shape)
    expected = influence_scores(preconditioned, g)
    torch.testing.assert_close(res.scores["datainf"], expected, rtol=1e-7, atol=1e-12)
