"""CubicNewtonModule under real 2-process DDP (gloo, CPU): explicit averaging, identical replicas."""

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.cubic_problems import (
    LinearModel,
    LogisticLoss,
    LogisticToyDataModule,
    NonconvexRegularizer,
    SaddleFunction,
    SaddleNoiseDataModule,
    logistic_oracles,
)
from modules.cubic_newton import CubicNewtonModule
from optim.cubic_solvers import StochasticCubicNewton

STEPS = 8
KW = dict(momentum_type="hessian_corrected", grad_momentum=0.2, hess_momentum=0.2, M=1.0)


class _SaveParams(L.Callback):
    """Each rank writes its final parameters, so the test can compare the replicas."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(self.out) / f"rank{trainer.global_rank}.pt"
        torch.save(pl_module.model.weight.detach().clone(), path)


def _dm() -> LogisticToyDataModule:
    return LogisticToyDataModule(n=200, d=30, seed=4)


@pytest.mark.distributed
def test_ddp_two_ranks_identical_and_equal_to_averaged_oracles(tmp_path):
    module = CubicNewtonModule(LinearModel(30), LogisticLoss(), NonconvexRegularizer(1e-2), **KW)
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[_SaveParams(str(tmp_path))],
    )  # fmt: skip
    trainer.fit(module, _dm())
    x0, x1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(x0, x1)

    # Reference in one process: the same optimizer fed with the mean of the two ranks' oracles.
    dm = _dm()
    streams = [iter(dm.stream(rank=r)) for r in (0, 1)]
    x = torch.nn.Parameter(torch.zeros(30, dtype=torch.float64))
    opt = StochasticCubicNewton([x], **KW)
    for _ in range(STEPS):
        y, z = opt.evaluation_points()
        batches = [next(s) for s in streams]
        g = sum(logistic_oracles(y, *bg, 1e-2)[1] for bg, _ in batches) / 2
        H = sum(logistic_oracles(z, *bh, 1e-2)[2] for _, bh in batches) / 2
        opt.step(grad=g, hess=H)
    assert torch.allclose(x0, x.detach(), atol=1e-10, rtol=0)
    # A single rank's samples alone would give a different point: the averaging is real.
    single = CubicNewtonModule(LinearModel(30), LogisticLoss(), NonconvexRegularizer(1e-2), **KW)
    L.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    ).fit(single, _dm())  # fmt: skip
    assert not torch.allclose(single.model.weight.detach(), x0, atol=1e-6)


@pytest.mark.distributed
def test_ddp_full_batch_validation_counts_every_row_once():
    # 201 rows on 2 ranks: a padding sampler would count one row twice.
    torch.manual_seed(0)
    module = CubicNewtonModule(LinearModel(30), LogisticLoss(), NonconvexRegularizer(1e-2), **KW)
    with torch.no_grad():
        module.model.weight.normal_()
    dm = LogisticToyDataModule(n=201, d=30, seed=4)
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False, inference_mode=False)  # fmt: skip
    two = L.Trainer(devices=2, strategy="ddp_spawn", **kw).validate(module, dm, verbose=False)[0]
    one = L.Trainer(devices=1, **kw).validate(module, dm, verbose=False)[0]
    A, y = dm.A, dm.y
    loss, g, _ = logistic_oracles(module.model.weight.detach().double(), A, y, 1e-2)
    for metrics in (one, two):
        assert metrics["val/loss"] == pytest.approx(float(loss), rel=1e-9)
        assert metrics["val/grad_norm"] == pytest.approx(float(g.norm()), rel=1e-9)


@pytest.mark.distributed
def test_ddp_validation_with_fewer_rows_than_ranks():
    # The saddle problem validates on one row: rank 1's shard is empty, yet it must join the
    # epoch-end all-reduce (it used to be refused: "needs >= 1 row per rank").
    module = CubicNewtonModule(SaddleFunction(), M=1.0)
    with torch.no_grad():
        module.model.x.copy_(torch.tensor([0.5, 0.2], dtype=module.model.x.dtype))
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False, inference_mode=False)  # fmt: skip
    dm = SaddleNoiseDataModule(noise=0.01)
    two = L.Trainer(devices=2, strategy="ddp_spawn", **kw).validate(module, dm, verbose=False)[0]
    one = L.Trainer(devices=1, **kw).validate(module, dm, verbose=False)[0]
    # f = x1^4/4 - x1^2/2 + x2^2/2, grad = (x1^3 - x1, x2), Hessian = diag(3 x1^2 - 1, 1).
    for metrics in (one, two):
        assert metrics["val/loss"] == pytest.approx(0.5**4 / 4 - 0.5**2 / 2 + 0.2**2 / 2)
        assert metrics["val/grad_norm"] == pytest.approx(float(torch.tensor([-0.375, 0.2]).norm()))
        assert metrics["val/lambda_min"] == pytest.approx(3 * 0.5**2 - 1)
