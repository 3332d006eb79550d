"""UpdateDiagnostics in real Trainer runs: cadence, accumulation, RNG neutrality, TensorBoard,
LoRA, LionAR and Lion steps, resume and DDP (the gradient-noise probe: test_warmup_snr.py)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks.warmup_diagnostics import UpdateDiagnostics
from ops.warmup import angular_update, lionar_target_angle
from tests.warmup_testkit import TinyRegressor, diagnostics_trainer, records, regression_data

Snapshot = dict[str, torch.Tensor]


class WeightRecorder(L.Callback):
    """Independent reference: the weights right before and after every optimizer step (``fc``
    alone and every trainable matrix), the gradients (as computed, and as the step used them:
    after Lightning's clipping) and the momentum buffers ``exp_avg`` the step starts from
    (m_{t-1}) and ends with (m_t)."""

    def __init__(self) -> None:
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}
        self.mats_before: dict[int, Snapshot] = {}
        self.mats_after: dict[int, Snapshot] = {}
        self.grads: dict[int, Snapshot] = {}
        self.used_grads: dict[int, Snapshot] = {}
        self.momenta_before: dict[int, Snapshot] = {}
        self.momenta_after: dict[int, Snapshot] = {}

    @staticmethod
    def _matrices(pl_module) -> Snapshot:
        return {
            n: p.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.requires_grad and p.dim() >= 2
        }

    @staticmethod
    def _momenta(pl_module, optimizer) -> Snapshot:
        optimizer = getattr(optimizer, "optimizer", optimizer)
        out = {}
        for n, p in pl_module.named_parameters():
            m = optimizer.state.get(p, {}).get("exp_avg")
            if m is not None:
                out[n] = m.detach().clone()
        return out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.before[step] = pl_module.fc.weight.detach().clone()
        self.mats_before[step] = self._matrices(pl_module)
        self.grads[step] = {
            n: p.grad.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.grad is not None
        }
        self.momenta_before[step] = self._momenta(pl_module, optimizer)
        if step == 0:
            self.first_grad = pl_module.fc.weight.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1
        if step in self.before and step not in self.after:
            self.after[step] = pl_module.fc.weight.detach().clone()
            self.mats_after[step] = self._matrices(pl_module)
            self.momenta_after[step] = self._momenta(pl_module, trainer.optimizers[0])
            self.used_grads[step] = {
                n: p.grad.detach().clone()
                for n, p in pl_module.named_parameters()
                if p.grad is not None
            }


def _flat(snapshot: Snapshot, names) -> torch.Tensor:
    """The named tensors of a snapshot flattened and concatenated, in float64."""
    return torch.cat([snapshot[n].double().flatten() for n in names])


def _concatenated_angle(before: Snapshot, after: Snapshot) -> float:
    """Spec D2 for all matrices as one vector: θ = 2·atan2(‖â − b̂‖, ‖â + b̂‖), â = a/‖a‖ and
    b̂ = b/‖b‖ for a, b = the concatenation of every matrix before and after the step."""
    a, b = _flat(before, sorted(before)), _flat(after, sorted(before))
    a, b = a / a.norm(), b / b.norm()
    return float(2 * torch.atan2((a - b).norm(), (a + b).norm()))


def test_cadence_metrics_and_sign_like_first_step(tmp_path: Path) -> None:
    L.seed_everything(0)
    cb = UpdateDiagnostics(
        keep_history=True,
        log_every_n_steps=4,
        dense_steps=5,
        snr_every_n_steps=4,
        snr_dense_steps=3,
        rrc_layers=["fc", "out"],
    )
    ref = WeightRecorder()
    diagnostics_trainer(tmp_path, 13, [cb, ref]).fit(
        TinyRegressor(), DataLoader(regression_data(), batch_size=32)
    )
    angles = records(cb, "warmup/angle/fc.weight")
    assert sorted(angles) == [0, 1, 2, 3, 4, 8, 12]
    for step, angle in angles.items():  # agrees with an independent measurement
        assert angle == pytest.approx(
            float(angular_update(ref.before[step], ref.after[step])), rel=1e-9
        )
    # AdamW's first step is sign(g): its RMS is √(fraction of nonzero gradients) (dead ReLUs)
    first = records(cb, "warmup/direction_rms/fc.weight")
    nonzero = float(ref.first_grad.ne(0).float().mean())
    assert nonzero > 0.5
    assert first[0] == pytest.approx(math.sqrt(nonzero), rel=1e-4)
    assert first[12] < 0.9
    assert sorted(records(cb, "warmup/snr/b_noise")) == [0, 1, 2, 4, 8, 12]
    for layer in ("fc", "out"):
        rrc = records(cb, f"warmup/rrc/{layer}")
        assert sorted(rrc) == [0, 1, 2, 3, 4, 8, 12] and all(v > 0 for v in rrc.values())
    assert set(records(cb, "warmup/momentum/cos_global")) == {1, 2, 3, 4, 8, 12}  # m_0 = 0
    # D2 global: the angle of fc.weight and out.weight concatenated (biases are not matrices),
    # from the recorded weights, not a combination of per-tensor angles.
    global_angles = records(cb, "warmup/global/angle")
    assert sorted(global_angles) == [0, 1, 2, 3, 4, 8, 12]
    for step, angle in global_angles.items():
        assert set(ref.mats_before[step]) == {"fc.weight", "out.weight"}
        expected = _concatenated_angle(ref.mats_before[step], ref.mats_after[step])
        assert angle == pytest.approx(expected, rel=1e-9)
        last_only = float(angular_update(ref.mats_before[step]["out.weight"],
                                         ref.mats_after[step]["out.weight"]))  # fmt: skip
        assert abs(expected - last_only) > 1e-3 * expected  # the check can tell them apart


@pytest.mark.parametrize("clip", [None, 0.01])
def test_momentum_alignment_and_ratio_are_the_recorded_cosines(tmp_path: Path, clip) -> None:
    # D5: cos(g_t, m_{t-1}) = ⟨g, m⟩/(‖g‖‖m‖) over all tensors concatenated (g = the gradient the
    # step uses, m = AdamW's exp_avg before the step) and ‖m_t‖/‖g_t‖ with m_t after the step,
    # both from tensors recorded by WeightRecorder. With norm clipping g is the clipped gradient
    # (the ratio took the unclipped one: 127x too small at clip 0.01).
    L.seed_everything(0)
    cb = UpdateDiagnostics(keep_history=True, dense_steps=100, snr_every_n_steps=0, rrc_layers=[])
    ref = WeightRecorder()
    diagnostics_trainer(tmp_path, 6, [cb, ref], gradient_clip_val=clip).fit(
        TinyRegressor(), DataLoader(regression_data(), batch_size=32)
    )
    cosines = records(cb, "warmup/momentum/cos_global")
    ratios = records(cb, "warmup/momentum/ratio_global")
    # Both need the momentum buffer before the step, which AdamW creates in its first step.
    assert sorted(cosines) == sorted(ratios) == [1, 2, 3, 4, 5]
    for step, cos in cosines.items():
        names = sorted(ref.momenta_before[step])
        assert len(names) == 4  # fc.weight, fc.bias, out.weight, out.bias
        # Norm clipping scales g by one factor: the cosine is the unclipped gradient's.
        g, m = _flat(ref.grads[step], names), _flat(ref.momenta_before[step], names)
        assert cos == pytest.approx(float(g @ m / (g.norm() * m.norm())), rel=1e-9)
        for name in names:  # per tensor too
            g1, m1 = ref.grads[step][name].double(), ref.momenta_before[step][name].double()
            per = float((g1 * m1).sum() / (g1.norm() * m1.norm()))
            assert records(cb, f"warmup/momentum/cos/{name}")[step] == pytest.approx(per, rel=1e-9)
    for step, ratio in ratios.items():
        names = sorted(ref.momenta_after[step])
        g, m = _flat(ref.used_grads[step], names), _flat(ref.momenta_after[step], names)
        assert ratio == pytest.approx(float(m.norm() / g.norm()), rel=1e-9)
        if clip is not None:
            assert g.norm() == pytest.approx(clip, rel=1e-4)  # every step was clipped


def test_gradient_accumulation_keys_on_optimizer_steps(tmp_path: Path) -> None:
    L.seed_everything(0)
    cb = UpdateDiagnostics(
        keep_history=True, dense_steps=100, snr_every_n_steps=2, snr_dense_steps=0
    )
    ref = WeightRecorder()
    trainer = diagnostics_trainer(tmp_path, 6, [cb, ref], accumulate_grad_batches=3)
    trainer.fit(TinyRegressor(), DataLoader(regression_data(), batch_size=16))
    angles = records(cb, "warmup/angle/fc.weight")
    assert sorted(angles) == list(range(6))  # one record per optimizer step, not per micro-batch
    for step, angle in angles.items():
        assert angle == pytest.approx(
            float(angular_update(ref.before[step], ref.after[step])), rel=1e-9
        )
    assert sorted(records(cb, "warmup/snr/b_noise")) == [0, 2, 4]


class TinyBatchNormRegressor(TinyRegressor):
    """TinyRegressor with BatchNorm, whose running statistics train-mode forwards update."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(32)

    def compute_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.out(self.drop(torch.relu(self.norm(self.fc(x))))), y)


