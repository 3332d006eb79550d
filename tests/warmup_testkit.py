"""A small regression setup shared by the UpdateDiagnostics tests (imported as
``tests.warmup_testkit``; its module classes are importable, as ``ddp_spawn`` needs)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import TensorDataset

from callbacks.warmup_diagnostics import UpdateDiagnostics
from optim.lion import Lion, LionAR


def regression_data(n: int = 320, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    return TensorDataset(x, x[:, :2].sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=gen))


class TinyRegressor(L.LightningModule):
    """Two linear layers with dropout; ``compute_loss`` is the callback's loss protocol."""

    def __init__(self, optimizer: str = "adamw", lr: float = 1e-2, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 32)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(32, 1)
        self.opt_name, self.lr = optimizer, lr

    def compute_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.out(self.drop(torch.relu(self.fc(x)))), y)

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def configure_optimizers(self):
        if self.opt_name == "lionar_plain":  # constant target angle atan(η_r) at every step
            return LionAR(self.named_parameters(), lr=self.lr, weight_decay=0.1,
                          rotational="all_matrices")  # fmt: skip
        if self.opt_name == "lion_ibc":  # the step is σ_t·η·(sign(c) + λw), σ_t = 1 − β₂ᵗ
            return Lion(self.parameters(), lr=self.lr, betas=(0.98, 0.98), weight_decay=0.1,
                        inverse_bias_correction=True)  # fmt: skip
        if self.opt_name == "lionar":
            return LionAR(
                self.named_parameters(), lr=self.lr, weight_decay=0.1, rrc_correction="derived",
                rotational="all_matrices",  # no transformer blocks here: fc and out rotate
            )  # fmt: skip
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


def diagnostics_trainer(tmp_path: Path, max_steps: int, callbacks, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=kw.pop("logger", False),
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def records(cb: UpdateDiagnostics, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in cb.history if key in r}
