"""Spec §7 SNGDM tests: exact step norm, beta=0 normalized GD, clipped == SGD, state round-trip."""

from __future__ import annotations

import copy

import pytest
import torch

from optim.sngdm import SNGDM


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64)),
    ]


def _set_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def test_normalized_step_norm_equals_lr():
    params = _params()
    opt = SNGDM(params, lr=0.37, momentum=0.9)
    for t in range(5):
        before = _flat(params)
        _set_grads(params, seed=t)
        opt.step()
        assert float(torch.linalg.vector_norm(_flat(params) - before)) == pytest.approx(
            0.37, rel=1e-12
        )


def test_beta_zero_is_normalized_gd_with_global_norm():
    params = _params()
    opt = SNGDM(params, lr=0.1, momentum=0.0)
    _set_grads(params, seed=1)
    grads = torch.cat([p.grad.flatten() for p in params])
    before = _flat(params)
    opt.step()
    expected = before - 0.1 * grads / torch.linalg.vector_norm(grads)
    assert torch.allclose(_flat(params), expected, atol=1e-14, rtol=0)


def test_clipped_equals_sgd_below_threshold_and_clips_above():
    a, b = _params(), _params()
    clipped = SNGDM(a, lr=0.1, momentum=0.5, mode="clipped", clip_threshold=1e6)
    sgd = SNGDM(b, lr=0.1, momentum=0.5, mode="sgd")
    for t in range(4):
        _set_grads(a, seed=t)
        _set_grads(b, seed=t)
        clipped.step()
        sgd.step()
    assert torch.allclose(_flat(a), _flat(b), atol=1e-14, rtol=0)
    # Above the threshold the step norm is exactly c.
    c = _params()
    opt = SNGDM(c, lr=10.0, momentum=0.0, mode="clipped", clip_threshold=0.01)
    before = _flat(c)
    _set_grads(c, seed=9)
    opt.step()
    assert float(torch.linalg.vector_norm(_flat(c) - before)) == pytest.approx(0.01, rel=1e-12)


def test_state_round_trip():
    a = _params()
    opt_a = SNGDM(a, lr=0.05, momentum=0.9, mode="clipped", clip_threshold=0.3)
    for t in range(3):
        _set_grads(a, seed=t)
        opt_a.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = SNGDM(b, lr=1.0, momentum=0.1)
    # deepcopy as a checkpoint would: torch's state_dict() shares the buffer tensors.
    # The checkpoint's settings, as torch restores its param groups' (lr, momentum), named.
    with pytest.warns(UserWarning, match=r"mode normalized -> clipped, clip_threshold None -> 0.3"):
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.mode == "clipped" and opt_b.clip_threshold == 0.3
    for t in range(3, 6):
        _set_grads(a, seed=t)
        _set_grads(b, seed=t)
        opt_a.step()
        opt_b.step()
    assert torch.equal(_flat(a), _flat(b))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        SNGDM(_params(), mode="adam")
    with pytest.raises(ValueError, match="clip_threshold"):
        SNGDM(_params(), mode="clipped")
    with pytest.raises(ValueError, match="momentum"):
        SNGDM(_params(), momentum=1.0)
    with pytest.raises(ValueError, match="eps"):
        SNGDM(_params(), eps=-1.0)
    # The float64 global norm dropped imaginary parts: a step of 2e11 for lr 0.1.
    with pytest.raises(ValueError, match="complex"):
        SNGDM([torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))])


def _reference_sngdm(x0, grads_per_step, lrs, beta, mode, c=None):
    """Spec §3.6 written out on flat float64 vectors, one entry of ``lrs`` per param group.

    m_t = beta m_{t-1} + (1 - beta) g_t (m_0 = 0), ||m_t|| the global norm over every group, then
    per group: normalized  x -= lr m / ||m||;  clipped  x -= min(lr, c / ||m||) m;  sgd  x -= lr m.
    Returns the final iterates and which clipped steps were clipped (c / ||m|| < lr).
    """
    x = [v.clone() for v in x0]
    m = [torch.zeros_like(v) for v in x0]
    clipped_flags = []
    for grads in grads_per_step:
        m = [beta * mi + (1.0 - beta) * gi for mi, gi in zip(m, grads, strict=True)]
        norm = float(torch.cat(m).norm())
        for i, lr in enumerate(lrs):
            if mode == "normalized":
                scale = lr / norm
            elif mode == "clipped":
                scale = min(lr, c / norm)
                clipped_flags.append(c / norm < lr)
            else:
                scale = lr
            x[i] = x[i] - scale * m[i]
    return x, clipped_flags


@pytest.mark.parametrize("beta", [0.5, 0.9])
@pytest.mark.parametrize("mode", ["normalized", "clipped", "sgd"])
def test_four_momentum_steps_match_the_spec_update_rule(mode, beta):
    """Momentum decay, global norm across two param groups, per-group lr: all modes, beta != 0."""
    params = _params(seed=3)
    lrs = (0.2, 0.05)
    groups = [{"params": [params[0]], "lr": lrs[0]}, {"params": [params[1]], "lr": lrs[1]}]
    # c = 0.3 sits between lr * ||m|| of the small and the large steps below, so the clipped mode
    # takes both branches (asserted on the reference's flags).
    opt = SNGDM(groups, momentum=beta, mode=mode, clip_threshold=0.3 if mode == "clipped" else None)
    # Known gradients with very different scales per step, so undecayed momentum is far off.
    scales = (1.0, 0.02, 5.0, 0.1)
    gen = torch.Generator().manual_seed(11)
    grads_per_step = [
        [s * torch.randn(p.shape, generator=gen, dtype=p.dtype).flatten() for p in params]
        for s in scales
    ]
    x0 = [p.detach().flatten().clone() for p in params]
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.view_as(p).clone()
        opt.step()
    expected, flags = _reference_sngdm(
        x0, grads_per_step, lrs, beta, mode, c=0.3 if mode == "clipped" else None
    )
    if mode == "clipped":
        assert any(flags) and not all(flags)
    torch.testing.assert_close(_flat(params), torch.cat(expected), atol=1e-13, rtol=0)


@pytest.mark.parametrize("mode", ["normalized", "clipped"])
def test_norm_based_modes_refuse_fsdp_shards(mode):
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    # The global norm of the momentum over one rank's shards is not the global norm (the
    # update norm was sqrt(2) too large on 2 processes).
    shard = torch.nn.Parameter(torch.randn(8))
    _set_fsdp_flattened(shard)
    with pytest.raises(ValueError, match="does not run under FSDP"):
        SNGDM([shard], mode=mode, clip_threshold=1.0)
    SNGDM([shard], mode="sgd")  # elementwise: shards are fine