class TinyEvalDropoutRegressor(TinyRegressor):
    """TinyRegressor whose dropout the user keeps in eval mode (like a frozen backbone's):
    Lightning leaves each submodule's own mode alone during fit, so no dropout is applied."""

    def __init__(self) -> None:
        super().__init__(dropout=0.5)
        self.drop.eval()


def _final_weights(tmp_path: Path, callbacks, model_class=TinyRegressor) -> list[torch.Tensor]:
    L.seed_everything(0)
    model = model_class()
    loader = DataLoader(regression_data(), batch_size=32, shuffle=True)
    diagnostics_trainer(tmp_path, 8, callbacks).fit(model, loader)
    return [t.detach().clone() for t in model.state_dict().values()]  # buffers included


def test_training_is_unchanged_by_the_callback(tmp_path: Path) -> None:
    cb = UpdateDiagnostics(
        keep_history=True, dense_steps=100, snr_every_n_steps=1, snr_fresh_batches=2
    )
    with_cb = _final_weights(tmp_path, [cb])
    without = _final_weights(tmp_path, [])
    assert all(torch.equal(a, b) for a, b in zip(with_cb, without, strict=True))
    assert len(records(cb, "warmup/snr/b_noise_raw")) == 8


def test_rrc_probe_restores_each_submodule_mode(tmp_path: Path) -> None:
    # The output-change probe runs in eval mode; restoring with ``train(True)`` would switch the
    # user's eval-mode dropout on for the rest of the fit and change the weights.
    cb = UpdateDiagnostics(
        rrc_layers=["fc"], keep_history=True, dense_steps=100, snr_every_n_steps=0
    )
    with_cb = _final_weights(tmp_path, [cb], TinyEvalDropoutRegressor)
    without = _final_weights(tmp_path, [], TinyEvalDropoutRegressor)
    assert all(torch.equal(a, b) for a, b in zip(with_cb, without, strict=True))
    assert len(records(cb, "warmup/rrc_median")) > 0  # the probe ran


