"""GracefulStop: a Ctrl-C or SIGTERM during fit stops at the next step boundary, so the
on-exception checkpoint resumes exactly; a second Ctrl-C stops at once; no handler is left
behind, also after an interrupted fit (Python sessions, notebooks).

The signal is sent right after an optimizer step, before Lightning counts it: where Python's own
``KeyboardInterrupt`` made the checkpoint hold the new weights with the old step count.
"""

from __future__ import annotations

import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpoint import ModelCheckpoint
from callbacks.graceful_stop import GracefulStop
from tests.signal_testkit import SignallingRegression, fit_regression


@pytest.fixture(autouse=True)
def handlers_before():
    """The SIGINT and SIGTERM handlers before the test, put back after it whatever happened."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield before
    for signum, handler in before.items():
        signal.signal(signum, handler)


def _stopped_fit(root, module: SignallingRegression, callback=None, raises=SystemExit) -> dict:
    """Fit until the signal stops it; the on-exception checkpoint it leaves."""
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_on_exception=True, every_n_epochs=0)
    with pytest.raises(raises):  # after Lightning's on-exception save
        fit_regression(module, root, 8, [callback or GracefulStop(), saver])
    (saved,) = (root / "ckpt").glob("*.ckpt")
    return {"path": saved, **torch.load(saved, weights_only=False)}


@pytest.mark.parametrize(
    ("signal_name", "raises"), [("SIGINT", SystemExit), ("SIGTERM", SIGTERMException)]
)
def test_a_signal_after_an_optimizer_step_stops_at_the_boundary_and_resumes_exactly(
    tmp_path, signal_name, raises
):
    uninterrupted = fit_regression(SignallingRegression(), tmp_path / "reference", 8, [])
    module = SignallingRegression(3, signal_name=signal_name)
    saved = _stopped_fit(tmp_path / "cut", module, raises=raises)
    assert saved["global_step"] == 4  # the step the signal landed in, completed and counted
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["started"] == progress["processed"] == 4
    resumed = fit_regression(
        SignallingRegression(), tmp_path / "resumed", 8, [], ckpt_path=saved["path"]
    )
    assert torch.equal(resumed, uninterrupted)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    module = SignallingRegression(3, signal_name="SIGINT", times=2)
    assert _stopped_fit(tmp_path / "cut", module)["global_step"] == 3  # inside step 4


def test_no_handler_is_left_behind(tmp_path, handlers_before):
    fit_regression(SignallingRegression(), tmp_path / "finished", 2, [GracefulStop()])
    assert signal.getsignal(signal.SIGINT) is handlers_before[signal.SIGINT]
    _stopped_fit(
        tmp_path / "stopped",
        SignallingRegression(1, signal_name="SIGTERM"),
        raises=SIGTERMException,
    )
    assert signal.getsignal(signal.SIGINT) is handlers_before[signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is handlers_before[signal.SIGTERM]


def test_switched_off_leaves_python_s_handler(tmp_path):
    module = SignallingRegression(3, signal_name="SIGINT")
    saved = _stopped_fit(tmp_path / "cut", module, GracefulStop(ctrl_c=False))
    assert saved["global_step"] == 3


def test_check_interval_must_be_positive():
    with pytest.raises(ValueError, match=r"graceful_stop\.check_every_n_steps must be >= 1"):
        GracefulStop(check_every_n_steps=0)


class _RecordSigintHandler(L.Callback):
    """Appends the name of the SIGINT handler during training to ``path`` (one line a rank)."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == 1:
            with open(self.path, "a") as file:
                file.write(f"{signal.getsignal(signal.SIGINT).__name__}\n")


@pytest.mark.distributed
def test_spawned_workers_keep_the_usual_handling(tmp_path):
    """ddp_spawn workers run the fit outside Lightning's exception handling: no checkpoint
    could be written, so the callback takes no signal there (it would announce one)."""
    seen = tmp_path / "handlers.txt"
    fit_regression(
        SignallingRegression(), tmp_path, 2, [GracefulStop(), _RecordSigintHandler(seen)],
        devices=2, strategy="ddp_spawn",
    )  # fmt: skip
    assert seen.read_text().split() == ["default_int_handler"] * 2
