"""CubicNewtonModule through the Lightning Trainer: oracles, reductions, resume, saddle escape, HVP path."""

import itertools

import lightning as L
import pytest
import torch
from torch import nn
from torch.func import grad, hessian

from datamodules.cubic_problems import (
    L2Regularizer,
    LinearModel,
    LogisticLoss,
    LogisticToyDataModule,
    NonconvexRegularizer,
    SaddleFunction,
    SaddleNoiseDataModule,
    logistic_oracles,
    saddle_oracles,
)
from modules.cubic_newton import CubicNewtonModule
from ops.cubic_reference import run_reference
from ops.cubic_subproblem import solve_cubic_exact


def _trainer(steps: int, **kw) -> L.Trainer:
    args = dict(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(**args)


def _logreg(reg=None, **kw) -> CubicNewtonModule:
    return CubicNewtonModule(
        LinearModel(30), LogisticLoss(), reg or NonconvexRegularizer(1e-2), **kw
    )


def _small_dm(**kw) -> LogisticToyDataModule:
    return LogisticToyDataModule(**{"n": 200, "d": 30, **kw})


@pytest.mark.parametrize("reg_name", ["nonconvex", "l2"])
def test_objective_oracles_match_closed_forms(reg_name):
    reg = NonconvexRegularizer(0.05) if reg_name == "nonconvex" else L2Regularizer(0.05)
    module = _logreg(reg)
    dm = _small_dm(n=50)
    x = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch = (dm.A[:7], dm.y[:7])
    value, g_ref, H_ref = logistic_oracles(x, *batch, 0.05, reg_name)
    assert float(module.objective(x, batch)) == pytest.approx(float(value), abs=1e-12)
    assert torch.allclose(grad(module.objective)(x, batch), g_ref, atol=1e-10, rtol=0)
    assert torch.allclose(hessian(module.objective)(x, batch), H_ref, atol=1e-10, rtol=0)
    # The module's (faster) double-backward Hessian, guarding against evaluating it at the wrong point.
    assert torch.allclose(module.sample_hessian(x, batch), H_ref, atol=1e-10, rtol=0)
    assert not torch.allclose(
        module.sample_hessian(torch.zeros(30, dtype=torch.float64), batch), H_ref, atol=1e-6
    )


def test_saddle_oracles_match_closed_forms():
    module = CubicNewtonModule(SaddleFunction())
    x = torch.tensor([0.3, -0.7], dtype=torch.float64)
    noise = torch.tensor([[0.01, -0.02], [0.03, 0.0]], dtype=torch.float64)
    _, g_ref, H_ref = saddle_oracles(x, noise)
    assert torch.allclose(grad(module.objective)(x, (noise,)), g_ref, atol=1e-12)
    assert torch.allclose(module.sample_hessian(x, (noise,)), H_ref, atol=1e-12)


def test_full_batch_without_momentum_is_deterministic_cubic_newton():
    dm = _small_dm(full_batch=True)
    module = _logreg(momentum_type="none", M=1.0)
    _trainer(6).fit(module, dm)
    x = torch.zeros(30, dtype=torch.float64)
    for _ in range(6):
        _, g, H = logistic_oracles(x, dm.A, dm.y, 1e-2, "nonconvex")
        x = x + solve_cubic_exact(g, H, 1.0).h
    assert torch.allclose(module.model.weight.detach(), x, atol=1e-10, rtol=0)
    # α = β = 1 is the same algorithm as momentum_type='none'.
    module1 = _logreg(momentum_type="hessian_corrected", grad_momentum=1.0, hess_momentum=1.0)
    _trainer(6).fit(module1, _small_dm(full_batch=True))
    assert torch.equal(module1.model.weight.detach(), module.model.weight.detach())


@pytest.mark.parametrize(
    ("momentum_type", "beta"),
    # β ≠ α puts the extrapolated gradient point y_t and Hessian point z_t apart (spec §3 step 1).
    [("hessian_corrected", 0.1), ("extrapolated", 0.1), ("extrapolated", 0.3)],
)
def test_module_trajectory_equals_numpy_reference(momentum_type, beta):
    """The experiment's fast NumPy loop is the module's algorithm on the module's samples."""
    kw = dict(momentum_type=momentum_type, grad_momentum=0.1, hess_momentum=beta, M=1.0)
    module = _logreg(**kw)
    _trainer(25).fit(module, _small_dm(seed=3))
    dm = _small_dm(seed=3)
    batches = [(ig.numpy(), ih.numpy()) for ig, ih in dm.step_indices(25)]
    x = run_reference(dm.A.numpy(), dm.y.numpy(), batches, 1e-2, "nonconvex", **kw)
    assert torch.allclose(module.model.weight.detach(), torch.from_numpy(x), atol=1e-9, rtol=0)


def test_resume_is_bitwise(tmp_path):
    kw = dict(momentum_type="hessian_corrected", grad_momentum=0.1, hess_momentum=0.1)
    full = _logreg(**kw)
    _trainer(20).fit(full, _small_dm(seed=1))

    first = _logreg(**kw)
    trainer = _trainer(10)
    trainer.fit(first, _small_dm(seed=1))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _logreg(**kw)
    _trainer(20).fit(resumed, _small_dm(seed=1), ckpt_path=ckpt)

    assert torch.equal(full.model.weight.detach(), resumed.model.weight.detach())
    st_full = full.optimizers().optimizer.cubic_state
    st_res = resumed.optimizers().optimizer.cubic_state
    assert st_full["step"] == st_res["step"] == 20
    for key in ("m", "H", "x_prev"):
        assert st_res[key].dtype == torch.float64
        assert torch.equal(st_full[key], st_res[key]), key
    # The checkpoint loads with weights_only=True (tensors and ints only).
    torch.load(ckpt, weights_only=True)


def test_saddle_escape_through_trainer():
    for seed in range(3):
        L.seed_everything(seed, verbose=False)
        module = CubicNewtonModule(SaddleFunction(), M=1.0, grad_momentum=0.1, hess_momentum=0.1)
        _trainer(50).fit(module, SaddleNoiseDataModule(noise=0.01, seed=seed))
        x1 = float(module.model.x.detach()[0])
        assert 0.95 <= abs(x1) <= 1.05
        assert min(3 * x1**2 - 1, 1.0) > 0  # λ_min(∇²f) at the end point


def test_validation_logs_full_batch_metrics_under_inference_mode():
    dm = _small_dm(seed=2)
    module = _logreg()
    trainer = _trainer(
        10,
        limit_val_batches=None,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        log_every_n_steps=5,
    )
    trainer.fit(module, dm)
    x = module.model.weight.detach()
    value, g, H = logistic_oracles(x, dm.A, dm.y, 1e-2, "nonconvex")
    for metrics in (
        trainer.callback_metrics,
        # `validate` runs under torch.inference_mode (the Trainer default): gradients must still work.
        _trainer(1, limit_val_batches=None, inference_mode=True).validate(module, dm)[0],
    ):
        assert float(metrics["val/grad_norm"]) == pytest.approx(float(g.norm()), rel=1e-10)
        assert float(metrics["val/loss"]) == pytest.approx(float(value), rel=1e-10)
        lam_min = float(torch.linalg.eigvalsh(H)[0])
        assert float(metrics["val/lambda_min"]) == pytest.approx(lam_min, abs=1e-10)
    for key in ("train/step_norm", "train/solver_residual", "train/lambda_min_H"):
        assert key in trainer.callback_metrics


class _MLP(nn.Module):
    """A small float32 network: the module is not tied to linear models or float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(30, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a.float()).squeeze(-1)


class _FloatLogisticLoss(LogisticLoss):
    def forward(self, z, y):
        return super().forward(z, y.float())


@pytest.mark.parametrize("solver", ["exact", "hvp"])
def test_network_training_decreases_full_loss(solver):
    dm = LogisticToyDataModule(n=400, d=30, batch_size_grad=16, batch_size_hess=16, seed=0)
    module = CubicNewtonModule(
        _MLP(), _FloatLogisticLoss(), M=1.0, grad_momentum=0.1, hess_momentum=0.1, solver=solver,
        solver_kwargs={"max_iters": 20, "power_iters": 5} if solver == "hvp" else None,
    )  # fmt: skip
    full = (dm.A, dm.y)
    f0 = float(module.objective(_flat(module), full))
    _trainer(20).fit(module, dm)
    f1 = float(module.objective(_flat(module), full))
    assert f1 < f0 - 1e-3, (f0, f1)
    assert module.model.net[0].weight.dtype == torch.float32


def _flat(module: CubicNewtonModule) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.model.parameters()])


def test_bad_configuration_errors_name_the_value():
    with pytest.raises(ValueError, match="max_dim_exact"):
        CubicNewtonModule(LinearModel(50), LogisticLoss(), max_dim_exact=10)
    with pytest.raises(ValueError, match="momentum_type"):
        CubicNewtonModule(LinearModel(3), LogisticLoss(), momentum_type="adam")
    with pytest.raises(ValueError, match="step_type"):
        CubicNewtonModule(LinearModel(3), LogisticLoss(), step_type="newton")
    with pytest.raises(ValueError, match="M must be > 0"):
        CubicNewtonModule(LinearModel(3), LogisticLoss(), M=-1.0)
    from optim.cubic_solvers import StochasticCubicNewton

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="share M"):
        StochasticCubicNewton([{"params": [a]}, {"params": [b], "M": 2.0}])


def test_model_and_data_feature_counts_must_agree_before_the_first_step():
    module = CubicNewtonModule(LinearModel(10), LogisticLoss())
    trainer = _trainer(1)
    with pytest.raises(ValueError, match=r"model takes 10 input features .* data has 30"):
        trainer.fit(module, LogisticToyDataModule(n=50, d=30))
    assert trainer.global_step == 0


def test_half_precision_is_refused_before_the_first_step():
    # 16-mixed (GPU) made Lightning's GradScaler assert on the hand-written step; bf16 autocast
    # would differentiate a float32 model in bf16
    trainer = _trainer(1, precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"precision='bf16-mixed' is not supported"):
        trainer.fit(CubicNewtonModule(LinearModel(30), LogisticLoss()), LogisticToyDataModule(n=50))
    assert trainer.global_step == 0


def test_hvp_mode_warns_that_hessian_corrected_uses_the_sample_and_evaluates_at_x():
    from optim.cubic_solvers import StochasticCubicNewton

    x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.warns(UserWarning, match="current sample"):
        StochasticCubicNewton([x], solver="hvp")
    opt = StochasticCubicNewton([x], solver="hvp", momentum_type="extrapolated",
                                grad_momentum=0.1, hess_momentum=0.01)  # fmt: skip
    for _ in range(2):
        y, z = opt.evaluation_points()
        opt.step(grad=torch.ones(3, dtype=torch.float64), hvp=lambda v: v)
    # β is ignored without Hessian momentum: Ĥ is taken at x_t, not 99 steps ahead; ĝ still at y_t
    assert torch.equal(z, opt.cubic_state["x_prev"]) and not torch.equal(y, z)


def test_sample_hvp_matches_hessian_products():
    module = CubicNewtonModule(_MLP(), _FloatLogisticLoss(), solver="hvp")
    dm = _small_dm(n=20)
    batch = (dm.A[:5], dm.y[:5])
    x = _flat(module)
    H = module.sample_hessian(x, batch)
    hvp = module.sample_hvp(x, batch)
    v = torch.randn(x.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hvp(v).double(), H @ v, atol=1e-5)
    assert torch.allclose(hvp(2 * v).double(), 2 * H @ v, atol=1e-5)  # graph is reusable


class _RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.grad_batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.grad_batches.append(batch[0][0].clone())


def test_each_epoch_continues_the_step_indexed_stream():
    """Epoch 2 draws the samples of steps 3-5, not epoch 1's again (the loader's stream was
    fixed at the step it was built at, so every epoch replayed it and a resumed run drew
    other samples than a straight one)."""
    dm = _small_dm()
    record = _RecordBatches()
    trainer = _trainer(-1, max_epochs=2, limit_train_batches=3, callbacks=[record])
    trainer.fit(_logreg(), dm)
    assert trainer.global_step == 6
    expected = [g[0] for g, _ in itertools.islice(dm.stream(rank=0, start_step=0), 6)]
    assert all(torch.equal(a, b) for a, b in zip(record.grad_batches, expected, strict=True))


def test_an_epoch_bound_alone_is_refused():
    """The stream is endless: max_epochs without max_steps (or an integer limit_train_batches,
    or max_time) trained forever."""
    with pytest.raises(ValueError, match=r"endless.*trainer\.max_steps"):
        _trainer(-1, max_epochs=1).fit(_logreg(), _small_dm())
