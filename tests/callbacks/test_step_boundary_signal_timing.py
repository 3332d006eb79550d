"""StepBoundarySignal: where it acts after a signal (a batch that stepped the optimizer, or the
end of a validation inside fit), and that a flag left over from one fit does not act in the next."""

from __future__ import annotations

import os
import signal
import threading

import lightning as L
import torch
from torch.utils.data import DataLoader

from callbacks.step_boundary_signal import StepBoundarySignal


class Recorder(StepBoundarySignal):
    """Answers SIGUSR1; ``act`` records the global step it ran at."""

    def __init__(self, check_every_n_steps: int = 1) -> None:
        super().__init__(check_every_n_steps)
        self.acted: list[int] = []

    def signals_to_answer(self, trainer):
        return (signal.SIGUSR1,)

    def act(self, trainer, signals):
        self.acted.append(trainer.global_step)


class Regression(L.LightningModule):
    """Sends itself SIGUSR1 inside training batch ``train_batch`` or validation ``val_after``
    (the validation that follows that optimizer step)."""

    def __init__(self, train_batch: int | None = None, val_after: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.train_batch, self.val_after = train_batch, val_after
        self.batches = 0

    def training_step(self, batch, batch_idx):
        if self.batches == self.train_batch:
            os.kill(os.getpid(), signal.SIGUSR1)
        self.batches += 1
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        if self.global_step == self.val_after:
            os.kill(os.getpid(), signal.SIGUSR1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(module, callback, steps, **kwargs):
    loader = DataLoader(torch.randn(64, 2), batch_size=2)
    L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **kwargs,
    ).fit(module, loader, loader)  # fmt: skip


def test_a_batch_that_only_accumulates_gradients_is_no_boundary():
    # Batches 0-1 make step 1, batches 2-3 step 2: a signal in batch 2 waits for step 2.
    callback = Recorder()
    _fit(Regression(train_batch=2), callback, 3, accumulate_grad_batches=2,
         limit_val_batches=0)  # fmt: skip
    assert callback.acted == [2]


def test_a_signal_during_validation_is_answered_at_its_end():
    callback = Recorder()
    _fit(Regression(val_after=2), callback, 4, val_check_interval=2, limit_val_batches=1,
         num_sanity_val_steps=0)  # fmt: skip
    assert callback.acted == [2]  # not after step 3, the next training batch


def test_a_signal_not_answered_in_one_fit_is_not_answered_in_the_next():
    # check every 2 steps: the signal in batch 2 (step 3, the last one) is never answered.
    callback = Recorder(check_every_n_steps=2)
    _fit(Regression(train_batch=2), callback, 3, limit_val_batches=0)
    assert callback.acted == []
    # A second fit outside the main thread, where no handler can be installed.
    worker = threading.Thread(target=_fit, args=(Regression(), callback, 2),
                              kwargs={"limit_val_batches": 0})  # fmt: skip
    worker.start()
    worker.join()
    assert callback.acted == []
