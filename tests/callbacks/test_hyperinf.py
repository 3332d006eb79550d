"""HyperINFCallback inside a real Trainer: files, logging, triggers, input checks, DDP (spec V4, 7.13)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from callbacks.hyperinf import HyperINFCallback, merge_parts
from callbacks.hyperinf_report import _top_bottom_markdown, detection_curve_figure, noise_metrics
from datamodules.noisy_labels import NoisyLabelDataModule
from modules.sequence_classifier import LoRAClassifier
from ops.influence_config import GradConfig
from ops.influence_engine import InfluenceEngine

METHODS = ["hyperinf", "exact_gfim", "datainf", "grad_dot"]
INCLUDE = ["lora_A", "lora_B", "head.weight"]
# Odd sizes: DistributedSampler would pad 61 -> 62 (a duplicated example) on 2 ranks, which the
# DDP test must catch; 60 would split evenly and hide it.
N_TRAIN, N_VAL = 61, 21


# One intra-op thread (tests/conftest.py): threads oversubscribe a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(**kw) -> NoisyLabelDataModule:
    kw = {"n_train": N_TRAIN, "n_val": N_VAL, **kw}
    return NoisyLabelDataModule(d_in=8, batch_size=20, seed=0, **kw)


def _model(lr: float = 1e-2) -> LoRAClassifier:
    return LoRAClassifier(in_features=8, hidden_size=16, lora_r=2, init_seed=0, lr=lr)


def _rank_auc(scores: pd.Series, noisy: pd.Series) -> float:
    """ROC-AUC of "high score = noisy" by the Mann-Whitney rank sum (ties get average ranks),
    independent of ops.influence_metrics.roc_auc."""
    ranks = scores.rank(method="average")
    pos = int(noisy.sum())
    neg = len(noisy) - pos
    return float((ranks[noisy.astype(bool)].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _callback(out, run_on: str = "fit_end", methods=METHODS, **kw) -> HyperINFCallback:
    kw = {"include": INCLUDE, **kw}
    return HyperINFCallback(
        methods=methods,
        grads=GradConfig(batch_size=16),
        run_on=run_on,
        output_dir=None if out is None else str(out),
        **kw,
    )


def _trainer(tmp_path, callback, logger=None, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else CSVLogger(tmp_path),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **{"max_epochs": 2, **kw},
    )


def test_fit_end_writes_aligned_table_and_metrics(tmp_path) -> None:
    dm = _data()
    cb = _callback(tmp_path / "inf")
    trainer = _trainer(tmp_path, cb)
    trainer.fit(_model(), dm)
    table = pd.read_csv(tmp_path / "inf" / "influence.csv")
    assert len(table) == N_TRAIN
    assert table["index"].tolist() == list(range(N_TRAIN))
    assert table["sample_id"].tolist() == dm.train_dataset.sample_id.tolist()
    assert table["is_noisy"].tolist() == dm.noisy_mask.tolist()
    for m in METHODS:
        assert table[f"score_{m}"].notna().all()
    assert (table["score_hyperinf"] - table["score_exact_gfim"]).abs().max() < 1e-3 * (
        table["score_exact_gfim"].abs().max()
    )
    summary = json.loads((tmp_path / "inf" / "influence_summary.json").read_text())
    assert summary["n_train"] == N_TRAIN
    for m in METHODS:
        expected = _rank_auc(table[f"score_{m}"], table["is_noisy"])
        assert summary["metrics"][f"influence/{m}/auc"] == pytest.approx(expected, abs=1e-9)
    logged = pd.read_csv(trainer.logger.log_dir + "/metrics.csv")
    assert "influence/hyperinf/auc" in logged.columns
    assert "influence/datainf/score_mean" in logged.columns
    # Also where callbacks read metrics (metrics.json, checkpoint monitors).
    auc = summary["metrics"]["influence/hyperinf/auc"]
    assert float(trainer.callback_metrics["influence/hyperinf/auc"]) == pytest.approx(auc)
    assert trainer.lightning_module.training  # train/eval flag restored


def test_parquet_and_tensorboard_histograms(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = _callback(tmp_path / "inf", output_format="parquet")
    trainer = _trainer(tmp_path, cb, logger=TensorBoardLogger(tmp_path, name="tb"))
    trainer.fit(_model(), _data())
    assert len(pd.read_parquet(tmp_path / "inf" / "influence.parquet")) == N_TRAIN
    sizes = {"histograms": 0, "tensors": 0, "images": 0}
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance=sizes)
    acc.Reload()
    assert "influence/hyperinf/scores" in acc.Tags()["histograms"]
    assert "influence/hyperinf/auc" in acc.Tags()["scalars"]
    assert any("top_bottom" in t for t in acc.Tags()["tensors"])
    assert acc.Tags()["images"] == ["influence/detection_curve"]


def test_a_diverged_model_gives_nan_metrics_and_strict_json_not_a_crash(tmp_path) -> None:
    # lr = 1e6: the weights stay finite but the loss is huge and LiSSA's recursion overflows to
    # all-NaN scores. TensorBoard's histogram raised "The histogram is empty" (the run died
    # before metrics.json), the AUC of the NaNs was argsort's order of them (0.56 looked like
    # a result), and influence_summary.json held bare NaN tokens that strict parsers reject.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = _callback(tmp_path / "inf", methods=["hyperinf", "lissa", "grad_dot"])
    trainer = _trainer(tmp_path, cb, logger=TensorBoardLogger(tmp_path, name="tb"), max_epochs=5)
    with pytest.warns(UserWarning, match="61 of 61 lissa scores are not finite"):
        trainer.fit(_model(lr=1e6), _data())

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    text = (tmp_path / "inf" / "influence_summary.json").read_text()
    metrics = json.loads(text, parse_constant=refuse)["metrics"]
    assert {metrics[f"influence/lissa/{k}"] for k in ("auc", "detect_at_10", "detect_at_20")} == {
        "nan"
    }
    assert 0.0 <= metrics["influence/grad_dot/auc"] <= 1.0
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    histograms = set(acc.Tags()["histograms"])
    assert {"influence/hyperinf/scores", "influence/grad_dot/scores"} <= histograms
    assert "influence/lissa/scores" not in histograms


def test_detection_curve_figure_plots_each_method_and_the_diagonal() -> None:
    scores = torch.tensor([0.9, 0.1, 0.8, 0.3])
    table = {"score_a": scores, "score_b": -scores, "is_noisy": torch.tensor([1, 0, 0, 1]).bool()}
    lines = detection_curve_figure(table, ["a", "b"]).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b", "random"]
    assert lines[0].get_xydata().tolist() == [[0.25, 0.5], [0.5, 0.5], [0.75, 1.0], [1.0, 1.0]]
    assert lines[1].get_ydata().tolist() == [0.0, 0.5, 0.5, 1.0]


def test_standalone_validate_computes_with_noise_file(tmp_path) -> None:
    dm = _data()
    dm.setup("fit")
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps(torch.nonzero(dm.noisy_mask).flatten().tolist()))
    cb = _callback(tmp_path / "inf", run_on="validate", noise_index_path=str(noise))
    trainer = _trainer(tmp_path, cb)
    model = _model()
    trainer.fit(model, dm)  # fit's validation loops must not trigger it
    assert not (tmp_path / "inf").exists()
    trainer.validate(model, dm)  # runs under inference_mode: the engine must re-enable grad
    table = pd.read_csv(tmp_path / "inf" / "influence.csv")
    assert table["is_noisy"].sum() == int(dm.noisy_mask.sum())
    assert cb.result is not None and cb.result.scores["hyperinf"].shape == (N_TRAIN,)


def test_bad_configuration_fails_before_training(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown influence method"):
        HyperINFCallback(methods=["tracin"])
    with pytest.raises(ValueError, match="run_on"):
        HyperINFCallback(run_on="epoch_end")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_format"):
        HyperINFCallback(output_format="xlsx")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="per_sample_loss"):
        _callback(tmp_path).compute(_trainer(tmp_path, _callback(tmp_path)), L.LightningModule())


class _Timeline(HyperINFCallback):
    """Records when the influence computation runs and on which device the model is."""

    def __init__(self, events: list, **kw):
        super().__init__(**kw)
        self.events = events

    def compute(self, trainer, pl_module):
        params = next(p for n, p in pl_module.named_parameters() if "lora_A" in n)
        self.events.append(("compute", params.device, trainer.strategy.root_device))
        return super().compute(trainer, pl_module)


def test_fit_end_scores_before_strategy_teardown(tmp_path) -> None:
    # Strategy.teardown() moves the model to the CPU and runs before on_fit_end: scoring there
    # would run on the CPU (silently) on a GPU run, and NCCL cannot reduce CPU tensors.
    events: list = []
    cb = _Timeline(
        events,
        methods=["hyperinf"],
        include=INCLUDE,
        grads=GradConfig(batch_size=16),
        run_on="fit_end",
        output_dir=str(tmp_path / "inf"),
    )
    trainer = _trainer(tmp_path, cb, max_epochs=1, limit_val_batches=0)
    teardown = trainer.strategy.teardown

    def recorded_teardown() -> None:
        events.append(("teardown",))
        teardown()

    trainer.strategy.teardown = recorded_teardown
    trainer.fit(_model(), _data())
    assert [e[0] for e in events] == ["compute", "teardown"]
    _, device, root = events[0]
    assert device == root


def test_fit_end_without_training_steps_still_scores(tmp_path) -> None:
    # limit_train_batches=0: the fit loop skips on_train_end, so on_fit_end must do it
    cb = _callback(tmp_path / "inf", methods=["grad_dot"])
    trainer = _trainer(tmp_path, cb, limit_train_batches=0, limit_val_batches=0)
    trainer.fit(_model(), _data())
    assert len(pd.read_csv(tmp_path / "inf" / "influence.csv")) == N_TRAIN


class _FrozenNormClassifier(LoRAClassifier):
    """A LoRA classifier whose input BatchNorm the user keeps in eval (frozen statistics)."""

    def __init__(self):
        super().__init__(in_features=8, hidden_size=16, lora_r=2, init_seed=0)
        self.norm = torch.nn.BatchNorm1d(8).requires_grad_(False)

    def on_fit_start(self) -> None:
        self.norm.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.norm(x))


def test_submodule_modes_restored_after_scoring(tmp_path) -> None:
    model = _FrozenNormClassifier()
    cb = _callback(tmp_path / "inf", methods=["grad_dot"])
    _trainer(tmp_path, cb, max_epochs=1, limit_val_batches=0).fit(model, _data())
    assert cb.result is not None
    assert model.training and model.head.training
    assert not model.norm.training  # pl_module.train(True) would have flipped it


def _write_json(path, values) -> str:
    path.write_text(json.dumps(values))
    return str(path)


def test_bf16_true_scores_with_the_inputs_in_the_weights_dtype(tmp_path) -> None:
    # The callback's own batches bypass Lightning's input conversion: a float32 batch met the
    # bf16 weights after training and the run crashed at the end of fit.
    cb = _callback(tmp_path / "inf", methods=["grad_dot"])
    trainer = _trainer(tmp_path, cb, precision="bf16-true", max_epochs=1)
    trainer.fit(_model(), _data())
    table = pd.read_csv(tmp_path / "inf" / "influence.csv")
    assert len(table) == N_TRAIN and table["score_grad_dot"].notna().all()


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"loss_fn": "ops.per_sample_grads.causal_lm_per_sample_los"}, ValueError, "loss_fn"),
        ({"include": ["lora_a"]}, ValueError, "no trainable parameter"),
        ({"noise_index_path": "missing.json"}, FileNotFoundError, "noise_index_path"),
        ({"noise_index_path": [-1, 3]}, ValueError, "got -1"),
        ({"noise_index_path": [3, N_TRAIN]}, ValueError, f"got {N_TRAIN}"),
    ],
)
def test_bad_inputs_fail_before_training(tmp_path, kw, error, match) -> None:
    """Every check runs at fit start: a late failure in ``on_train_end`` lost the whole run."""
    if isinstance(kw.get("noise_index_path"), list):
        kw = {"noise_index_path": _write_json(tmp_path / "noise.json", kw["noise_index_path"])}
    elif "noise_index_path" in kw:
        kw = {"noise_index_path": str(tmp_path / kw["noise_index_path"])}
    cb = _callback(tmp_path / "inf", methods=["grad_dot"], **kw)
    trainer = _trainer(tmp_path, cb)
    with pytest.raises(error, match=match):
        trainer.fit(_model(), _data())
    assert trainer.global_step == 0 and cb.result is None


def test_model_and_data_input_sizes_must_agree_before_training(tmp_path) -> None:
    trainer = _trainer(tmp_path, _callback(tmp_path / "inf", methods=["grad_dot"]))
    with pytest.raises(ValueError, match="in_features=8 but the data has 16 input features"):
        trainer.fit(_model(), NoisyLabelDataModule(d_in=16, n_train=N_TRAIN, n_val=N_VAL))
    assert trainer.global_step == 0


def test_a_head_with_fewer_outputs_than_classes_fails_before_training(tmp_path) -> None:
    # Was "IndexError: index 1 is out of bounds" from inside the first training step.
    trainer = _trainer(tmp_path, _callback(tmp_path / "inf", methods=["grad_dot"]))
    model = LoRAClassifier(in_features=8, hidden_size=16, num_classes=1, lora_r=2, init_seed=0)
    with pytest.raises(ValueError, match=r"num_classes=1 \(model.init_args.num_classes\) but "
                       r"the data has 2 classes"):  # fmt: skip
        trainer.fit(model, _data())
    assert trainer.global_step == 0


def test_an_empty_validation_set_fails_before_training(tmp_path) -> None:
    cb = _callback(tmp_path / "inf", methods=["grad_dot"])
    trainer = _trainer(tmp_path, cb)
    with pytest.raises(ValueError, match="the validation set to score against is empty"):
        trainer.fit(_model(), _data(n_val=0))
    assert trainer.global_step == 0


def test_scores_written_before_a_late_noise_file_failure(tmp_path, monkeypatch) -> None:
    # a noise file that vanishes during scoring must not throw the computed scores away
    dm = _data()
    dm.setup("fit")
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps(torch.nonzero(dm.noisy_mask).flatten().tolist()))
    run = InfluenceEngine.run

    def run_then_lose_file(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        noise.unlink()
        return out

    monkeypatch.setattr(InfluenceEngine, "run", run_then_lose_file)
    cb = _callback(tmp_path / "inf", noise_index_path=str(noise))
    with pytest.raises(FileNotFoundError, match="noise_index_path"):
        _trainer(tmp_path, cb, max_epochs=1, limit_val_batches=0).fit(_model(), dm)
    table = pd.read_csv(tmp_path / "inf" / "influence.csv")
    assert table["index"].tolist() == list(range(N_TRAIN))
    assert table["score_hyperinf"].notna().all()


def test_merge_parts_accepts_a_rank_with_an_empty_shard() -> None:
    # n_train < world_size: a rank scores nothing and so never saw a sample_id
    full = {
        "index": torch.tensor([2, 0]),
        "score_hyperinf": torch.tensor([0.5, -1.0]),
        "sample_id": torch.tensor([12, 10]),
    }
    empty = {"index": torch.empty(0, dtype=torch.long), "score_hyperinf": torch.empty(0)}
    merged = merge_parts([empty, full])
    assert set(merged) == {"index", "score_hyperinf", "sample_id"}
    assert merged["sample_id"].tolist() == [12, 10] and merged["sample_id"].dtype == torch.long
    assert merged["index"].tolist() == [2, 0]
    lacking = {k: t for k, t in full.items() if k != "sample_id"}
    with pytest.raises(ValueError, match="sample_id"):
        merge_parts([full, lacking])


def _nonzero_lora_b(model: LoRAClassifier) -> LoRAClassifier:
    with torch.no_grad():  # non-zero lora_B so every tensor has gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model


def _ddp_scores(
    tmp_path, devices: int, strategy: str, run_on: str = "validate", cb=None, data=None
) -> pd.DataFrame:
    cb = cb or _callback(tmp_path / f"inf_{devices}_{run_on}", run_on=run_on)
    out = Path(cb.output_dir)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        # fit: one step, no validation loop (validate itself needs its loop: it triggers there)
        **({"max_steps": 1, "limit_val_batches": 0} if run_on == "fit_end" else {}),
    )
    if run_on == "fit_end":
        # lr 0: one real DDP training step that leaves the weights as they are, so the scores
        # (computed at the end of fit, before teardown) equal one process's validate scores
        trainer.fit(_nonzero_lora_b(_model(lr=0.0)), _data())
    else:
        trainer.validate(_nonzero_lora_b(_model()), data or _data())
    return pd.read_csv(out / "influence.csv")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run_on", ["validate", "fit_end"])
def test_ddp_sharded_scores_equal_single_process(tmp_path, run_on: str) -> None:
    single = _ddp_scores(tmp_path, 1, "auto")
    ddp = _ddp_scores(tmp_path, 2, "ddp_spawn", run_on)
    # 61 rows in order: no DistributedSampler padding (a duplicate would also change G and v)
    assert ddp["index"].tolist() == list(range(N_TRAIN))
    assert ddp["sample_id"].is_unique
    for m in METHODS:
        torch.testing.assert_close(
            torch.tensor(ddp[f"score_{m}"].values),
            torch.tensor(single[f"score_{m}"].values),
            rtol=1e-4,
            atol=1e-6,
        )


@pytest.mark.distributed
def test_ddp_exact_fim_woodbury_gathers_rows_from_both_ranks(tmp_path) -> None:
    # 21 examples < r d = 32 for lora_B and head.weight: with fim_max_dim = 26 (21 x 32 <= 26**2)
    # exact_fim solves those by Woodbury on the rows gathered from both ranks. In the default run
    # because it caught ranks reducing the two equally wide tensors in different (set) orders.
    def scores(devices: int, strategy: str) -> pd.DataFrame:
        cb = HyperINFCallback(
            methods=["exact_fim"],
            grads=GradConfig(batch_size=4, fim_max_dim=26),
            include=INCLUDE,
            run_on="validate",
            output_dir=str(tmp_path / f"woodbury_{devices}"),
        )
        return _ddp_scores(tmp_path, devices, strategy, cb=cb, data=_data(n_train=21))

    single, ddp = scores(1, "auto"), scores(2, "ddp_spawn")
    assert ddp["index"].tolist() == list(range(21))
    torch.testing.assert_close(
        torch.tensor(ddp["score_exact_fim"].values),
        torch.tensor(single["score_exact_fim"].values),
        rtol=1e-4,
        atol=1e-6,
    )


def test_causal_lm_module_via_dataloader_fallback(tmp_path, tokenizer_dir, corpus_file) -> None:
    # the shared CausalLMModule has no per_sample_loss and TextDataModule no train_dataset:
    # loss_fn + the datamodule's own loaders (dataset + collate_fn) make it work unchanged
    from datamodules.text import TextDataModule
    from modules.causal_lm import CausalLMModule, LoraSettings

    short = [ln for ln in corpus_file.read_text().splitlines() if len(ln) < 1500]
    lines = short[:6]  # ~50 training blocks of 32 tokens
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines) + "\n")
    dm = TextDataModule(
        data_files=str(small),
        tokenizer=str(tokenizer_dir),
        block_size=32,
        batch_size=4,
        val_fraction=0.2,
        test_fraction=0.0,
    )
    model = CausalLMModule(
        model="micro-llama",
        tokenizer=str(tokenizer_dir),
        lora=LoraSettings(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"]),
    )
    cb = HyperINFCallback(
        methods=["hyperinf", "exact_gfim", "grad_dot"],
        include=["lora_A", "lora_B"],
        loss_fn="ops.per_sample_grads.causal_lm_per_sample_loss",
        grads=GradConfig(batch_size=8),
        run_on="fit_end",
        output_dir=str(tmp_path / "inf"),
    )
    trainer = _trainer(tmp_path, cb, max_steps=3, limit_val_batches=0)
    trainer.fit(model, dm)
    table = pd.read_csv(tmp_path / "inf" / "influence.csv")
    assert table["index"].tolist() == list(range(len(dm.splits["train"])))
    torch.testing.assert_close(
        torch.tensor(table["score_hyperinf"].values),
        torch.tensor(table["score_exact_gfim"].values),
        rtol=1e-2,
        atol=1e-3 * float(table["score_exact_gfim"].abs().max()),
    )


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_a_model_vmap_refuses_fails_at_fit_start_naming_the_loop_mode(tmp_path, tokenizer_dir,
                                                                      corpus_file, mode) -> None:  # fmt: skip
    # GPT-2 looks for pad tokens in input_ids when a batch has no attention mask: data-dependent
    # control flow under vmap, which used to fail after training, when scoring.
    from datamodules.text import TextDataModule
    from modules.causal_lm import CausalLMModule, LoraSettings

    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(corpus_file.read_text().splitlines()[:2]) + "\n")
    dm = TextDataModule(data_files=str(small), tokenizer=str(tokenizer_dir), block_size=16,
                        batch_size=4, val_fraction=0.3, test_fraction=0.0)  # fmt: skip
    model = CausalLMModule(model="tiny-gpt2", tokenizer=str(tokenizer_dir),
                           lora=LoraSettings(r=2, alpha=4.0, target_modules=["c_attn"]))  # fmt: skip
    cb = HyperINFCallback(methods=["grad_dot"], include=["lora_A", "lora_B"],
                          loss_fn="ops.per_sample_grads.causal_lm_per_sample_loss",
                          grads=GradConfig(mode=mode), run_on="fit_end",
                          output_dir=str(tmp_path / "inf"))  # fmt: skip
    trainer = _trainer(tmp_path, cb, max_steps=1, limit_val_batches=0)
    if mode == "vmap":
        with pytest.raises(RuntimeError, match=r"vmap cannot take .*set grads.mode: loop"):
            trainer.fit(model, dm)
        assert trainer.global_step == 0  # before any training step
    else:
        trainer.fit(model, dm)
        assert (tmp_path / "inf" / "influence.csv").is_file()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ddp_default_output_dir_is_the_log_dir(tmp_path) -> None:
    """Without ``output_dir`` the files go to ``<log_dir>/influence``; Lightning resolves
    ``log_dir`` with a broadcast, which rank 0 alone used to wait in (a hang under DDP)."""
    cb = _callback(None, run_on="validate", methods=["grad_dot"])
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", callbacks=[cb],
        logger=CSVLogger(tmp_path, name="inf", version=0), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.validate(_model(), _data())
    table = pd.read_csv(tmp_path / "inf" / "version_0" / "influence" / "influence.csv")
    assert table["index"].tolist() == list(range(N_TRAIN))


def test_noise_metrics_rank_high_scores_as_flipped_labels():
    # Ten examples scored 10, 9, ..., 1 with only the top-scored one flipped: inspecting the top
    # 10 % (one example) finds it (recall 1), and the ROC-AUC of "high score = flipped" is 1.
    table = {
        "score_m": torch.arange(10.0, 0.0, -1.0),
        "is_noisy": torch.tensor([True] + [False] * 9),
    }
    metrics = noise_metrics(table, ["m"])
    assert metrics["influence/m/detect_at_10"] == 1.0
    assert metrics["influence/m/auc"] == 1.0


def test_top_examples_are_the_highest_scores():
    # "top k (most harmful)" lists the highest scores first, "bottom k" the lowest.
    text = _top_bottom_markdown(
        {"score_m": torch.tensor([0.1, 0.9, 0.5]), "index": torch.arange(3)}, "m", 1
    )
    top, bottom = text.split("bottom 1")
    assert "| 1 | 0.9 |" in top and "| 0 | 0.1 |" in bottom


class _DropoutClassifier(LoRAClassifier):
    """LoRAClassifier with dropout on its input: scoring in train mode would draw masks."""

    def __init__(self) -> None:
        super().__init__(in_features=8, hidden_size=16, lora_r=2, init_seed=0)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.drop(x))


def test_scores_are_computed_without_dropout(tmp_path) -> None:
    # Influence is a property of the trained model, not of dropout draws: the scores of the
    # trained model equal those of the same weights with the dropout removed (in train mode each
    # per-sample gradient would see a mask).
    model = _DropoutClassifier()
    cb = HyperINFCallback(
        methods=["grad_dot"], include=INCLUDE, grads=GradConfig(batch_size=16, mode="loop"),
        output_dir=str(tmp_path / "inf"),
    )  # fmt: skip
    trainer = _trainer(tmp_path, cb, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, _data())
    with_dropout_layer = cb.result.scores["grad_dot"].clone()  # compute() replaces cb.result
    model.drop.p = 0.0
    without_dropout = cb.compute(trainer, model).scores["grad_dot"]
    torch.testing.assert_close(with_dropout_layer, without_dropout)
    assert model.training  # the module's mode is given back
