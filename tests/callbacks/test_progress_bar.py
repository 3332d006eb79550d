import io
import re

import lightning as L
import pytest
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.progress_bar import RunProgressBar
from cli import main
from tests.test_cli import FAST


def _bar_text(tmp_path, **trainer_kwargs):
    console = io.StringIO()
    bar = RunProgressBar(console_kwargs={"file": console, "force_terminal": True, "width": 160})
    trainer = L.Trainer(
        accelerator="cpu", limit_val_batches=1, default_root_dir=tmp_path, callbacks=[bar],
        enable_model_summary=False, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(BoringModel())
    return console.getvalue()


def test_a_step_driven_run_reads_epoch_without_a_negative_total(tmp_path):
    text = _bar_text(tmp_path, max_steps=3)
    assert "Epoch 0" in text and "/-2" not in text
    # The logger version reads as the integer it is (Lightning's rich bar showed 0.000).
    assert re.search(r"v_num: 0(?![.\d])", text) and "v_num: 0.000" not in text


def test_an_epoch_driven_run_keeps_lightnings_total(tmp_path):
    text = _bar_text(tmp_path, max_epochs=2, limit_train_batches=2)
    assert "Epoch 1/1" in text


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], RunProgressBar),
        (["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], TQDMProgressBar),
        (["--trainer.enable_progress_bar=false"], type(None)),
    ],
)
def test_mlo_uses_the_fixed_bar_unless_the_config_chooses(tmp_path, extra, expected):
    args = ["fit", *FAST, "--trainer.enable_progress_bar=true", "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0", f"--trainer.logger.init_args.save_dir={tmp_path}",
            *extra]  # fmt: skip
    cli = main(args)
    assert type(cli.trainer.progress_bar_callback) is expected
