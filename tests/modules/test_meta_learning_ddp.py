"""DDP (2 CPU processes, gloo): the meta-batch is split across ranks and reduced explicitly.

Three meta-steps under ``ddp_spawn`` with 2 ranks must give the same parameters as one process
seeing the whole meta-batch (up to float64 summation order). Validation on an odd number of tasks
must give the same metrics as one process (each task scored once, padding given zero weight).
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch import nn

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


class DropoutRegressor(nn.Module):
    """A linear-regression net with dropout (module level: ddp_spawn pickles it)."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def _run(
    tmp_path, devices: int, method: str, net: type[nn.Module] | None = None, **kw
) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    dm = LinearRegressionTasks(dim=6, num_tasks=20, meta_batch_size=4, episodes_per_epoch=3)
    torch.manual_seed(1)
    module = MetaLearningModule(
        net() if net else LinearRegressor(6, init_std=0.1), loss="half_mse", method=method, alpha=0.5,
        inner_steps=30, inner_lr=0.12, baselines_use_proximal=True,
        optimizer=partial(SNGDM, lr=0.05), **kw,
    )  # fmt: skip
    path = str(tmp_path / f"weights_{devices}_{method}_{sorted(kw)}.pt")
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


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("net", "kw"),
    [
        (None, {"inner_batch_size": 3}),  # per-step support mini-batches
        (DropoutRegressor, {"vectorize_tasks": False}),  # dropout masks
    ],
    ids=["mini_batches", "dropout"],
)
def test_ddp_task_randomness_does_not_depend_on_the_rank(tmp_path, net, kw):
    """A task's mini-batches and dropout masks come from (step, index in the meta-batch): two
    ranks give one process's result. They used to be seeded by (step, rank, local index), and
    dropout drew from the global RNG, which Lightning seeds alike on every rank (so rank 0's and
    rank 1's i-th tasks shared their masks); both cases failed this test."""
    single, _ = _run(tmp_path, 1, "fomaml", net=net, **kw)
    ddp, _ = _run(tmp_path, 2, "fomaml", net=net, **kw)
    assert single.keys() == ddp.keys()
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-10, rtol=0)


class RecordEvalBatches(L.Callback):
    """Every rank saves the task count and the scored-task count of each validation batch."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.batches: list[tuple[int, int]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        total = int(batch["support_x"].shape[0])
        self.batches.append((total, int(batch["scored"].sum()) if "scored" in batch else total))

    def on_validation_end(self, trainer, pl_module) -> None:
        torch.save(self.batches, f"{self.path}.rank{trainer.global_rank}")


def _validate(tmp_path, devices: int) -> tuple[dict[str, float], list]:
    # 21 tasks, 4 per batch: one process sees batches of 4, 4, 4, 4, 4, 1; two ranks see 11
    # tasks each (4, 4, 3), rank 1's last batch holding the one padding task of EvenEvalSampler.
    dm = LinearRegressionTasks(dim=6, num_tasks=21, meta_batch_size=4, episodes_per_epoch=1)
    dm.eval_batch_size = 4
    module = MetaLearningModule(
        LinearRegressor(6), loss="half_mse", method="fo_b_maml_symmetric", alpha=0.5,
        inner_steps=30, inner_lr=0.12, baselines_use_proximal=True,
    ).double()  # fmt: skip
    with torch.no_grad():
        module.net.weight.copy_(torch.linspace(-0.3, 0.4, 6, dtype=torch.float64))
    path = str(tmp_path / f"eval_batches_{devices}.pt")
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true", inference_mode=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RecordEvalBatches(path)], default_root_dir=str(tmp_path),
    )  # fmt: skip
    (metrics,) = trainer.validate(module, dm, verbose=False)
    return metrics, [torch.load(f"{path}.rank{r}") for r in range(devices)]


@pytest.mark.distributed
def test_ddp_validation_metrics_count_every_task_once(tmp_path):
    """An odd task count under 2 ranks: the padding task is not scored, so every val metric equals
    the single-process one, and both ranks run the same batch count. (Lightning's default
    DistributedSampler repeated task 0 and scored it twice: val/query_loss 4.3609 instead of
    4.4427; with the padding merely unweighted, ``self.log(batch_size=n, sync_dist=True)`` still
    divided by a batch-size total truncated from 21 / 2 to 10: 4.6649.)"""
    single, batches_single = _validate(tmp_path, 1)
    ddp, batches_ddp = _validate(tmp_path, 2)
    assert set(single) == {"val/pre_adapt_loss", "val/query_loss"}
    assert set(ddp) == set(single)
    assert ddp == pytest.approx(single, rel=1e-6)
    assert batches_single == [[(4, 4)] * 5 + [(1, 1)]]
    assert batches_ddp == [[(4, 4), (4, 4), (3, 3)], [(4, 4), (4, 4), (3, 2)]]
