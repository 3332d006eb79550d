"""The ``mlo`` command end to end, in process: config printing, errors, artifacts, resume."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from cli import main, unwrap_instantiation_error
from tests.callbacks.test_hparams_summary import read_hparams_tab

FAST = [
    "--config", "configs/quickstart.yaml",
    "--model.init_args.model=micro-llama",
    "--data.init_args.block_size=32",
    "--data.init_args.batch_size=4",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=2",
]  # fmt: skip


def _fit(tmp_path, *extra, name="run"):
    args = ["fit", *FAST, f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.logger.init_args.name={name}", *extra]  # fmt: skip
    return main(args)


def test_print_config_is_complete_and_documented(repo_root):
    out = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", "configs/quickstart.yaml", "--print_config"],
        cwd=repo_root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    config = yaml.safe_load(out.stdout)
    init = config["model"]["init_args"]
    assert init["model"] == "tiny-llama" and init["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert config["data"]["init_args"]["block_size"] == 128
    assert config["seed_everything"] == 1234
    assert "metrics_file" in config
    assert config["slurm_requeue"] == {"check_every_n_steps": 1} and config["graceful_stop"]
    help_text = subprocess.run(
        [sys.executable, "cli.py", "fit", "--model.help", "modules.causal_lm.CausalLMModule"],
        cwd=repo_root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    flat = " ".join(help_text.split())
    assert "tokenizer directory, preset or hub id" in flat and "--model.lora.help" in flat


def test_unknown_config_key_is_named(tmp_path, repo_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    learning_rat: 0.1\n")
    out = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", "configs/quickstart.yaml", "--config", str(bad)],
        cwd=repo_root, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode != 0
    assert "learning_rat" in out.stderr


def test_a_run_started_outside_the_repository_names_the_setting_and_directory(tmp_path, repo_root):
    # Relative paths in configs resolve against the current directory: from elsewhere the
    # quickstart's ``data/tokenizer`` is missing. The error is jsonargparse's "Does not
    # validate against any of the Union subtypes" + a namespace dump unless ``mlo`` unwraps it.
    out = subprocess.run(
        [sys.executable, str(repo_root / "cli.py"), "fit",
         "--config", str(repo_root / "configs/quickstart.yaml"), "--trainer.max_steps=1"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1
    last_line = out.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        "error: building modules.causal_lm.CausalLMModule failed: FileNotFoundError: "
        f"model.tokenizer: no tokenizer directory 'data/tokenizer' (looked for in the current "
        f"directory {tmp_path}: relative paths, also those in configs, resolve against"
    )
    assert "Does not validate" not in out.stderr and "Given value" not in out.stderr
    assert "in load_tokenizer" in out.stderr  # the original traceback is kept


def test_an_error_in_a_callback_list_names_that_callback(tmp_path):
    bad = tmp_path / "bad_callback.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
        "    - class_path: callbacks.warmup_diagnostics.UpdateDiagnostics\n"
        "      init_args: {log_every_n_steps: 0}\n"
    )
    with pytest.raises(ValueError) as info:
        main(["fit", *FAST, "--config", str(bad), f"--trainer.default_root_dir={tmp_path}"])
    class_path, cause = unwrap_instantiation_error(info.value)
    assert class_path == "callbacks.warmup_diagnostics.UpdateDiagnostics"
    assert str(cause) == "log_every_n_steps must be >= 1, got 0"
    assert unwrap_instantiation_error(ValueError("an unrelated error")) is None


@pytest.mark.parametrize("form", ["--config=PATH", "--config PATH"])
def test_yaml_syntax_error_names_the_file(tmp_path, form):
    bad = tmp_path / "bad_syntax.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n   devices: 1\n")
    # Both spellings: the README writes ``--config A --config B``.
    bad_args = [f"--config={bad}"] if form == "--config=PATH" else ["--config", str(bad)]
    with pytest.raises(SystemExit, match=r"(?s)--config .*bad_syntax\.yaml: invalid YAML.*line 3"):
        main(["fit", "--config", "configs/quickstart.yaml", *bad_args])


def test_fit_writes_all_artifacts_and_predict_generates(tmp_path):
    cli = _fit(tmp_path, "--trainer.max_steps=6", "--trainer.val_check_interval=3")
    log_dir = tmp_path / "run" / "version_0"
    assert (log_dir / "config.yaml").is_file()
    assert list((log_dir / "checkpoints").glob("last.ckpt"))
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["stage"] == "fit" and metrics["global_step"] == 6
    assert metrics["metrics"]["val/ppl"] > 1
    # The export holds the trained weights: it reloads with plain transformers to the same logits.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(log_dir / "hf_model").eval()
    ids = torch.randint(0, cli.model.model.config.vocab_size, (2, 12))
    cli.model.eval()
    with torch.no_grad():
        trained = cli.model.model(input_ids=ids).logits
        torch.testing.assert_close(exported(input_ids=ids).logits, trained)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert {"train/loss", "val/loss", "val/ppl"} <= set(events.Tags()["scalars"])
    assert cli.trainer.global_step == 6
    # HPARAMS tab: the whole resolved config (optimizer and trainer too), final metrics.
    settings, tags, scalars = read_hparams_tab(log_dir)
    assert settings["model.optimizer.lr"] == 3e-3 and settings["model.model"] == "micro-llama"
    assert settings["trainer.max_steps"] == 6 and settings["data.block_size"] == 32
    assert settings["seed_everything"] == 1234 and settings["config"] == "configs/quickstart.yaml"
    assert "hparams/val/ppl" in tags
    assert scalars["hparams/val/ppl"] == [(5, pytest.approx(metrics["metrics"]["val/ppl"]))]

    predict = main([
        "predict", *FAST, "--config", "configs/quickstart_predict.yaml",
        f"--ckpt_path={log_dir / 'checkpoints' / 'last.ckpt'}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.name=pred",
        "--model.init_args.generation.max_new_tokens=5",
    ])  # fmt: skip
    lines = (tmp_path / "pred" / "version_0" / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3 and all(r["completion"] for r in records)
    # The command line's decoding settings win over the checkpoint's hyperparameters.
    tokenizer = predict.model.tokenizer
    assert all(len(tokenizer(r["completion"]).input_ids) <= 6 for r in records), records
    assert predict.trainer.state.fn == "predict"
    # The checkpoint predict loaded holds the same trained weights as the export.
    with torch.no_grad():
        torch.testing.assert_close(predict.model.model.eval()(input_ids=ids).logits, trained)


def test_readme_lora_command_exports_a_reloadable_adapter(tmp_path):
    """The README's LoRA override: LightningCLI passes the settings as a dict."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cli = _fit(tmp_path, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
               "--model.init_args.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}")  # fmt: skip
    export = tmp_path / "run" / "version_0" / "hf_model"
    assert json.loads((export / "mlo_export.json").read_text())["lora"]["r"] == 4
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(export / "base"), export
    ).eval()
    ids = torch.randint(0, 4096, (1, 10))
    cli.model.eval()
    with torch.no_grad():
        expected = cli.model.model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def _params(cli):
    return {k: v.clone() for k, v in cli.model.state_dict().items()}


