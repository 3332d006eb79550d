"""Test helper: Ctrl-C (a ``KeyboardInterrupt``) in the middle of one training step, raised from
the hook named by ``hook`` (``on_before_backward``: after the forward; ``on_before_optimizer_step``:
before the optimizer step, also for manual optimization)."""

from __future__ import annotations

import lightning as L


class InterruptAtStep(L.Callback):
    def __init__(self, step: int, hook: str = "on_before_backward") -> None:
        self.step = step
        setattr(self, hook, self._interrupt)

    def _interrupt(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt
