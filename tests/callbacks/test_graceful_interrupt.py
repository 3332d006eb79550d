"""GracefulInterrupt: a Ctrl-C during fit stops at the next step boundary, so the on-exception
checkpoint resumes exactly; a second Ctrl-C stops at once.

The SIGINT is sent right after an optimizer step, before Lightning counts it: where Python's own
``KeyboardInterrupt`` made the checkpoint hold the new weights with the old step count.
"""

from __future__ import annotations

import signal

import pytest
import torch

from callbacks.checkpoint import ModelCheckpoint
from callbacks.graceful_interrupt import GracefulInterrupt
from tests.signal_testkit import SignallingRegression, fit_regression


@pytest.fixture(autouse=True)
def sigint_handler_restored():
    """Lightning ignores SIGINT after a KeyboardInterrupt (for its shutdown): undo that here."""
    before = signal.getsignal(signal.SIGINT)
    yield before
    signal.signal(signal.SIGINT, before)


def _interrupted_fit(root, module: SignallingRegression, steps: int = 8) -> dict:
    """Fit until the Ctrl-C; the on-exception checkpoint it leaves."""
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_on_exception=True, every_n_epochs=0)
    with pytest.raises(SystemExit):  # Lightning's answer to a KeyboardInterrupt, after saving
        fit_regression(module, root, steps, [GracefulInterrupt(), saver])
    (saved,) = (root / "ckpt").glob("*.ckpt")
    return {"path": saved, **torch.load(saved, weights_only=False)}


def test_ctrl_c_after_an_optimizer_step_stops_at_the_boundary_and_resumes_exactly(tmp_path):
    uninterrupted = fit_regression(SignallingRegression(), tmp_path / "reference", 8, [])
    saved = _interrupted_fit(tmp_path / "cut", SignallingRegression(3, signal_name="SIGINT"))
    assert saved["global_step"] == 4  # the step the signal landed in, completed and counted
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["started"] == progress["processed"] == 4
    resumed = fit_regression(
        SignallingRegression(), tmp_path / "resumed", 8, [], ckpt_path=saved["path"]
    )
    assert torch.equal(resumed, uninterrupted)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    saved = _interrupted_fit(
        tmp_path / "cut", SignallingRegression(3, signal_name="SIGINT", times=2)
    )
    assert saved["global_step"] == 3  # inside step 4: not counted


def test_the_handler_is_restored_after_fit(tmp_path, sigint_handler_restored):
    fit_regression(SignallingRegression(), tmp_path, 2, [GracefulInterrupt()])
    assert signal.getsignal(signal.SIGINT) is sigint_handler_restored


def test_disabled_leaves_python_s_handler(tmp_path):
    callback = GracefulInterrupt(enabled=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "off", save_on_exception=True, every_n_epochs=0)
    with pytest.raises(SystemExit):
        fit_regression(
            SignallingRegression(3, signal_name="SIGINT"), tmp_path, 8, [callback, saver]
        )
    (off,) = (tmp_path / "off").glob("*.ckpt")
    assert torch.load(off, weights_only=False)["global_step"] == 3


def test_check_interval_must_be_positive():
    with pytest.raises(ValueError, match=r"graceful_interrupt\.check_every_n_steps must be >= 1"):
        GracefulInterrupt(check_every_n_steps=0)
