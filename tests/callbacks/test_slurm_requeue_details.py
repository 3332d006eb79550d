"""SlurmRequeue details: the array-job id, the ``scontrol`` failures, ``auto_requeue=False``, a
second preemption's checkpoint file."""

from __future__ import annotations

import signal

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

import callbacks.slurm_requeue as slurm_requeue
from callbacks.slurm_requeue import SlurmRequeue, requeue_slurm_job, slurm_job_id
from tests.signal_testkit import SignallingRegression, fit_regression

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_array_task_is_requeued_as_array_job_underscore_task(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "107")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "100_7"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert slurm_job_id() == "107"


def _scontrol(tmp_path, monkeypatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(script)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_a_failing_scontrol_is_reported(tmp_path, monkeypatch):
    _scontrol(tmp_path, monkeypatch, "#!/bin/sh\necho 'Invalid job id' >&2\nexit 3\n")
    with pytest.warns(UserWarning, match=r"not requeued: `scontrol requeue` exited 3: Invalid"):
        assert requeue_slurm_job("4242") is False


def test_a_missing_scontrol_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.warns(UserWarning, match=r"SLURM job 4242 not requeued: no `scontrol` on PATH"):
        assert requeue_slurm_job("4242") is False


def test_a_working_scontrol_succeeds(tmp_path, monkeypatch):
    _scontrol(tmp_path, monkeypatch, "#!/bin/sh\nexit 0\n")
    assert requeue_slurm_job("4242") is True


@pytest.mark.parametrize(("auto_requeue", "answered"), [(True, (signal.SIGUSR1,)), (False, ())])
def test_auto_requeue_off_leaves_the_signal_alone(slurm_env, auto_requeue, answered):
    trainer = L.Trainer(accelerator="cpu", logger=False,
                        plugins=[SLURMEnvironment(auto_requeue=auto_requeue)])  # fmt: skip
    assert SlurmRequeue().signals_to_answer(trainer) == answered


def test_a_second_preemption_writes_the_next_hpc_checkpoint(tmp_path, slurm_env, monkeypatch):
    monkeypatch.setattr(slurm_requeue, "requeue_slurm_job", lambda job_id: True)
    fit_regression(SignallingRegression(signal_step=1), tmp_path, 6, [SlurmRequeue()])
    # The requeued job resumes from hpc_ckpt_1 (step 2) and is preempted again after step 3.
    fit_regression(SignallingRegression(signal_step=3), tmp_path, 6, [SlurmRequeue()])
    names = sorted(p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert names == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    steps = [torch.load(tmp_path / n, weights_only=False)["global_step"] for n in names]
    assert steps == [2, 4]
