"""Answer a signal at the next step boundary instead of wherever it lands.

A signal handler runs between two Python bytecodes of whatever the process was doing. A
checkpoint written from there (Lightning's SIGUSR1 save, the on-exception save after a Ctrl-C)
can catch an automatic-optimization step between ``optimizer.step()`` and the loop's counters,
saving updated weights with the old step count, so the resumed run applies that batch twice;
or a step that changes the weights in place and restores them (a federated round), half done.

A ``StepBoundarySignal`` callback takes the signal during ``fit``, only records it, and acts at
the end of the next training batch that stepped an optimizer, or of the next validation: the
places where Lightning's loops save their own resumable checkpoints (``ModelCheckpoint``). In a
multi-process run the ranks receive a signal at different moments, or only one of them does:
they act when any rank has it, all at the same boundary (one all-reduce of a flag).
Subclasses say which signal (``signal_to_answer``) and what to do (``act``).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning as L


class StepBoundarySignal(L.Callback):
    """Record a signal during ``fit``; ``act`` on it at the next step boundary, on every rank.

    Args:
        check_every_n_steps: ranks agree on whether the signal arrived (one all-reduce of a
            flag) only at steps divisible by this, to spare that sync when steps are very short.
    """

    #: The name ``mlo`` gives this callback's arguments (``<name>.check_every_n_steps``).
    config_name = "step_boundary_signal"

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(
                f"{self.config_name}.check_every_n_steps must be >= 1, got {check_every_n_steps}"
            )
        self.check_every_n_steps = check_every_n_steps
        self.signal_received = False
        self._signum: int | None = None
        self._previous_handler: Any = None
        self._step_at_batch_start = 0

    def signal_to_answer(self, trainer: L.Trainer) -> int | None:
        """The signal to take over for this fit, or ``None`` to leave every handler alone."""
        raise NotImplementedError

    def act(self, trainer: L.Trainer) -> None:
        """What every rank does at the boundary after the signal (may raise to stop the fit)."""
        raise NotImplementedError

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Python runs signal handlers in the main thread only, and only it may install them.
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._signum = self.signal_to_answer(trainer)
        if self._signum is not None:
            self.signal_received = False
            self._previous_handler = signal.signal(self._signum, self.record_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signum is not None:
            signal.signal(self._signum, self._previous_handler)
            self._signum = None

    def record_signal(self, signum: int, frame: FrameType | None) -> None:
        """The handler. Anything more than a flag here runs in the middle of a step."""
        self.signal_received = True

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        stepped = trainer.global_step != self._step_at_batch_start
        if stepped and trainer.global_step % self.check_every_n_steps == 0:
            self._act_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._act_if_signalled(trainer)

    def _act_if_signalled(self, trainer: L.Trainer) -> None:
        if self._signum is None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        self.signal_received = False
        self.act(trainer)
