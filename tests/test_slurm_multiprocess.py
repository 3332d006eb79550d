"""A 2-task SLURM job simulated on one machine: two ``mlo fit`` processes with the variables
``srun`` sets, real DDP (gloo), the requeue signal in the middle of a step on both tasks, then the
requeued job (same command, same directory) resumes and ends bit-identical to a job that was
never signalled. ``scontrol`` is a fake on PATH that records its arguments."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed

FIT = [
    "fit", "--config", "configs/quickstart.yaml", "--trainer.strategy=ddp", "--trainer.devices=2",
    "--trainer.accelerator=cpu", "--trainer.max_steps=12", "--trainer.val_check_interval=6",
    "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
    "--model.init_args.model=micro-llama", "--data.init_args.block_size=32",
    "--data.init_args.batch_size=4",
]  # fmt: skip


def _srun(repo_root, root, env, port: int, extra=()) -> None:
    """Both tasks of the job step, like ``srun --ntasks=2`` on one node."""
    args = [
        *FIT,
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
    ]
    env = {**env, "MASTER_PORT": str(port)}
    tasks = []
    for rank in (0, 1):
        task_env = {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
        command = [sys.executable, "cli.py", *args, *extra]
        output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        tasks.append(subprocess.Popen(command, cwd=repo_root, env=task_env, **output))
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    for task, output in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, output[-3000:]


def _final_weights(root) -> dict[str, torch.Tensor]:
    (path,) = sorted(root.glob("quickstart/version_*/checkpoints/step12.ckpt"))[-1:]
    return torch.load(path, weights_only=False, map_location="cpu")["state_dict"]


def test_a_signalled_two_task_job_is_requeued_and_resumes_exactly(
    tmp_path, repo_root, fake_scontrol, free_port
):
    bin_dir, log = fake_scontrol
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
        SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NODEID="0", SLURM_JOB_ID="4343",
        SLURM_JOB_NAME="mlo-test", SLURM_NODELIST="localhost", SLURM_JOB_NUM_NODES="1",
    )  # fmt: skip

    _srun(repo_root, tmp_path / "never_signalled", env, free_port())
    job = tmp_path / "job"
    signal_at_5 = [
        "--trainer.callbacks+=tests.slurm_signal_callback.SignalAtStep",
        "--trainer.callbacks.step=5",
    ]
    # A real requeue would end this job after the save.
    _srun(repo_root, job, env, free_port(), signal_at_5)
    (hpc,) = job.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, weights_only=False, map_location="cpu")["global_step"] == 6
    assert log.read_text().split() == ["requeue", "4343"]  # once, by rank 0

    _srun(repo_root, job, env, free_port())  # the requeued job: same command, same directory
    expected, resumed = _final_weights(tmp_path / "never_signalled"), _final_weights(job)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
