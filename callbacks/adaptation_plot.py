"""A TensorBoard image of few-shot adaptation on one fixed validation task (scalar inputs)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.func import functional_call

from callbacks.direct_logging import lightning_log_step


def adaptation_figure(
    task: dict[str, Tensor], grid: Tensor, before: Tensor, after: Tensor, title: str = ""
):
    """Matplotlib figure: support and query points of ``task`` with the predictions on ``grid``
    of the meta-learned initialisation (``before``) and of the adapted parameters (``after``)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    fig = Figure(figsize=(5.0, 3.5))
    ax = fig.add_subplot()
    ax.plot(grid, before, color="tab:grey", linestyle="--", label="meta-init")
    ax.plot(grid, after, color="tab:blue", label="adapted")
    ax.scatter(task["query_x"], task["query_y"], s=12, color="tab:green", label="query")
    ax.scatter(task["support_x"], task["support_y"], s=30, marker="^", color="tab:red",
               label="support")  # fmt: skip
    ax.set(xlabel="x", ylabel="y", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


class AdaptationPlot(L.Callback):
    """After every validation of fit, adapt the meta-learned parameters to one fixed validation
    task with the module's own evaluation procedure (``pl_module.adapt``) and log the fit as
    the TensorBoard image ``meta/adaptation`` (the classic MAML sinusoid picture).

    For task families with scalar inputs (``SinusoidTasks``); rank 0 plots alone.

    Args:
        task_index: which task of the first validation batch to show.
        grid_points: points of the prediction curves, spanning the task's inputs.
    """

    def __init__(self, task_index: int = 0, grid_points: int = 200) -> None:
        if task_index < 0 or grid_points < 2:
            raise ValueError(
                f"AdaptationPlot: task_index={task_index} must be >= 0 and grid_points="
                f"{grid_points} >= 2"
            )
        self.task_index, self.grid_points = task_index, grid_points

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not callable(getattr(pl_module, "adapt", None)):
            raise TypeError(
                f"AdaptationPlot needs a meta-learning module with adapt(task, params); "
                f"{type(pl_module).__name__} has none"
            )
        if stage == "fit":
            self._task(trainer)  # refuse vector inputs or a bad task_index now, not after steps

    def _task(self, trainer: L.Trainer) -> dict[str, Tensor]:
        batch = next(iter(trainer.datamodule.val_dataloader()))
        if batch["support_x"].dim() != 2:
            raise ValueError(
                "AdaptationPlot plots tasks with scalar inputs (support_x of shape [tasks, k]); "
                f"got support_x of shape {tuple(batch['support_x'].shape)}"
            )
        if self.task_index >= batch["support_x"].shape[0]:
            raise ValueError(
                f"AdaptationPlot task_index={self.task_index} exceeds the "
                f"{batch['support_x'].shape[0]} tasks of the first validation batch"
            )
        keys = ("support_x", "support_y", "query_x", "query_y")
        return {k: batch[k][self.task_index] for k in keys}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.global_rank != 0:
            return
        task = {k: v.to(pl_module.device) for k, v in self._task(trainer).items()}
        net = pl_module.net
        params = {n: p.detach() for n, p in net.named_parameters()}
        with torch.enable_grad():
            adapted = pl_module.adapt(task, params)
        xs = torch.cat([task["support_x"], task["query_x"]])
        grid = torch.linspace(float(xs.min()), float(xs.max()), self.grid_points)
        grid = grid.to(xs.device, xs.dtype)
        with torch.no_grad():
            before = functional_call(net, params, (grid,)).flatten().cpu()
            after = functional_call(net, adapted, (grid,)).flatten().cpu()
        cpu_task = {k: v.cpu() for k, v in task.items()}
        title = f"step {trainer.global_step}: validation task {self.task_index}"
        figure = adaptation_figure(cpu_task, grid.cpu(), before, after, title)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("meta/adaptation", figure, lightning_log_step(trainer))
