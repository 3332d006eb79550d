"""Answer signals at the next step boundary instead of wherever they land.

A signal handler runs between two Python bytecodes of whatever the process was doing. A
checkpoint written from there (Lightning's SIGUSR1 save, the on-exception save after a Ctrl-C)
can catch an automatic-optimization step between ``optimizer.step()`` and the loop's counters,
saving updated weights with the old step count, so the resumed run applies that batch twice;
or a step that changes the weights in place and restores them (a federated round), half done.
A collective in a handler (Lightning 2.6's SIGTERM broadcast) can pair with a different
collective on another rank and hang the run.

A ``StepBoundarySignal`` callback takes its signals while the training loop runs, only records
them, and acts at the end of the next training batch that stepped an optimizer, or of the next
validation: the places where Lightning's loops save their own resumable checkpoints
(``ModelCheckpoint``). In a multi-process run the ranks receive a signal at different moments,
or only one of them does: they act when any rank has it, all at the same boundary (one
all-reduce of the flags). Subclasses say which signals (``signals_to_answer``) and what to do
(``act``).

The handlers are installed in ``on_train_start``, after Lightning has set its own (which it
restores, over these, when the fit ends or fails).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch


class StepBoundarySignal(L.Callback):
    """Record signals during training; ``act`` on them at the next step boundary, on every rank.

    Args:
        check_every_n_steps: ranks agree on whether a signal arrived (one all-reduce of the
            flags) only at steps divisible by this, to spare that sync when steps are very short.
    """

    #: The name ``mlo`` gives this callback's arguments (``<name>.check_every_n_steps``).
    config_name = "step_boundary_signal"

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(
                f"{self.config_name}.check_every_n_steps must be >= 1, got {check_every_n_steps}"
            )
        self.check_every_n_steps = check_every_n_steps
        self.received: dict[int, bool] = {}
        self._previous_handlers: dict[int, Any] = {}
        self._step_at_batch_start = 0

    def signals_to_answer(self, trainer: L.Trainer) -> tuple[int, ...]:
        """The signals to take over for this fit (none: every handler is left alone)."""
        raise NotImplementedError

    def act(self, trainer: L.Trainer, signals: list[int]) -> None:
        """What every rank does at the boundary after ``signals`` arrived (may raise to stop)."""
        raise NotImplementedError

    def record_signal(self, signum: int, frame: FrameType | None) -> None:
        """The handler. Anything more than a flag here runs in the middle of a step."""
        self.received[signum] = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Python runs signal handlers in the main thread only, and only it may install them.
        if threading.current_thread() is not threading.main_thread():
            return
        self.received = dict.fromkeys(self.signals_to_answer(trainer), False)
        self._previous_handlers = {s: signal.signal(s, self.record_signal) for s in self.received}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers, self.received = {}, {}

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
        if not self.received:
            return
        signums = list(self.received)
        if trainer.world_size == 1:
            agreed = [s for s in signums if self.received[s]]
        else:
            # Ranks receive a signal at different moments: act when any has it, all together.
            flags = [int(self.received[s]) for s in signums]
            counts = trainer.strategy.reduce(
                torch.tensor(flags, device=trainer.strategy.root_device), reduce_op="sum"
            )
            agreed = [s for s, count in zip(signums, counts.tolist(), strict=True) if count > 0]
        if agreed:
            self.received = dict.fromkeys(signums, False)
            self.act(trainer, agreed)
