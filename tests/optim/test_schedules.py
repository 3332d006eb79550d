import math
import warnings

import pytest
import torch

from optim.schedules import Trapezoidal, WarmupCosine, trapezoidal_factor, warmup_cosine_factor


def _lrs(scheduler_cls, steps, **kwargs):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = scheduler_cls(optimizer, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer, scheduler


def test_warmup_cosine_values():
    assert warmup_cosine_factor(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine_factor(4, 4, 20) == pytest.approx(1.0)
    midpoint = 4 + 8
    assert warmup_cosine_factor(midpoint, 4, 20, min_lr_ratio=0.2) == pytest.approx(0.6)
    # Interior points, where a linear decay would differ: progress p = (t − 4)/16, factor
    # 0.2 + 0.8·½(1 + cos πp). p = ¼ (t = 8): ½(1 + √2/2) = 0.8535533905932737 → 0.8828427124746190
    # (linear: 0.8); p = ¾ (t = 16): ½(1 − √2/2) = 0.1464466094067262 → 0.3171572875253810
    # (linear: 0.4).
    assert warmup_cosine_factor(8, 4, 20, min_lr_ratio=0.2) == pytest.approx(0.8828427124746190)
    assert warmup_cosine_factor(16, 4, 20, min_lr_ratio=0.2) == pytest.approx(0.3171572875253810)
    # Without a floor, p = ⅓ (warmup 0, total 30, t = 10): ½(1 + cos π/3) = ½·1.5 = 0.75.
    assert warmup_cosine_factor(10, 0, 30) == pytest.approx(0.75)


def test_warmup_cosine_without_room_to_decay_is_at_its_minimum_right_after_warmup():
    # total_steps is the step at which the cosine reaches min_lr_ratio: with total = warmup
    # that is the first step after the warmup (it ran one step at the full LR before).
    assert [warmup_cosine_factor(t, 4, 4, min_lr_ratio=0.1) for t in range(6)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 0.1, 0.1]
    )
    assert warmup_cosine_factor(20, 4, 20, min_lr_ratio=0.2) == pytest.approx(0.2)
    assert warmup_cosine_factor(50, 4, 20, min_lr_ratio=0.2) == pytest.approx(0.2)


def test_trapezoidal_shape():
    lrs, *_ = _lrs(Trapezoidal, 10, warmup_steps=2, total_steps=10, cooldown_fraction=0.3)
    assert lrs[:2] == pytest.approx([1.0, 2.0])
    assert lrs[2:8] == pytest.approx([2.0] * 6)
    assert lrs[8:] == pytest.approx([2 * 2 / 3, 2 * 1 / 3])  # (T - t) / D: last step at 1/D
    assert trapezoidal_factor(10, 2, 10, 0.3, min_lr_ratio=0.5) == pytest.approx(0.5)


def test_overlapping_warmup_and_cooldown_take_the_lower_ramp():
    # W = 8, D = 5 of T = 10: the warmup ran to 1.0 at step 7 and the LR then fell to 0.4.
    with pytest.warns(UserWarning, match=r"warmup_steps=8 and the cooldown's 5 steps overlap"):
        lrs, *_ = _lrs(Trapezoidal, 10, warmup_steps=8, total_steps=10)
    expected = [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 0.8, 0.6, 0.4, 0.2]
    assert lrs == pytest.approx([2.0 * f for f in expected])


def test_trapezoidal_without_warmup_and_default_cooldown():
    # W = 0: full LR from the first step; the default f_c = 0.5 (warmup paper) gives
    # D = 5 of T = 10 steps, s(t) = (T - t) / D over the last five.
    lrs, *_ = _lrs(Trapezoidal, 10, warmup_steps=0, total_steps=10)
    assert lrs == pytest.approx([2.0] * 5 + [2.0, 1.6, 1.2, 0.8, 0.4])
    assert [trapezoidal_factor(t, 0, 10) for t in (0, 4, 9)] == pytest.approx([1.0, 1.0, 0.2])


def test_schedule_state_resumes_exactly():
    _, optimizer, scheduler = _lrs(WarmupCosine, 7, warmup_steps=3, total_steps=15)
    state = scheduler.state_dict()
    param = torch.nn.Parameter(torch.zeros(1))
    resumed_opt = torch.optim.SGD([param], lr=2.0)
    resumed = WarmupCosine(resumed_opt, warmup_steps=0, total_steps=None)
    resumed.load_state_dict(state)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        resumed_opt.step()
        resumed.step()
        assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert resumed.total_steps == 15 and resumed.warmup_steps == 3


def _resume(scheduler_cls, state: dict, optimizer_state: dict, **kwargs):
    """Lightning's order: the optimizer's state first, then the schedule's."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = scheduler_cls(optimizer, **kwargs)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, scheduler


def test_a_longer_resumed_run_follows_its_own_cosine_and_says_so():
    """A run of 8 steps resumed at step 4 with trainer.max_steps = 16: the checkpoint's
    total_steps = 8 kept the LR at its minimum from step 8 on."""
    _, optimizer, scheduler = _lrs(WarmupCosine, 4, warmup_steps=2, total_steps=8, min_lr_ratio=0.1)
    # Step 4 of warmup 2: cosine progress 2/6 -> 0.1 + 0.9 * (1 + cos(pi/3)) / 2 = 0.775;
    # of 16 steps, progress 2/14 -> 0.1 + 0.9 * (1 + cos(pi/7)) / 2 = 0.9554.
    with pytest.warns(UserWarning, match=r"total_steps 8 -> 16.*factor 0\.775 -> 0\.9554"):
        lrs, resumed = _resume(
            WarmupCosine, scheduler.state_dict(), optimizer.state_dict(),
            warmup_steps=2, total_steps=16, min_lr_ratio=0.1,
        )  # fmt: skip
    assert resumed.total_steps == 16
    expected = [2.0 * warmup_cosine_factor(t, 2, 16, 0.1) for t in range(4, 10)]
    assert lrs == pytest.approx(expected)


def test_a_longer_resumed_trapezoidal_run_does_not_train_at_lr_zero():
    _, optimizer, scheduler = _lrs(Trapezoidal, 8, warmup_steps=2, total_steps=8)
    with pytest.warns(UserWarning, match="total_steps 8 -> 16"):
        lrs, _ = _resume(
            Trapezoidal, scheduler.state_dict(), optimizer.state_dict(),
            warmup_steps=2, total_steps=16,
        )  # fmt: skip
    # Steps 8-13 of 16 with D = 8: constant until the cooldown starts at 8, then (16 - t) / 8.
    assert lrs == pytest.approx([2.0 * (16 - t) / 8 for t in range(8, 14)])


def test_an_unchanged_resume_is_silent():
    _, optimizer, scheduler = _lrs(WarmupCosine, 4, warmup_steps=2, total_steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrs, _ = _resume(
            WarmupCosine, scheduler.state_dict(), optimizer.state_dict(),
            warmup_steps=2, total_steps=8,
        )  # fmt: skip
    assert lrs[:4] == pytest.approx([2.0 * warmup_cosine_factor(t, 2, 8) for t in range(4, 8)])


def test_total_steps_filled_from_trainer():
    from optim.schedules import fill_total_steps

    _, _, scheduler = _lrs(WarmupCosine, 1, warmup_steps=1, total_steps=None)
    fill_total_steps(scheduler, 40)
    assert scheduler.total_steps == 40
    assert math.isclose(scheduler._factor(40), 0.0, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"warmup_steps": 10, "total_steps": 5}, "total_steps=5 must be >= max"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio must lie in"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        WarmupCosine(optimizer, **kwargs)


def test_phase_lengths_are_floors_of_the_fractions() -> None:
    from optim.schedules import steps_of

    assert steps_of(0.05, 400) == 20 and steps_of(0.5, 400) == 200
    assert steps_of(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert steps_of(0.05, 30) == 1  # 1.5 -> 1 (round() gave 2)


def test_filling_total_steps_refuses_an_unbounded_run_and_warns_on_a_short_one():
    from optim.schedules import fill_total_steps

    _, _, scheduler = _lrs(WarmupCosine, 1, warmup_steps=10, total_steps=None)
    with pytest.raises(ValueError, match="unbounded"):
        fill_total_steps(scheduler, float("inf"))  # max_steps = max_epochs = -1
    assert scheduler.total_steps is None
    with pytest.warns(UserWarning, match="fewer than lr_scheduler.init_args.warmup_steps=10"):
        fill_total_steps(scheduler, 4)
    assert scheduler.total_steps == 4


def test_trapezoidal_before_the_trainer_sets_its_length_starts_the_warmup_at_one_over_w():
    # LambdaLR applies step 0's factor at construction, before the trainer fills total_steps:
    # the first step trains at η/W (warmup spec §2, reconstructed endpoints), not at 0.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    Trapezoidal(optimizer, warmup_steps=4, total_steps=None)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
