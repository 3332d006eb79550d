"""Lightning's ``ModelCheckpoint`` with an on-exception save that cannot hang a multi-process run.

``save_on_exception`` saves through ``trainer.save_checkpoint``, which waits at a barrier of
every rank. When only one rank raises (a data error, an out-of-memory), the others sit in a
gradient all-reduce and never reach that barrier: the failing rank waited until the process
group's timeout (30 minutes with gloo) instead of failing. In a multi-process run this class
saves on exception only for the interruptions every rank receives (Ctrl-C, and SIGTERM, which
Lightning forwards to all ranks); otherwise the last regular checkpoint stands.

A diverged run (NaN or infinite trainable weights) is stopped at its next save instead of being
saved: Lightning wrote the broken weights over ``last.ckpt`` and then removed the previous
top-k file, so a run that diverged late kept no usable checkpoint at all (with ``save_top_k: 1``
and no monitor, the configs' setting, every file then held NaN).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.export import non_finite_on_any_rank, non_finite_trainable

log = logging.getLogger(__name__)

#: Exceptions that every rank of a run raises together.
EVERY_RANK_INTERRUPTS = (KeyboardInterrupt, SIGTERMException)


class DivergedRunError(RuntimeError):
    """The trainable weights are no longer finite; raised at a checkpoint save, which is skipped."""


class ModelCheckpoint(LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint``; see the module docstring.

    Args:
        stop_on_non_finite: at a save whose trainable weights hold NaN or inf, stop the run with
            ``DivergedRunError`` and keep the files already written (nothing is overwritten or
            removed). ``false``: save them anyway, as Lightning does.
        *args, **kwargs: the arguments of Lightning's ``ModelCheckpoint``.
    """

    def __init__(self, *args: Any, stop_on_non_finite: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_on_non_finite = stop_on_non_finite

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Every save (top-k, last, on exception) passes here before Lightning removes the file
        # it replaces: raising keeps every file as it was.
        if self.stop_on_non_finite and non_finite_on_any_rank(trainer, trainer.lightning_module):
            raise DivergedRunError(self._divergence_message(trainer, filepath))
        super()._save_checkpoint(trainer, filepath)

    def _divergence_message(self, trainer: L.Trainer, filepath: str) -> str:
        bad = non_finite_trainable(trainer.lightning_module)
        where = (
            f"{len(bad)} tensors, e.g. {bad[0][0]} with {bad[0][1]} entries"
            if bad
            else "on another rank"
        )
        kept = (
            f"the last one written, {self._last_checkpoint_saved} (step "
            f"{self._last_global_step_saved}), still holds finite weights"
            if self._last_checkpoint_saved
            else "no checkpoint had been written before"
        )
        return (
            f"the trainable weights are not finite at step {trainer.global_step} ({where}): the "
            f"run diverged. {filepath} was not written and no checkpoint was removed; {kept}. "
            "Lower the learning rate (or add gradient clipping) and start again or resume from "
            "it; ModelCheckpoint(stop_on_non_finite=false) saves such weights instead"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 saves last.ckpt here also under fast_dev_run, which suppresses every
        # other checkpoint (into default_root_dir, the working directory by default).
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, DivergedRunError):
            return  # its message names the checkpoint kept; saving again would raise again
        if trainer.world_size > 1 and not isinstance(exception, EVERY_RANK_INTERRUPTS):
            if self.save_on_exception:
                log.warning(
                    f"rank {trainer.global_rank}: {type(exception).__name__}: no on-exception "
                    f"checkpoint in a {trainer.world_size}-process run (the other ranks cannot "
                    "join its save); the last regular checkpoint stands"
                )
            return
        if (
            self.save_on_exception
            and self.stop_on_non_finite
            and non_finite_on_any_rank(trainer, pl_module)
        ):
            # raising here would hide the run's own exception behind this one
            log.warning(
                f"{type(exception).__name__}: no on-exception checkpoint: the trainable weights "
                f"are not finite at step {trainer.global_step}; the earlier checkpoints stand"
            )
            return
        super().on_exception(trainer, pl_module, exception)
