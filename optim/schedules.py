"""Learning-rate schedules stepped once per optimizer step.

Both are ``LambdaLR`` subclasses, so LightningCLI selects them by ``class_path`` in YAML
(``lr_scheduler: {class_path: optim.schedules.WarmupCosine, init_args: {...}}``) and their state
resumes from checkpoints. ``total_steps: null`` means "the trainer's
``estimated_stepping_batches``", filled in by the module before the first step.
"""

from __future__ import annotations

import math
import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """LR multiplier: linear warmup from 0 over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` at ``total_steps`` (held there afterwards)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:  # no room to decay: at the minimum from the first step after
        return min_lr_ratio
    decay_steps = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_of(fraction: float, total_steps: int) -> int:
    """⌊fraction · total_steps⌋ (warmup spec §2: W = ⌊f_w T⌋, D = ⌊f_c T⌋), robust to float error
    such as 0.29 · 100 = 28.999999999999996."""
    return math.floor(fraction * total_steps + 1e-9)


def trapezoidal_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    cooldown_fraction: float = 0.5,
    min_lr_ratio: float = 0.0,
) -> float:
    """LR multiplier of the trapezoidal (warmup-stable-decay) schedule: linear warmup, constant 1,
    then a linear cooldown to ``min_lr_ratio`` over the final ``cooldown_fraction`` of
    ``total_steps``. Where warmup and cooldown overlap (W + D > T) the lower of the two ramps
    applies (the warmup ran to 1.0 and the LR then dropped inside the cooldown)."""
    warmup = (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else 1.0
    cooldown_steps = max(1, steps_of(cooldown_fraction, total_steps))
    cooldown_start = total_steps - cooldown_steps
    if step < cooldown_start:
        return warmup
    # s(t) = (T - t) / D over the last D steps: the final step still trains at 1/D of the LR.
    progress = min(1.0, (step - cooldown_start) / cooldown_steps)
    return min(warmup, 1.0 - (1.0 - min_lr_ratio) * progress)


def _check(warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and total_steps < max(1, warmup_steps):
        raise ValueError(
            f"total_steps={total_steps} must be >= max(1, warmup_steps={warmup_steps})"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")


class _FollowsThisRunOnResume(LambdaLR):
    """On resume, keep this run's schedule settings rather than the checkpoint's.

    ``LambdaLR.load_state_dict`` restores every attribute, so a run resumed with a larger
    ``trainer.max_steps`` (or another world size under ``max_epochs``) would keep the old length:
    a cosine sits at its minimum and a Trapezoidal cooldown at 0 for every added step. When the
    settings differ, this run's settings apply from the resumed step on, with a warning naming
    them. A schedule whose length is not yet known (``total_steps=None``, outside a trainer)
    takes the checkpoint's, as plain ``LambdaLR`` does.
    """

    SETTINGS: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict) -> None:
        current = {name: getattr(self, name) for name in self.SETTINGS}
        super().load_state_dict(state_dict)
        if current["total_steps"] is None:
            return
        changed = {
            name: (getattr(self, name), value)
            for name, value in current.items()
            if getattr(self, name) != value
        }
        if not changed:
            return
        step = self.last_epoch
        old_factor = self._factor(step)
        for name, (_, value) in changed.items():
            setattr(self, name, value)
        new_factor = self._factor(step)
        # The optimizer's restored LR is the old schedule's: move it onto this run's curve.
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * new_factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        settings = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())
        warnings.warn(
            f"{type(self).__name__} resumed at step {step} with other settings than the "
            f"checkpoint's ({settings}; total_steps follows trainer.max_steps / max_epochs when "
            f"null): the LR follows this run's schedule, factor {old_factor:.4g} -> "
            f"{new_factor:.4g} at this step",
            stacklevel=2,
        )


class WarmupCosine(_FollowsThisRunOnResume):
    """Linear warmup then cosine decay, stepped per optimizer step.

    Args:
        optimizer: the wrapped optimizer (given by LightningCLI).
        warmup_steps: steps of linear warmup from 0 to the base LR.
        total_steps: step at which the cosine reaches ``min_lr_ratio``; ``None`` uses the
            trainer's ``estimated_stepping_batches``.
        min_lr_ratio: final LR as a fraction of the base LR.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _check(warmup_steps, total_steps, min_lr_ratio)
        self.warmup_steps, self.total_steps, self.min_lr_ratio = (
            warmup_steps,
            total_steps,
            min_lr_ratio,
        )
        super().__init__(optimizer, self._factor, last_epoch)

    SETTINGS = ("warmup_steps", "total_steps", "min_lr_ratio")

    def _factor(self, step: int) -> float:
        total = self.total_steps if self.total_steps is not None else max(1, self.warmup_steps)
        return warmup_cosine_factor(step, self.warmup_steps, total, self.min_lr_ratio)


