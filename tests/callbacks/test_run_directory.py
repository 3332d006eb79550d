"""Each run gets its own ``version_<n>`` directory, also when several start at the same moment
(a SLURM array job, a sweep): Lightning's listing gave them all the same one, and all but one
stopped at set-up after writing event files into the other's directory."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from callbacks.run_config import reserve_next_version
from tests.test_cli import FAST


def test_the_next_version_directory_is_created_and_pinned(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    reserve_next_version(logger)
    assert logger.version == 0 and (tmp_path / "run" / "version_0").is_dir()
    reserve_next_version(logger)  # pinned now: nothing more
    second = CSVLogger(tmp_path, name="run")
    reserve_next_version(second)
    assert second.version == 1 and (tmp_path / "run" / "version_1").is_dir()


def test_a_version_taken_after_the_listing_is_skipped(tmp_path, monkeypatch):
    logger = TensorBoardLogger(tmp_path, name="run")
    (tmp_path / "run" / "version_0").mkdir(parents=True)  # by a run that listed at the same time
    monkeypatch.setattr(logger, "_get_next_version", lambda: 0)
    reserve_next_version(logger)
    assert logger.version == 1


def test_a_named_version_and_other_ranks_are_left_alone(tmp_path, monkeypatch):
    named = TensorBoardLogger(tmp_path, name="run", version="demo")
    reserve_next_version(named)
    assert named.version == "demo" and not (tmp_path / "run").exists()
    monkeypatch.setenv("NODE_RANK", "1")  # the first process of another node
    reserve_next_version(TensorBoardLogger(tmp_path, name="run"))
    assert not (tmp_path / "run").exists()


def test_runs_started_together_each_get_their_own_directory(tmp_path, repo_root):
    command = [sys.executable, "cli.py", "fit", *FAST, "--trainer.max_steps=2",
               "--trainer.val_check_interval=2", f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen([*command, f"--seed_everything={seed}"], cwd=repo_root, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for seed in (1, 2)
    ]  # fmt: skip
    for run in runs:
        output = run.communicate(timeout=300)[0]
        assert run.returncode == 0, output[-3000:]
    configs = sorted((tmp_path / "quickstart").glob("version_*/config.yaml"))
    assert [c.parent.name for c in configs] == ["version_0", "version_1"]
    assert sorted(yaml.safe_load(c.read_text())["seed_everything"] for c in configs) == [1, 2]
    for config in configs:
        assert len(list(config.parent.glob("events.out.tfevents.*"))) == 1
