"""Ctrl-C during ``fit``: stop at the next step boundary, so the checkpoint resumes exactly.

Python turns SIGINT into a ``KeyboardInterrupt`` wherever it lands; Lightning then saves the
on-exception checkpoint (``callbacks/checkpoint.py``) from there. Between ``optimizer.step()``
and the loop's counters that checkpoint holds the new weights with the old step count (the
resumed run applies the batch twice); anywhere inside a step it leaves the loop's batch counters
one ahead (later validations and saves shift by one step). In a multi-process run a SIGINT to one
rank left it waiting alone in the save's barrier.

This callback records the first Ctrl-C and raises the ``KeyboardInterrupt`` itself at the end of
the step (or of a validation) on every rank together (``callbacks/step_boundary_signal.py``);
Lightning's shutdown then runs as for any Ctrl-C. A second Ctrl-C stops at once, as before.
``mlo`` adds it to every run (``graceful_interrupt.*`` arguments).
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import lightning as L

from callbacks.step_boundary_signal import StepBoundarySignal


class GracefulInterrupt(StepBoundarySignal):
    """Answer the first Ctrl-C of a ``fit`` at the next step boundary, a second one at once.

    Args:
        enabled: take over SIGINT during ``fit``; ``False`` leaves Python's handler (Ctrl-C
            stops wherever it lands).
        check_every_n_steps: in a multi-process run, ranks agree on whether a Ctrl-C arrived
            (one all-reduce of a flag) only at steps divisible by this, to spare that sync when
            steps are very short; the run stops at the next such step.
    """

    config_name = "graceful_interrupt"

    def __init__(self, enabled: bool = True, check_every_n_steps: int = 1) -> None:
        super().__init__(check_every_n_steps)
        self.enabled = enabled
        self._announce = False

    def signal_to_answer(self, trainer: L.Trainer) -> int | None:
        self._announce = trainer.is_global_zero
        return signal.SIGINT if self.enabled else None

    def record_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_received:
            # The second Ctrl-C: Python's own answer, right here.
            raise KeyboardInterrupt
        self.signal_received = True
        if self._announce:
            # os.write: a print() interrupted inside another print() raises a reentrancy error.
            os.write(
                2,  # stderr
                b"\nCtrl-C: stopping after this training step, with a checkpoint "
                b"(Ctrl-C again stops at once)\n",
            )

    def act(self, trainer: L.Trainer) -> None:
        raise KeyboardInterrupt