def test_snr_probe_leaves_batchnorm_statistics_alone(tmp_path: Path) -> None:
    cb = UpdateDiagnostics(dense_steps=100, snr_every_n_steps=1, snr_fresh_batches=2)
    with_cb = _final_weights(tmp_path, [cb], TinyBatchNormRegressor)
    without = _final_weights(tmp_path, [], TinyBatchNormRegressor)
    assert all(torch.equal(a, b) for a, b in zip(with_cb, without, strict=True))


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_tensors", 0), ("max_tensors", -1), ("dense_steps", -1), ("log_every_n_steps", 0)],
)
def test_out_of_range_settings_are_refused(key: str, value: int) -> None:
    # max_tensors=0 ran and logged a global update norm of 0 at every step
    with pytest.raises(ValueError, match=f"{key} must be >= "):
        UpdateDiagnostics(**{key: value})


def test_rrc_layers_matching_nothing_is_an_error(tmp_path: Path) -> None:
    cb = UpdateDiagnostics(rrc_layers=["*.q_proj"])
    trainer = diagnostics_trainer(tmp_path, 1, [cb])
    with pytest.raises(ValueError, match=r"rrc_layers=\['\*\.q_proj'\] match no module"):
        trainer.fit(TinyRegressor(), DataLoader(regression_data(), batch_size=32))


