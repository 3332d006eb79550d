"""An exception on one rank of a 2-process DDP run ends the run (it used to hang in the
on-exception checkpoint's barrier until the process group's timeout, 30 minutes with gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/fo_maml/sinusoid.yaml"])
def test_an_exception_on_one_rank_fails_the_run_instead_of_hanging(tmp_path, repo_root, config):
    # quickstart names a ModelCheckpoint with save_on_exception; sinusoid gets mlo's default one.
    command = [
        sys.executable, "cli.py", "fit", "--config", config, "--trainer.strategy=ddp",
        "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_steps=6",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks+=tests.rank_failure_callback.RaiseOnRank",
    ]  # fmt: skip
    if config == "configs/quickstart.yaml":
        command += ["--model.init_args.model=micro-llama", "--data.init_args.block_size=32",
                    "--data.init_args.batch_size=4"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode != 0
    assert "failure on rank 1 only" in done.stdout + done.stderr
    assert "no on-exception checkpoint in a 2-process run" in done.stdout + done.stderr
