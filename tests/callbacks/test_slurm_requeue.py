"""SlurmRequeue: the preemption checkpoint is taken at a step boundary and resumes exactly.

The job runs under a faked SLURM environment (the variables ``srun`` sets for one task) with a
fake ``scontrol`` on PATH that records its arguments. The signal is raised right after an
optimizer step (before Lightning counts it), or in the middle of a federated full fine-tuning
round, where the module's weights hold a client's local training.
"""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.slurm_requeue import SlurmRequeue
from modules.lora_fl import FederatedLoRAModule
from modules.lora_fl_client import ClientTrainer
from tests.federated_testkit import NO_MEM, tiny_dm, tiny_module, tiny_trainer
from tests.signal_testkit import SignallingRegression, fit_regression

pytestmark = pytest.mark.usefixtures("one_thread")

LOCAL_STEPS, CLIENTS = 2, 3


def _module() -> FederatedLoRAModule:
    return tiny_module(finetune_mode="full", local_steps=LOCAL_STEPS, memorization=NO_MEM)


def _fit(module: FederatedLoRAModule, root, rounds: int, callbacks: list) -> None:
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    tiny_trainer(
        rounds, default_root_dir=root, callbacks=callbacks, enable_checkpointing=checkpoints
    ).fit(module, tiny_dm())


@pytest.fixture
def fake_slurm(slurm_env, fake_scontrol, monkeypatch):
    """One SLURM task, job 4242; ``scontrol`` writes its arguments to ``scontrol.log``."""
    bin_dir, log = fake_scontrol
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def _signal_during_local_step(monkeypatch, call: int) -> None:
    """Send SIGUSR1 to this process from inside the ``call``-th local loss evaluation."""
    original, calls = ClientTrainer.loss, [0]

    def loss(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClientTrainer, "loss", loss)


def test_signal_mid_round_saves_after_the_round_and_the_requeued_job_resumes_exactly(
    tmp_path, monkeypatch, fake_slurm
):
    reference_dir = tmp_path / "reference"
    every_round = ModelCheckpoint(dirpath=reference_dir, every_n_train_steps=1, save_top_k=-1)
    reference = _module()
    _fit(reference, reference_dir, rounds=3, callbacks=[every_round])

    job_dir = tmp_path / "job"
    # Round 2, second client, second local step: the weights are that client's, not global.
    _signal_during_local_step(monkeypatch, call=CLIENTS * LOCAL_STEPS + LOCAL_STEPS + 2)
    preempted = _module()
    _fit(preempted, job_dir, rounds=3, callbacks=[SlurmRequeue()])
    assert fake_slurm.read_text().split() == ["requeue", "4242"]
    (hpc,) = job_dir.glob("hpc_ckpt_*.ckpt")
    saved = torch.load(hpc, weights_only=False)
    assert saved["global_step"] == 2  # after round 2, not inside it
    (after_round_2,) = reference_dir.glob("*step=2.ckpt")
    expected = torch.load(after_round_2, weights_only=False)["state_dict"]
    for name, tensor in expected.items():
        assert torch.equal(saved["state_dict"][name], tensor), name


def test_requeued_job_resumes_from_the_checkpoint_bit_identically(
    tmp_path, monkeypatch, fake_slurm
):
    uninterrupted = _module()
    _fit(uninterrupted, tmp_path / "reference", rounds=4, callbacks=[])

    job_dir = tmp_path / "job"
    with monkeypatch.context() as patch:
        _signal_during_local_step(patch, call=LOCAL_STEPS + 2)  # round 1, second client, step 2
        # A real requeue kills this job soon after the save: its later rounds are lost.
        _fit(_module(), job_dir, rounds=2, callbacks=[SlurmRequeue()])
    assert [p.name for p in job_dir.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    # The requeued job: same command, same directory; Lightning finds the hpc checkpoint itself.
    resumed = _module()
    _fit(resumed, job_dir, rounds=4, callbacks=[SlurmRequeue()])
    assert torch.equal(resumed.flat_server_state(), uninterrupted.flat_server_state())


def test_outside_slurm_the_signal_is_left_alone(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    callback = SlurmRequeue()
    before = signal.getsignal(signal.SIGUSR1)
    _fit(_module(), tmp_path, rounds=1, callbacks=[callback])
    assert signal.getsignal(signal.SIGUSR1) == before
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))


def test_handler_is_restored_after_fit(tmp_path, fake_slurm):
    before = signal.getsignal(signal.SIGUSR1)
    _fit(_module(), tmp_path, rounds=1, callbacks=[SlurmRequeue()])
    assert signal.getsignal(signal.SIGUSR1) == before


def test_check_interval_must_be_positive():
    with pytest.raises(ValueError, match="check_every_n_steps must be >= 1, got 0"):
        SlurmRequeue(check_every_n_steps=0)


class _ArmedWithoutSlurm(SlurmRequeue):
    """Answers SIGUSR1 without a SLURM environment: ddp_spawn cannot fake one per rank."""

    def signals_to_answer(self, trainer: L.Trainer) -> tuple[int, ...]:
        return (signal.SIGUSR1,)


def test_signal_after_an_optimizer_step_is_not_replayed_on_resume(tmp_path, fake_slurm):
    """Caught between ``optimizer.step()`` and the loop's counters, Lightning's own handler saves
    updated weights with the old step count, and the resumed run applies that batch twice."""
    uninterrupted = fit_regression(SignallingRegression(), tmp_path / "reference", 8, [])
    job_dir = tmp_path / "job"
    fit_regression(SignallingRegression(signal_step=3), job_dir, 6, [SlurmRequeue()])
    (hpc,) = job_dir.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, weights_only=False)["global_step"] == 4
    resumed = fit_regression(SignallingRegression(), job_dir, 8, [SlurmRequeue()])
    assert torch.equal(resumed, uninterrupted)


class DivergesThenSignals(SignallingRegression):
    """The weights turn NaN with the optimizer step that also sends SIGUSR1."""

    def optimizer_step(self, *args, **kwargs) -> None:
        if self.global_step == self.signal_step:
            with torch.no_grad():
                self.layer.weight.fill_(float("nan"))
        super().optimizer_step(*args, **kwargs)


def test_a_diverged_run_is_neither_saved_nor_requeued(tmp_path, fake_slurm):
    # Saving would make the requeued job resume NaN weights (and be preempted again, forever).
    with pytest.warns(UserWarning, match=r"step 4: the trainable weights are not finite"):
        fit_regression(DivergesThenSignals(signal_step=3), tmp_path, 6, [SlurmRequeue()])
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert not fake_slurm.exists() or not fake_slurm.read_text()


@pytest.mark.distributed
def test_ranks_agree_on_a_signal_only_one_of_them_received(tmp_path, fake_slurm, monkeypatch):
    """Every rank saves at the same step (a rank saving alone would wait in its barrier)."""
    monkeypatch.delenv("SLURM_NTASKS")  # SLURM detection off; the job id stays for scontrol
    fit_regression(
        SignallingRegression(signal_step=2, signal_rank=1), tmp_path, 6, [_ArmedWithoutSlurm()],
        devices=2, strategy="ddp_spawn",
    )  # fmt: skip
    (hpc,) = tmp_path.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, weights_only=False)["global_step"] == 3
    assert fake_slurm.read_text().split() == ["requeue", "4242"]  # once, by rank 0
