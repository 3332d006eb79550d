"""Influence engine on a real peft LoRA model: vmap vs loop, streaming vs cached (spec 7.12)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from modules.sequence_classifier import LoRAClassifier
from ops.influence import METHODS
from ops.influence_config import DampingConfig, GradConfig
from ops.influence_engine import InfluenceEngine
from ops.per_sample_grads import per_sample_grads, select_params

INCLUDE = ["lora_A", "lora_B", "head.weight"]


@pytest.fixture(autouse=True)
def _one_thread():
    # intra-op threads oversubscribe a shared 2-core machine (30x slower full-batch steps)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_engine_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="unknown influence method 'tracin'"):
        InfluenceEngine(methods=["tracin"])
    with pytest.raises(ValueError, match=r"damping\.value"):
        InfluenceEngine(damping=DampingConfig(mode="fixed"))
    with pytest.raises(ValueError, match="code_faithful_preset"):
        InfluenceEngine(code_faithful_preset="fast")
    model, train, val = _setup()
    engine = InfluenceEngine(methods=["exact_fim"], grads=GradConfig(fim_max_dim=10))
    params = select_params(model, INCLUDE)
    with pytest.raises(ValueError, match="fim_max_dim"):
        engine.run(model, params, model.per_sample_loss, _batches(train, 8), _batches(val, 8))
