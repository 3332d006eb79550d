"""AdaptationPlot: the meta-learned and the adapted fit of one validation task as an image."""

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.func import functional_call

from callbacks.adaptation_plot import AdaptationPlot, adaptation_figure
from datamodules.tasks import LinearRegressionTasks, SinusoidTasks
from modules.meta_learning import MetaLearningModule
from modules.meta_nets import LinearRegressor, MLPRegressor
from optim.sngdm import SNGDM


def _trainer(tmp_path, callback, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=2, val_check_interval=1, limit_val_batches=1,
        inference_mode=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback], **kw,
    )  # fmt: skip


def _module(net) -> MetaLearningModule:
    return MetaLearningModule(
        net, loss="mse", method="fomaml", inner_steps=3, inner_lr=0.01,
        optimizer=partial(SNGDM, lr=0.01),
    )  # fmt: skip


def test_one_image_per_validation_of_fit(tmp_path):
    trainer = _trainer(tmp_path, AdaptationPlot(task_index=1))
    trainer.fit(_module(MLPRegressor(hidden=8, depth=2)), SinusoidTasks(meta_batch_size=4))
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    # Not the sanity check; at the steps of the same validations' scalars.
    val_steps = [e.step for e in events.Scalars("val/query_loss")]
    assert [e.step for e in events.Images("meta/adaptation")] == val_steps == [0, 1]


def test_the_figure_draws_the_module_adaptation_of_the_task():
    torch.manual_seed(0)
    module = _module(MLPRegressor(hidden=8, depth=2))
    data = SinusoidTasks(meta_batch_size=4)
    batch = next(iter(data.val_dataloader()))
    task = {k: batch[k][0] for k in ("support_x", "support_y", "query_x", "query_y")}
    params = {n: p.detach() for n, p in module.net.named_parameters()}
    adapted = module.adapt(task, params)
    grid = torch.linspace(-5, 5, 7)
    with torch.no_grad():
        before = functional_call(module.net, params, (grid,)).flatten()
        after = functional_call(module.net, adapted, (grid,)).flatten()
    assert not torch.allclose(before, after)  # the support set moved the fit
    lines = adaptation_figure(task, grid, before, after).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["meta-init", "adapted"]
    assert torch.equal(torch.as_tensor(lines[1].get_ydata()), after)


def test_vector_inputs_and_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="grid_points=1"):
        AdaptationPlot(grid_points=1)
    module = MetaLearningModule(LinearRegressor(6), loss="half_mse", method="fomaml")
    data = LinearRegressionTasks(dim=6, num_tasks=10, episodes_per_epoch=2, dtype="float32")
    trainer = _trainer(tmp_path, AdaptationPlot(), num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"scalar inputs .* shape \(10, 10, 6\)"):
        trainer.fit(module, data)
    assert trainer.global_step == 0
