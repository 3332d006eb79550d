"""Lightning's ``ModelCheckpoint`` with an on-exception save that cannot hang a multi-process run.

``save_on_exception`` saves through ``trainer.save_checkpoint``, which waits at a barrier of
every rank. When only one rank raises (a data error, an out-of-memory), the others sit in a
gradient all-reduce and never reach that barrier: the failing rank waited until the process
group's timeout (30 minutes with gloo) instead of failing. In a multi-process run this class
saves on exception only for the interruptions every rank receives (Ctrl-C, and SIGTERM, which
Lightning forwards to all ranks); otherwise the last regular checkpoint stands.
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

#: Exceptions that every rank of a run raises together.
EVERY_RANK_INTERRUPTS = (KeyboardInterrupt, SIGTERMException)


class ModelCheckpoint(LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` (same arguments); see the module docstring."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 saves last.ckpt here also under fast_dev_run, which suppresses every
        # other checkpoint (into default_root_dir, the working directory by default).
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.world_size > 1 and not isinstance(exception, EVERY_RANK_INTERRUPTS):
            if self.save_on_exception:
                log.warning(
                    f"rank {trainer.global_rank}: {type(exception).__name__}: no on-exception "
                    f"checkpoint in a {trainer.world_size}-process run (the other ranks cannot "
                    "join its save); the last regular checkpoint stands"
                )
            return
        super().on_exception(trainer, pl_module, exception)