def _resume_matches_straight_run(
    tmp_path, steps: int, stop: int, common: list[str], part_extra=(), ckpt=None
):
    """Fit ``steps`` straight and ``stop`` then resumed to ``steps``: parameters bit-identical."""
    full = _fit(tmp_path, f"--trainer.max_steps={steps}", *common, name="full")
    _fit(tmp_path, f"--trainer.max_steps={stop}", *common, *part_extra, name="part")
    ckpt = ckpt or tmp_path / "part" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = _fit(
        tmp_path, f"--trainer.max_steps={steps}", *common, f"--ckpt_path={ckpt}", name="resumed"
    )
    expected, got = _params(full), _params(resumed)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    return full, resumed


def test_resume_from_the_checkpoint_written_when_training_ended(tmp_path):
    # No validation before max_steps: last.ckpt is written in on_train_end, after Lightning
    # marked the epoch completed. Resumed with a longer max_steps, the run went on in the next
    # epoch's permutation (skipping its first batches) and never trained the rest of this one.
    common = ["--trainer.val_check_interval=50", "--model.init_args.lr_scheduler=null"]
    _resume_matches_straight_run(tmp_path, 8, 4, common)


def test_chained_resumes_from_training_end_checkpoints_across_epochs(tmp_path):
    # Epochs of 6 batches; 4 -> 9 -> 15 steps, each resumed from the previous train-end
    # last.ckpt: Lightning's epoch count then runs one ahead of the data's (the sampler keeps
    # the offset in its checkpointed state), through the next epoch boundaries.
    common = ["--trainer.limit_train_batches=6", "--trainer.val_check_interval=6",
              "--trainer.check_val_every_n_epoch=50", "--model.init_args.lr_scheduler=null"]  # fmt: skip
    full = _fit(tmp_path, "--trainer.max_steps=15", *common, name="full")
    previous = None
    for stop in (4, 9, 15):
        resume = [f"--ckpt_path={previous}"] if previous else []
        _fit(tmp_path, f"--trainer.max_steps={stop}", *common, *resume, name=f"to{stop}")
        previous = tmp_path / f"to{stop}" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = torch.load(previous, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in _params(full).items():
        assert torch.equal(value, resumed[key]), key


def test_a_run_into_an_earlier_runs_directory_is_refused_unless_it_resumes(tmp_path):
    # A fixed version (``make demo``'s, or a run's own saved config.yaml) used to replace the
    # earlier run's config.yaml, metrics.json and export next to its old last.ckpt.
    demo = ["--trainer.logger.init_args.version=demo", "--trainer.val_check_interval=2"]
    _fit(tmp_path, "--trainer.max_steps=2", *demo)
    run_dir = tmp_path / "run" / "demo"
    files = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.json")}
    refused = f"{run_dir / 'config.yaml'} exists: this {{}} run would write into the directory"
    with pytest.raises(RuntimeError, match=re.escape(refused.format("fit"))):
        _fit(tmp_path, "--trainer.max_steps=3", *demo)
    with pytest.raises(RuntimeError, match=re.escape(refused.format("validate"))):
        main(["validate", *FAST, f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.logger.init_args.name=run", *demo,
              f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"])  # fmt: skip
    assert {name: (run_dir / name).read_bytes() for name in files} == files
    assert not list(run_dir.glob("checkpoints/*-v1.ckpt"))
    # Continuing the run writes there: its config.yaml and metrics.json now describe step 4.
    cli = _fit(
        tmp_path, "--trainer.max_steps=4", *demo, f"--ckpt_path={run_dir}/checkpoints/last.ckpt"
    )
    assert cli.trainer.global_step == 4
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 4


def test_a_run_ended_by_sigterm_exits_with_143_after_saving(tmp_path, repo_root):
    # Lightning's SIGTERM handler saves and raises a bare SystemExit: status 0, as if finished.
    out = subprocess.run(
        [sys.executable, "cli.py", "fit", *FAST, "--trainer.max_steps=6",
         f"--trainer.logger.init_args.save_dir={tmp_path}",
         "--trainer.callbacks+=tests.slurm_signal_callback.SignalAtStep",
         "--trainer.callbacks.step=2", "--trainer.callbacks.signal_name=SIGTERM"],
        cwd=repo_root, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 143, out.stderr[-2000:]
    # saved at the end of the step the signal arrived in (Lightning's step boundary)
    last = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_resume_is_bit_identical(tmp_path):
    common = [
        "--model.init_args.lr_scheduler.init_args.total_steps=12",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=3",
        "--trainer.val_check_interval=4",
    ]
    full, resumed = _resume_matches_straight_run(tmp_path, 12, 5, common)
    opt_full = full.trainer.optimizers[0].state_dict()["state"]
    opt_resumed = resumed.trainer.optimizers[0].state_dict()["state"]
    for idx in opt_full:
        assert torch.equal(opt_full[idx]["exp_avg_sq"], opt_resumed[idx]["exp_avg_sq"])
    assert full.trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == (
        resumed.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
    )


@pytest.mark.parametrize(
    ("val_every", "stop"),
    [
        (2, 6),  # mid-epoch: the resumed run must skip the 2 batches epoch 1 already used
        (4, 4),  # the epoch's last batch: resume with the next epoch, skipping nothing
    ],
)
def test_resume_under_limit_train_batches(tmp_path, val_every, stop):
    common = [
        "--trainer.limit_train_batches=4", f"--trainer.val_check_interval={val_every}",
        "--model.init_args.lr_scheduler.init_args.total_steps=10",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=2",
    ]  # fmt: skip
    _resume_matches_straight_run(tmp_path, 10, stop, common)


def test_resume_from_a_checkpoint_written_at_batch_end(tmp_path):
    """every_n_train_steps saves in on_train_batch_end, where the batch is processed but not
    yet counted as completed: the resumed run must not train that batch again."""
    common = [
        "--trainer.val_check_interval=4",
        "--model.init_args.lr_scheduler.init_args.total_steps=8",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=2",
    ]  # fmt: skip
    batch_end = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'batch_end'}",
        "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.filename=step3",
    ]  # fmt: skip
    ckpt = tmp_path / "batch_end" / "step3.ckpt"
    _resume_matches_straight_run(tmp_path, 8, 3, common, part_extra=batch_end, ckpt=ckpt)


@pytest.mark.parametrize("tokenizer", ["null", "./data/tokenizer"])
def test_a_model_tokenizer_left_unset_or_spelled_otherwise_trains_with_a_logger(
    tmp_path, tokenizer
):
    # The data names data/tokenizer; Lightning used to refuse logging module and datamodule
    # hparams of one name with different values ("Error while merging hparams").
    cli = _fit(tmp_path, f"--model.init_args.tokenizer={tokenizer}", "--trainer.max_steps=1",
               "--trainer.limit_val_batches=0")  # fmt: skip
    assert cli.trainer.global_step == 1


def test_block_size_beyond_model_positions(tmp_path):
    with pytest.raises(ValueError, match="exceeds the model's maximum positions"):
        _fit(tmp_path, "--trainer.max_steps=1", "--data.init_args.block_size=4096")


def test_tokenizer_larger_than_pretrained_embedding(tmp_path):
    from modules.hf_models import build_causal_lm

    small = tmp_path / "small-vocab-model"
    build_causal_lm("micro-llama", vocab_size=100).save_pretrained(small)
    with pytest.raises(ValueError, match="embeds only 100"):
        _fit(tmp_path, "--trainer.max_steps=1", f"--model.init_args.model={small}")


def test_a_checkpoint_that_changes_the_configured_model_says_so(tmp_path):
    _fit(tmp_path, "--trainer.max_steps=2", "--trainer.val_check_interval=2")
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    common = ["validate", *FAST, f"--ckpt_path={ckpt}", "--trainer.limit_val_batches=1",
              f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"(?s)replaces model settings.*"
                      r"model\.init_args\.model: 'tiny-llama' -> 'micro-llama'"):  # fmt: skip
        cli = main([*common, "--model.init_args.model=tiny-llama"])
    assert cli.model.model.config.num_hidden_layers == 2  # micro-llama's, as the note says
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*replaces model settings")
        main(common)  # the same config: no note
    # a whole group that the config leaves null (LoRA) is reported too
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["hyper_parameters"]["lora"] = {"r": 4, "alpha": 8}
    with_lora = tmp_path / "with_lora.ckpt"
    torch.save(checkpoint, with_lora)
    note = pytest.warns(UserWarning, match=r"model\.init_args\.lora: None -> \{'r': 4")
    # the weights have no adapters: they do not load
    with note, pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict.*lora_A"):
        main(["validate", *FAST, f"--ckpt_path={with_lora}", "--trainer.limit_val_batches=1",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    # the legacy (non-zip) serialization is a valid checkpoint
    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(ckpt, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    legacy_run = main(["validate", *FAST, f"--ckpt_path={legacy}", "--trainer.limit_val_batches=1",
                       f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    assert "val/loss" in legacy_run.trainer.callback_metrics


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("truncated", "not a readable PyTorch checkpoint"),
        ("text", "not a readable PyTorch checkpoint"),
        # intact, but holding an object weights-only loading does not allow: not "truncated"
        ("custom object", "torch.load failed: Weights only load failed"),
    ],
)
def test_an_unreadable_checkpoint_is_named(tmp_path, content, message):
    from fractions import Fraction

    path = tmp_path / "broken.ckpt"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "text":
        path.write_text("this is not a checkpoint\n")
    else:
        torch.save({"state_dict": {}, "hyper_parameters": {"ratio": Fraction(1, 3)}}, path)
    with pytest.raises(SystemExit, match=rf"--ckpt_path .*broken\.ckpt: {message}"):
        main(["validate", *FAST, f"--ckpt_path={path}"])


def _every_step_checkpoints(directory) -> list[str]:
    return [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={directory}", "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        # 64-true: the checkpoint used to pass through the float32 model (8.5e-10 off)
        ("configs/fo_maml/linear_regression.yaml", ["--model.init_args.inner_steps=5"]),
        # mini-batches resumed mid-epoch: the loader used to replay epoch 0's order
        (
            "configs/hyperinf/mislabel_digits.yaml",
            ["--data.init_args.batch_size=100", "--trainer.callbacks.init_args.methods=[grad_dot]"],
        ),
        # dropout: the checkpoint used to hold no RNG state, so the resumed steps replayed the
        # masks drawn right after seeding
        ("configs/quickstart.yaml", [*FAST[2:], "--model.init_args.model=tiny-gpt2"]),
    ],
)
def test_resume_through_the_cli_is_bit_identical(tmp_path, config, extra):
    common = ["--config", config, *extra, "--trainer.max_steps=4",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
              f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    main(["fit", *common, *_every_step_checkpoints(tmp_path / "straight")])
    main(["fit", *common, *_every_step_checkpoints(tmp_path / "resumed"),
          f"--ckpt_path={tmp_path / 'straight' / 'step=2.ckpt'}"])  # fmt: skip
    straight = torch.load(tmp_path / "straight" / "step=4.ckpt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "step=4.ckpt", weights_only=False)
    for key, value in straight["state_dict"].items():
        assert value.dtype == resumed["state_dict"][key].dtype
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_a_run_without_validation_still_ends_with_a_checkpoint(tmp_path):
    # Lightning's default checkpoint is written at validation or epoch ends only; a
    # step-bounded run with validation off used to leave none.
    cli = main(["fit", "--config", "configs/cubic_newton/saddle.yaml", "--trainer.max_steps=5",
                "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    (last,) = tmp_path.rglob("checkpoints/*.ckpt")
    assert last.name == "last.ckpt" and torch.load(last, weights_only=True)["global_step"] == 5
    assert cli.trainer.checkpoint_callback.save_on_exception
    # With validation: the latest checkpoint at each validation end (crash recovery), also
    # as last.ckpt.
    main(["fit", "--config", "configs/cubic_newton/saddle.yaml", "--trainer.max_steps=7",
          "--trainer.val_check_interval=2", "--trainer.check_val_every_n_epoch=null",
          "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.logger.init_args.name=validated"])  # fmt: skip
    steps = {
        path.name: torch.load(path, weights_only=True)["global_step"]
        for path in (tmp_path / "validated").rglob("checkpoints/*.ckpt")
    }
    assert steps == {"epoch=0-step=6.ckpt": 6, "last.ckpt": 6}
    # A config's own ModelCheckpoint is the only one; enable_checkpointing: false means none.
    own = _fit(tmp_path, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", name="own")
    (checkpoint,) = own.trainer.checkpoint_callbacks
    assert checkpoint.monitor == "val/loss"
    off = _fit(tmp_path, "--trainer.max_steps=1", "--trainer.enable_checkpointing=false",
               "--trainer.callbacks=[]", name="off")  # fmt: skip
    assert off.trainer.checkpoint_callbacks == []


def test_validation_inside_fit_leaves_a_dropout_models_training_unchanged(tmp_path):
    # Each validation's DataLoader iterator drew a seed from the global RNG, so a fit with
    # validation trained other weights than one without (GPT-2 has dropout).
    weights = []
    for name, val in (("validated", ["--trainer.val_check_interval=2"]),
                      ("not_validated", ["--trainer.limit_val_batches=0"])):  # fmt: skip
        cli = _fit(tmp_path, "--model.init_args.model=tiny-gpt2", "--trainer.max_steps=6", *val,
                   name=name)  # fmt: skip
        weights.append({k: v.clone() for k, v in cli.model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize(
    ("subcommand", "config", "message"),
    [
        (
            "test",
            "configs/cubic_newton/saddle.yaml",
            r"mlo test: CubicNewtonModule defines no test_step\(\).*supports: fit, validate$",
        ),
        (
            "predict",
            "configs/lora_fl/smoke.yaml",
            r"mlo predict: FederatedLoRAModule defines no predict_step\(\)",
        ),
    ],
)
def test_a_subcommand_the_module_does_not_support_is_named(tmp_path, subcommand, config, message):
    with pytest.raises(SystemExit, match=message):
        main([subcommand, "--config", config, f"--trainer.logger.init_args.save_dir={tmp_path}"])


def test_a_learning_rate_changed_on_resume_is_named(tmp_path):
    _fit(tmp_path, "--trainer.max_steps=2", "--trainer.val_check_interval=2", name="part")
    ckpt = tmp_path / "part" / "version_0" / "checkpoints" / "last.ckpt"
    changed = "--model.init_args.optimizer.init_args.lr=0.01"
    with pytest.warns(UserWarning, match=r"optimizer.init_args.lr is 0.01 in the config, but the "
                      r"resumed optimizer keeps the checkpoint's 0.003"):  # fmt: skip
        _fit(tmp_path, "--trainer.max_steps=3", changed, f"--ckpt_path={ckpt}", name="resumed")


def test_unused_learning_rates_needs_one_optimizer_setting_and_one_state():
    from cli import unused_optimizer_settings

    def model(**optimizers):
        return {"init_args": {k: {"init_args": {"lr": lr}} for k, lr in optimizers.items()}}

    groups = [{"initial_lr": 3e-3, "lr": 1e-3}, {"initial_lr": 1e-2, "lr": 5e-3}]
    ckpt = {"optimizer_states": [{"param_groups": groups}]}
    assert unused_optimizer_settings(model(optimizer=1e-2), ckpt) == []  # one group's base LR
    (note,) = unused_optimizer_settings(model(optimizer=5e-3), ckpt)  # the current LR is no base
    assert note.endswith("keeps the checkpoint's 0.003, 0.01 (Lightning restores its param groups)")
    two = model(local_optimizer=1.0, server_optimizer=1.0)  # rebuilt per round: not restored
    assert unused_optimizer_settings(two, ckpt) == []
    assert unused_optimizer_settings(model(optimizer=5e-3), {"optimizer_states": []}) == []


def _resumed_groups(optimizer):
    """The param groups a checkpoint of ``optimizer`` holds (what Lightning restores)."""
    return {"optimizer_states": [optimizer.state_dict()]}


def test_every_optimizer_setting_the_groups_store_is_checked(tokenizer_dir):
    from functools import partial

    from cli import unused_optimizer_settings
    from modules.causal_lm import CausalLMModule
    from optim.lion import LionAR

    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    adamw = {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "amsgrad": False,
             "foreach": None}  # fmt: skip
    ckpt = _resumed_groups(torch.optim.AdamW(module.parameter_groups(), **adamw))

    def config(**changes):
        return {"init_args": {"optimizer": {"init_args": {**adamw, **changes}}}}

    assert unused_optimizer_settings(config(), ckpt) == []  # the no-decay group's 0 is no change
    notes = unused_optimizer_settings(config(weight_decay=0.2, betas=[0.9, 0.99]), ckpt)
    assert notes == [
        "model.init_args.optimizer.init_args.weight_decay is 0.2 in the config, but the resumed "
        "optimizer keeps the checkpoint's 0, 0.1 (Lightning restores its param groups)",
        "model.init_args.optimizer.init_args.betas is (0.9, 0.99) in the config, but the resumed "
        "optimizer keeps the checkpoint's (0.9, 0.95) (Lightning restores its param groups)",
    ]
    # LionAR stores rotational="blocks" as per-group True/False: another kind, not a change.
    lionar = {"lr": 0.1, "weight_decay": 0.1, "rotational": "blocks", "lr_other": 3e-4}
    lion = partial(LionAR, **lionar)(module.parameter_groups())
    lionar_config = {"init_args": {"optimizer": {"init_args": lionar}}}
    assert unused_optimizer_settings(lionar_config, _resumed_groups(lion)) == []


def test_a_checkpoint_directory_is_read_only_under_fsdp(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from cli import check_checkpoint_fits_strategy

    ddp = SimpleNamespace(strategy=DDPStrategy.__new__(DDPStrategy))
    fsdp = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(SystemExit, match="is a directory, not a checkpoint"):
        check_checkpoint_fits_strategy(str(tmp_path), fsdp)
    torch.save({"global_step": 4}, tmp_path / "meta.pt")  # what a sharded checkpoint holds
    with pytest.raises(SystemExit, match=r"sharded FSDP checkpoint.*consolidate_checkpoint"):
        check_checkpoint_fits_strategy(str(tmp_path), ddp)
    check_checkpoint_fits_strategy(str(tmp_path), fsdp)
    check_checkpoint_fits_strategy(None, ddp)


@pytest.mark.parametrize(
    ("slurm_env", "ckpt_path", "hpc_checkpoint", "continues"),
    [
        ({}, None, None, False),
        ({}, "last.ckpt", None, True),
        ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mlo"}, None, None, False),
        ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mlo"}, None, "hpc_ckpt_1.ckpt", True),
        # requeued after a node failure, before any save: starts over in its own directory
        ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mlo", "SLURM_RESTART_COUNT": "1"}, None, None,
         True),
        ({"SLURM_RESTART_COUNT": "1"}, None, None, False),  # not inside a SLURM job
    ],
)  # fmt: skip
def test_which_fits_continue_an_existing_run(
    monkeypatch, slurm_env, ckpt_path, hpc_checkpoint, continues
):
    from types import SimpleNamespace

    from callbacks.run_config import SaveRunConfig

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in slurm_env.items():
        monkeypatch.setenv(key, value)
    saver = SaveRunConfig.__new__(SaveRunConfig)  # _resumes reads only the config
    saver.config = {"ckpt_path": ckpt_path}
    trainer = SimpleNamespace(
        _checkpoint_connector=SimpleNamespace(_hpc_resume_path=hpc_checkpoint)
    )
    assert saver._resumes(trainer) is continues
