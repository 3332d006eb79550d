"""Every argument a user can set from YAML is typed and documented.

DESIGN.md's contract: "every argument is typed and documented so ``--print_config`` and
``--help`` explain it". ``mlo fit --model.help X`` shows what jsonargparse reads from the
signature and the docstring (via ``docstring_parser``), so this test asks jsonargparse itself,
for every configurable class of the project: the public Lightning parts, optimizers and LR
schedules in the packages, and every project class a config names by ``class_path``
(``nn.Module`` problems, networks, settings dataclasses, ...). Parameters inherited from a
Lightning or torch base class (``DDPStrategy``'s ``accelerator``, ...) are theirs to document.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch
from jsonargparse._parameter_resolvers import get_signature_parameters
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.strategies import Strategy

PACKAGES = ("modules", "datamodules", "callbacks", "strategies", "optim")
CONFIGURABLE_BASES = (
    LightningModule,
    LightningDataModule,
    Callback,
    Strategy,
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LRScheduler,
)
# Arguments a Lightning or torch API passes in, never a config (e.g. an optimizer's params).
PASSED_BY_FRAMEWORK = {"params", "optimizer"}


def _project_classes() -> dict[str, type]:
    found = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package_name}.{info.name}")
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and not name.startswith("_"):
                    found[f"{module.__name__}.{name}"] = cls
    return found


def _class_paths_in_configs(repo_root: Path) -> set[str]:
    paths = set()
    for config in (repo_root / "configs").rglob("*.yaml"):
        paths.update(re.findall(r"class_path:\s*([\w.]+)", config.read_text()))
    return paths


def _configurable(repo_root: Path) -> list[str]:
    classes = _project_classes()
    named_in_configs = _class_paths_in_configs(repo_root)
    chosen = {
        path
        for path, cls in classes.items()
        if issubclass(cls, CONFIGURABLE_BASES) or path in named_in_configs
    }
    return sorted(chosen)


REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGURABLE = _configurable(REPO_ROOT)


def test_the_sweep_covers_the_project():
    # A guard against the collection silently finding nothing (e.g. a package renamed).
    for expected in (
        "modules.causal_lm.CausalLMModule",
        "datamodules.text.TextDataModule",
        "callbacks.hyperinf.HyperINFCallback",
        "strategies.fsdp.HFFSDPStrategy",
        "optim.lion.LionA",
        "optim.schedules.Trapezoidal",
        "datamodules.cubic_problems.LinearModel",
        "modules.meta_nets.Conv1dNet",
    ):
        assert expected in CONFIGURABLE
    assert len(CONFIGURABLE) >= 40


def _undocumented(cls: type) -> list[str]:
    problems = []
    for param in get_signature_parameters(cls):
        defined_in = getattr(param.component, "__module__", "") or ""
        if param.name in PASSED_BY_FRAMEWORK or defined_in.split(".")[0] not in PACKAGES:
            continue
        if param.annotation is inspect.Parameter.empty:
            problems.append(f"{param.name}: no type annotation")
        if not (param.doc or "").strip():
            problems.append(f"{param.name}: no description in the docstring's Args section")
    return problems


@pytest.mark.parametrize("class_path", CONFIGURABLE)
def test_every_argument_is_typed_and_documented(class_path):
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    problems = _undocumented(cls)
    assert not problems, f"{class_path}: " + "; ".join(problems)


def test_the_check_catches_a_missing_description():
    class Undocumented(torch.optim.Optimizer):
        """An optimizer whose docstring forgets an argument.

        Args:
            params: parameters.
            lr: learning rate.
        """

        def __init__(self, params, lr: float = 0.1, momentum=0.9):
            super().__init__(params, {"lr": lr, "momentum": momentum})

    # Where the check looks to tell the project's arguments from inherited ones.
    Undocumented.__init__.__module__ = "optim.example"
    assert _undocumented(Undocumented) == [
        "momentum: no type annotation",
        "momentum: no description in the docstring's Args section",
    ]
