"""Every YAML under ``configs/`` parses and instantiates with the current code.

Each file is built the way its header comment and the docs tell users to run it: a full config
on its own, an overlay or a ``configs/trainer/`` fragment on top of its documented base. The
``mlo`` entry point (``cli.main``) builds the model, datamodule, trainer, logger and callbacks
with ``run=False`` (nothing is trained), and the settings the files ask for must be what got built.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

import cli
from modules.pretrained_presets import is_preset_available
from strategies.atomic_checkpoint_io import AtomicCheckpointIO

QUICKSTART = "configs/quickstart.yaml"
LP_EVAL = "configs/layer_parallel/eval.yaml"
SMOLLM2_FIT = "configs/smollm2/lora_finetune.yaml"
SMOLLM2 = "smollm2-135m-instruct"
CUDA = torch.cuda.is_available()

needs_smollm2 = pytest.mark.skipif(
    not is_preset_available(SMOLLM2),
    reason=f"preset {SMOLLM2} not set up: run `make smollm2`",
)


@dataclass(frozen=True)
class Case:
    """``file`` built on top of ``base`` (the documented combination) for ``subcommand``."""

    file: str
    base: tuple[str, ...] = ()
    subcommand: str = "fit"
    extra: tuple[str, ...] = ()  # command-line overrides the docs give for this machine


STANDALONE = [
    *(f"configs/cubic_newton/{n}.yaml" for n in
      ("breast_cancer_hvp", "convex_reg_newton", "nonconvex_logreg", "saddle")),
    *(f"configs/fo_maml/{n}.yaml" for n in
      ("linear_regression", "mnist1d_fob_maml", "mnist1d_fomaml", "mnist1d_maml",
       "mnist1d_reptile", "sinusoid")),
    *(f"configs/hyperinf/{n}.yaml" for n in ("lm_selection", "mislabel_digits", "mislabel_gmm")),
    *(f"configs/lora_fl/{n}.yaml" for n in ("full", "lora", "smoke")),
    *(f"configs/warmup/{n}.yaml" for n in
      ("adamw_no_warmup", "adamw_warmup", "lion", "liona_rrc", "lionar", "lionar_nesterov")),
    QUICKSTART,
    LP_EVAL,
]  # fmt: skip

CASES = [
    *(pytest.param(Case(f), id=f) for f in STANDALONE),
    # README / Makefile: mlo predict --config configs/quickstart.yaml --config <this>
    pytest.param(Case("configs/quickstart_predict.yaml", (QUICKSTART,), "predict"),
                 id="configs/quickstart_predict.yaml"),
    # docs/layer-parallel.md: eval.yaml + predict.yaml (predict), eval.yaml + finetune.yaml (fit)
    pytest.param(Case("configs/layer_parallel/predict.yaml", (LP_EVAL,), "predict"),
                 id="configs/layer_parallel/predict.yaml"),
    pytest.param(Case("configs/layer_parallel/finetune.yaml", (LP_EVAL,)),
                 id="configs/layer_parallel/finetune.yaml"),
    # Trainer fragments on the quickstart (their headers and README "Multi-GPU and multi-node").
    pytest.param(Case("configs/trainer/cpu.yaml", (QUICKSTART,)), id="configs/trainer/cpu.yaml"),
    # Without GPUs: the header's CPU variant (devices -1 means every GPU).
    pytest.param(Case("configs/trainer/ddp.yaml", (QUICKSTART,),
                      extra=() if CUDA else ("--trainer.accelerator=cpu", "--trainer.devices=2")),
                 id="configs/trainer/ddp.yaml"),
    # FSDP needs CUDA to run; without it the strategy and precision are still built, on CPU.
    pytest.param(Case("configs/trainer/fsdp.yaml", (QUICKSTART,),
                      extra=() if CUDA else ("--trainer.accelerator=cpu", "--trainer.devices=1")),
                 id="configs/trainer/fsdp.yaml"),
    # The real SmolLM2-135M-Instruct weights (offline preset).
    pytest.param(Case(SMOLLM2_FIT), id=SMOLLM2_FIT, marks=needs_smollm2),
    pytest.param(Case("configs/smollm2/hyperinf_mislabel.yaml"),
                 id="configs/smollm2/hyperinf_mislabel.yaml", marks=needs_smollm2),
    pytest.param(Case("configs/smollm2/predict_chat.yaml", (SMOLLM2_FIT,), "predict"),
                 id="configs/smollm2/predict_chat.yaml", marks=needs_smollm2),
]  # fmt: skip

# Trainer.<subcommand> arguments that the CLI passes itself (not config keys).
CLI_PASSED = {"self", "model", "datamodule", "train_dataloaders", "val_dataloaders", "dataloaders"}


def test_every_config_file_is_covered(repo_root):
    on_disk = {p.relative_to(repo_root).as_posix() for p in (repo_root / "configs").rglob("*.yaml")}
    covered = {param.values[0].file for param in CASES}
    assert covered == on_disk, {"not tested": on_disk - covered, "missing": covered - on_disk}


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory) -> Path:
    """Stand-in for a run's ``save_pretrained`` export: a random tiny-llama (4 layers, the
    quickstart's architecture) saved like ``callbacks.export.ExportPretrained`` does."""
    from modules.hf_models import build_causal_lm

    out = tmp_path_factory.mktemp("export") / "hf_model"
    build_causal_lm("tiny-llama").save_pretrained(out)
    return out


