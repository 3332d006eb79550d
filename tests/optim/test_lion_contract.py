"""Lion, LionA and LionAR as torch optimizers: arguments, groups added later, dtypes, layouts."""

from __future__ import annotations

import math

import pytest
import torch

from optim.lion import Lion, LionA, LionAR

ALL = "all_matrices"


def _rot_param(rows=6, cols=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(rows, cols, generator=gen, dtype=dtype))


def test_foreign_and_invalid_settings_are_refused() -> None:
    # Lion took any keyword through **kwargs: maximize=True stored, ignored, still minimizing.
    with pytest.raises(TypeError, match="maximize"):
        Lion([_rot_param()], maximize=True)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        Lion([_rot_param()], lr=float("nan"))
    for setting in ("lr_other", "weight_decay_other", "vector_weight_decay", "rotational_eps"):
        with pytest.raises(ValueError, match=f"{setting} must be >= 0"):
            LionAR([_rot_param()], rotational=ALL, **{setting: -1e-3})
    with pytest.raises(ValueError, match="complex"):
        LionA([torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))])


def test_a_sparse_gradient_is_refused_before_any_state_changes() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = Lion([p], lr=0.1)
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert not opt.state


def test_a_neuron_centering_would_zero_is_refused() -> None:
    # fan-in 1: centering zeroes every row, n0 = 0, and the first step wrote NaN weights.
    single_input = torch.nn.Linear(1, 8)
    with pytest.raises(ValueError, match="constant neuron"):
        LionAR(single_input.parameters(), rotational=ALL)
    opt = LionAR(single_input.parameters(), rotational=ALL, zero_mean=False)
    single_input.weight.grad = torch.randn(8, 1)
    opt.step()
    assert torch.isfinite(single_input.weight).all()


def test_groups_added_later_follow_the_constructors_rules() -> None:
    opt = LionAR([_rot_param()], lr=0.1, lr_other=3e-4, rotational=ALL)
    # no rotational key: plain Lion at lr_other (it took the virtual LR, ~300x lr_other)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert opt.param_groups[-1]["rotational"] is False
    assert opt.param_groups[-1]["lr"] == 3e-4
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-2})
    assert opt.param_groups[-1]["lr"] == 1e-2
    with pytest.raises(ValueError, match="zero-norm neuron"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rotational": True})
    with pytest.raises(ValueError, match="weight_decay=0"):
        opt.add_param_group(
            {"params": [_rot_param(seed=1)], "rotational": True, "weight_decay": 0.0}
        )


def _reference_lionar(w0, grads, lr, wd, betas, eps):
    """Spec §3.3 steps 1-5 (per neuron, zero_mean, ν = 0) in float64, from scratch."""
    b1, b2 = betas
    eta_r = math.sqrt(math.pi / 2) * math.sqrt(2 * lr * wd)
    eta_r *= math.sqrt((1 - b1) ** 2 + b1**2 * (1 - b2) / (1 + b2))
    norm = w0.norm(dim=1, keepdim=True)
    w = w0 - w0.mean(dim=1, keepdim=True)
    w = w * norm / w.norm(dim=1, keepdim=True)  # centered once, at the original norm
    n0, m = w.norm(dim=1, keepdim=True), torch.zeros_like(w0)
    for g in grads:
        d = (b1 * m + (1 - b1) * g).sign()
        m = b2 * m + (1 - b2) * g
        d = d - d.mean(dim=1, keepdim=True)
        d = d - w * (d * w).sum(dim=1, keepdim=True) / n0**2
        w = w - eta_r * n0 * d / (d.norm(dim=1, keepdim=True) + eps)
        w = w * n0 / w.norm(dim=1, keepdim=True)
    return w


def test_float64_weights_rotate_in_float64() -> None:
    # The rotation ran in float32 whatever the weight's dtype: 4e-7 off this reference.
    p = _rot_param(dtype=torch.float64)
    w0 = p.detach().clone()
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(10)]
    opt = LionAR([p], lr=0.1, weight_decay=0.1, rotational=ALL)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _reference_lionar(w0, grads, 0.1, 0.1, (0.9, 0.99), 1e-8)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-13)
    assert opt.state[p]["n0"].dtype == torch.float64


def test_channels_last_weights_rotate_like_contiguous_ones() -> None:
    conv = torch.nn.Conv2d(3, 8, 3)
    twin = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    twin.load_state_dict(conv.state_dict())
    opts = [LionAR([m.weight], lr=0.1, rotational=ALL) for m in (conv, twin)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        g = torch.randn(conv.weight.shape, generator=gen)
        for m, opt in zip((conv, twin), opts, strict=True):
            m.weight.grad = g.clone()
            opt.step()
    torch.testing.assert_close(twin.weight, conv.weight, rtol=0, atol=1e-6)
    assert twin.weight.is_contiguous(memory_format=torch.channels_last)
