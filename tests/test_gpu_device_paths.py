"""CUDA-only regressions: paths whose devices CPU tests cannot check (skipped without a GPU).

Each case crashed on a GPU before its fix: a CPU generator drawing a CUDA tensor (cubic HVP
solver), a CPU task pool meeting CUDA weights (FO-B-MAML closed-form logs), a CPU constant
stacked with CUDA values (saddle oracles).
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from datamodules.cubic_problems import saddle_oracles
from datamodules.tasks import LinearRegressionTasks
from modules.meta_learning import MetaLearningModule
from modules.meta_nets import LinearRegressor
from ops.cubic_subproblem import solve_cubic_hvp
from optim.sngdm import SNGDM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cubic_hvp_solver_takes_a_cpu_generator_for_cuda_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    H = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    H = H + H.T
    g = torch.randn(6, generator=gen, dtype=torch.float64)

    def solve(device: str):
        Hd, gd = H.to(device), g.to(device)
        step = solve_cubic_hvp(
            gd, lambda v: Hd @ v, 1.0, generator=torch.Generator().manual_seed(3)
        )
        return step.h.cpu()

    torch.testing.assert_close(solve("cuda"), solve("cpu"), rtol=1e-8, atol=1e-10)


def test_meta_learning_closed_form_logs_on_cuda(tmp_path) -> None:
    dm = LinearRegressionTasks(dim=6, num_tasks=20, meta_batch_size=4, episodes_per_epoch=2)
    module = MetaLearningModule(
        LinearRegressor(6, init_std=0.1), loss="half_mse", method="fo_b_maml_symmetric",
        alpha=0.5, inner_steps=5, inner_lr=0.12, optimizer=partial(SNGDM, lr=0.05),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="gpu", devices=1, max_steps=2, precision="64-true", inference_mode=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    assert "train/estimator_error" in trainer.callback_metrics


def test_saddle_oracles_on_cuda() -> None:
    x = torch.tensor([0.5, -0.2], dtype=torch.float64, device="cuda")
    noise = torch.zeros(3, 2, dtype=torch.float64, device="cuda")
    *_, hess = saddle_oracles(x, noise)
    assert hess.device.type == "cuda"
    torch.testing.assert_close(hess.diag().cpu(), torch.tensor([3 * 0.25 - 1.0, 1.0]).double())
