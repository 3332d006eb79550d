"""DDP (2 CPU processes, gloo): the meta-batch is split across ranks and reduced explicitly.

Three meta-steps under ``ddp_spawn`` with 2 ranks must give the same parameters as one process
seeing the whole meta-batch (up to float64 summation order).
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from datamodules.tasks import LinearRegressionTasks
from modules.meta_learning import MetaLearningModule
from modules.meta_nets import LinearRegressor
from optim.sngdm import SNGDM


class SaveWeights(L.Callback):
    """Every rank saves the task counts it computed; rank 0 also saves the final weights."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.local_tasks: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.local_tasks.append(len(pl_module._local_tasks(batch)))

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.local_tasks, f"{self.path}.rank{trainer.global_rank}")
        if trainer.global_rank == 0:
            torch.save(
                {k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.path
            )


def _run(tmp_path, devices: int, method: str) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    dm = LinearRegressionTasks(dim=6, num_tasks=20, meta_batch_size=4, episodes_per_epoch=3)
    module = MetaLearningModule(
        LinearRegressor(6, init_std=0.1), loss="half_mse", method=method, alpha=0.5,
        inner_steps=30, inner_lr=0.12, baselines_use_proximal=True,
        optimizer=partial(SNGDM, lr=0.05),
    )  # fmt: skip
    path = str(tmp_path / f"weights_{devices}_{method}.pt")
    trainer = L.Trainer(
        accelerator="cpu", devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=3, precision="64-true", inference_mode=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=2, num_sanity_val_steps=0, callbacks=[SaveWeights(path)],
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, dm)
    local = [torch.load(f"{path}.rank{r}") for r in range(devices)]
    return torch.load(path), local


@pytest.mark.distributed
@pytest.mark.parametrize(
    "method", ["fo_b_maml_symmetric", pytest.param("maml", marks=pytest.mark.slow)]
)
def test_ddp_two_ranks_match_single_process(tmp_path, method):
    single, local_single = _run(tmp_path, 1, method)
    ddp, local_ddp = _run(tmp_path, 2, method)
    # Each rank computes half of the meta-batch of 4, the single process all of it.
    assert local_single == [[4, 4, 4]]
    assert local_ddp == [[2, 2, 2], [2, 2, 2]]
    assert not torch.equal(single["net.weight"], torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(ddp["net.weight"], single["net.weight"], atol=1e-10, rtol=0)
