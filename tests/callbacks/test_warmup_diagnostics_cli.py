"""The configs/warmup/*.yaml arms run through the ``mlo`` CLI with the diagnostics callback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import main
from optim.lion import LionA, LionAR

CONFIGS = ["adamw_warmup", "adamw_no_warmup", "lion", "lionar", "lionar_nesterov", "liona_rrc"]


def _fit(repo_root: Path, tmp_path: Path, name: str):
    args = [
        "fit",
        "--config",
        str(repo_root / "configs" / "warmup" / f"{name}.yaml"),
        "--trainer.max_steps=4",
        "--trainer.limit_val_batches=0",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=4",
        "--model.init_args.model=micro-llama",
        f"--metrics_file.filename={tmp_path / 'metrics.json'}",
    ]
    return main(args)


def _scalar_tags(tmp_path: Path) -> set[str]:
    (event_file,) = tmp_path.rglob("events.out.tfevents*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.parametrize(
    "name", ["lionar_nesterov", pytest.param("liona_rrc", marks=pytest.mark.slow)]
)
def test_warmup_configs_run_from_yaml(
    repo_root: Path, tmp_path: Path, monkeypatch, name: str
) -> None:
    monkeypatch.chdir(repo_root)
    torch.set_num_threads(1)
    cli = _fit(repo_root, tmp_path, name)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, LionAR if name.startswith("lionar") else LionA)
    if isinstance(opt, LionAR):  # the default rotational set: the matrices of the blocks only
        rotating = [n for g in opt.param_groups if g["rotational"] for n in g["param_names"]]
        assert rotating and all(".layers." in n for n in rotating), rotating
    tags = _scalar_tags(tmp_path)
    assert {"warmup/global/angle", "warmup/global/update_norm", "warmup/snr/trace_sigma"} <= tags
    assert any(t.startswith("warmup/rrc/") for t in tags)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_warmup_config_runs(repo_root: Path, tmp_path: Path, monkeypatch, name: str) -> None:
    monkeypatch.chdir(repo_root)
    _fit(repo_root, tmp_path, name)
    assert "warmup/global/angle" in _scalar_tags(tmp_path)
