"""MetaLearningModule: estimator written to .grad, all methods run, eval guards, resume, CLI."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from datamodules.even_eval_sampler import PaddedItems, ScoredCollate
from datamodules.tasks import LinearRegressionTasks, MNIST1DFewShot, stack_tasks
from modules.meta_learning import METHODS, MetaLearningModule, half_mse
from modules.meta_nets import Conv1dNet, LinearRegressor
from ops.meta_gradients import fomaml_grad, reptile_grad, task_objectives
from ops.meta_tasks_closed_form import exact_meta_grad
from optim.sngdm import SNGDM


def _trainer(tmp_path, **kw) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "inference_mode": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
    }
    return L.Trainer(**{**defaults, **kw})


def _linear_module(method="fo_b_maml_symmetric", lr=0.05, **kw) -> MetaLearningModule:
    return MetaLearningModule(
        LinearRegressor(6), loss="half_mse", method=method, alpha=0.5, inner_steps=60,
        inner_lr=0.12, baselines_use_proximal=True, optimizer=partial(SNGDM, lr=lr), **kw,
    )  # fmt: skip


def test_full_batch_step_writes_the_true_meta_gradient(tmp_path):
    """One meta-step on the whole pool: the .grad written is the closed-form grad F to 1e-3."""
    torch.manual_seed(0)
    dm = LinearRegressionTasks(dim=6, num_tasks=10, full_batch=True, episodes_per_epoch=1)
    module = _linear_module(lr=1e-9).double()
    x0 = module.net.weight.detach().clone()
    _trainer(tmp_path, max_steps=1, precision="64-true", limit_val_batches=0).fit(module, dm)
    # SNGDM momentum buffer after one step is (1 - beta) * grad.
    buf = module.optimizers().optimizer.state[module.net.weight]["momentum_buffer"] / 0.1
    truth = exact_meta_grad(x0, dm.closed_form, 0.5)
    assert float((buf - truth).norm() / truth.norm()) < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_evaluates_on_mnist1d(tmp_path, method):
    torch.manual_seed(0)
    dm = MNIST1DFewShot(meta_batch_size=2, episodes_per_epoch=2, num_val_tasks=4, eval_batch_size=4)
    module = MetaLearningModule(
        Conv1dNet(channels=4), method=method, inner_steps=2,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
    )  # fmt: skip
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    metrics = trainer.callback_metrics
    loss_key = "train/reptile_fit_loss" if method == "reptile" else "train/meta_loss"
    for key in (loss_key, "train/meta_grad_norm", "val/query_acc", "val/query_loss"):
        assert torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/query_acc"]) <= 1.0
    assert trainer.global_step == 2


def _hand_adapted_query_losses(dm, x, *, steps, lr, alpha):
    """Per-task query loss before and after ``steps`` inner GD steps on the support set, by hand.

    The loss is half_mse, l(w; X, t) = 0.5 mean((X w - t)^2), with gradient X^T (X w - t) / n.
    Inner step (spec §3.3 with nu = 0): y <- y - lr (X_s^T (X_s y - t_s) / n_s + (y - x) / alpha),
    starting at y = x; ``alpha=None`` drops the proximal term (plain K-step GD).
    """
    pre, post = [], []
    for sx, sy, qx, qy in zip(
        *(dm.pool[k] for k in ("support_x", "support_y", "query_x", "query_y")), strict=True
    ):
        y = x.clone()
        for _ in range(steps):
            grad = sx.T @ (sx @ y - sy) / len(sy)
            if alpha is not None:
                grad = grad + (y - x) / alpha
            y = y - lr * grad
        pre.append(0.5 * (qx @ x - qy).pow(2).mean())
        post.append(0.5 * (qx @ y - qy).pow(2).mean())
    return torch.stack(pre), torch.stack(post)


@pytest.mark.parametrize(
    ("method", "vectorize", "proximal"),
    [
        ("fo_b_maml_symmetric", True, True),
        ("fo_b_maml_symmetric", False, True),
        ("maml", True, False),
        ("maml", False, False),
    ],
)
def test_validation_query_loss_is_scored_after_inner_adaptation(
    tmp_path, method, vectorize, proximal
):
    """val/query_loss is the mean query loss of the support-adapted weights (hand-written inner
    GD with eval_inner_steps / eval_inner_lr), val/pre_adapt_loss that of the meta-parameters."""
    torch.manual_seed(0)
    dm = LinearRegressionTasks(dim=6, num_tasks=10, episodes_per_epoch=1)  # one eval batch
    # Training settings (K = 20, gamma = 0.12) differ from the eval ones (K = 4, gamma = 0.15).
    module = MetaLearningModule(
        LinearRegressor(6), loss="half_mse", method=method, alpha=0.5, inner_steps=20,
        inner_lr=0.12, eval_inner_steps=4, eval_inner_lr=0.15, vectorize_tasks=vectorize,
    ).double()  # fmt: skip
    x = torch.randn(6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        module.net.weight.copy_(x)
    trainer = _trainer(tmp_path, precision="64-true")
    trainer.validate(module, dm)
    metrics = trainer.callback_metrics
    # FO-B-MAML adapts with its proximal inner problem (alpha = 0.5); second-order MAML with plain
    # GD (spec §3.8 "each method adapts with its own inner procedure").
    pre, post = _hand_adapted_query_losses(dm, x, steps=4, lr=0.15, alpha=0.5 if proximal else None)
    # One eval batch of all 10 tasks: the logged epoch value is the plain mean over tasks.
    assert float(metrics["val/pre_adapt_loss"]) == pytest.approx(float(pre.mean()), rel=1e-10)
    assert float(metrics["val/query_loss"]) == pytest.approx(float(post.mean()), rel=1e-10)
    # Adaptation must matter here: 4 steps lower the query loss by a quarter or more (hand-computed
    # means: 9.02 -> 5.25 with the proximal term), far beyond the rel=1e-10 tolerance above.
    assert float(post.mean()) < 0.75 * float(pre.mean())
    assert float(metrics["val/query_loss"]) < float(metrics["val/pre_adapt_loss"])


@pytest.mark.parametrize(
    ("task", "vectorize"), [("linear", True), ("linear", False), ("mnist1d", True)]
)
def test_padding_tasks_get_zero_weight(tmp_path, task, vectorize):
    """Unscored (padding) tasks, alone in a batch or beside scored ones, change no val metric.

    The task order and the scored batches are those of the unpadded loader, and a padding-only
    batch adds exactly zero, so the metrics are bit-identical (and finite: no 0/0 mean)."""
    torch.manual_seed(0)
    if task == "linear":
        dm = LinearRegressionTasks(dim=6, num_tasks=5, episodes_per_epoch=1)
        module = _linear_module(vectorize_tasks=vectorize).double()
        precision = "64-true"
    else:
        dm = MNIST1DFewShot(num_val_tasks=5)
        module = MetaLearningModule(Conv1dNet(channels=4), inner_steps=2)
        precision = "32-true"
    tasks = PaddedItems(dm.eval_tasks("val"))

    def validate(**kw) -> dict[str, float]:
        loader = DataLoader(tasks, batch_size=2, collate_fn=ScoredCollate(stack_tasks), **kw)
        (metrics,) = _trainer(tmp_path, precision=precision).validate(module, loader, verbose=False)
        return metrics

    plain = validate()  # batches [0, 1], [2, 3], [4]
    # Indices >= 5 are padding: batches [pad, pad], [0, 1], [2, 3], [4, pad].
    padded = validate(sampler=[5, 6, 0, 1, 2, 3, 4, 7])
    expected = {"val/pre_adapt_loss", "val/query_loss"}
    if task == "mnist1d":
        expected |= {"val/pre_adapt_acc", "val/query_acc"}
    assert set(plain) == expected
    assert all(torch.isfinite(torch.tensor(v)) for v in plain.values())
    assert padded == plain


def test_inference_mode_gets_a_clear_error(tmp_path):
    dm = LinearRegressionTasks(dim=6, num_tasks=10, episodes_per_epoch=1)
    with pytest.raises(RuntimeError, match="inference_mode: false"):
        _trainer(tmp_path, inference_mode=True).validate(_linear_module(), dm)


def test_float64_tasks_with_a_float32_net_are_named_at_the_sanity_check(tmp_path):
    # the sanity validation runs before any training batch: it used to fail inside the net
    # ("expected scalar type Double but found Float") before the module's own check ran
    dm = LinearRegressionTasks(dim=6, num_tasks=10, episodes_per_epoch=1)  # float64 tasks
    trainer = _trainer(tmp_path, max_steps=1, num_sanity_val_steps=1)
    with pytest.raises(TypeError, match=r"task inputs are torch.float64 .* 64-true"):
        trainer.fit(_linear_module(), dm)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="method"):
        MetaLearningModule(LinearRegressor(3), method="imaml2")
    with pytest.raises(ValueError, match="K-step GD objective is second-order MAML's"):
        MetaLearningModule(LinearRegressor(3), objective="k_step")
    with pytest.raises(ValueError, match="BatchNorm"):
        MetaLearningModule(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    with pytest.warns(UserWarning, match="linearly"):
        MetaLearningModule(LinearRegressor(3), method="maml", inner_steps=100)
    with pytest.raises(ValueError, match="inner_lr must be > 0"):
        MetaLearningModule(LinearRegressor(3), inner_lr=-0.1)
    with pytest.raises(ValueError, match="eval_inner_steps"):
        MetaLearningModule(LinearRegressor(3), eval_inner_steps=-1)
    with pytest.raises(ValueError, match="baselines_use_proximal needs alpha"):
        MetaLearningModule(
            LinearRegressor(3), method="fomaml", alpha=0, baselines_use_proximal=True
        )
    dropout_net = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.1), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"net\.1 is active dropout.*common random"):
        MetaLearningModule(dropout_net)
    with pytest.raises(ValueError, match="vectorize_tasks: false"):
        MetaLearningModule(dropout_net, method="fomaml")
    MetaLearningModule(dropout_net, method="fomaml", vectorize_tasks=False)


def test_zero_eval_settings_are_kept():
    module = MetaLearningModule(LinearRegressor(3), eval_inner_steps=0)
    assert module.eval_inner_steps == 0 and module.eval_inner_lr == module.inner_lr


def test_maml_ignores_baselines_use_proximal_at_evaluation():
    kw = {"baselines_use_proximal": True}
    assert not MetaLearningModule(LinearRegressor(3), method="maml", **kw).proximal
    assert MetaLearningModule(LinearRegressor(3), method="fomaml", **kw).proximal


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])  # 16-mixed is bf16 on CPU
def test_fo_b_maml_refuses_mixed_precision(tmp_path, precision):
    dm = LinearRegressionTasks(dim=6, num_tasks=10, episodes_per_epoch=1)
    with pytest.raises(ValueError, match=f"precision='{precision}'"):
        _trainer(tmp_path, max_steps=1, precision=precision).fit(_linear_module(), dm)


def test_float64_data_into_float32_net_gets_a_clear_error(tmp_path):
    dm = LinearRegressionTasks(dim=6, num_tasks=10, episodes_per_epoch=1)
    with pytest.raises(
        TypeError, match=r"torch\.float64 but the net's parameters are torch\.float32"
    ):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(_linear_module(), dm)


def test_net_outputs_must_match_the_task_classes(tmp_path):
    module = MetaLearningModule(Conv1dNet(channels=4, n_way=3), method="fomaml")
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"net has 3 outputs .* tasks have 5 classes"):
        trainer.fit(module, MNIST1DFewShot(n_way=5, episodes_per_epoch=1))
    assert trainer.global_step == 0


def test_net_dim_must_match_the_task_dim(tmp_path):
    # Was a bare "Expected size [50, 5] but got [50, 20]" from inside the first step.
    module = MetaLearningModule(LinearRegressor(dim=20), method="fomaml")
    trainer = _trainer(tmp_path, max_steps=1, precision="64-true")
    with pytest.raises(ValueError, match=r"net has 20 input features .*net\.init_args\.dim\) but "
                       r"the tasks have 5 input features \(data\.init_args\.dim\)"):  # fmt: skip
        trainer.fit(module, LinearRegressionTasks(dim=5, num_tasks=10, episodes_per_epoch=1))
    assert trainer.global_step == 0


@pytest.mark.parametrize("method", ["fo_b_maml_forward", "fo_b_maml_symmetric"])
def test_vectorized_and_per_task_paths_agree_with_warm_start(method):
    """Same estimate from the vmapped and the looped path, warm start included (float64)."""
    torch.manual_seed(0)
    dm = LinearRegressionTasks(dim=6, num_tasks=10, meta_batch_size=3, episodes_per_epoch=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    sums, stats = [], []
    for vectorize in (True, False):
        torch.manual_seed(1)
        module = _linear_module(method, warm_start=True, vectorize_tasks=vectorize).double()
        x = module._params()
        grad_sum, stat = module._local_sums(batch, x, list(x))
        sums.append(grad_sum)
        stats.append(stat)
    torch.testing.assert_close(sums[0], sums[1], atol=1e-10, rtol=0)
    # the logged sums (tasks, query loss, accuracy, solve gap) agree slot by slot too
    torch.testing.assert_close(stats[0], stats[1], atol=1e-10, rtol=0, equal_nan=True)
    cold = _linear_module(method).double()
    cold.net.load_state_dict(module.net.state_dict())
    x = cold._params()
    assert not torch.allclose(cold._local_sums(batch, x, list(x))[0], sums[0], atol=1e-10, rtol=0)


def test_a_configured_lr_scheduler_is_stepped(tmp_path):
    """Manual optimization: the module steps the schedule Lightning would step (per epoch)."""
    dm = LinearRegressionTasks(dim=6, num_tasks=10, episodes_per_epoch=1)
    module = _linear_module().double()

    def configure_optimizers():
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    module.configure_optimizers = configure_optimizers
    trainer = _trainer(tmp_path, max_epochs=3, precision="64-true", limit_val_batches=0)
    trainer.fit(module, dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


class _SaveAtStep(L.Callback):
    """A mid-epoch checkpoint as ``every_n_train_steps`` writes it (in on_train_batch_end)."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit_linear(tmp_path, steps, ckpt=None, save=None, epochs=None, callbacks=()):
    L.seed_everything(0)
    dm = LinearRegressionTasks(dim=6, num_tasks=20, meta_batch_size=4, episodes_per_epoch=3)
    module = _linear_module().double()
    saves = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = _trainer(tmp_path, max_steps=steps, max_epochs=epochs, precision="64-true",
                       limit_val_batches=0, callbacks=list(callbacks),
                       enable_checkpointing=saves)  # fmt: skip
    trainer.fit(module, dm, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return module, dm


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    straight, dm_straight = _fit_linear(tmp_path / "a", 5)
    ckpt = tmp_path / "mid.ckpt"
    _fit_linear(tmp_path / "b", 2, save=ckpt)
    resumed, dm_resumed = _fit_linear(tmp_path / "c", 5, ckpt=str(ckpt))
    assert dm_straight.next_episode == dm_resumed.next_episode == 5
    assert torch.equal(straight.net.weight, resumed.net.weight)


def test_an_epoch_bound_run_resumed_mid_epoch_keeps_its_epoch_length(tmp_path):
    # The stream's length was what was left of the epoch at the resume, and Lightning kept
    # that length for the later epochs: max_epochs ended the resumed run steps early.
    straight, _ = _fit_linear(tmp_path / "a", -1, epochs=3)  # 3 epochs of 3 episodes
    ckpt = tmp_path / "mid.ckpt"
    _fit_linear(tmp_path / "b", 4, callbacks=[_SaveAtStep(2, ckpt)])
    resumed, dm_resumed = _fit_linear(tmp_path / "c", -1, ckpt=str(ckpt), epochs=3)
    assert dm_resumed.next_episode == 9 and resumed.trainer.global_step == 9
    assert torch.equal(straight.net.weight, resumed.net.weight)


class _CountValidations(L.Callback):
    def __init__(self) -> None:
        self.at_steps: list[int] = []

    def on_validation_end(self, trainer, pl_module):
        self.at_steps.append(trainer.global_step)


def test_limit_train_batches_gives_every_epoch_its_batches_and_validation(tmp_path):
    # Each epoch's stream ended at the next multiple of episodes_per_epoch: with 4 of 10
    # episodes per epoch the third epoch (episodes 8, 9) had 2 batches and no validation.
    dm = LinearRegressionTasks(dim=6, num_tasks=8, meta_batch_size=4, episodes_per_epoch=10)
    validations = _CountValidations()
    trainer = _trainer(tmp_path, max_epochs=3, limit_train_batches=4, callbacks=[validations],
                       precision="64-true", limit_val_batches=1)  # fmt: skip
    trainer.fit(_linear_module().double(), dm)
    assert trainer.global_step == 12 and dm.next_episode == 12
    assert validations.at_steps == [4, 8, 12]


def test_a_checkpoint_saved_mid_step_trains_that_steps_episode_again(tmp_path):
    # The episode is counted consumed when fetched, before its step runs: the on-exception
    # checkpoint of an interrupted step skipped it on resume.
    from callbacks.checkpoint import ModelCheckpoint as OnExceptionCheckpoint
    from tests.interrupt_callback import InterruptAtStep

    straight, _ = _fit_linear(tmp_path / "a", 5)
    saver = OnExceptionCheckpoint(
        dirpath=tmp_path / "ckpt", save_on_exception=True, every_n_epochs=0
    )
    with pytest.raises(SystemExit):  # Lightning's answer to a KeyboardInterrupt, after saving
        _fit_linear(
            tmp_path / "b", 5, callbacks=[saver, InterruptAtStep(2, "on_before_optimizer_step")]
        )
    (saved,) = (tmp_path / "ckpt").glob("*.ckpt")
    state = torch.load(saved, weights_only=True)
    assert state["global_step"] == 2
    assert state["LinearRegressionTasks"]["next_episode"] == 2
    resumed, _ = _fit_linear(tmp_path / "c", 5, ckpt=str(saved))
    assert torch.equal(straight.net.weight, resumed.net.weight)


def test_cli_fit_from_yaml(tmp_path, repo_root, monkeypatch):
    from cli import main

    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(repo_root / "configs/fo_maml/linear_regression.yaml"),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--trainer.enable_progress_bar", "false", "--data.init_args.dim", "20",
    ])  # fmt: skip
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())["metrics"]
    assert metrics["train/estimator_rel_error"] < 1e-3
    assert "val/query_loss" in metrics and "train/true_meta_grad_norm" in metrics


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("method", ["fomaml", "reptile"])
def test_baselines_adapt_on_support_and_score_on_query(method, vectorize):
    # The module's FO-MAML / Reptile directions equal the ops-level ones fed the right data:
    # FO-MAML adapts on the support set and differentiates the query loss; Reptile
    # (reptile_uses_query, default) adapts on support and query together.
    dm = LinearRegressionTasks(dim=6, num_tasks=10, meta_batch_size=3, episodes_per_epoch=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = _linear_module(method=method, vectorize_tasks=vectorize).double()
    with torch.no_grad():
        module.net.weight.copy_(torch.randn(6, generator=torch.Generator().manual_seed(1)))
    x = module._params()
    got = module._local_sums(batch, x, list(x))[0]
    expected = torch.zeros(6, dtype=torch.float64)
    kw = {"steps": 60, "lr": 0.12, "alpha": 0.5}  # _linear_module's inner loop
    for i in range(3):
        support = (batch["support_x"][i], batch["support_y"][i])
        query = (batch["query_x"][i], batch["query_y"][i])
        if method == "fomaml":
            g, f = task_objectives(module.net, half_mse, support, query)
            expected += fomaml_grad(g, f, x, **kw).grad["weight"]
        else:
            both = tuple(torch.cat([s, q]) for s, q in zip(support, query, strict=True))
            g, _ = task_objectives(module.net, half_mse, both, query)
            expected += reptile_grad(g, x, **kw).grad["weight"]
    assert torch.allclose(got, expected, atol=1e-10, rtol=0)


def test_inner_mini_batches_follow_the_runs_seed(monkeypatch):
    """Per-task mini-batches are keyed by (run seed, step, task index): the same seed gives the
    same meta-gradient, another seed_everything another one (runs of '3 seeds' used to share
    this noise, keyed by step and task index alone)."""
    dm = LinearRegressionTasks(dim=6, num_tasks=10, meta_batch_size=3, episodes_per_epoch=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    def meta_gradient(seed: int) -> torch.Tensor:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))  # what seed_everything exports
        torch.manual_seed(1)
        module = _linear_module("fomaml", inner_batch_size=3, vectorize_tasks=False).double()
        x = module._params()
        return module._local_sums(batch, x, list(x))[0]

    torch.testing.assert_close(meta_gradient(0), meta_gradient(0), rtol=0, atol=0)
    assert not torch.allclose(meta_gradient(0), meta_gradient(7))


def test_each_task_of_a_meta_batch_draws_its_own_noise(monkeypatch):
    """Per-task seeds are keyed by the task's index in the meta-batch (rank + world * i): tasks
    never share mini-batches or dropout masks, and 1 or N processes give the same seeds."""
    from ops.seeding import derive_seed, run_seed

    dm = LinearRegressionTasks(dim=6, num_tasks=10, meta_batch_size=3, episodes_per_epoch=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = _linear_module(vectorize_tasks=False).double()
    seeds = []
    estimate = module.estimate

    def recording_estimate(task, x, seed):
        seeds.append(seed)
        return estimate(task, x, seed=seed)

    monkeypatch.setattr(module, "estimate", recording_estimate)
    x = module._params()
    module._local_sums(batch, x, list(x))
    assert seeds == [derive_seed(run_seed(), 0, i) for i in range(3)]
    assert len(set(seeds)) == 3
