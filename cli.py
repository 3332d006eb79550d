"""The ``mlo`` command: LightningCLI over every module and datamodule of the project.

    mlo fit --config configs/quickstart.yaml
    mlo fit --config configs/quickstart.yaml --print_config
    python cli.py test --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt

Models and data are chosen by ``class_path`` (subclass mode), so any LightningModule or
LightningDataModule, of this project or of the user's own package, plugs in. Defaults:

- TensorBoard logger; the resolved config saved next to the logs (never over another run's:
  ``callbacks/run_config.py``) and shown, with the final metrics, in TensorBoard's HPARAMS tab
  (``callbacks/hparams_summary.py``);
- ``seed_everything`` on; validation inside ``fit`` leaves the training RNG stream alone and
  checkpoints carry it (``callbacks/training_rng.py``);
- ``metrics.json`` at the end of every fit/validate/test (``callbacks/metrics_file.py``);
- a ModelCheckpoint for configs that name none: ``checkpoints/last.ckpt`` also without
  validation, and an on-exception save that cannot hang a multi-process run;
- Ctrl-C or SIGTERM during ``fit`` stops at the next step boundary, on every rank, so the
  checkpoint resumes exactly (``callbacks/graceful_stop.py``); under SLURM, the requeue
  signal is answered with a checkpoint at the next step boundary
  (``callbacks/slurm_requeue.py``).
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import sys
import traceback
from itertools import pairwise
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import DoublePrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_helpers import is_overridden

import strategies  # noqa: F401  (registers the project's strategies by name)
from callbacks.checkpoint import DivergedRunError, ModelCheckpoint
from callbacks.graceful_stop import GracefulStop
from callbacks.hparams_summary import HParamsSummary
from callbacks.metrics_file import MetricsFile
from callbacks.progress_bar import RunProgressBar
from callbacks.run_config import SaveRunConfig, reserve_next_version
from callbacks.slurm_requeue import SlurmRequeue
from callbacks.training_rng import TrainingRng
from modules.hf_models import TINY_PRESETS
from modules.pretrained_presets import PRETRAINED_PRESETS
from strategies.atomic_checkpoint_io import AtomicCheckpointIO
from strategies.fsdp import sharded_checkpoint_meta

DEFAULT_SEED = 1234
#: The checkpoint of configs that name none: the latest one at every validation end (as
#: Lightning's default) and as ``last.ckpt``, which a run without validation writes when
#: training ends, and one on an exception (``callbacks/checkpoint.py``). (Not a train-end save
#: after a validation saved: Lightning resumes such a checkpoint in the next epoch.)
DEFAULT_CHECKPOINT = {"save_top_k": 1, "save_last": True, "save_on_exception": True}
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # default_hp_metric: HParamsSummary fills the HPARAMS tab with the real final metrics
        "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
    },
}


class MloCLI(LightningCLI):
    """LightningCLI with the project's defaults (see the module docstring)."""

    def add_arguments_to_parser(self, parser) -> None:
        # Always-on callbacks, configurable under their names (``metrics_file.filename``,
        # ``graceful_stop.ctrl_c``, ``slurm_requeue.check_every_n_steps``: inert outside SLURM).
        parser.add_lightning_class_args(MetricsFile, "metrics_file")
        parser.add_lightning_class_args(GracefulStop, "graceful_stop")
        parser.add_lightning_class_args(SlurmRequeue, "slurm_requeue")
        parser.add_lightning_class_args(HParamsSummary, "hparams_summary")
        parser.add_lightning_class_args(TrainingRng, "training_rng")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        # Lightning's default bar, with its display fixed for step-driven runs; a progress bar
        # the config names, or ``enable_progress_bar: false``, wins.
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if (
            _RICH_AVAILABLE
            and config.get("enable_progress_bar") is not False
            and not any(isinstance(c, ProgressBar) for c in [*configured, *callbacks])
        ):
            callbacks = [*callbacks, RunProgressBar()]
        # Lightning's default checkpoint is written at validation or epoch ends only: a
        # step-bounded run without validation ended with no checkpoint at all.
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(c, LightningModelCheckpoint) for c in [*configured, *callbacks]
        ):
            callbacks = [*callbacks, ModelCheckpoint(**DEFAULT_CHECKPOINT)]
        return super()._instantiate_trainer(with_atomic_checkpoint_io(config), callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        # Lightning loads --ckpt_path into the model before the precision plugin casts it, so
        # under 64-true the float64 checkpoint went through the float32 model first and lost
        # its low bits: cast the model first (the plugin's own later cast is then a no-op).
        if isinstance(self.trainer.strategy.precision_plugin, DoublePrecision):
            self.model.double()
        check_subcommand_is_supported(subcommand, self.model)
        check_checkpoint_fits_strategy(self.config[subcommand].get("ckpt_path"), self.trainer)
        for logger in self.trainer.loggers:
            reserve_next_version(logger)
        super()._run_subcommand(subcommand)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's, plus errors and a note that name the checkpoint.

        LightningCLI applies the hyperparameters saved in ``--ckpt_path`` over the config's
        ``model``; a checkpoint of another run then silently changes the model, and a later
        error blames a key of the config. Torch's errors on a truncated or foreign file name no
        file at all.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return super()._parse_ckpt_path()
        before = plain_settings(self.config[subcommand].get("model"))
        # LightningCLI reads the hyperparameters of a file only; a sharded checkpoint keeps
        # them in its meta.pt (they were silently ignored)
        meta = sharded_checkpoint_meta(ckpt_path)
        if meta is not None:
            self.config[subcommand]["ckpt_path"] = str(meta)
        try:
            super()._parse_ckpt_path()
        except SystemExit:
            model = before.get("class_path") if isinstance(before, dict) else before
            sys.stderr.write(
                f"--ckpt_path {ckpt_path}: its saved hyperparameters do not fit the config's "
                f"model ({model}); was it trained with another config?\n"
            )
            raise
        except pickle.UnpicklingError as err:
            # weights-only loading refuses objects it does not know (custom hparam types) and
            # fails on garbage: torch's message says which
            raise SystemExit(f"error: --ckpt_path {ckpt_path}: torch.load failed: {err}") from err
        except Exception as err:  # a truncated or foreign file fails anywhere in the unpickler
            raise SystemExit(
                f"error: --ckpt_path {ckpt_path}: not a readable PyTorch checkpoint (truncated or "
                f"another kind of file?): {type(err).__name__}: {err}"
            ) from err
        finally:
            self.config[subcommand]["ckpt_path"] = ckpt_path
        after = plain_settings(self.config[subcommand].get("model"))
        changes = changed_settings(before, after)
        check_checkpoint_model_class(ckpt_path, changes)
        for key, old, new in [c for c in changes if moved_path(*c[1:])]:
            # A path saved where the run was trained (relative to its working directory, or a
            # directory moved since): the config's existing path, which loads the same
            # architecture or fails naming it, beats an error about a path the user never gave.
            self.config[subcommand][f"model.{key}"] = old
            changes.remove((key, old, new))
            rank_zero_warn(
                f"--ckpt_path {ckpt_path} saved model.{key}={new!r}, which does not exist here "
                f"(relative paths resolve against {os.getcwd()}); using the config's {old!r}"
            )
        if changes:
            lines = "".join(f"\n  model.{key}: {old!r} -> {new!r}" for key, old, new in changes)
            rank_zero_warn(f"--ckpt_path {ckpt_path} replaces model settings of the config{lines}")
        if subcommand == "fit" and meta is None:  # a sharded one holds them in its shards
            try:  # memory-mapped: only the optimizer's param groups are read
                checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # a legacy (non-zip) file: Lightning reports it itself
                return
            for note in unused_optimizer_settings(after, checkpoint):
                rank_zero_warn(f"--ckpt_path {ckpt_path}: {note}")


def with_atomic_checkpoint_io(config: dict[str, Any]) -> dict[str, Any]:
    """The trainer config with ``AtomicCheckpointIO`` among its plugins, unless the config names
    a ``CheckpointIO`` of its own (in ``plugins`` or on a strategy instance): Lightning's save
    could truncate the last good checkpoint (``strategies/atomic_checkpoint_io.py``)."""
    plugins = config.get("plugins")
    plugins = [] if plugins is None else plugins if isinstance(plugins, list) else [plugins]
    strategy_io = getattr(config.get("strategy"), "_checkpoint_io", None)
    if strategy_io is not None or any(isinstance(p, CheckpointIO) for p in plugins):
        return config
    return {**config, "plugins": [*plugins, AtomicCheckpointIO()]}


def check_checkpoint_model_class(ckpt_path: str, changes: list[tuple[str, Any, Any]]) -> None:
    """Exit when ``--ckpt_path`` holds another model class than the config's ``model``.

    LightningCLI builds the checkpoint's class in place of the config's, with a mere note: a
    checkpoint of another experiment then ran the wrong module on the config's data, failing
    with an unrelated error deep in a step (a cubic-Newton config) or "succeeding" with the
    wrong model (a federated config). Setting ``model.class_path`` to the checkpoint's class
    says the swap is meant.
    """
    for key, configured, saved in changes:
        if key == "class_path":
            raise SystemExit(
                f"error: --ckpt_path {ckpt_path} holds a {saved}, but the config's model is "
                f"{configured}: was it trained with another config? Pass the config of its run "
                f"(config.yaml in its run directory), or --model.class_path={saved} to use it"
            )


def check_checkpoint_fits_strategy(ckpt_path: str | None, trainer: L.Trainer) -> None:
    """Exit naming the way out when ``--ckpt_path`` is a directory the strategy cannot read:
    only FSDP loads sharded checkpoints (the others raised IsADirectoryError)."""
    if not ckpt_path or not Path(ckpt_path).is_dir():
        return
    if sharded_checkpoint_meta(ckpt_path) is None:
        raise SystemExit(f"error: --ckpt_path {ckpt_path} is a directory, not a checkpoint")
    if not isinstance(trainer.strategy, FSDPStrategy):
        raise SystemExit(
            f"error: --ckpt_path {ckpt_path} is a sharded FSDP checkpoint, which only FSDP "
            "loads: add --config configs/trainer/fsdp.yaml (on CPU also "
            "--trainer.accelerator=cpu --trainer.precision=32-true), or consolidate it into "
            "one file first: python -m lightning.pytorch.utilities.consolidate_checkpoint "
            f"{ckpt_path} --output_file {Path(ckpt_path).with_suffix('.consolidated.ckpt')}"
        )


#: The step a module must define for each evaluation subcommand (``predict`` also accepts
#: ``forward``: Lightning's default ``predict_step`` calls the module).
STEP_OF_SUBCOMMAND = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}


