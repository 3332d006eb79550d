"""Lion, LionA and LionAR: update rules, invariants, flags and exact resume (spec §3.3-3.5, §7)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from ops.warmup import angular_update, lionar_target_angle, rrc_lr_factor
from optim.lion import Lion, LionA, LionAR


def _grads(shapes, steps, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]


def _run(opt_cls, params, grads, **kw):
    opt = opt_cls(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return opt


def test_lion_matches_reference_update() -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    grads = _grads([(6, 5)], 5, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    _run(Lion, [p], grads, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    w, m = w0.clone(), torch.zeros_like(w0)
    for (g,) in grads:  # Chen et al. 2023, Alg. 2
        c = 0.9 * m + 0.1 * g
        w = w - 1e-2 * (c.sign() + 0.1 * w)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-14)


def test_nesterov_equals_lion_with_product_beta() -> None:
    # Unequal betas: with beta1 = beta2 a swap of the two inside the Nesterov form would pass.
    b1, b2 = 0.9, 0.99
    grads = _grads([(16, 8), (8,)], 30, seed=1, dtype=torch.float64)
    a = [
        torch.nn.Parameter(torch.ones(16, 8, dtype=torch.float64)),
        torch.nn.Parameter(torch.ones(8, dtype=torch.float64)),
    ]
    b = [torch.nn.Parameter(t.detach().clone()) for t in a]
    _run(Lion, a, grads, lr=1e-3, betas=(b1, b2), nesterov=True, weight_decay=0.1)
    _run(Lion, b, grads, lr=1e-3, betas=(b1 * b2, b2), weight_decay=0.1)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=1e-7)


def test_liona_update_norm_is_exact_even_with_zero_signs() -> None:
    kappa, lr = 0.7, 1e-2
    p = torch.nn.Parameter(torch.randn(40, 30, dtype=torch.float64))
    g = torch.randn(40, 30, dtype=torch.float64)
    g[:10] = 0.0  # sign(c) = 0 on a quarter of the entries
    opt = LionA([p], lr=lr, update_norm_scale=kappa, weight_decay=0.0)
    before = p.detach().clone()
    p.grad = g
    opt.step()
    u = (before - p.detach()) / lr
    assert float(u.norm()) == pytest.approx(kappa * math.sqrt(p.numel()), rel=1e-12)
    assert u[:10].eq(0).all()
    # the direction too (a flipped step has the same norm): u = κ√C sign(g)/‖sign(g)‖
    expected = kappa * math.sqrt(p.numel()) * g.sign() / g.sign().norm()
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="update_norm_scale"):
        LionA([p], update_norm_scale=0.0)


ALL = "all_matrices"  # anonymous tensors: the name-based default ("blocks") cannot select them


def _rot_param(rows=32, cols=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(0.02 * torch.randn(rows, cols, generator=gen) + 0.01)


def test_lionar_keeps_neuron_norms_and_means_and_hits_target_angle() -> None:
    p = _rot_param()
    lr, wd, betas = 0.1, 0.1, (0.9, 0.99)
    opt = LionAR([p], lr=lr, weight_decay=wd, betas=betas, rotational=ALL)
    assert opt.param_groups[0]["rotational"]
    w_init = p.detach().clone()
    assert opt.center_rotational_weights() == 1  # the explicit, idempotent module step
    assert opt.center_rotational_weights() == 0
    torch.testing.assert_close(p.detach().norm(dim=1), w_init.norm(dim=1))
    target = math.atan(lionar_target_angle(lr, wd, betas))
    gen = torch.Generator().manual_seed(1)
    for step in range(50):
        before = p.detach().clone()
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        if step == 0:
            n0 = opt.state[p]["n0"].squeeze(1)
            torch.testing.assert_close(n0, w_init.norm(dim=1), rtol=1e-6, atol=0)
            # every neuron moves against sign(g) (m = 0, so d = sign(g) before the projections;
            # an uphill step has the same angle, norm and chord)
            assert ((p.detach() - before) * p.grad.sign()).sum(1).lt(0).all()
        angles = angular_update(before, p.detach(), per_neuron=True)
        torch.testing.assert_close(angles, torch.full_like(angles, target), rtol=1e-3, atol=0)
    norms = p.detach().double().norm(dim=1)
    torch.testing.assert_close(norms, n0.double(), rtol=1e-6, atol=0)
    assert float(p.detach().double().mean(dim=1).abs().max()) < 1e-6 * float(n0.min())


@pytest.mark.parametrize(
    ("nesterov", "eta_r"),
    [
        # η_r = √(π/2)·√(2ηλ)·√((1−β₁)² + β₁²(1−β₂)/(1+β₂)) (spec §3.3) by hand, η = 0.5, λ = 0.01
        # (√(2ηλ) = 0.1), β = (0.5, 0.6), √(π/2) = 1.2533141373155001:
        # (1−0.5)² + 0.25·0.4/1.6 = 0.3125 → 1.2533141373155001·0.1·√0.3125.
        (False, 0.0700623902049741),
        # Nesterov = Lion with (β₁β₂, β₂) = (0.3, 0.6): (0.7)² + 0.09·0.4/1.6 = 0.49 + 0.0225
        # = 0.5125 → 1.2533141373155001·0.1·√0.5125.
        (True, 0.0897236377707895),
    ],
    ids=["plain", "nesterov"],
)
def test_lionar_turns_by_the_hand_computed_target_angle(nesterov: bool, eta_r: float) -> None:
    # With update_norm_decay = 0 each neuron turns by exactly atan(η_r) per step.
    p = _rot_param(seed=11)
    opt = LionAR([p], lr=0.5, weight_decay=0.01, betas=(0.5, 0.6), nesterov=nesterov,
                 rotational=ALL)  # fmt: skip
    opt.center_rotational_weights()
    gen = torch.Generator().manual_seed(12)
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        angles = angular_update(before, p.detach(), per_neuron=True)
        torch.testing.assert_close(
            angles, torch.full_like(angles, math.atan(eta_r)), rtol=1e-3, atol=0
        )


def test_lionar_step_is_tangent_before_projection() -> None:
    # tan(θ) = ‖step‖/‖w‖ holds only if the step is ⟂ w: check against a non-centered tensor.
    p = _rot_param(8, 128, seed=3)
    opt = LionAR([p], lr=0.3, weight_decay=0.1, zero_mean=False, rotational=ALL)
    before = p.detach().double().clone()
    p.grad = torch.randn(p.shape)
    opt.step()
    after = p.detach().double()
    eta_r = lionar_target_angle(0.3, 0.1, (0.9, 0.99))
    chord = (after - before).norm(dim=1) / before.norm(dim=1)
    # projecting w − η_r n₀ d̂ back to the sphere moves w by the chord 2 sin(θ/2), θ = atan(η_r)
    expected = 2 * math.sin(math.atan(eta_r) / 2)
    torch.testing.assert_close(chord, torch.full_like(chord, expected), rtol=1e-5, atol=0)


def test_lionar_rejects_zero_weight_decay_and_zero_rows() -> None:
    with pytest.raises(ValueError, match="weight_decay=0"):
        LionAR([{"params": [_rot_param()], "rotational": True, "weight_decay": 0.0}])
    # spec §4.4: λ = 0 everywhere would quietly train every tensor as plain Lion at lr_other
    with pytest.raises(ValueError, match="weight_decay=0, so η_r"):
        LionAR([_rot_param()], weight_decay=0.0, rotational=ALL)
    with pytest.raises(ValueError, match="matched no"):
        LionAR([("head.weight", _rot_param())], weight_decay=0.1, rotational=["blocks.*"])
    # a "no decay" group beside a decayed one keeps its tensors on Lion
    opt = LionAR(
        [{"params": [_rot_param()]}, {"params": [_rot_param()], "weight_decay": 0.0}],
        weight_decay=0.1,
        rotational=ALL,
    )
    assert [g["rotational"] for g in opt.param_groups] == [True, False]
    dead = torch.nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="zero-norm neuron"):
        LionAR([("lora_B.weight", dead)], weight_decay=0.1, rotational=ALL)
    with pytest.raises(ValueError, match="named_parameters"):
        LionAR([_rot_param()], rotational="blocks")


def test_lionar_group_split_by_name() -> None:
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(10, 8),
            "layers": torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)]),
            "head": torch.nn.Linear(8, 10, bias=False),
        }
    )
    opt = LionAR(
        model.named_parameters(), lr=0.1, weight_decay=0.1, rotational="blocks", lr_other=3e-4
    )
    by_name = {
        n: (g["rotational"], g["lr"], g["weight_decay"])
        for g in opt.param_groups
        for n in g["param_names"]
    }
    assert by_name["layers.0.weight"] == (True, 0.1, 0.1)
    assert by_name["embed.weight"] == (False, 3e-4, 0.1)
    assert by_name["head.weight"] == (False, 3e-4, 0.1)
    assert by_name["layers.0.bias"] == (False, 3e-4, 0.0)
    assert by_name["layers.1.weight"] == (False, 3e-4, 0.0)
    # Each split group has its own LR, so LearningRateMonitor needs names it can tell apart.
    assert [g["name"] for g in opt.param_groups] == ["rotational", "matrices", "vectors"]
    named_groups = [
        {"params": [("layers.0.weight", model["layers"][0].weight)], "name": "decay"},
        {"params": [("layers.0.bias", model["layers"][0].bias)], "weight_decay": 0.0},
    ]
    opt = LionAR(named_groups, weight_decay=0.1, rotational="blocks")
    assert [g["name"] for g in opt.param_groups] == ["decay/rotational", "pg2/vectors"]
    # Explicit groups with a "rotational" key are kept as they are.
    explicit = LionAR([{"params": [model["head"].weight], "rotational": False, "lr": 1e-3}])
    assert explicit.param_groups[0]["lr"] == 1e-3 and not explicit.param_groups[0]["rotational"]


def test_lionar_skips_params_without_grad() -> None:
    a, b = _rot_param(seed=0), _rot_param(seed=1)
    opt = LionAR([a, b], weight_decay=0.1, rotational=ALL)
    b_before = b.detach().clone()
    a.grad = torch.randn(a.shape)
    opt.step()  # REQ crashes here (spec §4.1)
    assert "exp_avg" not in opt.state[b]
    # b was centered (zero_mean) but not stepped; its norms are unchanged
    torch.testing.assert_close(b.detach().norm(dim=1), b_before.norm(dim=1))


def test_inverse_bias_correction_and_rrc_correction_scale_the_angle() -> None:
    # unequal betas: the correction is 1 - beta2^t, which beta1 would also give if they were equal
    lr, wd, betas = 0.1, 0.1, (0.9, 0.98)
    eta_r = lionar_target_angle(lr, wd, betas)
    p = _rot_param(seed=4)
    opt = LionAR(
        [p], lr=lr, weight_decay=wd, betas=betas, inverse_bias_correction=True, rotational=ALL
    )
    opt.center_rotational_weights()
    before = p.detach().clone()
    p.grad = torch.randn(p.shape)
    opt.step()
    angle = float(angular_update(before, p.detach()))
    assert angle == pytest.approx(math.atan((1 - 0.98) * eta_r), rel=1e-3)

    p = _rot_param(seed=5)
    opt = LionAR([p], lr=lr, weight_decay=wd, betas=betas, rrc_correction="derived", rotational=ALL)
    opt.center_rotational_weights()
    p.grad = torch.randn(p.shape)
    with pytest.raises(RuntimeError, match="UpdateDiagnostics"):
        opt.step()
    assert "step" not in opt.state[p]  # the failed step changed no state
    opt.set_gradient_snr(phi=0.5, batch_size=32)
    assert opt.wants_gradient_snr
    before = p.detach().clone()
    opt.step()
    rho = rrc_lr_factor(0.5, 32)
    assert float(angular_update(before, p.detach())) == pytest.approx(
        math.atan(rho * eta_r), rel=1e-3
    )
    # Nesterov's target angle uses the effective betas (β₁β₂, β₂)
    q = _rot_param(seed=6)
    opt = LionAR([q], lr=lr, weight_decay=wd, betas=betas, nesterov=True, rotational=ALL)
    opt.center_rotational_weights()
    before = q.detach().clone()
    q.grad = torch.randn(q.shape)
    opt.step()
    expected = math.atan(lionar_target_angle(lr, wd, (0.9 * 0.98, 0.98)))
    assert float(angular_update(before, q.detach())) == pytest.approx(expected, rel=1e-3)


def test_update_norm_decay_smooths_the_step() -> None:
    p = _rot_param(seed=7)
    lr, wd = 0.1, 0.1
    opt = LionAR([p], lr=lr, weight_decay=wd, update_norm_decay=0.9, rotational=ALL)
    opt.center_rotational_weights()
    before = p.detach().clone()
    p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.state[p]["update_norm_sq"].shape == (32, 1)
    # With the EMA's bias correction the first step still turns by the target angle (without it
    # the step would be sqrt(1 - 0.9) = 0.32 of it).
    expected = math.atan(lionar_target_angle(lr, wd, (0.9, 0.99)))
    assert float(angular_update(before, p.detach())) == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="update_norm_decay"):
        LionAR([p], update_norm_decay=1.0)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (Lion, {"lr": 1e-3, "weight_decay": 0.1}),
        (LionA, {"lr": 1e-3, "weight_decay": 0.1, "nesterov": True}),
        (
            LionAR,
            {
                "lr": 0.1,
                "weight_decay": 0.1,
                "update_norm_decay": 0.9,
                "inverse_bias_correction": True,
                "rotational": ALL,
            },
        ),
    ],
)
def test_resume_is_bitwise(cls, kw) -> None:
    data = _grads([(4, 8), (4, 4)], 20, seed=9)

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    ref = _model(0)
    ref_opt = cls(ref.parameters(), **kw)
    train(ref, ref_opt, data)

    first = _model(0)
    first_opt = cls(first.parameters(), **kw)
    train(first, first_opt, data[:10])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # state is tensors and ints only
    resumed = _model(1)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = cls(resumed.parameters(), **kw)
    resumed_opt.load_state_dict(ckpt["opt"])
    train(resumed, resumed_opt, data[10:])
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lionar_refuses_fsdp_flattened_parameters() -> None:
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    # FSDP1 with use_orig_params=True (Lightning's default) hands the optimizer 1-D views of the
    # original weights, marked as flattened: they would silently run as plain Lion.
    view = torch.nn.Parameter(torch.randn(64))
    _set_fsdp_flattened(view)
    with pytest.raises(ValueError, match="FSDP"):
        LionAR([("layers.0.weight", view)])
    assert not LionAR([("layers.0.weight", view)], rotational="none").param_groups[0]["rotational"]


def test_lionar_keeps_bf16_neuron_norms():
    """The rotation runs in float32: bf16 storage alone must not drift the norms (was 0.6 %)."""
    torch.manual_seed(8)
    p = torch.nn.Parameter(torch.randn(16, 64).to(torch.bfloat16))
    opt = LionAR([p], lr=0.1, weight_decay=0.1, rotational=ALL)
    opt.center_rotational_weights()
    n0 = p.detach().float().norm(dim=1)
    for _ in range(200):
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
        opt.step()
    drift = (p.detach().float().norm(dim=1) / n0 - 1).abs().max()
    assert opt.state[p]["n0"].dtype == torch.float32
    assert float(drift) < 2e-3


def test_lionar_bf16_resume_is_bit_identical():
    """load_state_dict keeps n0 and the update-norm EMA in float32 (torch casts to bf16)."""

    def run(opt, p, steps):
        for step in steps:
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            p.grad = g.to(torch.bfloat16)
            opt.step()

    def fresh():
        torch.manual_seed(9)
        p = torch.nn.Parameter(torch.randn(8, 16).to(torch.bfloat16))
        return p, LionAR([p], lr=1e-2, weight_decay=0.1, rotational=ALL)

    straight, opt = fresh()
    run(opt, straight, range(10))
    first, opt = fresh()
    run(opt, first, range(5))
    saved = copy.deepcopy(opt.state_dict())
    resumed = torch.nn.Parameter(first.detach().clone())
    opt = LionAR([resumed], lr=1e-2, weight_decay=0.1, rotational=ALL)
    opt.load_state_dict(saved)
    assert opt.state[resumed]["n0"].dtype == torch.float32
    run(opt, resumed, range(5, 10))
    assert torch.equal(straight, resumed)


def test_liona_refuses_fsdp_flattened_parameters() -> None:
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    # LionA scales each tensor's update by sqrt(numel) / ||sign||: on a shard both are the
    # shard's, which silently changed the updates (up to 8e-4 off DDP after 2 steps).
    view = torch.nn.Parameter(torch.randn(64))
    _set_fsdp_flattened(view)
    with pytest.raises(ValueError, match="LionA does not run under FSDP"):
        LionA([view])
    LionA([torch.nn.Parameter(torch.randn(64))])  # whole tensors are fine


def test_liona_leaves_a_tensor_with_an_all_zero_sign_unchanged_and_finite() -> None:
    # A zero gradient on a fresh momentum gives sign(c) = 0: the normalized update 0/‖0‖ must be
    # 0, not NaN (an unused parameter, or bf16 gradients that underflow, hit this).
    p = torch.ones(3, requires_grad=True)
    opt = LionA([p], lr=0.1)
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_decoupled_decay_uses_the_corrected_step_size() -> None:
    # Spec §3.3: w ← w − η_t(sign(c) + λw) with η_t = η·σ_t, σ_t = 1 − β₂ᵗ. With a zero
    # gradient only the decay acts: w₁ = 1 − η·σ₁·λ = 1 − 0.1·(1 − 0.5)·0.1 = 0.995.
    p = torch.ones(2, requires_grad=True)
    opt = Lion([p], lr=0.1, betas=(0.9, 0.5), weight_decay=0.1, inverse_bias_correction=True)
    p.grad = torch.zeros(2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2,), 0.995))


def test_lionar_decays_its_plain_lion_groups() -> None:
    # Gains and biases train as plain Lion at lr_other with vector_weight_decay: with a zero
    # gradient the bias is scaled by 1 − lr_other·λ_vec = 1 − 0.01·0.5 = 0.995.
    layer = torch.nn.Linear(4, 3)
    bias = layer.bias.detach().clone()
    opt = LionAR(
        layer.named_parameters(), rotational="all_matrices", lr_other=0.01,
        vector_weight_decay=0.5,
    )  # fmt: skip
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(layer.bias.detach(), 0.995 * bias)
