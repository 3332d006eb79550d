"""``--trainer.fast_dev_run`` writes no run files, like Lightning's own logs and checkpoints.

Without a logger the project's writers fell back to ``default_root_dir`` (the working
directory by default): a dev run left ``metrics.json``, ``checkpoints/last.ckpt`` and
``hf_model/`` in the checkout, over the previous dev run's.
"""

import pytest

from cli import main
from tests.test_cli import FAST


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_a_dev_fit_and_predict_leave_no_files(tmp_path, caplog):
    root = tmp_path / "root"
    cli = main(["fit", *FAST, "--trainer.fast_dev_run=true",
                f"--trainer.default_root_dir={root}"])  # fmt: skip
    assert cli.trainer.global_step == 1
    assert not root.exists() or _files(root) == []
    with caplog.at_level("INFO"):
        main(["predict", *FAST, "--config", "configs/quickstart_predict.yaml", "--ckpt_path=null",
              "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={root}",
              "--model.init_args.generation.max_new_tokens=2"])  # fmt: skip
    assert not root.exists() or _files(root) == []
    assert "fast_dev_run: predictions.jsonl not written" in caplog.text
    assert '"prompt": "The for statement is used to"' in caplog.text  # still echoed


@pytest.mark.usefixtures("one_thread")
def test_a_dev_influence_run_writes_no_report(tmp_path):
    root = tmp_path / "root"
    cli = main(["fit", "--config", "configs/hyperinf/mislabel_gmm.yaml",
                "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={root}"])  # fmt: skip
    influence = next(c for c in cli.trainer.callbacks if hasattr(c, "table"))
    assert influence.table is not None  # computed, not written
    assert not root.exists() or _files(root) == []
