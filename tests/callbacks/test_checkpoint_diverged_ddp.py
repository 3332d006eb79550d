"""A divergence seen on one rank only stops the run at that save (2 CPU processes, gloo), and
the checkpoint written before it stays."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from callbacks.checkpoint import ModelCheckpoint

pytestmark = pytest.mark.distributed


class BreakRankOneAtStep3(L.Callback):
    """Rank 1's weights turn NaN after step 3, rank 0's stay finite until the next gradient
    all-reduce; Lightning runs checkpoint callbacks after the others (module level: spawn)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3 and trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.w.fill_(float("nan"))


class Quadratic(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        return (self.w**2).sum() * 1e-3

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)


def test_a_divergence_on_one_rank_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=6, logger=False,
        callbacks=[checkpoint, BreakRankOneAtStep3()], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    # The launcher reports the first rank to fail (either: the decision is collective, so
    # both stop at step 3's save; which one is first to report is a race).
    with pytest.raises(Exception, match=r"not finite at step 3 \((on another rank|1 tensors)"):
        trainer.fit(Quadratic())
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2 and bool(torch.isfinite(last["state_dict"]["w"]).all())