class Trapezoidal(_FollowsThisRunOnResume):
    """Linear warmup, constant LR, linear cooldown over the final fraction of training.

    Args:
        optimizer: the wrapped optimizer (given by LightningCLI).
        warmup_steps: steps of linear warmup from 0 to the base LR.
        total_steps: length of the schedule; ``None`` uses the trainer's
            ``estimated_stepping_batches``.
        cooldown_fraction: fraction of ``total_steps`` spent in the final linear cooldown
            (default 0.5, the warmup paper's f_c).
        min_lr_ratio: LR at the end of the cooldown as a fraction of the base LR.

    The endpoints are reconstructed (warmup spec §2): the warmup starts at 1/W rather than 0, so
    the first step trains, and with ``min_lr_ratio=0`` the last step runs at 1/D of the LR.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        cooldown_fraction: float = 0.5,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _check(warmup_steps, total_steps, min_lr_ratio)
        if not 0.0 < cooldown_fraction <= 1.0:
            raise ValueError(f"cooldown_fraction must lie in (0, 1], got {cooldown_fraction}")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.cooldown_fraction, self.min_lr_ratio = cooldown_fraction, min_lr_ratio
        self.check_total_steps()
        super().__init__(optimizer, self._factor, last_epoch)

    def check_total_steps(self) -> None:
        """Warn when warmup and cooldown overlap (also once ``total_steps`` is filled in)."""
        if self.total_steps is None:
            return
        cooldown = max(1, steps_of(self.cooldown_fraction, self.total_steps))
        if self.warmup_steps + cooldown > self.total_steps:
            warnings.warn(
                f"Trapezoidal: warmup_steps={self.warmup_steps} and the cooldown's {cooldown} "
                f"steps overlap in total_steps={self.total_steps}: the LR follows the lower "
                "ramp and never holds at its set value",
                stacklevel=2,
            )

    SETTINGS = ("warmup_steps", "total_steps", "cooldown_fraction", "min_lr_ratio")

    def _factor(self, step: int) -> float:
        if self.total_steps is None:  # before the trainer filled it in: warmup only
            return (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0
        return trapezoidal_factor(
            step, self.warmup_steps, self.total_steps, self.cooldown_fraction, self.min_lr_ratio
        )


def fill_total_steps(scheduler: object, total_steps: float) -> None:
    """Give a schedule with ``total_steps=None`` the trainer's number of optimizer steps.

    ``total_steps`` is ``trainer.estimated_stepping_batches``: ``inf`` when neither
    ``max_steps`` nor ``max_epochs`` bounds the run, which no decaying schedule can span.
    """
    if getattr(scheduler, "total_steps", 0) is not None:
        return
    name = type(scheduler).__name__
    if not math.isfinite(total_steps):
        raise ValueError(
            f"{name}(total_steps=null) takes its length from the trainer, but the run is "
            "unbounded (trainer.max_steps and trainer.max_epochs are both -1): set one of them "
            "or lr_scheduler.init_args.total_steps"
        )
    warmup = getattr(scheduler, "warmup_steps", 0)
    if int(total_steps) < warmup:
        # a warning, not an error: short smoke runs of a full config are common and harmless
        warnings.warn(
            f"{name}: the run has {int(total_steps)} optimizer steps (trainer.max_steps / "
            f"max_epochs), fewer than lr_scheduler.init_args.warmup_steps={warmup}: the LR "
            "never reaches its set value",
            stacklevel=2,
        )
    scheduler.total_steps = max(1, int(total_steps))  # type: ignore[attr-defined]
    check = getattr(scheduler, "check_total_steps", None)
    if callable(check) and int(total_steps) >= warmup:  # shorter runs were warned about above
        check()
