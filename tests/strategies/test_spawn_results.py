"""ddp_spawn with many callback metrics: Lightning's launcher waited for rank 0 to exit before
reading its results from a pipe, and rank 0 blocked writing more than the pipe holds (64 KiB,
about 200 scalars: the warmup diagnostics of ``tiny-llama`` log 233). The run hung after its
work was done; now the metrics travel through a file and reach the parent process."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

import strategies  # noqa: F401  (registers the names, as cli.py does)
from strategies.spawn_results import SpawnSafeDDPStrategy
from tests.signal_testkit import RegressionData, SignallingRegression

METRICS = 2000


class ManyMetrics(L.Callback):
    """Puts ``METRICS`` scalars into ``callback_metrics`` (as ``log_scalars`` does), ~640 KB."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.callback_metrics.update({f"m/{i}": torch.tensor(float(i)) for i in range(METRICS)})


def _spawn_trainer(root, callbacks=()) -> L.Trainer:
    """Two CPU ranks by ``ddp_spawn``, two steps, nothing written but under ``root``."""
    return L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=list(callbacks),
    )  # fmt: skip


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_many_callback_metrics_reach_the_parent_process(tmp_path):
    trainer = _spawn_trainer(tmp_path, [ManyMetrics()])
    assert isinstance(trainer.strategy, SpawnSafeDDPStrategy)
    trainer.fit(SignallingRegression(), RegressionData())
    assert float(trainer.callback_metrics[f"m/{METRICS - 1}"]) == METRICS - 1
    assert len([k for k in trainer.callback_metrics if k.startswith("m/")]) == METRICS


class RegressionWithGenerator(SignallingRegression):
    """Holds a ``torch.Generator``, as modules and data modules with their own noise do."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = torch.Generator().manual_seed(3)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_module_holding_a_generator_reaches_the_spawned_workers(tmp_path):
    # Pickling a Generator makes a temporary state tensor. With file-descriptor sharing it was
    # freed before the workers started, its descriptor number went to the launcher's next pipe,
    # and each worker died unpickling a "storage" that was now that pipe (pytorch#146828); the
    # parent then blocked writing the rest of the pickle: the run hung.
    trainer = _spawn_trainer(tmp_path)
    module = RegressionWithGenerator()
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, RegressionData())
    assert trainer.state.finished
    # rank 0's trained weights came back to this process
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"  # restored


def test_every_spawn_and_fork_ddp_name_is_spawn_safe():
    for name in ("ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true"):
        assert StrategyRegistry[name]["strategy"] is SpawnSafeDDPStrategy, name
    assert StrategyRegistry["ddp_spawn"]["init_params"] == {"start_method": "spawn"}