def test_tensorboard_receives_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = UpdateDiagnostics(
        keep_history=True, dense_steps=3, log_every_n_steps=2, log_histograms=True
    )
    diagnostics_trainer(tmp_path, 5, [cb], logger=logger).fit(
        TinyRegressor(), DataLoader(regression_data(), batch_size=32)
    )
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = events.Tags()
    assert "warmup/global/angle" in tags["scalars"]
    assert "warmup/angle_per_neuron" in tags["histograms"]
    assert [e.step for e in events.Scalars("warmup/global/angle")] == [0, 1, 2, 4]


def test_lionar_step_zero_measures_the_step_not_the_centering(tmp_path: Path) -> None:
    L.seed_everything(0)
    cb = UpdateDiagnostics(keep_history=True, dense_steps=100, snr_every_n_steps=0)
    model = TinyRegressor(optimizer="lionar_plain", lr=0.1, dropout=0.0)
    diagnostics_trainer(tmp_path, 4, [cb]).fit(model, DataLoader(regression_data(), batch_size=32))
    target = math.atan(lionar_target_angle(0.1, 0.1, (0.9, 0.99)))
    largest = records(cb, "warmup/angle_neuron_max/fc.weight")
    assert sorted(largest) == [0, 1, 2, 3]
    for step, angle in largest.items():  # step 0 included: the centering is not an update
        assert angle == pytest.approx(target, rel=1e-3)
        # neurons without gradient yet (sign(c) = 0 at step 0) do not turn
        assert records(cb, "warmup/angle_neuron_mean/fc.weight")[step] <= angle


def test_lion_direction_divides_by_the_lr_actually_applied(tmp_path: Path) -> None:
    L.seed_everything(0)
    cb = UpdateDiagnostics(keep_history=True, dense_steps=100, snr_every_n_steps=0)
    ref = WeightRecorder()
    model = TinyRegressor(optimizer="lion_ibc", lr=1e-3)
    diagnostics_trainer(tmp_path, 3, [cb, ref]).fit(
        model, DataLoader(regression_data(), batch_size=32)
    )
    # Lion's first direction is sign(g): RMS = √(fraction of nonzero gradients), although the
    # step was scaled by σ_1 = 1 − 0.98 = 0.02.
    nonzero = float(ref.first_grad.ne(0).float().mean())
    first = records(cb, "warmup/direction_rms/fc.weight")[0]
    assert first == pytest.approx(math.sqrt(nonzero), rel=1e-4)


def test_max_tensors_caps_snapshots_not_the_snr(tmp_path: Path) -> None:
    logs = []
    for cap in (None, 1):
        L.seed_everything(0)
        cb = UpdateDiagnostics(keep_history=True, snr_every_n_steps=1, max_tensors=cap)
        diagnostics_trainer(tmp_path, 3, [cb]).fit(
            TinyRegressor(), DataLoader(regression_data(), batch_size=32)
        )
        logs.append(records(cb, "warmup/snr/b_noise_raw"))
        tensors = {k for r in cb.history for k in r if k.startswith("warmup/angle/")}
        assert len(tensors) == (4 if cap is None else 1)
    assert logs[0] == logs[1]


def test_fresh_batch_generators_differ_per_rank_and_survive_a_resume() -> None:
    class Rank:
        def __init__(self, rank: int) -> None:
            self.global_rank = rank

    def draws(cb: UpdateDiagnostics, rank: int, n: int) -> list[int]:
        return [
            int(torch.randint(10**9, (1,), generator=cb._generator(Rank(rank)))) for _ in range(n)
        ]

    straight = UpdateDiagnostics(seed=3)
    rank0, rank1 = draws(straight, 0, 4), draws(UpdateDiagnostics(seed=3), 1, 4)
    assert not set(rank0) & set(rank1)
    first_half = UpdateDiagnostics(seed=3)
    draws(first_half, 0, 2)
    for rank, expected in ((0, rank0[2:]), (1, None)):
        resumed = UpdateDiagnostics(seed=3)
        resumed.load_state_dict(first_half.state_dict())  # rank 0's checkpoint, on every rank
        got = draws(resumed, rank, 2)
        if expected is not None:
            assert got == expected
        else:
            assert got == rank1[2:]