def check_subcommand_is_supported(subcommand: str, model: L.LightningModule) -> None:
    """Exit naming the module and the missing step, before any data is loaded or model moved
    (Lightning raises deep inside the run, and for ``predict`` blames a missing ``forward``)."""
    step = STEP_OF_SUBCOMMAND.get(subcommand)
    if step is None or is_overridden(step, model):
        return
    if subcommand == "predict" and is_overridden("forward", model):
        return
    name = type(model).__name__
    supported = [s for s, method in STEP_OF_SUBCOMMAND.items() if is_overridden(method, model)]
    raise SystemExit(
        f"error: mlo {subcommand}: {name} defines no {step}(), so it has nothing to "
        f"{subcommand}; {name} supports: {', '.join(['fit', *supported])}"
    )


def moved_path(configured: Any, saved: Any) -> bool:
    """Whether a checkpoint's saved setting is a path that does not exist here while the
    config's value for it is one that does (a moved checkpoint, or another working directory).
    A model preset's name is no path: the checkpoint's preset stays."""
    return (
        isinstance(configured, str)
        and isinstance(saved, str)
        and saved not in {*TINY_PRESETS, *PRETRAINED_PRESETS}
        and not Path(saved).exists()
        and Path(configured).exists()
    )


def plain_settings(node: Any) -> Any:
    """A (jsonargparse) config node as plain dicts and lists."""
    return node.as_dict() if hasattr(node, "as_dict") else node


