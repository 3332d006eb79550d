"""The cubic-Newton YAML configs run through the real ``mlo`` entry point."""

import json
from pathlib import Path

import pytest

from cli import main

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(config: str, tmp_path: Path, *extra: str):
    return main(
        [
            "fit",
            "--config",
            config,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *QUIET,
            *extra,
        ]
    )


def test_saddle_config_escapes_through_mlo_fit(tmp_path):
    cli = _fit("configs/cubic_newton/saddle.yaml", tmp_path)
    x = cli.model.model.x.detach()
    assert 0.95 <= abs(float(x[0])) <= 1.05
    assert float(cli.trainer.callback_metrics["val/lambda_min"]) > 0
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert (
        metrics["metrics"]["val/lambda_min"] > 0 and "train/solver_residual" in metrics["metrics"]
    )


@pytest.mark.parametrize(
    "config",
    [
        "configs/cubic_newton/nonconvex_logreg.yaml",
        pytest.param("configs/cubic_newton/convex_reg_newton.yaml", marks=pytest.mark.slow),
        pytest.param("configs/cubic_newton/breast_cancer_hvp.yaml", marks=pytest.mark.slow),
    ],
)
def test_configs_fit_a_few_steps(tmp_path, config):
    cli = _fit(config, tmp_path, "--trainer.max_steps=6", "--trainer.val_check_interval=3")
    assert cli.trainer.global_step == 6
    assert float(cli.trainer.callback_metrics["val/grad_norm"]) > 0
