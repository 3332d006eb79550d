"""Test kit for the step-boundary signal callbacks (SlurmRequeue, GracefulStop): linear
regression whose ``signal_rank`` sends itself a signal right after an optimizer step, before
Lightning counts the step (where a handler that saves at once catches a half-counted step)."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from datamodules.resumable_sampler import resumable_train_loader


class SignallingRegression(L.LightningModule):
    """Linear regression with SGD; ``signal_rank`` sends itself ``signal_name`` ``times`` times
    right after optimizer step number ``signal_step + 1``."""

    def __init__(
        self,
        signal_step: int | None = None,
        signal_rank: int = 0,
        signal_name: str = "SIGUSR1",
        times: int = 1,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.signal_step, self.signal_rank = signal_step, signal_rank
        self.signal_name, self.times = signal_name, times

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.global_step == self.signal_step and self.global_rank == self.signal_rank:
            for _ in range(self.times):
                os.kill(os.getpid(), getattr(signal, self.signal_name))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RegressionData(L.LightningDataModule):
    """64 fixed samples, batches of 4, a loader that resumes mid-epoch (the project's)."""

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(
            torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
        )
        return resumable_train_loader(self, data, batch_size=4, seed=0, drop_last=True)


def fit_regression(
    module: SignallingRegression, root, steps: int, callbacks: list, ckpt_path=None, **kw
) -> torch.Tensor:
    """Fit ``steps`` steps on CPU; the flat weights after it."""
    checkpoints = any(isinstance(c, Checkpoint) for c in callbacks)
    L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=checkpoints,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=callbacks, **kw,
    ).fit(module, RegressionData(), ckpt_path=ckpt_path)  # fmt: skip
    return torch.cat([p.detach().flatten() for p in module.parameters()])
