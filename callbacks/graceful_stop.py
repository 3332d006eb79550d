"""Ctrl-C or SIGTERM during training: stop at the next step boundary, on every rank together.

Python turns SIGINT into a ``KeyboardInterrupt`` wherever it lands, and Lightning then saves the
on-exception checkpoint (``callbacks/checkpoint.py``) from there. Between ``optimizer.step()``
and the loop's counters that checkpoint holds the new weights with the old step count (the
resumed run applies the batch twice); anywhere inside a step it leaves the loop's batch counters
one ahead (later validations and saves shift by one step). In a multi-process run a SIGINT to one
rank left it waiting alone in the save's barrier. Lightning 2.6's SIGTERM handler broadcasts
from inside the handler: a SIGTERM to every process of a DDP run (``kill -TERM -<pgid>``,
systemd, ``scancel``) hung it.

This callback records the signal and raises, at the end of the step (or of a validation) and
on every rank together (``callbacks/step_boundary_signal.py``), the exception Lightning's own
handling would: ``KeyboardInterrupt`` for Ctrl-C (``mlo`` exits 1), Lightning's
``SIGTERMException`` for SIGTERM (``mlo`` exits 143). Both save the on-exception checkpoint.
A second Ctrl-C stops at once, as before. ``mlo`` adds it to every run (``graceful_stop.*``).

Not under ``ddp_spawn``/``ddp_fork``: their workers run the fit outside Lightning's exception
handling (no on-exception hooks, and torch's worker wrapper swallows a ``KeyboardInterrupt``), so
no checkpoint could be written; the signals keep their usual handling there (use ``ddp``).
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import lightning as L
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.step_boundary_signal import StepBoundarySignal


class GracefulStop(StepBoundarySignal):
    """Stop training at the next step boundary on Ctrl-C or SIGTERM (a second Ctrl-C: at once).

    Args:
        ctrl_c: take over SIGINT during training; ``False`` leaves Python's handler (Ctrl-C
            stops wherever it lands).
        sigterm: take over SIGTERM during training; ``False`` leaves Lightning's handler.
        check_every_n_steps: in a multi-process run, ranks agree on whether a signal arrived
            (one all-reduce of the flags) only at steps divisible by this, to spare that sync
            when steps are very short; the run stops at the next such step.
    """

    config_name = "graceful_stop"

    def __init__(
        self, ctrl_c: bool = True, sigterm: bool = True, check_every_n_steps: int = 1
    ) -> None:
        super().__init__(check_every_n_steps)
        self.ctrl_c, self.sigterm = ctrl_c, sigterm
        self._announce = False

    def signals_to_answer(self, trainer: L.Trainer) -> tuple[int, ...]:
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            return ()  # a spawned or forked worker (module docstring)
        self._announce = trainer.is_global_zero
        wanted = {signal.SIGINT: self.ctrl_c, signal.SIGTERM: self.sigterm}
        return tuple(signum for signum, on in wanted.items() if on)

    def record_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received.get(signum):
            raise KeyboardInterrupt  # the second Ctrl-C: Python's own answer, right here
        first = not any(self.received.values())
        super().record_signal(signum, frame)
        if first and self._announce:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = " (Ctrl-C again stops at once)" if self.ctrl_c else ""
            # os.write: a print() interrupted inside another print() raises a reentrancy error.
            message = f"\n{name}: stopping after this training step, with a checkpoint{again}\n"
            os.write(2, message.encode())

    def act(self, trainer: L.Trainer, signals: list[int]) -> None:
        if signal.SIGTERM in signals:
            raise SIGTERMException
        raise KeyboardInterrupt
