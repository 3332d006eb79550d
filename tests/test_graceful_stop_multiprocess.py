"""Ctrl-C and SIGTERM in a 2-process ``mlo fit`` (popen DDP over gloo), in the middle of a step:
both ranks stop at the same step boundary, save the on-exception checkpoint together and exit.

- SIGINT to rank 0 alone (``kill -INT <pid>``): Python's own ``KeyboardInterrupt`` left rank 0
  waiting in the save's barrier while rank 1 waited in the next gradient all-reduce.
- SIGTERM to every process (``kill -TERM -<pgid>``, systemd, ``scancel``): Lightning 2.6's
  handler broadcast from inside the handler, and rank 1 (signalled twice: once more by rank 0,
  which forwards it) hung.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    ("signal_name", "ranks", "status", "announced"),
    [("SIGINT", ["--trainer.callbacks.rank=0"], 1, "Ctrl-C"), ("SIGTERM", [], 143, "SIGTERM")],
)
def test_a_signal_stops_both_ranks_at_the_next_step_boundary(
    tmp_path, repo_root, free_port, signal_name, ranks, status, announced
):
    command = [
        sys.executable, "cli.py", "fit", "--config", "configs/quickstart.yaml",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.max_steps=12", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--model.init_args.model=micro-llama",
        "--data.init_args.block_size=32", "--data.init_args.batch_size=4",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks+=tests.slurm_signal_callback.SignalAtStep",
        "--trainer.callbacks.step=5", f"--trainer.callbacks.signal_name={signal_name}",
        "--trainer.callbacks.hook=on_before_optimizer_step", *ranks,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    run = subprocess.Popen(
        command, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output = run.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail(f"hung after the {signal_name}: {run.communicate()[0][-3000:]}")
    assert run.returncode == status, output[-3000:]
    assert f"{announced}: stopping after this training step" in output
    (saved,) = tmp_path.glob("quickstart/version_*/checkpoints/step*.ckpt")
    checkpoint = torch.load(saved, weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 6  # step 6 finished on both ranks, then the save
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["started"] == progress["processed"] == 6
