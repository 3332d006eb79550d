"""UpdateDiagnostics' gradient-noise probe (spec D4) in real Trainer runs: the two-half-batch
estimator against closed-form gradients, odd batches, and the SNR LionAR's RRC correction gets."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from callbacks.warmup_diagnostics import UpdateDiagnostics
from optim.lion import LionAR
from tests.warmup_testkit import TinyRegressor, diagnostics_trainer, records, regression_data


class LinearRegressor(L.LightningModule):
    """y = xwᵀ + b with the MSE loss: its half-batch gradients have a closed form."""

    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        self.lin = nn.Linear(8, 1)
        self.opt_name = optimizer

    def compute_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.lin(x), y)

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def configure_optimizers(self):
        if self.opt_name == "lionar":
            return LionAR(self.named_parameters(), lr=0.1, weight_decay=0.1,
                          rrc_correction="derived", rotational="all_matrices")  # fmt: skip
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)


class BatchRecorder(L.Callback):
    """The batch and the weights w_t at the start of every step (what the SNR probe sees)."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[torch.Tensor, ...]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        w, b = pl_module.lin.weight, pl_module.lin.bias
        self.seen[trainer.global_step] = tuple(
            t.detach().double().clone() for t in (x, y, w.reshape(-1), b)
        )


def _half_batch_gradient(x, y, w, b) -> torch.Tensor:
    """∇ of mean((xw + b − y)²) over a half batch of n samples: with residuals r = xw + b − y,
    ∂/∂w = (2/n)·xᵀr and ∂/∂b = (2/n)·Σr, concatenated."""
    r = x @ w + b - y.reshape(-1)
    n = x.shape[0]
    return torch.cat([2 / n * (x.T @ r), (2 / n * r.sum()).reshape(1)])


@pytest.mark.parametrize("optimizer", ["adamw", "lionar"])
def test_snr_is_the_two_half_batch_estimator(tmp_path: Path, optimizer: str) -> None:
    # Spec D4 on the current batch of B = 32: G₁, G₂ = mean gradients of samples 0-15 and 16-31,
    # |G|² ≈ ⟨G₁, G₂⟩, trΣ ≈ (B/4)‖G₁ − G₂‖², each EMA-smoothed (decay 0.9, from 0) before
    # B_noise = trΣ/|G|² and φ = 1/B_noise. G₁, G₂ come from the closed-form gradient above.
    L.seed_everything(0)
    cb = UpdateDiagnostics(keep_history=True, dense_steps=100, snr_every_n_steps=1,
                           rrc_layers=[])  # fmt: skip
    seen = BatchRecorder()
    model = LinearRegressor(optimizer)
    diagnostics_trainer(tmp_path, 4, [cb, seen]).fit(
        model, DataLoader(regression_data(), batch_size=32)
    )
    ema_g2 = ema_tr = 0.0
    for step in range(4):
        x, y, w, b = seen.seen[step]
        g1 = _half_batch_gradient(x[:16], y[:16], w, b)
        g2 = _half_batch_gradient(x[16:], y[16:], w, b)
        grad_sq, trace = float(g1 @ g2), 32 / 4 * float((g1 - g2).square().sum())
        ema_g2, ema_tr = 0.9 * ema_g2 + 0.1 * grad_sq, 0.9 * ema_tr + 0.1 * trace
        assert trace > 0 and grad_sq > 0
        assert records(cb, "warmup/snr/grad_sq")[step] == pytest.approx(grad_sq, rel=1e-4)
        assert records(cb, "warmup/snr/trace_sigma")[step] == pytest.approx(trace, rel=1e-4)
        assert records(cb, "warmup/snr/b_noise_raw")[step] == pytest.approx(
            trace / grad_sq, rel=1e-4
        )
        assert records(cb, "warmup/snr/b_noise")[step] == pytest.approx(ema_tr / ema_g2, rel=1e-4)
        assert records(cb, "warmup/snr/phi")[step] == pytest.approx(ema_g2 / ema_tr, rel=1e-4)
    if optimizer == "lionar":
        # LionAR's RRC correction got the last φ and applied ρ = √((1 + Bφ)/(1 + B²φ)) (§3.5).
        opt = model.trainer.optimizers[0]
        phi = ema_g2 / ema_tr
        assert opt.param_groups[0]["snr_phi"] == pytest.approx(phi, rel=1e-4)
        rho = math.sqrt((1 + 32 * phi) / (1 + 32**2 * phi))
        assert opt.state[model.lin.weight]["lr_multiplier"] == pytest.approx(rho, rel=1e-4)


def test_odd_batches_scale_the_noise_by_the_samples_the_halves_hold(tmp_path, monkeypatch):
    import callbacks.warmup_diagnostics as module

    sizes: list[int] = []
    real = module.noise_scale

    def recording(g1, g2, batch):
        sizes.append(batch)
        return real(g1, g2, batch)

    monkeypatch.setattr(module, "noise_scale", recording)
    cb = UpdateDiagnostics(snr_every_n_steps=1, snr_fresh_batches=0, rrc_layers=[])
    loader = DataLoader(regression_data(), batch_size=5)
    diagnostics_trainer(tmp_path, 2, [cb]).fit(TinyRegressor(), loader)
    assert sizes == [4, 4]  # two halves of 2 samples; one of the 5 is left out


def test_lionar_rrc_correction_gets_the_snr_every_step(tmp_path: Path) -> None:
    L.seed_everything(0)
    cb = UpdateDiagnostics(
        keep_history=True, dense_steps=100, snr_every_n_steps=50, snr_dense_steps=0
    )
    model = TinyRegressor(optimizer="lionar", lr=0.1, dropout=0.0)  # the halves' only difference
    diagnostics_trainer(tmp_path, 5, [cb]).fit(model, DataLoader(regression_data(), batch_size=32))
    assert sorted(records(cb, "warmup/snr/phi")) == list(range(5))
    group = model.trainer.optimizers[0].param_groups[0]
    # The optimizer holds the φ logged at the last step; a finite, positive one (a probe that
    # used one half twice would give trΣ = 0 and φ = ∞, i.e. ρ pinned at 1/√B).
    last_phi = records(cb, "warmup/snr/phi")[4]
    assert 0 < last_phi < math.inf and group["snr_phi"] == pytest.approx(last_phi, rel=1e-12)
    assert group["snr_batch_size"] == 32
    # With accumulation ρ_t gets the batch of one optimizer step: 3 micro-batches of 16.
    model = TinyRegressor(optimizer="lionar", lr=0.1)
    diagnostics_trainer(tmp_path, 2, [UpdateDiagnostics()], accumulate_grad_batches=3).fit(
        model, DataLoader(regression_data(), batch_size=16)
    )
    assert model.trainer.optimizers[0].param_groups[0]["snr_batch_size"] == 48


def test_an_snr_measured_every_step_for_the_optimizer_is_logged_on_the_schedule(tmp_path):
    cb = UpdateDiagnostics(keep_history=True, snr_every_n_steps=3, snr_dense_steps=0)
    model = TinyRegressor(optimizer="lionar", lr=0.1, dropout=0.0)
    logger = CSVLogger(tmp_path, name="run")
    loader = DataLoader(regression_data(), batch_size=32)
    diagnostics_trainer(tmp_path, 5, [cb], logger=logger).fit(model, loader)
    assert sorted(records(cb, "warmup/snr/phi")) == list(range(5))  # measured every step
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        logged = [row["step"] for row in csv.DictReader(file) if row.get("warmup/snr/phi")]
    assert logged == ["0", "3"]