def test_resume_is_bitwise(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps: int, ckpt: str | None, root: Path) -> TinyRegressor:
        L.seed_everything(0)
        model = TinyRegressor(dropout=0.0)  # Lightning checkpoints do not hold the global RNG
        diag = UpdateDiagnostics(
            keep_history=True, dense_steps=100, snr_every_n_steps=1, snr_fresh_batches=1,
            rrc_layers=["fc", "out"],
        )  # fmt: skip
        cbs = [diag, ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=10)]
        loader = DataLoader(regression_data(), batch_size=32)  # 10 batches per epoch
        diagnostics_trainer(root, max_steps, cbs, enable_checkpointing=True).fit(
            model, loader, ckpt_path=ckpt
        )
        return model, {(r["step"], k): v for r in diag.history for k, v in r.items()}

    straight, straight_log = run(20, None, tmp_path / "a")
    run(10, None, tmp_path / "b")
    resumed, resumed_log = run(20, str(tmp_path / "b" / "last.ckpt"), tmp_path / "c")
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    # The diagnostics resume too: RRC on the restored probe inputs, B_noise from the restored
    # EMAs and the same fresh batches.
    assert {k[1] for k in resumed_log} >= {"warmup/rrc/out", "warmup/snr/b_noise"}
    assert resumed_log == {k: v for k, v in straight_log.items() if k[0] >= 10}


def test_resume_with_fewer_rrc_layers(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps: int, layers: list[str], ckpt: str | None, root: Path) -> set[str]:
        diag = UpdateDiagnostics(keep_history=True, dense_steps=100, rrc_layers=layers)
        cbs = [diag, ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=5)]
        loader = DataLoader(regression_data(), batch_size=32)
        trainer = diagnostics_trainer(root, max_steps, cbs, enable_checkpointing=True)
        trainer.fit(TinyRegressor(dropout=0.0), loader, ckpt_path=ckpt)
        return {k for r in diag.history for k in r if k.startswith("warmup/rrc/")}

    run(5, ["fc", "out"], None, tmp_path / "a")
    ckpt = str(tmp_path / "a" / "last.ckpt")
    assert run(8, ["fc"], ckpt, tmp_path / "b") == {"warmup/rrc/fc"}
    assert run(8, [], ckpt, tmp_path / "c") == set()


class TokenDataset(Dataset):
    def __init__(self, n: int = 64, length: int = 16, vocab: int = 4096) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, vocab, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LoraLM(L.LightningModule):
    """micro-llama with LoRA adapters; no compute_loss: the callback uses ``model(**batch).loss``."""

    def __init__(self) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        from modules.hf_models import build_causal_lm

        cfg = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        self.model = get_peft_model(build_causal_lm("micro-llama"), cfg)

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_lora_follows_only_trainable_tensors(tmp_path: Path) -> None:
    L.seed_everything(0)
    cb = UpdateDiagnostics(
        keep_history=True,
        dense_steps=10,
        rrc_layers=["*.q_proj"],
        rrc_mode="network",
        probe_batch_size=4,
    )
    diagnostics_trainer(tmp_path, 3, [cb]).fit(LoraLM(), DataLoader(TokenDataset(), batch_size=8))
    keys = {k for r in cb.history for k in r if k.startswith("warmup/angle/")}
    assert keys and all("lora_" in k for k in keys)
    rrc = records(cb, "warmup/rrc_median")
    # q_proj's output changes through the adapter alone (the base weight is frozen)
    assert sorted(rrc) == [0, 1, 2] and all(0 < v < 1 for v in rrc.values())
    # the two halves of each batch differ: trΣ > 0 (|G|² > 0 too in this deterministic run)
    traces = records(cb, "warmup/snr/trace_sigma")
    assert sorted(traces) == [0, 1, 2] and all(v > 0 for v in traces.values())
    assert all(0 < v < math.inf for v in records(cb, "warmup/snr/b_noise_raw").values())


@pytest.mark.distributed
def test_ddp_spawn_two_processes(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="ddp")
    cb = UpdateDiagnostics(
        keep_history=True,
        dense_steps=4,
        log_every_n_steps=2,
        snr_every_n_steps=2,
        snr_dense_steps=2,
    )
    trainer = diagnostics_trainer(tmp_path, 6, [cb], logger=logger, strategy="ddp_spawn", devices=2)
    trainer.fit(TinyRegressor(), DataLoader(regression_data(), batch_size=16))
    (event_file,) = (tmp_path / "ddp").rglob("events.out.tfevents*")  # written by rank 0 only
    events = EventAccumulator(str(event_file))
    events.Reload()
    assert [e.step for e in events.Scalars("warmup/global/angle")] == [0, 1, 2, 3, 4]
    # b_noise itself is skipped while the |G|² EMA is <= 0 (infinite noise scale)
    assert [e.step for e in events.Scalars("warmup/snr/trace_sigma")] == [0, 1, 2, 4]
    assert all(e.value > 0 for e in events.Scalars("warmup/global/update_norm"))


