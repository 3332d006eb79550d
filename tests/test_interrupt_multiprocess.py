"""Ctrl-C in a 2-process ``mlo fit`` (popen DDP over gloo), sent to rank 0 alone in the middle of
a step, as ``kill -INT <pid>`` does: both ranks stop at the same step boundary, save the
on-exception checkpoint together and exit. (Python's own ``KeyboardInterrupt`` on rank 0 alone
left it waiting in the save's barrier while rank 1 waited in the next gradient all-reduce.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_to_rank_0_alone_stops_both_ranks_at_the_next_step_boundary(tmp_path, repo_root):
    command = [
        sys.executable, "cli.py", "fit", "--config", "configs/quickstart.yaml",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.max_steps=12", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--model.init_args.model=micro-llama",
        "--data.init_args.block_size=32", "--data.init_args.batch_size=4",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks+=tests.slurm_signal_callback.SignalAtStep",
        "--trainer.callbacks.step=5", "--trainer.callbacks.signal_name=SIGINT",
        "--trainer.callbacks.hook=on_before_optimizer_step", "--trainer.callbacks.rank=0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    run = subprocess.Popen(
        command, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output = run.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail(f"hung after the Ctrl-C: {run.communicate()[0][-3000:]}")
    assert run.returncode == 1, output[-3000:]  # Lightning's exit after a KeyboardInterrupt
    assert "Ctrl-C: stopping after this training step" in output
    (saved,) = tmp_path.glob("quickstart/version_*/checkpoints/step*.ckpt")
    checkpoint = torch.load(saved, weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 6  # step 6 finished on both ranks, then the save
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["started"] == progress["processed"] == 6