def _load(path: str) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text()) or {}


def _merge(base: dict, over: dict) -> dict:
    """Later config files override earlier ones key by key; lists are replaced, not appended."""
    out = dict(base)
    for key, value in over.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_dicts else value
    return out


def _is(obj: object, class_path: str) -> bool:
    """``obj`` is an instance of exactly the class that ``class_path`` imports (which may be a
    re-export, e.g. ``lightning.pytorch.loggers.TensorBoardLogger``)."""
    module, name = class_path.rsplit(".", 1)
    return type(obj) is getattr(importlib.import_module(module), name)


def _plain(value: object) -> bool:
    scalar = (str, int, float, bool, type(None))
    return isinstance(value, scalar) or (
        isinstance(value, list) and all(isinstance(v, scalar) for v in value)
    )


def _assert_init_args(built: object, section: dict, what: str) -> None:
    """The built object is the file's class, and its saved hyperparameters are the file's
    plain init args (nested classes and settings dicts are left to the class's own tests)."""
    assert _is(built, section["class_path"]), (what, type(built))
    hparams = built.hparams
    for key, value in (section.get("init_args") or {}).items():
        if _plain(value) and key in hparams:
            got = hparams[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{what}.{key}"


def _strategy_setting(strategy: object, key: str) -> object:
    """A strategy's init arg as it stored it: an attribute (``_``-prefixed for some), or the
    keyword arguments it passes on to the wrapper (DDP's ``_ddp_kwargs``)."""
    for attr in (key, f"_{key}"):
        if hasattr(strategy, attr):
            value = getattr(strategy, attr)
            return getattr(value, "name", value)  # enums (FSDP ShardingStrategy) by name
    return (getattr(strategy, "_ddp_kwargs", None) or strategy.kwargs)[key]


def _assert_trainer(trainer: Trainer, settings: dict, tmp_path: Path) -> None:
    simple = {
        "max_steps", "max_epochs", "val_check_interval", "check_val_every_n_epoch",
        "log_every_n_steps", "gradient_clip_val", "num_sanity_val_steps", "limit_val_batches",
        "limit_test_batches", "num_nodes",
    }  # fmt: skip
    for key in simple & settings.keys():
        assert getattr(trainer, key) == settings[key], f"trainer.{key}"
    if "precision" in settings:
        assert trainer.precision == settings["precision"]
    if "inference_mode" in settings:
        assert trainer.validate_loop.inference_mode == settings["inference_mode"]
    if settings.get("enable_progress_bar") is False:
        assert trainer.progress_bar_callback is None
    if settings.get("enable_checkpointing") is False:
        assert trainer.checkpoint_callback is None
    # No shipped config names a CheckpointIO: every one saves atomically (a failed save keeps
    # the previous checkpoint).
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    accelerators = {"cpu": CPUAccelerator, "gpu": CUDAAccelerator}
    if settings.get("accelerator") in accelerators:
        assert isinstance(trainer.accelerator, accelerators[settings["accelerator"]])
    if isinstance(settings.get("devices"), int) and settings["devices"] > 0:
        assert trainer.num_devices == settings["devices"]
    strategy = settings.get("strategy")
    if isinstance(strategy, dict):
        assert _is(trainer.strategy, strategy["class_path"]), type(trainer.strategy)
        for key, value in (strategy.get("init_args") or {}).items():
            assert _strategy_setting(trainer.strategy, key) == value, f"strategy.{key}"
    logger = settings.get("logger")
    if logger:
        assert _is(trainer.logger, logger["class_path"]), type(trainer.logger)
        assert trainer.logger.name == logger["init_args"]["name"]
        assert Path(trainer.logger.save_dir) == tmp_path  # nothing lands in the repo's runs/
    for callback in settings.get("callbacks") or []:
        path = callback["class_path"]
        assert any(_is(c, path) for c in trainer.callbacks), (path, trainer.callbacks)


@pytest.mark.parametrize("case", CASES)
def test_config_instantiates(case: Case, repo_root, tmp_path, monkeypatch, request):
    monkeypatch.chdir(repo_root)  # the configs name data/... relative to the repository
    monkeypatch.setattr(cli, "MloCLI", functools.partial(cli.MloCLI, run=False))
    files = [*case.base, case.file]
    merged: dict[str, Any] = {}
    for path in files:
        merged = _merge(merged, _load(path))

    # A subcommand's own keys (quickstart_predict.yaml's ckpt_path, an argument of
    # Trainer.predict) have no place in the run=False parser: build without them. Any other
    # unknown key is left in and fails the parse.
    own = _load(case.file)
    subcommand_keys = set(inspect.signature(getattr(Trainer, case.subcommand)).parameters)
    subcommand_keys -= CLI_PASSED
    if subcommand_keys & set(own):
        own = {key: value for key, value in own.items() if key not in subcommand_keys}
        files[-1] = str(tmp_path / Path(case.file).name)
        Path(files[-1]).write_text(yaml.safe_dump(own))

    overrides = list(case.extra)
    model_name = merged["model"].get("init_args", {}).get("model")
    if isinstance(model_name, str) and model_name.startswith("runs/"):
        # The output of an earlier run the docs tell users to make first (the quickstart's
        # hf_model export, the lora_fl pretrained base): a freshly saved stand-in.
        overrides.append(f"--model.init_args.model={request.getfixturevalue('exported_model')}")
    for override in overrides:  # what the command line changes, the built objects must show
        keys, value = override.removeprefix("--").split("=", 1)
        *parents, last = keys.split(".")
        section = merged
        for key in parents:
            section = section[key]
        section[last] = yaml.safe_load(value)
    args = [arg for path in files for arg in ("--config", path)]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path}", *overrides]

    built = cli.main(args)

    _assert_init_args(built.model, merged["model"], "model")
    _assert_init_args(built.datamodule, merged["data"], "data")
    _assert_trainer(built.trainer, merged.get("trainer") or {}, tmp_path)
    assert built.config["seed_everything"] == merged.get("seed_everything", cli.DEFAULT_SEED)
    assert any(_is(c, "callbacks.metrics_file.MetricsFile") for c in built.trainer.callbacks)