def changed_settings(before: Any, after: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, before, after)`` of every configured setting that ``after`` changes.

    Dicts are compared key by key; anything else (``None`` becoming a dict included) as a whole.
    Keys the configuration did not have are not reported.
    """
    if isinstance(before, dict) and isinstance(after, dict):
        changes = []
        for key, value in before.items():
            if key in after:
                path = f"{prefix}.{key}" if prefix else str(key)
                changes += changed_settings(value, after[key], path)
        return changes
    return [] if before == after else [(prefix, before, after)]


def unused_optimizer_settings(model_config: Any, checkpoint: dict[str, Any]) -> list[str]:
    """Notes on configured optimizer settings that resuming ``checkpoint`` will not use.

    Lightning restores the optimizer's param groups (and an LR schedule's base LRs), so a
    changed ``optimizer.init_args.lr`` (or ``weight_decay``, ``betas``, ...: every setting the
    groups store) has no effect on a resumed run. A setting is named when no restored group
    holds the configured value (a group's base LR for ``lr``). Checked when the model has
    exactly one optimizer setting and the checkpoint one optimizer state (a federated module's
    local optimizers are rebuilt every round and take their settings from the config).
    """
    init_args = model_config.get("init_args", {}) if isinstance(model_config, dict) else {}
    optimizers = {
        key: value["init_args"]
        for key, value in init_args.items()
        if isinstance(value, dict) and "lr" in (value.get("init_args") or {})
    }
    states = checkpoint.get("optimizer_states") or []
    if len(optimizers) != 1 or len(states) != 1:
        return []
    (key, settings), groups = next(iter(optimizers.items())), states[0].get("param_groups", [])
    notes = []
    for name, configured in settings.items():
        if configured is None or not groups or any(name not in g for g in groups):
            continue
        restored = []
        for group in groups:
            value = group.get("initial_lr", group["lr"]) if name == "lr" else group[name]
            if not any(_same_setting(value, r) for r in restored):
                restored.append(value)
        if not all(_same_kind(configured, r) for r in restored):
            continue  # stored as something else (LionAR's rotational="blocks" -> True/False)
        if any(_same_setting(configured, r) for r in restored):
            continue
        shown = ", ".join(_shown(r) for r in sorted(restored, key=str))
        notes.append(
            f"model.init_args.{key}.init_args.{name} is {_shown(configured)} in the config, but "
            f"the resumed optimizer keeps the checkpoint's {shown} (Lightning restores its "
            "param groups)"
        )
    return notes


def _same_kind(a: Any, b: Any) -> bool:
    kinds = (bool, int | float, list | tuple, str)
    kind_of = [next((k for k in kinds if isinstance(v, k)), None) for v in (a, b)]
    return kind_of[0] is not None and kind_of[0] == kind_of[1]


def _same_setting(a: Any, b: Any) -> bool:
    """Equal as settings: numbers to float precision, lists and tuples item by item."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b, strict=True))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return not isinstance(b, bool) and math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_shown(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_paths(args: list[str]) -> list[str]:
    """The values of every ``--config PATH`` / ``--config=PATH`` in ``args``."""
    paths = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    paths += [b for a, b in pairwise(args) if a == "--config"]
    return paths


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    PyYAML (and so jsonargparse) keeps the last of two equal keys: a config that sets
    ``max_steps`` twice, e.g. after a copy-paste, silently ran with the second value.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: SafeLoader reports it itself
            if key in first_line:
                problem = f"found duplicate key {key!r} (first given on line {first_line[key]})"
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, problem, key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def check_config_syntax(args: list[str]) -> None:
    """Exit with the file's name on a YAML syntax error or a key given twice in one mapping:
    the parser's own message names only ``"<unicode string>"``, which does not say which of
    several ``--config`` files is broken, and it keeps the last of two equal keys silently."""
    for path in config_paths(args):
        file = Path(path)
        if not file.is_file():
            continue  # the parser reports missing files itself
        try:
            with file.open() as stream:  # a stream: the YAML error then names the file too
                yaml.load(stream, Loader=UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise SystemExit(f"error: --config {path}: invalid YAML: {err}") from err


def main(args: list[str] | None = None) -> MloCLI:
    """Entry point of the ``mlo`` console script; ``args`` defaults to ``sys.argv[1:]``."""
    # Tokenizers' thread pool and the DataLoader workers forked later do not mix (it warns and
    # turns itself off in every worker); set here, not at import, so importing leaves it alone.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_config_syntax(sys.argv[1:] if args is None else args)
    return MloCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=DEFAULT_SEED,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=SaveRunConfig,
        parser_kwargs={"default_env": False},
        args=args,
    )


def run() -> None:
    """Console-script entry point: like ``main`` but returns nothing (exit status 0 on success).

    A run ended by SIGTERM exits with status 143 (Lightning's exception is a bare SystemExit). An
    exception raised while building a configured class reaches the user wrapped by
    jsonargparse in "Does not validate against any of the Union subtypes" plus a dump of the
    whole resolved namespace; ``run`` prints the original traceback and ends with one line
    naming the class and the original error instead.
    """
    try:
        main()
    except SIGTERMException:
        # Raised after the on-exception checkpoint (callbacks/graceful_stop.py, or Lightning's
        # own handling), it is a bare SystemExit: the run exited with status 0, as if finished. 128 + 15 is
        # what a shell reports for a process ended by SIGTERM: job scripts see a failure.
        raise SystemExit(128 + signal.SIGTERM) from None
    except DivergedRunError as err:
        raise SystemExit(f"error: {err}") from None  # the message says what was kept
    except ValueError as err:
        failure = unwrap_instantiation_error(err)
        if failure is None:
            raise
        class_path, cause = failure
        traceback.print_exception(cause)
        raise SystemExit(
            f"error: building {class_path} failed: {type(cause).__name__}: {cause}"
        ) from None


def unwrap_instantiation_error(err: ValueError) -> tuple[str, BaseException] | None:
    """``(class path, original exception)`` of jsonargparse's wrapper around an exception raised
    in a configured class's ``__init__``, or ``None`` for any other ``ValueError``."""
    cause = err.__cause__
    if cause is None or not str(err).startswith("Does not validate against any of the Union"):
        return None
    # The outermost __init__ in the original traceback is the configured class's (the wrapper's
    # "Given value" may be a list of several classes, e.g. trainer.callbacks).
    for frame, _ in traceback.walk_tb(cause.__traceback__):
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
            return f"{cls.__module__}.{cls.__qualname__}", cause
    return "a configured class", cause


if __name__ == "__main__":
    run()
