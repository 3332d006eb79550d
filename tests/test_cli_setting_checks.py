"""cli.py helpers: missing config files left to the parser, changed settings with keys the
checkpoint lacks, equal settings, a predict-by-forward module."""

from __future__ import annotations

import lightning as L
import torch

from cli import (
    _same_kind,
    _same_setting,
    changed_settings,
    check_config_syntax,
    check_subcommand_is_supported,
)


def test_a_missing_config_file_is_left_to_the_parser(tmp_path):
    check_config_syntax(["fit", "--config", str(tmp_path / "missing.yaml")])  # no exception


def test_keys_the_checkpoint_lacks_are_no_change():
    before = {"model": "micro-llama", "lora": {"r": 4, "alpha": 8}}
    after = {"model": "micro-llama", "lora": {"r": 8}}
    assert changed_settings(before, after) == [("lora.r", 4, 8)]


def test_numbers_are_equal_to_float_precision_and_booleans_are_not_numbers():
    assert _same_setting(0.1 + 0.2, 0.3)
    assert _same_setting([0.9, 0.1 + 0.2], (0.9, 0.3))
    assert not _same_setting(1, True) and not _same_setting(1.0, True)
    assert not _same_kind(True, 1.0) and _same_kind(1, 2.5) and _same_kind(True, False)


class ForwardOnly(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def forward(self, x):
        return self.layer(x)


def test_a_module_with_forward_predicts():
    check_subcommand_is_supported("predict", ForwardOnly())  # Lightning's predict_step calls it