def test_fsdp_is_refused_with_a_clear_message() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="does not support FSDP"):
        UpdateDiagnostics(per_neuron=False, rrc_layers=[]).setup(trainer, TinyRegressor(), "fit")


class DivergingRegressor(TinyRegressor):
    """From step 2 on the loss is NaN, so AdamW writes NaN weights: a diverged run."""

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        return loss * math.nan if self.global_step >= 2 else loss


def test_a_diverged_run_logs_nan_not_no_update(tmp_path: Path) -> None:
    # Before: the angle of NaN weights was reported as 0.0 ("no update"), NaN scalars were
    # dropped (metrics.json and the HPARAMS tab kept step 0's values as final), one NaN SNR
    # measurement stayed in the EMA for good, and an all-NaN per-neuron histogram would be
    # refused by TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = UpdateDiagnostics(
        keep_history=True, dense_steps=10, log_histograms=True, snr_every_n_steps=1
    )
    with pytest.warns(UserWarning, match=r"diagnostics are NaN at step 2 .*not finite"):
        diagnostics_trainer(tmp_path, 4, [cb], logger=logger).fit(
            DivergingRegressor(), DataLoader(regression_data(), batch_size=32)
        )
    angles = records(cb, "warmup/global/angle")
    assert all(math.isfinite(angles[s]) for s in (0, 1)) and math.isnan(angles[2])
    assert math.isnan(angular_update(torch.ones(3, 2), torch.full((3, 2), math.nan)))
    per_neuron = angular_update(torch.ones(2, 2), torch.tensor([[1.0, 2.0], [0.0, math.nan]]), True)
    assert math.isfinite(per_neuron[0]) and math.isnan(per_neuron[1])
    # Step 3 measures the SNR on NaN weights: logged raw, kept out of the EMA (steps 0-2).
    assert math.isnan(records(cb, "warmup/snr/b_noise_raw")[3])
    assert records(cb, "warmup/snr/phi")[3] == records(cb, "warmup/snr/phi")[2]
    assert math.isfinite(cb._ema["g2"]) and cb._ema["n"] == 3
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("warmup/global/angle")}
    assert sorted(logged) == [0, 1, 2, 3] and math.isnan(logged[3])


def test_value_clipping_is_warned_about(tmp_path: Path) -> None:
    cb = UpdateDiagnostics(dense_steps=2, snr_every_n_steps=0, rrc_layers=[])
    trainer = diagnostics_trainer(
        tmp_path, 2, [cb], gradient_clip_val=0.5, gradient_clip_algorithm="value"
    )
    with pytest.warns(UserWarning, match=r"'value'.*cos\* use the gradient before clipping"):
        trainer.fit(TinyRegressor(), DataLoader(regression_data(), batch_size=32))


class _Doubling(torch.optim.Optimizer):
    """Doubles every parameter at each step (a hand-checkable update)."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 1.0})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(2.0)


class _DoublingRegressor(TinyRegressor):
    def configure_optimizers(self):
        return _Doubling(self.parameters())


def test_network_rrc_is_the_output_change_relative_to_the_output_before(tmp_path: Path) -> None:
    # Doubling fc's weight and bias doubles its output Y on any input: ‖Y₁ − Y₀‖/‖Y₀‖ = 1
    # (relative to the output after the step it would be ½).
    cb = UpdateDiagnostics(keep_history=True, dense_steps=2, rrc_layers=["fc"], rrc_mode="network")
    module = _DoublingRegressor(dropout=0.0)
    diagnostics_trainer(tmp_path, 2, [cb]).fit(module, DataLoader(regression_data(), batch_size=16))
    rrc = records(cb, "warmup/rrc_median")
    assert sorted(rrc) == [0, 1] and all(v == pytest.approx(1.0, rel=1e-12) for v in rrc.values())
